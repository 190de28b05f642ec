"""Where `make setup` gets BVLC Caffe's source, and the project's own patches to it.

Caffe's last release is 1.0 (2017) and its repository's last commit is from 2020, so no single
archive can be relied on to keep serving it: Debian carries it only in bullseye, Ubuntu not at
all. ``tools/setup.sh`` therefore tries a chain of sources (docs/install.md):

1. ``CAFFE_ROOT``: a Caffe the user already built (no source needed);
2. ``CAFFE_SRC``: a BVLC Caffe source folder or tarball the user has;
3. Debian's source package ``caffe`` through the system's Debian archive (or ``DEBIAN_MIRROR``);
4. the upstream repository's tarball at a pinned commit, checked against a pinned digest.

Whatever the source, one patch set (:data:`PATCHES`) makes it build with today's toolchains. The
patches are edits this project wrote, each checked after it is applied, and each recognises a
tree that already has it, so they apply to the 1.0 release, to the last upstream commit and to
Debian's tree alike.

This module is used by ``tools/setup.sh`` through its command line (``python -m
redseg.toolchain.caffe_source ...``) and needs nothing beyond the standard library and redseg.fileio.
"""

from __future__ import annotations

import argparse
import hashlib
import inspect
import logging
import os
import re
import shutil
import sys
import tarfile
import tempfile
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from redseg.fileio import file_digest

log = logging.getLogger(__name__)

# The last commit of BVLC/caffe's master (2020-02-13); Debian's 1.0.0+git20180821.99bd997 differs
# from it in README.md and a lint script only.
UPSTREAM_COMMIT = "9b891540183ddc834a02b2bd81b31afae71b2153"
UPSTREAM_URL = f"https://github.com/BVLC/caffe/archive/{UPSTREAM_COMMIT}.tar.gz"
# sha256 of the tree's *contents* (:func:`tree_digest`), not of the tarball's bytes: the hosting
# service generates its tarballs on request and does not promise byte-identical compression, while
# the files in them are fixed by the commit. Computed from a checkout of UPSTREAM_COMMIT.
UPSTREAM_DIGEST = "cd962d63c34071e50864b1b33e9598b1c0d6b82d4f4360d82c3e1369a960150d"

# Folders that are build products, not source: left out of digests and copies.
_NOT_SOURCE = {".git", "build", ".build_release", ".build_debug", "distribute"}


class SourceError(RuntimeError):
    """A Caffe source that cannot be used; the message says which and what to do."""


# --- identity of a source -----------------------------------------------------------------------
def tree_digest(root: Path) -> str:
    """sha256 over every file's relative path and content (symbolic links by their target).

    Independent of how the tree was packed (tar, gzip level, zip, a checkout), so a source can be
    pinned by what it contains. Build folders at the top (``build/`` ...) and ``.git`` are skipped.
    """
    root = Path(root)
    h = hashlib.sha256()
    entries = []
    for dirpath, dirnames, filenames in os.walk(root):
        rel_dir = Path(dirpath).relative_to(root)
        dirnames[:] = sorted(d for d in dirnames if not (d == ".git" or (rel_dir == Path(".") and d in _NOT_SOURCE)))
        for name in filenames:
            entries.append((rel_dir / name).as_posix())
        for name in dirnames:
            if (Path(dirpath) / name).is_symlink():
                entries.append((rel_dir / name).as_posix())
    for rel in sorted(entries):
        p = root / rel
        if p.is_symlink():
            h.update(f"L {rel}\0{os.readlink(p)}\n".encode())
        else:
            h.update(f"F {rel}\0{file_digest(p)}\n".encode())
    return h.hexdigest()


def check_caffe_tree(root: Path) -> str:
    """Raise unless ``root`` is a BVLC Caffe source tree; return its version (CAFFE_TARGET_VERSION)."""
    root = Path(root)
    needed = ("CMakeLists.txt", "src/caffe/proto/caffe.proto", "python/caffe/_caffe.cpp", "cmake/Dependencies.cmake")
    missing = [n for n in needed if not (root / n).is_file()]
    if missing:
        raise SourceError(
            f"{root} is not a BVLC Caffe source tree (missing {', '.join(missing)}). "
            "CAFFE_SRC must be the folder holding Caffe's CMakeLists.txt, or a tarball of it."
        )
    m = re.search(r'set\(CAFFE_TARGET_VERSION "([^"]+)"', (root / "CMakeLists.txt").read_text(errors="replace"))
    return m.group(1) if m else "unknown"


# --- getting a tree ---------------------------------------------------------------------------------
def _source_root(top: Path) -> Path:
    """The Caffe tree inside an unpacked archive: the folder itself or its single sub-folder."""
    if (top / "CMakeLists.txt").is_file():
        return top
    subs = [p for p in top.iterdir() if p.is_dir()]
    if len(subs) == 1 and (subs[0] / "CMakeLists.txt").is_file():
        return subs[0]
    return top  # check_caffe_tree names what is missing


