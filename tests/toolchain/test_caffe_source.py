"""The Caffe source chain of `make setup` (redseg/toolchain/caffe_source.py, tools/setup.sh).

Nothing here downloads: the "download" is a ``file://`` URL, and the real Caffe source these tests
use is the pristine copy that `make setup` keeps beside the build the tests run on
(``<build>/source.tar.gz``: the tree as fetched, before the project's patches).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tarfile
from pathlib import Path

import pytest

from redseg.fileio import file_digest
from redseg.toolchain import caffe_source as cs

REPO = Path(__file__).resolve().parents[2]


def _setup(tmp_path: Path, **env: str) -> subprocess.CompletedProcess:
    """tools/setup.sh up to the patched source only, in a private cache."""
    e = {**os.environ, "REDSEG_CACHE": str(tmp_path / "cache"), "SETUP_SOURCE_ONLY": "1", **env}
    e.pop("CAFFE_ROOT", None)
    return subprocess.run(["bash", str(REPO / "tools/setup.sh")], env=e, capture_output=True, text=True, timeout=300)


def _assert_same_sources(tree: Path, built_src: Path) -> None:
    """Every file of ``tree`` is in ``built_src`` with the same bytes (the build adds its outputs)."""
    files = [p for p in tree.rglob("*") if p.is_file() and "build" not in p.relative_to(tree).parts[:1]]
    assert len(files) > 500
    differ = [p.relative_to(tree) for p in files if (built_src / p.relative_to(tree)).read_bytes() != p.read_bytes()]
    assert differ == []


def test_digest_ignores_packing_and_build_folders_but_not_content(tmp_path):
    tree = tmp_path / "tree"
    (tree / "src").mkdir(parents=True)
    (tree / "src" / "a.cpp").write_text("int a;\n")
    (tree / "CMakeLists.txt").write_text("project(Caffe)\n")
    d0 = cs.tree_digest(tree)
    for mode in ("w:gz", "w:xz"):
        arch = tmp_path / f"t.{mode[2:]}"
        with tarfile.open(arch, mode) as tf:
            tf.add(tree, arcname="caffe-x")
        out = tmp_path / f"u-{mode[2:]}"
        with tarfile.open(arch) as tf:
            # extraction filters exist from Python 3.11.4 (Debian 12 has 3.11.2)
            tf.extractall(out, **({"filter": "data"} if hasattr(tarfile, "data_filter") else {}))
        assert cs.tree_digest(out / "caffe-x") == d0
    (tree / "build").mkdir()
    (tree / "build" / "junk.o").write_bytes(b"\0")
    assert cs.tree_digest(tree) == d0
    (tree / "src" / "a.cpp").write_text("int b;\n")
    assert cs.tree_digest(tree) != d0


def test_the_patch_set_reproduces_the_built_tree(built, pristine, tmp_path):
    tree = tmp_path / "t"
    shutil.copytree(pristine, tree)
    # built with SHARED_COL=0 or SHARED_DIFF=0? The build folder's name holds its patch set's id.
    ways = [(col, diff) for col in (True, False) for diff in (True, False)]
    shared_col, shared_diff = next(w for w in ways if f"-p{cs.patchset_id(*w)}-" in built.name)
    applied = cs.apply_patches(tree, shared_col=shared_col, shared_diff=shared_diff)
    # protobuf >= 3.21 is what every supported system has: that patch is always needed upstream.
    assert "protobuf-3.21" in applied
    assert cs.apply_patches(tree, shared_col=shared_col, shared_diff=shared_diff) == []  # idempotent
    text = (tree / "src/caffe/util/io.cpp").read_text()
    assert "SetTotalBytesLimit(kProtoReadBytesLimit)" in text
    assert "prop.clockRate" not in (tree / "src/caffe/common.cpp").read_text()
    assert "patched by Red-Seg" in (tree / "cmake/Dependencies.cmake").read_text()
    # The tree Caffe was really built from is exactly the pristine tree plus this patch set.
    _assert_same_sources(tree, built / "src")


def test_a_patch_that_does_not_fit_names_itself(pristine, tmp_path):
    tree = tmp_path / "t"
    shutil.copytree(pristine, tree)
    io = tree / "src/caffe/util/io.cpp"
    io.write_text(io.read_text().replace("SetTotalBytesLimit", "SetSomethingElse"))
    with pytest.raises(cs.SourceError, match="protobuf-3.21.*does not fit"):
        cs.apply_patches(tree)


def test_caffe_src_as_tarball_and_as_folder(built, pristine, tmp_path):
    tarball = built / "source.tar.gz"
    r = _setup(tmp_path, CAFFE_SRC=str(tarball))
    assert r.returncode == 0, r.stderr
    label = f"src-{file_digest(tarball)[:12]}"  # the cache key names the source
    src = next((tmp_path / "cache").glob(f"caffe-{label}-p{cs.patchset_id()}-cpu-py*/src"))
    assert "source ready" in r.stdout and str(src) in r.stdout
    _assert_same_sources(src, built / "src")

    folder = tmp_path / "user-caffe"
    shutil.copytree(pristine, folder)
    before = cs.tree_digest(folder)
    r = _setup(tmp_path, CAFFE_SRC=str(folder))
    assert r.returncode == 0, r.stderr
    src = next((tmp_path / "cache").glob(f"caffe-src-{before[:12]}-*/src"))
    _assert_same_sources(src, built / "src")
    assert cs.tree_digest(folder) == before  # the user's folder is copied, never patched in place


def test_corrupt_tarball_and_non_caffe_folder_are_refused(built, tmp_path):
    data = (built / "source.tar.gz").read_bytes()
    bad = tmp_path / "caffe.tar.gz"
    bad.write_bytes(data[: len(data) // 3])
    r = _setup(tmp_path, CAFFE_SRC=str(bad))
    assert r.returncode == 1
    assert f"{bad}: not a readable tar archive" in r.stderr and "truncated or corrupt" in r.stderr
    assert not list((tmp_path / "cache").glob("caffe-src-*"))  # nothing half-made is left

    other = tmp_path / "not-caffe"
    other.mkdir()
    (other / "CMakeLists.txt").write_text("project(Other)\n")
    r = _setup(tmp_path, CAFFE_SRC=str(other))
    assert r.returncode == 1 and "is not a BVLC Caffe source tree" in r.stderr


def test_download_is_checked_against_the_pinned_digest(built, pristine, tmp_path):
    url = (built / "source.tar.gz").as_uri()
    with pytest.raises(cs.SourceError, match="does not match the pinned"):
        cs.download(url, tmp_path / "a", "0" * 64)
    assert not (tmp_path / "a").exists()
    out = cs.download(url, tmp_path / "b", cs.tree_digest(pristine))
    assert cs.tree_digest(out) == cs.tree_digest(pristine)


def test_chain_tries_every_source_and_says_what_failed(built, tmp_path):
    url = (built / "source.tar.gz").as_uri()
    r = _setup(tmp_path, DEBIAN_MIRROR="file:///nonexistent/debian", REDSEG_CAFFE_URL=url, REDSEG_CAFFE_DIGEST="0" * 64)
    assert r.returncode == 1
    msg = r.stderr
    assert "Tried, in order" in msg
    assert "debian-1.0.0+git20180821.99bd997-8: could not read the bullseye source index" in msg
    assert "file:///nonexistent/debian" in msg
    assert "does not match the pinned" in msg and "refusing to build it" in msg
    assert "CAFFE_SRC=" in msg and "CAFFE_ROOT=" in msg and "DEBIAN_MIRROR=" in msg
    assert msg.index("debian-") < msg.index("bvlc-")

    # The same chain with the right digest goes through to the upstream tree.
    digest = cs.tree_digest(cs.unpack(built / "source.tar.gz", tmp_path / "ref"))
    r = _setup(tmp_path, DEBIAN_MIRROR="file:///nonexistent/debian", REDSEG_CAFFE_URL=url, REDSEG_CAFFE_DIGEST=digest)
    assert r.returncode == 0, r.stderr
    assert "/caffe-bvlc-" in r.stdout
