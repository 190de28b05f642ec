"""The shared diff and data memory: make setup's patches (redseg/toolchain/caffe_source.py), their
build switch SHARED_DIFF=0 and their runtime switches REDSEG_SHARED_DIFF=1 and REDSEG_SHARED_DATA=1
(docs/install.md).

The runtime tests run real pycaffe in child processes (tests/toolchain/shared_diff_child.py): with
the blob diffs sharing memory ("diff"), with diffs and data in one arena ("data", what the training
driver runs) and with a diff and data per blob ("own", upstream's), and compare their numbers bit
for bit: a net of every layer type Red-Seg's nets use, reshaped up and down between backward passes
(the plans are made again), and the package's own training driver for 20 stage-1 and 2 stage-2
iterations of the demo schedule on a set with images of two sizes (losses, every parameter's
gradient and weights after every backward pass, the test-loss net, the final weights) and the
deploy net's maps with those weights. Checks that the memory really is shared (fewer distinct diff
buffers, less memory, Caffe's own log lines) make equal numbers mean something.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import write_prepared_set

from redseg.toolchain import caffe_source as cs
from redseg.toolchain.caffe_utils import (
    SHARED_DATA_ENV,
    SHARED_DIFF_ENV,
    caffe_shared_data,
    caffe_shared_diff,
    shared_blob_memory,
)

REPO = Path(__file__).resolve().parents[2]
CHILD = Path(__file__).with_name("shared_diff_child.py")
SHARED_DIFF_NAMES = {"shared-diff-decl", "shared-diff", "shared-data-decl", "shared-data", "shared-diff-reshape"}
FILES = ("include/caffe/net.hpp", "src/caffe/net.cpp", "src/caffe/blob.cpp", "include/caffe/blob.hpp")


# --- the patch in the patch set ------------------------------------------------------------------


def test_the_patch_is_in_the_default_patch_set_and_its_cache_key(monkeypatch):
    assert SHARED_DIFF_NAMES <= {p.name for p in cs.patch_set()}
    assert not SHARED_DIFF_NAMES & {p.name for p in cs.patch_set(shared_diff=False)}
    assert cs.patch_set(shared_diff=False) == cs.PATCHES + cs.SHARED_COL_PATCHES
    assert cs.patch_set(shared_col=False, shared_diff=False) == cs.PATCHES
    ids = {cs.patchset_id(col, diff) for col in (True, False) for diff in (True, False)}
    assert len(ids) == 4 and cs.patchset_id() == cs.patchset_id(True, True)
    # The C++ the patch inserts is part of the key; the keys without it do not depend on it (they
    # are the keys builds had before the patch existed).
    before = {(col, diff): cs.patchset_id(col, diff) for col in (True, False) for diff in (True, False)}
    for name, old, new in (
        ("_SHARED_DIFF_PLAN", "<= consumer[b]", "< consumer[b]"),
        ("_SHARED_DATA_PLAN", "<= shared_data_to_[n]", "< shared_data_to_[n]"),
    ):
        monkeypatch.setattr(cs, name, getattr(cs, name).replace(old, new))
        for (col, diff), key in before.items():
            assert (cs.patchset_id(col, diff) == key) is (not diff)
        monkeypatch.undo()
    for value, shared in (("0", False), ("1", True), ("", True)):
        monkeypatch.setenv("SHARED_DIFF", value)
        assert cs.shared_diff_default() is shared
    monkeypatch.setenv("SHARED_DIFF", "yes")
    with pytest.raises(cs.SourceError, match="SHARED_DIFF=yes: give 1"):
        cs.shared_diff_default()


def test_the_driver_switch_respects_an_opt_out(monkeypatch):
    for env in (SHARED_DIFF_ENV, SHARED_DATA_ENV):
        monkeypatch.delenv(env, raising=False)
    with shared_blob_memory():
        assert os.environ[SHARED_DIFF_ENV] == os.environ[SHARED_DATA_ENV] == "1"
    assert SHARED_DIFF_ENV not in os.environ and SHARED_DATA_ENV not in os.environ
    monkeypatch.setenv(SHARED_DATA_ENV, "0")
    with shared_blob_memory():
        assert os.environ[SHARED_DIFF_ENV] == "1" and os.environ[SHARED_DATA_ENV] == "0"
    assert SHARED_DIFF_ENV not in os.environ and os.environ[SHARED_DATA_ENV] == "0"


def test_the_patch_applies_once_and_is_checked(pristine, tmp_path):
    tree = tmp_path / "t"
    shutil.copytree(pristine, tree)
    assert set(cs.apply_patches(tree)) >= SHARED_DIFF_NAMES
    assert cs.apply_patches(tree) == []  # recognised once applied
    hpp, cpp, blob, blob_h = ((tree / f).read_text() for f in FILES)
    assert "void PlanSharedDiffs();" in hpp and "void BindSharedDiffs();" in hpp
    assert 'std::getenv("REDSEG_SHARED_DIFF")' in cpp and "void Net<Dtype>::PlanSharedDiffs()" in cpp
    # bound once, at the start of every backward pass (Backward, BackwardFrom/To all go through it)
    body = cpp[cpp.index("void Net<Dtype>::BackwardFromTo(int start, int end) {") :]
    assert re.match(r"[^}]*CHECK_LT\(start, layers_\.size\(\)\);\n  BindSharedDiffs\(\);", body)
    # the shared data plan: made after the shared diffs' (whose blobs it takes over), checked after
    # a full backward pass
    assert cpp.index('std::getenv("REDSEG_SHARED_DIFF")') < cpp.index('std::getenv("REDSEG_SHARED_DATA")')
    check = r"after_backward_\[c\]->run\(i\);\n    \}\n  \}\n  if \(end == 0 [^\n]*\n    CheckSharedData"
    assert re.search(check, body)
    assert "void PlanSharedData();" in hpp and "void set_data_memory(" in blob_h
    assert "diff_->size() < count_ * sizeof(Dtype)" in blob and "data_->size() < count_ * sizeof(Dtype)" in blob

    plain = tmp_path / "plain"
    shutil.copytree(pristine, plain)
    assert not SHARED_DIFF_NAMES & set(cs.apply_patches(plain, shared_diff=False))
    for f in FILES:
        assert (plain / f).read_bytes() == (pristine / f).read_bytes()


def test_a_tree_the_patch_does_not_fit_is_refused(pristine, tmp_path):
    tree = tmp_path / "t"
    shutil.copytree(pristine, tree)
    cpp = tree / "src/caffe/net.cpp"
    cpp.write_text(cpp.read_text().replace("  debug_info_ = param.debug_info();\n", ""))
    with pytest.raises(cs.SourceError, match="patch shared-diff .*does not fit"):
        cs.apply_patches(tree)

    loop = tmp_path / "loop"  # a backward loop without NCCL's callbacks: no place for the check
    shutil.copytree(pristine, loop)
    cpp = loop / "src/caffe/net.cpp"
    cpp.write_text(cpp.read_text().replace("      after_backward_[c]->run(i);\n", ""))
    with pytest.raises(cs.SourceError, match="patch shared-data .*does not fit"):
        cs.apply_patches(loop)


def test_setup_shared_diff_0_is_a_build_of_its_own(built, tmp_path):
    tarball = str(built / "source.tar.gz")
    for value, shared in (("0", False), ("1", True)):
        e = {**os.environ, "REDSEG_CACHE": str(tmp_path / "cache"), "SETUP_SOURCE_ONLY": "1"}
        e.update(CAFFE_SRC=tarball, SHARED_DIFF=value)
        e.pop("CAFFE_ROOT", None)
        r = subprocess.run(["bash", str(REPO / "tools/setup.sh")], env=e, capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stderr
        src = next((tmp_path / "cache").glob(f"caffe-src-*-p{cs.patchset_id(True, shared)}-cpu-py*/src"))
        assert ("Red-Seg shared diff memory" in (src / "src/caffe/net.cpp").read_text()) is shared
    assert len(list((tmp_path / "cache").glob("caffe-src-*"))) == 2  # side by side


# --- the patched Caffe at work ------------------------------------------------------------------


@pytest.fixture(scope="module")
def shared_caffe(caffe):
    if not caffe_shared_diff():
        pytest.skip(f"this Caffe ({caffe.__file__}) has no shared diff memory (make setup SHARED_DIFF=0?)")
    return caffe


MODES = {"own": ("0", "0"), "diff": ("1", "0"), "data": ("1", "1")}  # REDSEG_SHARED_DIFF, _DATA


def _child(*args: str, mode: str) -> subprocess.Popen:
    diff, data = MODES[mode]
    env = {**os.environ, SHARED_DIFF_ENV: diff, SHARED_DATA_ENV: data, "GLOG_minloglevel": "0"}
    return subprocess.Popen(
        [sys.executable, str(CHILD), *args], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


def _each(*args: str, modes: tuple[str, ...] = ("data", "diff", "own")) -> dict[str, tuple[str, str]]:
    """The child in each mode, one after the other: stdout, stderr."""
    out = {}
    for mode in modes:
        p = _child(*args, mode=mode)
        stdout, stderr = p.communicate(timeout=900)
        assert p.returncode == 0, f"{args} ({mode}) failed:\n{stderr[-3000:]}"
        out[mode] = stdout, stderr
    return out


def _planned(stderr: str) -> list[tuple[int, int, int, int]]:
    """Caffe's log lines of the diff plan: (blob diffs, buffers, bytes, bytes without sharing)."""
    pattern = r"Red-Seg shared diff memory: (\d+) blob diffs in (\d+) buffers, (\d+) bytes instead of (\d+)"
    return [tuple(map(int, m)) for m in re.findall(pattern, stderr)]


