"""tools/segment.py end to end: a real deploy net through pycaffe (--weights) and, with Caffe made
impossible to import, through ONNX Runtime (--onnx); the sidecar's thresholds and FOV diameter,
bad files in the batch, exit statuses."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
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
