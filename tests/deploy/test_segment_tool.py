"""tools/segment.py end to end: a real deploy net through pycaffe (--weights) and, with Caffe made
impossible to import, through ONNX Runtime (--onnx); the sidecar's thresholds and FOV diameter,
bad files in the batch, exit statuses."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import cv2
import numpy as np
import pytest
from conftest import save_random_model

from redseg.data.synthetic import SyntheticParams, render_fundus

REPO = Path(__file__).resolve().parents[2]
TOOL = REPO / "tools" / "segment.py"
TRAIN_FOV = 64.0  # a tiny training FOV diameter: the net runs at ~64x43 px, fast

# Runs the tool with Caffe blocked: `import caffe` (or _caffe, or any caffe.*) raises, and at the
# end no Caffe module may have been loaded.
NO_CAFFE = """
import importlib.abc, runpy, sys
class NoCaffe(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("caffe", "_caffe"):
            raise ImportError("Caffe is blocked in this test: " + name)
sys.meta_path.insert(0, NoCaffe())
sys.modules.pop("caffe", None)
sys.argv = sys.argv[1:]
try:
    runpy.run_path(sys.argv[0], run_name="__main__")
    code = 0
except SystemExit as e:
    code = e.code
loaded = [m for m in sys.modules if m.split(".")[0] in ("caffe", "_caffe") and sys.modules[m] is not None]
assert not loaded, loaded
sys.exit(code)
"""


@pytest.fixture(scope="module")
def model(caffe, tmp_path_factory) -> Path:
    """A Red-Seg deploy net with seeded random weights, and its sidecar (as tools/test_net.py writes)."""
    from redseg.deploy.model_info import ModelInfo, write_model_info

    path = save_random_model(tmp_path_factory.mktemp("model") / "model.caffemodel", seed=0)
    write_model_info(path, ModelInfo([30.0, 60.0, 120.0], TRAIN_FOV, {"MA": 0.3, "HE": 0.7}, "test", "m.json"))
    return path


@pytest.fixture(scope="module")
def onnx_model(model, tmp_path_factory) -> Path:
    from redseg.deploy.onnx_export import export

    return export(model, tmp_path_factory.mktemp("onnx") / "model.onnx", verify_size=None)


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("photos")
    img = render_fundus(np.random.default_rng(1), SyntheticParams(160, 106)).image
    cv2.imwrite(str(d / "eye1.jpg"), img, [cv2.IMWRITE_JPEG_QUALITY, 95])
    big = np.zeros((300, 420, 3), np.uint8)
    big[47:259, 50:370] = cv2.resize(img, (320, 212))  # another camera: 2x, black margins
    cv2.imwrite(str(d / "eye2.png"), big)
    (d / "eye3.jpg").write_bytes(b"\xff\xd8\xff\xe0 this is not a photograph")
    return d


def segment(*args, blocked: bool = False) -> subprocess.CompletedProcess:
    argv = [str(TOOL), "--no-progress", *map(str, args)]
    cmd = [sys.executable, "-c", NO_CAFFE, *argv] if blocked else [sys.executable, *argv]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300)


def rows(out: Path) -> dict[str, dict]:
    with open(out / "summary.csv", newline="") as f:
        return {Path(r["image"]).name: r for r in csv.DictReader(f)}


def test_caffe_weights_with_the_sidecar(model, photos, tmp_path):
    out = tmp_path / "out"
    proc = segment("--weights", model, "--out", out, photos)
    assert proc.returncode == 0, proc.stderr
    r = rows(out)
    assert r["eye1.jpg"]["status"] == r["eye2.png"]["status"] == "ok"
    assert r["eye3.jpg"]["status"].startswith("skipped: corrupt JPEG")
    assert float(r["eye1.jpg"]["ma_threshold"]) == 0.3 and float(r["eye1.jpg"]["he_threshold"]) == 0.7
    assert "model.caffemodel.json" in r["eye1.jpg"]["ma_threshold_source"]
    assert float(r["eye1.jpg"]["scale_to_net"]) * float(r["eye1.jpg"]["fov_diameter_px"]) == pytest.approx(TRAIN_FOV)
    assert float(r["eye2.png"]["fov_diameter_px"]) == pytest.approx(2 * float(r["eye1.jpg"]["fov_diameter_px"]), 0.02)
    assert cv2.imread(str(out / "eye2_he.png"), cv2.IMREAD_UNCHANGED).shape == (300, 420)
    settings = json.loads((out / "summary.json").read_text())["settings"]
    assert settings["fov_diameter_px"] == TRAIN_FOV and "model.caffemodel.json" in settings["fov_source"]
    # the user's threshold wins over the sidecar's
    proc = segment("--weights", model, "--out", tmp_path / "o2", "--threshold", "MA=0.9", photos / "eye1.jpg")
    assert proc.returncode == 0, proc.stderr
    r = rows(tmp_path / "o2")["eye1.jpg"]
    assert (float(r["ma_threshold"]), r["ma_threshold_source"]) == (0.9, "--threshold")
    assert float(r["he_threshold"]) == 0.7


def test_onnx_without_caffe_gives_caffes_maps(model, onnx_model, photos, tmp_path):
    """A user without Caffe: the tool runs with every Caffe import blocked, and the maps are Caffe's."""
    proc = segment("--onnx", onnx_model, "--out", tmp_path / "onnx", photos, blocked=True)
    assert proc.returncode == 0, proc.stderr
    proc = segment("--weights", model, "--out", tmp_path / "caffe", photos)
    assert proc.returncode == 0, proc.stderr
    a, b = rows(tmp_path / "onnx"), rows(tmp_path / "caffe")
    assert a["eye3.jpg"]["status"].startswith("skipped")
    for name in ("eye1.jpg", "eye2.png"):
        assert a[name]["status"] == "ok"
        assert float(a[name]["ma_threshold"]) == 0.3  # the exporter copied the sidecar into the model
        assert "ONNX metadata" in a[name]["ma_threshold_source"]
        assert (a[name]["ma_count"], a[name]["he_count"]) == (b[name]["ma_count"], b[name]["he_count"])
        stem = Path(name).stem
        for les in ("ma", "he"):
            ma = cv2.imread(str(tmp_path / "onnx" / f"{stem}_{les}.png"), cv2.IMREAD_UNCHANGED).astype(int)
            mb = cv2.imread(str(tmp_path / "caffe" / f"{stem}_{les}.png"), cv2.IMREAD_UNCHANGED).astype(int)
            assert np.abs(ma - mb).max() <= 1, (name, les)
    settings = json.loads((tmp_path / "onnx" / "summary.json").read_text())["settings"]
    assert settings["fov_diameter_px"] == TRAIN_FOV and "ONNX metadata" in settings["fov_source"]


def test_the_caffe_block_really_blocks(model, photos, tmp_path):
    """The wrapper above must make --weights fail, or the ONNX test proves nothing."""
    proc = segment("--weights", model, "--out", tmp_path / "o", photos / "eye1.jpg", blocked=True)
    assert proc.returncode != 0 and "Caffe is blocked" in proc.stderr


def test_exit_status_when_every_file_fails(onnx_model, photos, tmp_path):
    bad = tmp_path / "notes.txt"
    bad.write_text("hello")
    out = tmp_path / "out"
    proc = segment("-q", "--onnx", onnx_model, "--out", out, photos / "eye3.jpg", bad, tmp_path / "missing.png")
    assert proc.returncode == 1 and "no photograph could be segmented" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert [r["status"].split(":")[0] for r in rows(out).values()] == ["skipped"] * 3  # listed all the same
    assert segment("--out", out, photos).returncode == 2  # no model: a usage error
    proc = segment("--onnx", onnx_model, "--out", photos, photos)
    assert proc.returncode == 1 and "--out" in proc.stderr  # never writes among the user's photographs


# --- many photographs: parts, merge, reruns -------------------------------------------------------


def segment_env(*args, env: dict | None = None) -> subprocess.CompletedProcess:
    base = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    cmd = [sys.executable, str(TOOL), "--no-progress", *map(str, args)]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300, env={**base, **(env or {})})