def _arenas(stderr: str) -> list[tuple[int, int, int, int]]:
    """Caffe's log lines of the data plan: (blobs' data, blobs' diffs, arena bytes, bytes without sharing)."""
    pattern = r"Red-Seg shared data memory: (\d+) blobs' data and (\d+) blobs' diffs in one arena of (\d+) bytes"
    pattern += r" instead of (\d+)"
    return [tuple(map(int, m)) for m in re.findall(pattern, stderr)]


@pytest.fixture(scope="module")
def shared_data_caffe(shared_caffe):
    if not caffe_shared_data():
        pytest.skip(f"this Caffe ({shared_caffe.__file__}) has no shared data memory (built before it existed?)")
    return shared_caffe


def test_a_net_reshaped_between_passes_gives_the_same_numbers(shared_data_caffe):
    # built at 96, run at 64, 128 (larger than at construction), 96 and 48: the buffers grow, a
    # blob reshaped past its shared diff gets its own (read in full here), the diff plan stays;
    # blobs outgrow their places in the arena at 128 and the data plan is made again
    out = _each("sizes", "--read-diffs", "96", "64", "128", "96", "48")
    runs = {mode: json.loads(out[mode][0]) for mode in out}
    assert [p["side"] for p in runs["own"]["passes"]] == [64, 64, 128, 128, 96, 96, 48, 48]
    for mode in ("diff", "data"):  # every loss, gradient and blob's data, bit for bit
        assert runs[mode]["passes"] == runs["own"]["passes"], mode
    assert runs["own"]["diff_buffers"] == runs["own"]["blobs"]
    assert runs["diff"]["diff_buffers"] < runs["own"]["diff_buffers"] - 5
    (plan,) = _planned(out["diff"][1])
    assert plan[0] >= 10 and plan[1] < plan[0] and plan[2] < plan[3]
    assert not _planned(out["own"][1]) and not _arenas(out["own"][1]) and not _arenas(out["diff"][1])
    arenas = _arenas(out["data"][1])
    assert len(arenas) == 2  # at construction, and again after the first pass at 128
    assert arenas[1][2] > arenas[0][2]  # for the larger shapes
    for data, diffs, arena, own in arenas:
        assert data >= 8 and diffs == plan[0] and arena < own


