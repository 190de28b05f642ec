"""The shared im2col buffer: make setup's patch (redseg/toolchain/caffe_source.py), its build switch
SHARED_COL=0 and its runtime switch REDSEG_SHARED_COL=0 (docs/install.md).

The runtime tests run real pycaffe in child processes (tests/toolchain/shared_col_child.py), one
with the shared buffer and one with a buffer per layer, and compare their numbers bit for bit:
the package's own training driver for 20 iterations of the demo schedule (losses and every
parameter's gradient after every backward pass, the test-loss net that shares the weights, the
final weights) and the deploy net's maps with those weights. A memory check makes sure the two
children really differ in what they allocate, so equal numbers mean something.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from redseg.toolchain import caffe_source as cs
from redseg.toolchain.caffe_utils import SHARED_COL_ENV, caffe_shared_col

REPO = Path(__file__).resolve().parents[2]
CHILD = Path(__file__).with_name("shared_col_child.py")
SHARED_COL_NAMES = {"shared-col-buffer-decl", "shared-col-buffer"}
CPP = "src/caffe/layers/base_conv_layer.cpp"
HPP = "include/caffe/layers/base_conv_layer.hpp"


# --- the patch in the patch set ------------------------------------------------------------------


def test_the_patch_is_in_the_default_patch_set_and_its_cache_key(monkeypatch):
    assert SHARED_COL_NAMES <= {p.name for p in cs.patch_set()}
    assert not SHARED_COL_NAMES & {p.name for p in cs.patch_set(shared_col=False)}
    assert cs.patch_set(shared_col=False, shared_diff=False) == cs.PATCHES
    assert cs.patchset_id() == cs.patchset_id(shared_col=True) != cs.patchset_id(shared_col=False)
    # The C++ the patch inserts is part of the key; the key without the patch does not depend on it
    # (it is the key of the build fixes alone, as builds made before the patch existed have).
    shared, plain = cs.patchset_id(), cs.patchset_id(shared_col=False)
    monkeypatch.setattr(cs, "_SHARED_COL_CLASS", cs._SHARED_COL_CLASS.replace("bytes > bytes_", "bytes >= bytes_"))
    assert cs.patchset_id() != shared and cs.patchset_id(shared_col=False) == plain
    monkeypatch.undo()
    for value, shared in (("0", False), ("1", True), ("", True)):
        monkeypatch.setenv("SHARED_COL", value)
        assert cs.shared_col_default() is shared
    monkeypatch.setenv("SHARED_COL", "yes")
    with pytest.raises(cs.SourceError, match="SHARED_COL=yes: give 1"):
        cs.shared_col_default()


def test_the_patch_applies_once_and_is_checked(pristine, tmp_path):
    tree = tmp_path / "t"
    shutil.copytree(pristine, tree)
    assert set(cs.apply_patches(tree)) >= SHARED_COL_NAMES
    assert cs.apply_patches(tree) == []  # recognised once applied
    cpp, hpp = (tree / CPP).read_text(), (tree / HPP).read_text()
    assert "class SharedColBuffer {" in cpp and "boost::thread_specific_ptr" in cpp
    assert 'std::getenv("REDSEG_SHARED_COL")' in cpp
    assert "BVLC/caffe pull request #2016" in cpp
    # every use of the layer's own buffer memory now goes through the accessors, GPU ones included
    assert cpp.count("col_buffer_cpu()") == 6 and cpp.count("col_buffer_gpu()") == 6  # 5 uses + the definition
    assert "col_buffer_.cpu_data()" not in cpp and "col_buffer_.gpu_data()" not in cpp
    assert "bool share_col_buffer_;" in hpp and "class SharedColBuffer;" in hpp

    plain = tmp_path / "plain"
    shutil.copytree(pristine, plain)
    assert not SHARED_COL_NAMES & set(cs.apply_patches(plain, shared_col=False))
    for f in (CPP, HPP):
        assert (plain / f).read_bytes() == (pristine / f).read_bytes()


def test_a_tree_the_patch_does_not_fit_is_refused(pristine, tmp_path):
    tree = tmp_path / "t"
    shutil.copytree(pristine, tree)
    cpp = tree / CPP
    cpp.write_text(cpp.read_text().replace("col_buffer_.cpu_data()", "col_buffer_.mutable_cpu_data()", 1))
    with pytest.raises(cs.SourceError, match="patch shared-col-buffer .*does not fit"):
        cs.apply_patches(tree)

    half = tmp_path / "half"  # patched, then one use put back by hand: not taken for patched
    shutil.copytree(pristine, half)
    cs.apply_patches(half)
    cpp = half / CPP
    cpp.write_text(cpp.read_text().replace("col_buffer_cpu()", "col_buffer_.cpu_data()", 1))
    with pytest.raises(cs.SourceError, match="shared-col-buffer .*does not fit"):
        cs.apply_patches(half)


def _setup(tmp_path: Path, **env: str) -> subprocess.CompletedProcess:
    """tools/setup.sh up to the patched source only, in a private cache."""
    e = {**os.environ, "REDSEG_CACHE": str(tmp_path / "cache"), "SETUP_SOURCE_ONLY": "1", **env}
    e.pop("CAFFE_ROOT", None)
    return subprocess.run(["bash", str(REPO / "tools/setup.sh")], env=e, capture_output=True, text=True, timeout=300)


def test_setup_shared_col_0_is_a_build_of_its_own(built, tmp_path):
    tarball = str(built / "source.tar.gz")
    for value, shared in (("0", False), ("1", True)):
        r = _setup(tmp_path, CAFFE_SRC=tarball, SHARED_COL=value)
        assert r.returncode == 0, r.stderr
        src = next((tmp_path / "cache").glob(f"caffe-src-*-p{cs.patchset_id(shared)}-cpu-py*/src"))
        assert ("Red-Seg shared im2col buffer" in (src / CPP).read_text()) is shared
    assert len(list((tmp_path / "cache").glob("caffe-src-*"))) == 2  # side by side
    r = _setup(tmp_path, CAFFE_SRC=tarball, SHARED_COL="2")
    assert r.returncode == 1 and "SHARED_COL=2: give 1" in r.stderr


# --- the patched Caffe at work ------------------------------------------------------------------


@pytest.fixture(scope="module")
def shared_caffe(caffe):
    if not caffe_shared_col():
        pytest.skip(f"this Caffe ({caffe.__file__}) has no shared im2col buffer (make setup SHARED_COL=0?)")
    return caffe


def _child(*args: str, shared: bool) -> subprocess.Popen:
    env = {**os.environ, SHARED_COL_ENV: "1" if shared else "0"}
    return subprocess.Popen(
        [sys.executable, str(CHILD), *args], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


def _both(*args: str) -> tuple[str, str]:
    """The child with the shared buffer and with a buffer per layer, side by side; their stdout."""
    procs = {shared: _child(*args, shared=shared) for shared in (True, False)}
    out = {}
    for shared, p in procs.items():
        stdout, stderr = p.communicate(timeout=600)
        assert p.returncode == 0, f"{args} (shared={shared}) failed:\n{stderr[-3000:]}"
        out[shared] = stdout
    return out[True], out[False]


def test_convolutions_share_one_buffer_with_the_same_numbers(shared_caffe):
    # 3x3, dilated, grouped, strided, 1x1 and transposed convolutions at 256x256: four of the
    # layers' buffers are 75 MB each (32 x 9 x 256 x 256 floats), all of them together 267 MB.
    shared, own = (json.loads(out) for out in _both("memory", "256"))
    assert shared["digests"] == own["digests"]  # every blob's data and diff, every gradient
    saved = own["peak_above_start_mb"] - shared["peak_above_start_mb"]
    assert 150 < saved < 230, (shared["peak_above_start_mb"], own["peak_above_start_mb"])


def _csv_without_seconds(path: Path) -> list[list[str]]:
    rows = [line.split(",") for line in path.read_text().splitlines()]
    drop = rows[0].index("seconds")
    return [r[:drop] + r[drop + 1 :] for r in rows]


def test_demo_schedule_is_bit_for_bit_the_same(shared_caffe, tiny_set, tmp_path):
    """20 stage-1 iterations of the demo schedule through redseg.training.train, then the deploy net."""
    for name in ("shared", "own"):
        (tmp_path / name).mkdir()
    args = [(str(tiny_set), str(tmp_path / n / "run"), str(tmp_path / n / "out.npz")) for n in ("shared", "own")]
    procs = [_child("train", *args[0], shared=True), _child("train", *args[1], shared=False)]
    for p in procs:
        _, stderr = p.communicate(timeout=600)
        assert p.returncode == 0, stderr[-3000:]
    a, b = (np.load(tmp_path / n / "out.npz") for n in ("shared", "own"))
    assert a["losses"].shape == (20, 8) and a["grads"].shape[0] == 20
    assert np.isfinite(a["losses"]).all()
    assert a.files == b.files and sum(k.startswith("map/") for k in a.files) == 8
    np.testing.assert_array_equal(a["losses"], b["losses"])  # exact, every loss layer, every iteration
    differ = np.argwhere(a["grads"] != b["grads"])
    assert differ.size == 0, f"gradient of {a['params'][differ[0][1]]} differs at iteration {differ[0][0] + 1}"
    assert a["weights"].tobytes() == b["weights"].tobytes()  # the final .caffemodel, byte for byte
    for k in a.files:
        if k.startswith("map/"):
            assert a[k].tobytes() == b[k].tobytes(), k
    for log in ("stage1_log.csv", "stage1_test_log.csv"):  # the test-loss net ran at 0 and 20
        assert _csv_without_seconds(tmp_path / "shared" / "run" / log) == _csv_without_seconds(
            tmp_path / "own" / "run" / log
        )
    assert len(_csv_without_seconds(tmp_path / "shared" / "run" / "stage1_test_log.csv")) == 3


def test_the_benchmark_measures_each_net_both_ways(shared_caffe, tmp_path):
    """tools/benchmark.py --memory-only (make benchmark's memory section) at a small size."""
    out = tmp_path / "bench.json"
    cmd = [sys.executable, str(REPO / "tools" / "benchmark.py"), "--memory-only", "--size", "96x128", "--stages", "1"]
    cmd += ["--repeats", "1", "--warmup", "0", "--json", str(out), "-q"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert r.returncode == 0, r.stdout + r.stderr
    mem = json.loads(out.read_text())["memory"]
    assert mem["shared_col_build"] and set(mem["nets"]) == {"stage1", "deploy"}
    for name, e in mem["nets"].items():
        assert e["shared"]["peak_rss_mb"] < e["own"]["peak_rss_mb"], name
        assert e["shared"]["seconds"]["n"] == e["own"]["seconds"]["n"] == 1
        # what the shared buffer saves, measured, is what the blob shapes say (sum - largest buffer)
        assert 0.7 * e["saved_mb_paper"] < e["saved_mb"] < 1.3 * e["saved_mb_paper"], (name, e)
        assert e["paper"]["col_largest"] == "conv1_2"
    assert [p["size"] for p in mem["deploy_scan"]] == [[48, 64], [96, 128]]
    big = mem["largest_photograph"]
    assert big["shared"]["max_pixels"] > 1.5 * big["own"]["max_pixels"]
    gpu = mem["gpu_estimate_stage1"]
    assert gpu["shared"]["gib"] < gpu["own"]["gib"] and gpu["shared"]["smallest_card_gb"] == 8
    if mem["shared_diff_build"]:  # and with shared blob diffs (tests/toolchain/test_shared_diff.py)
        stage1 = mem["nets"]["stage1"]
        assert stage1["diff"]["peak_rss_mb"] < stage1["shared"]["peak_rss_mb"] and stage1["saved_diff_mb"] > 0
        assert mem["nets"]["deploy"]["diff"]["seconds"]["n"] == 1
        # and with the shared data memory: Caffe's plan, read from its log, on paper for a GPU
        arena = stage1["arena"]
        assert 0 < arena["bytes"] < arena["items_bytes"] < stage1["paper"]["total_shared_bytes"]
        assert gpu["diff"]["gib"] < gpu["shared"]["gib"] and "arena" not in mem["nets"]["deploy"]
    assert "Memory at 128x96" in r.stdout


@pytest.mark.parametrize("shared", [True, False], ids=["shared", "own-buffers"])
def test_pycaffe_upstream_tests_pass(caffe, shared, tmp_path):
    """Caffe's own Python tests (python/caffe/test of the built tree) against this build.

    test_draw.py is left out: it needs pydot, which the project does not install (drawing nets
    runs no convolution)."""
    tests = Path(caffe.__file__).parent / "test"
    files = sorted(str(f) for f in tests.glob("test_*.py") if f.name != "test_draw.py")
    assert len(files) >= 9
    env = {**os.environ, SHARED_COL_ENV: "1" if shared else "0"}
    env["PYTHONPATH"] = os.pathsep.join([str(tests.parents[1]), env.get("PYTHONPATH", "")])
    r = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-W", "ignore::DeprecationWarning", *files],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-2000:]
    assert " passed" in r.stdout and " failed" not in r.stdout