def unpack(tarball: Path, dest: Path) -> Path:
    """Unpack ``tarball`` (any compression tar reads) into the new folder ``dest``; return the tree."""
    tarball = Path(tarball)
    if not tarball.is_file():
        raise SourceError(f"CAFFE_SRC={tarball}: no such file or folder")
    dest.mkdir(parents=True)
    try:
        with tarfile.open(tarball) as tf:
            if hasattr(tarfile, "data_filter"):  # refuses absolute paths, '..' and device files
                tf.extractall(dest, filter="data")
            else:  # pragma: no cover - Python < 3.11.4
                for m in tf.getmembers():
                    if m.name.startswith("/") or ".." in Path(m.name).parts:
                        raise SourceError(f"{tarball}: unsafe path in archive: {m.name}")
                tf.extractall(dest)
    except (tarfile.TarError, EOFError, OSError, ValueError) as e:
        raise SourceError(
            f"{tarball}: not a readable tar archive ({type(e).__name__}: {e}). "
            "The file may be truncated or corrupt: download it again."
        ) from e
    root = _source_root(dest)
    check_caffe_tree(root)
    return root


def copy_tree(src: Path, dest: Path) -> Path:
    """Copy a user's source folder (without build folders and .git): the user's files stay untouched."""
    src = Path(src)
    check_caffe_tree(src)
    shutil.copytree(src, dest, symlinks=True, ignore=lambda d, names: [n for n in names if n in _NOT_SOURCE])
    return dest


def download(url: str, dest: Path, digest: str, timeout: float = 60) -> Path:
    """Download a source tarball, unpack it into ``dest`` and check its :func:`tree_digest`.

    A mismatch is refused (the unpacked tree is deleted): a moved tag, a changed archive or a
    tampered mirror must not be built silently.
    """
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=dest.parent) as tmp:
        archive = Path(tmp) / "source.tar.gz"
        try:
            with urllib.request.urlopen(url, timeout=timeout) as r, archive.open("wb") as f:
                shutil.copyfileobj(r, f, 1 << 20)
        except (OSError, ValueError) as e:
            raise SourceError(f"could not download {url}: {e}") from e
        root = unpack(archive, Path(tmp) / "tree")
        got = tree_digest(root)
        if got != digest:
            raise SourceError(
                f"{url}: content digest {got} does not match the pinned {digest}; refusing to build it. "
                "Build from a source you trust with CAFFE_SRC=... instead."
            )
        root.rename(dest)
    return dest


# --- the patch set --------------------------------------------------------------------------------
@dataclass(frozen=True)
class Patch:
    name: str
    file: str
    why: str
    apply: Callable[[str], str | None]  # new text, or None when the tree already has the change


def _protobuf_321(text: str) -> str | None:
    if "SetTotalBytesLimit(kProtoReadBytesLimit)" in text:
        return None
    old_call = r"SetTotalBytesLimit\(\s*kProtoReadBytesLimit\s*,\s*\d+\s*\)"
    new, n = re.subn(old_call, "SetTotalBytesLimit(kProtoReadBytesLimit)", text)
    return new if n else ""


_CUDA13_FIELDS = ("clockRate", "deviceOverlap", "kernelExecTimeoutEnabled")


def _cuda13_device_query(text: str) -> str | None:
    if not any(f"prop.{f}" in text for f in _CUDA13_FIELDS):
        return None if "DeviceQuery" in text else ""
    for field in _CUDA13_FIELDS:  # the printed value becomes "n/a"; nothing else reads these fields
        text = re.sub(rf'\(prop\.{field} \? "Yes" : "No"\)|prop\.{field}', '"n/a"', text)
    return text


_BOOST_PYTHON = """    # Boost.Python (patched by Red-Seg's make setup): Boost >= 1.67 names the library after the
    # interpreter (python311); older Boost used python-py35 or python3. Exact names first.
    set(Boost_PYTHON_FOUND FALSE)
    set(_py ${PYTHON_VERSION_MAJOR}${PYTHON_VERSION_MINOR})
    foreach(_bp python${_py} python-py${_py} python${PYTHON_VERSION_MAJOR} python)
      if(NOT Boost_PYTHON_FOUND)
        find_package(Boost 1.46 QUIET COMPONENTS ${_bp})
        string(TOUPPER ${_bp} _BP)
        set(Boost_PYTHON_FOUND ${Boost_${_BP}_FOUND})
        set(_bp_found ${_bp})
      endif()
    endforeach()
    message(STATUS "Boost.Python: component ${_bp_found} found: ${Boost_PYTHON_FOUND}")
"""