@pytest.fixture(scope="module")
def two_folders(photos, tmp_path_factory) -> list[Path]:
    """The photos plus a second folder holding another eye1: its outputs are eye1_2_*, whichever
    part it falls in."""
    other = tmp_path_factory.mktemp("other")
    img = render_fundus(np.random.default_rng(7), SyntheticParams(160, 106)).image
    cv2.imwrite(str(other / "eye1.png"), img)
    return [photos, other]


def outputs(out: Path) -> dict[str, bytes]:
    """Every file a run wrote, by relative path, but its bookkeeping (records/, parts/)."""
    return {
        str(p.relative_to(out)): p.read_bytes()
        for p in out.rglob("*")
        if p.is_file() and p.relative_to(out).parts[0] not in ("records", "parts")
    }


def test_two_parts_merged_give_exactly_a_single_runs_summary(model, two_folders, tmp_path):
    """Part 0 by the options, part 1 by SLURM's array variables, into one folder; --merge writes
    the summary files byte for byte as one run of the whole batch does, and every map the same."""
    single = tmp_path / "single"
    proc = segment_env("--weights", model, "--out", single, *two_folders)
    assert proc.returncode == 0, proc.stderr
    out = tmp_path / "parts"
    proc = segment_env("--weights", model, "--out", out, "--num-parts", 2, "--part-id", 0, *two_folders)
    assert proc.returncode == 0, proc.stderr
    assert "part 0 of 2" in proc.stdout and not (out / "summary.csv").exists()
    proc = segment_env("-q", "--merge", out)
    assert proc.returncode == 1 and "1 of 2 parts missing" in proc.stderr and "part-1-of-2.json" in proc.stderr
    array = {"SLURM_ARRAY_TASK_COUNT": "2", "SLURM_ARRAY_TASK_ID": "4", "SLURM_ARRAY_TASK_MIN": "3"}  # --array=3-4
    proc = segment_env("--weights", model, "--out", out, *two_folders, env=array)
    assert proc.returncode == 0, proc.stderr
    assert "part 1 of 2 ($SLURM_ARRAY_TASK_COUNT, $SLURM_ARRAY_TASK_ID 4 - $SLURM_ARRAY_TASK_MIN 3)" in proc.stderr
    assert sorted(p.name for p in (out / "parts").iterdir()) == ["part-0-of-2.json", "part-1-of-2.json"]
    proc = segment_env("--merge", out)
    assert proc.returncode == 0, proc.stderr
    for name in ("summary.csv", "summary.json", "index.html"):
        assert (out / name).read_bytes() == (single / name).read_bytes(), name
    assert outputs(out) == outputs(single)
    assert "eye1_2_ma.png" in outputs(out)  # the second eye1 (index 3: part 1) named as in one run


