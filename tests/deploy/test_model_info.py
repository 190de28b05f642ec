"""redseg/deploy/model_info.py: a model's sidecar <weights>.json, and tools/test_net.py writing it."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import save_random_model

from redseg.deploy.model_info import (
    ModelInfo,
    ModelInfoError,
    break_even_thresholds,
    from_evaluation,
    read_model_info,
    sidecar_path,
    write_model_info,
)

REPO = Path(__file__).resolve().parents[2]


def test_sidecar_round_trip_beside_the_weights(tmp_path):
    w = tmp_path / "stage2_final.caffemodel"
    assert sidecar_path(w) == tmp_path / "stage2_final.caffemodel.json"
    assert read_model_info(w) is None  # no sidecar: None, not an error
    info = ModelInfo([16.0, 53.8, 122.8], 222.2, {"MA": 0.525, "HE": 0.498}, "break-even", "m/metrics.json")
    write_model_info(w, info)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["stage2_final.caffemodel.json"]  # no temp file left
    d = json.loads(sidecar_path(w).read_text())
    assert set(d) == {"mean_bgr", "fov_diameter_px", "thresholds", "threshold_rule", "source"}
    assert read_model_info(w) == info


def test_onnx_metadata_round_trip():
    info = ModelInfo([1.0, 2.0, 3.0], None, {"HE": 0.4}, "rule", None)
    meta = info.as_metadata()
    assert all(isinstance(v, str) for v in meta.values()) and json.loads(meta["thresholds"]) == {"HE": 0.4}
    assert ModelInfo.from_metadata({**meta, "deploy": '"deploy.prototxt"'}) == info
    with pytest.raises(ModelInfoError, match="fov_diameter_px"):
        ModelInfo.from_metadata({**meta, "fov_diameter_px": "{not json"})


@pytest.mark.parametrize(
    "bad, why",
    [
        ({"mean_bgr": [1, 2]}, "mean_bgr"),
        ({"mean_bgr": [1, 2, 3], "fov_diameter_px": -3}, "fov_diameter_px"),
        ({"mean_bgr": [1, 2, 3], "thresholds": {"MA": 1.5}}, "MA"),
        ({"mean_bgr": [1, 2, 3], "thresholds": [0.5]}, "thresholds"),
    ],
)
def test_malformed_sidecar_is_refused_by_name(tmp_path, bad, why):
    w = tmp_path / "m.caffemodel"
    sidecar_path(w).write_text(json.dumps(bad))
    with pytest.raises(ModelInfoError, match=why) as e:
        read_model_info(w)
    assert "m.caffemodel.json" in str(e.value)
    sidecar_path(w).write_text("{truncated")
    with pytest.raises(ModelInfoError, match="m.caffemodel.json"):
        read_model_info(w)


def test_thresholds_from_an_evaluation():
    result = {"MA": {"break_even": {"threshold": 134 / 255}}, "HE": {"break_even": {"threshold": math.nan}}}
    assert break_even_thresholds(result) == {"MA": 134 / 255}  # no HE pixel in the test set: no threshold
    info = from_evaluation(result, np.array([1, 2, 3], np.float32), None, "e/metrics.json")
    assert info.as_dict()["thresholds"] == {"MA": 134 / 255} and info.source == "e/metrics.json"
    assert "break-even" in info.threshold_rule


def test_test_net_writes_the_sidecar(caffe, tmp_path, tiny_set):
    """After scoring, <weights>.json holds the set's mean and each lesion's break-even threshold of
    metrics.json."""
    weights = save_random_model(tmp_path / "model.caffemodel", seed=1)
    cmd = [sys.executable, str(REPO / "tools/test_net.py"), "-q", "--weights", str(weights), "--data",
           str(tiny_set), "--out", str(tmp_path / "t"), "--overlays", "0"]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    info = read_model_info(weights)
    metrics = json.loads((tmp_path / "t" / "eval" / "metrics.json").read_text())
    for lesion in ("MA", "HE"):
        assert info.thresholds[lesion] == metrics[lesion]["break_even"]["threshold"]
    assert info.mean_bgr == pytest.approx(json.loads((tiny_set / "meta.json").read_text())["mean_bgr"])
    assert info.source == str(tmp_path / "t" / "eval" / "metrics.json")
    assert info.fov_diameter_px == 80.0  # the tiny set's 64x48 images have no border: the frame's diagonal