def _boost_python_name(text: str) -> str | None:
    if "patched by Red-Seg" in text:
        return None
    pattern = re.compile(
        r"    # Find the matching boost python implementation\n.*?"
        r"if\(NOT Boost_PYTHON_FOUND\)\s*find_package\(Boost 1\.46 COMPONENTS python\)\s*endif\(\)\n",
        re.S,
    )
    new, n = pattern.subn(lambda _: _BOOST_PYTHON, text, count=1)
    return new if n else ""


PATCHES = (
    Patch(
        "protobuf-3.21",
        "src/caffe/util/io.cpp",
        "protobuf >= 3.18 removed the two-argument SetTotalBytesLimit (the one-argument form exists since 3.6)",
        _protobuf_321,
    ),
    Patch(
        "cuda13-device-query",
        "src/caffe/common.cpp",
        "CUDA 13 removed three cudaDeviceProp fields that Caffe::DeviceQuery only prints",
        _cuda13_device_query,
    ),
    Patch(
        "boost-python-name",
        "cmake/Dependencies.cmake",
        "Boost >= 1.67 names Boost.Python python3X; upstream looks for python-py3X and may pick another Python's",
        _boost_python_name,
    ),
)


def patchset_id() -> str:
    """A short hash of what the patches do, part of the build cache key (new patches, new build).

    It covers each patch's name, file and code and the text it inserts, not the explanations, so
    rewording a comment does not force a rebuild.
    """
    h = hashlib.sha256()
    for p in PATCHES:
        h.update(f"{p.name}\0{p.file}\0{inspect.getsource(p.apply)}".encode())
    h.update(f"{_CUDA13_FIELDS}{_BOOST_PYTHON}".encode())
    return h.hexdigest()[:8]


def apply_patches(root: Path) -> list[str]:
    """Apply :data:`PATCHES` to the tree at ``root``; return the names applied (not already there)."""
    root = Path(root)
    done = []
    for p in PATCHES:
        f = root / p.file
        if not f.is_file():
            raise SourceError(f"patch {p.name}: {f} not found; is {root} a BVLC Caffe tree?")
        new = p.apply(f.read_text())
        if new is None:
            log.info("patch %s: already in the source", p.name)
            continue
        if not new:
            raise SourceError(
                f"patch {p.name} ({p.why}) does not fit {f}: this Caffe tree differs from the 1.0 release "
                "and the last upstream commit. Please report it with the tree's origin."
            )
        f.write_text(new)
        if p.apply(new) is not None:
            raise SourceError(f"patch {p.name}: {f} still lacks the change after patching")
        done.append(p.name)
    return done


# --- command line (for tools/setup.sh) ------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m redseg.toolchain.caffe_source", description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("key", help="print a cache-key label for CAFFE_SRC (a folder or a tarball)")
    s.add_argument("src", type=Path)
    s = sub.add_parser("get", help="put CAFFE_SRC's tree (copied or unpacked) at DEST")
    s.add_argument("src", type=Path)
    s.add_argument("dest", type=Path)
    s = sub.add_parser("download", help="download the pinned upstream tree to DEST")
    s.add_argument("dest", type=Path)
    s.add_argument("--url", default=os.environ.get("REDSEG_CAFFE_URL", UPSTREAM_URL))
    s.add_argument("--digest", default=os.environ.get("REDSEG_CAFFE_DIGEST", UPSTREAM_DIGEST))
    s = sub.add_parser("patch", help="apply the project's patch set to the tree at ROOT")
    s.add_argument("root", type=Path)
    s = sub.add_parser("digest", help="print the content digest of a tree")
    s.add_argument("root", type=Path)
    sub.add_parser("patchset", help="print the patch set's id")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="setup: %(message)s")
    try:
        if args.cmd == "key":
            if args.src.is_dir():
                check_caffe_tree(args.src)
                print(f"src-{tree_digest(args.src)[:12]}")
            elif args.src.is_file():
                print(f"src-{file_digest(args.src)[:12]}")
            else:
                raise SourceError(f"CAFFE_SRC={args.src}: no such file or folder")
        elif args.cmd == "get":
            if args.dest.exists():
                raise SourceError(f"{args.dest} already exists")
            if args.src.is_dir():
                root = copy_tree(args.src, args.dest)
            else:
                work = args.dest.with_name(args.dest.name + ".unpack")
                shutil.rmtree(work, ignore_errors=True)
                root = unpack(args.src, work)
                root.rename(args.dest)
                shutil.rmtree(work, ignore_errors=True)
                root = args.dest
            print(f"Caffe {check_caffe_tree(root)} source from {args.src}", file=sys.stderr)
        elif args.cmd == "download":
            download(args.url, args.dest, args.digest)
        elif args.cmd == "patch":
            applied = apply_patches(args.root)
            print(f"patches applied: {', '.join(applied) or 'none needed'}", file=sys.stderr)
        elif args.cmd == "digest":
            print(tree_digest(args.root))
        elif args.cmd == "patchset":
            print(patchset_id())
    except SourceError as e:
        print(f"setup: ERROR: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