def test_shared_diffs_and_data_take_less_memory(shared_data_caffe):
    out = _each("sizes", "512", "512")
    runs = {mode: json.loads(out[mode][0]) for mode in out}
    assert runs["diff"]["passes"] == runs["own"]["passes"] == runs["data"]["passes"]
    (plan,) = _planned(out["diff"][1])
    saved_mb = (plan[3] - plan[2]) / 2**20
    assert saved_mb > 20
    measured = runs["own"]["peak_above_start_mb"] - runs["diff"]["peak_above_start_mb"]
    assert 0.7 * saved_mb < measured < 1.3 * saved_mb, (measured, saved_mb)
    # the arena holds the planned data and diffs in less than the data plus the diff buffers did
    (arena,) = _arenas(out["data"][1])
    data_mb = (arena[3] - plan[3]) / 2**20  # the planned blobs' data: the arena's items less the diffs
    saved_mb = (data_mb * 2**20 + plan[2] - arena[2]) / 2**20
    assert saved_mb > 20
    measured = runs["diff"]["peak_above_start_mb"] - runs["data"]["peak_above_start_mb"]
    assert 0.7 * saved_mb < measured < 1.3 * saved_mb, (measured, saved_mb)


@pytest.fixture(scope="module")
def two_size_set(tmp_path_factory) -> Path:
    """The tiny set with four more training images of another size (80x56 after 64x48)."""
    root = write_prepared_set(tmp_path_factory.mktemp("two_sizes") / "set")
    other = write_prepared_set(tmp_path_factory.mktemp("other") / "set", size=(80, 56), seed=1)
    lines = []
    for line in (other / "train.txt").read_text().split():
        if line.endswith(".png"):
            new = re.sub(r"IDRiD_0(\d)", lambda m: f"IDRiD_1{m.group(1)}", line)
            shutil.copy(other / line, root / new)
            lines.append(new)
    rows = ["\t".join(lines[i : i + 3]) for i in range(0, len(lines), 3)]
    with open(root / "train.txt", "a") as f:
        f.write("\n".join(rows) + "\n")
    return root