def test_a_rerun_does_no_work_for_finished_photographs_and_redoes_a_damaged_one(model, two_folders, tmp_path):
    out = tmp_path / "out"
    args = ("--weights", model, "--out", out, "--num-parts", 2, "--part-id", 1, *two_folders)
    assert segment_env(*args).returncode == 0
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*.png")}
    assert set(before) == {out / f"{s}_{k}.png" for s in ("eye2", "eye1_2") for k in ("ma", "he", "overlay")}
    proc = segment_env(*args)
    assert proc.returncode == 0 and "2 of 2 photographs done before" in proc.stderr, proc.stderr
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*.png")} == before  # nothing written again
    # a record cut short (never trusted), a map gone: those photographs are segmented again
    rec = out / "records" / "eye2.json"
    rec.write_text(rec.read_text()[:40])
    (out / "eye1_2_he.png").unlink()
    proc = segment_env(*args)
    assert proc.returncode == 0 and "photographs done before" not in proc.stderr, proc.stderr
    assert (out / "eye1_2_he.png").is_file() and (out / "eye2_ma.png").stat().st_mtime_ns != before[out / "eye2_ma.png"]
    assert json.loads(rec.read_text())["row"]["status"] == "ok"
    # other settings: not reused, and the parts then disagree
    assert segment_env("--weights", model, "--out", out, "--num-parts", 2, "--part-id", 0, *two_folders).returncode == 0
    proc = segment_env(*args, "--threshold", "0.9")
    assert proc.returncode == 0 and "done before" not in proc.stderr
    proc = segment_env("-q", "--merge", out)
    assert proc.returncode == 1 and "disagree on the model or settings" in proc.stderr and "thresholds" in proc.stderr
    assert "Traceback" not in proc.stderr and not (out / "summary.csv").exists()