def test_training_is_bit_for_bit_the_same(shared_data_caffe, two_size_set, tmp_path):
    """20 stage-1 and 2 stage-2 iterations of the demo schedule through redseg.training.train, then
    the deploy net: with shared diffs and data (as the driver builds its nets by default) and
    without."""
    results = {}
    for shared in (True, False):
        run = tmp_path / str(shared) / "run"
        run.mkdir(parents=True)
        for stage, iters in ((1, 20), (2, 2)):
            out = tmp_path / str(shared) / f"stage{stage}.npz"
            args = ("train", str(two_size_set), str(run), str(out), str(stage), str(iters))
            p = _child(*args, mode="data" if shared else "own")
            _, stderr = p.communicate(timeout=900)
            assert p.returncode == 0, stderr[-3000:]
            # the train net planned its shared diffs and its arena (the test-loss net too, no backward)
            assert bool(_planned(stderr)) is shared and bool(_arenas(stderr)) is shared
            if shared:
                assert max(plan[0] for plan in _planned(stderr)) > 20
                # two image sizes: the arena is planned again when the larger first arrives
                assert len(_arenas(stderr)) >= 3
            results[shared, stage] = np.load(out)
    for stage, iters in ((1, 20), (2, 2)):
        a, b = results[True, stage], results[False, stage]
        assert a["losses"].shape[0] == iters and np.isfinite(a["losses"]).all()
        assert a.files == b.files and sum(k.startswith("map/") for k in a.files) == 8
        np.testing.assert_array_equal(a["losses"], b["losses"])  # exact, every loss layer, every iteration
        for what in ("grads", "datas"):
            differ = np.argwhere(a[what] != b[what])
            where = differ[0] if differ.size else None
            assert where is None, f"stage {stage}: {what} of {a['params'][where[1]]} differ at iteration {where[0] + 1}"
        assert a["weights"].tobytes() == b["weights"].tobytes()  # the final .caffemodel, byte for byte
        for k in a.files:
            if k.startswith("map/"):
                assert a[k].tobytes() == b[k].tobytes(), k
    for log in ("stage1_log.csv", "stage1_test_log.csv", "stage2_log.csv"):
        rows = [_without_seconds(tmp_path / str(s) / "run" / log) for s in (True, False)]
        assert rows[0] == rows[1], log


def _without_seconds(path: Path) -> list[list[str]]:
    rows = [line.split(",") for line in path.read_text().splitlines()]
    drop = rows[0].index("seconds")
    return [r[:drop] + r[drop + 1 :] for r in rows]