@pytest.mark.parametrize(
    "args, env, message",
    [
        (("--num-parts", 2, "--part-id", 2), {}, "--part-id must be in 0..1 for 2 parts, got 2"),
        (("--num-parts", 0, "--part-id", 0), {}, "--num-parts must be at least 1, got 0"),
        (("--num-parts", 3), {}, "--num-parts 3 needs --part-id I (0..2)"),
        (
            (),
            {"SLURM_ARRAY_TASK_COUNT": "2", "SLURM_ARRAY_TASK_ID": "5"},
            "got 5 ($SLURM_ARRAY_TASK_COUNT, $SLURM_ARRAY_TASK_ID 5",
        ),
        ((), {"SLURM_ARRAY_TASK_COUNT": "two", "SLURM_ARRAY_TASK_ID": "1"}, "$SLURM_ARRAY_TASK_COUNT is 'two'"),
    ],
)
def test_a_part_that_does_not_exist_is_one_clear_line(onnx_model, photos, tmp_path, args, env, message):
    proc = segment_env("-q", "--onnx", onnx_model, "--out", tmp_path / "o", *args, photos, env=env)
    assert proc.returncode == 1 and message in proc.stderr, proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and not (tmp_path / "o").exists()


def test_merge_usage_errors(photos, tmp_path):
    assert segment_env("--merge", tmp_path, photos).returncode == 2  # --merge takes no photographs
    assert segment_env("--out", tmp_path / "o").returncode == 2  # nothing to segment
    proc = segment_env("-q", "--merge", tmp_path / "empty")
    assert proc.returncode == 1 and "no part summaries in" in proc.stderr


def test_sigusr1_stops_after_a_photograph_with_75_and_the_rerun_finishes(model, tmp_path):
    """A scheduler's signal mid-batch: the photograph in hand is finished, exit 75; the rerun does
    only the rest and the summary lists them all."""
    src = tmp_path / "many"
    src.mkdir()
    img = render_fundus(np.random.default_rng(1), SyntheticParams(160, 106)).image
    for i in range(8):
        cv2.imwrite(str(src / f"eye{i}.png"), img)
    out = tmp_path / "out"
    cmd = [sys.executable, str(TOOL), "--no-progress", "--weights", str(model), "--out", str(out), str(src)]
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None and not list((out / "records").glob("*.json")):
        time.sleep(0.01)
    proc.send_signal(signal.SIGUSR1)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 75, err
    assert "SIGUSR1: stopped after" in err and "preempted, resumable" in err
    done = len(list((out / "records").glob("*.json")))
    assert 1 <= done < 8 and not (out / "summary.csv").exists()
    proc = segment_env("--weights", model, "--out", out, src)
    assert proc.returncode == 0 and f"{done} of 8 photographs done before" in proc.stderr, proc.stderr
    assert [r["status"] for r in rows(out).values()] == ["ok"] * 8
