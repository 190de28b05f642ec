"""tools/test_net.py: maps from the deploy net, their files, scoring, and bad weights."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
from conftest import save_random_model

REPO = Path(__file__).resolve().parents[2]


def run_test_net(*args):
    cmd = [sys.executable, str(REPO / "tools/test_net.py"), "--no-progress", *map(str, args)]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def weights(caffe, tmp_path_factory) -> Path:
    """A Red-Seg model as Caffe saves it (deploy net, seeded random fillers): every layer present."""
    return save_random_model(tmp_path_factory.mktemp("w") / "model.caffemodel", seed=0)


def test_maps_equal_a_direct_forward_and_are_scored(caffe, tmp_path, tiny_set, weights):
    proc = run_test_net("--weights", weights, "--data", tiny_set, "--out", tmp_path / "t", "--overlays", 1)
    assert proc.returncode == 0, proc.stderr
    pred = tmp_path / "t" / "pred"
    names = [line.split("\t")[0] for line in (tiny_set / "test.txt").read_text().split("\n") if line]
    assert len(list(pred.glob("*.png"))) == 2 * len(names)
    net = caffe.Net(str(REPO / "prototxt" / "deploy.prototxt"), str(weights), caffe.TEST)
    meta = json.loads((tiny_set / "meta.json").read_text())
    img = cv2.imread(str(tiny_set / names[0]))
    net.blobs["data"].reshape(1, 3, *img.shape[:2])
    net.blobs["data"].data[0] = img.transpose(2, 0, 1) - np.array(meta["mean_bgr"]).reshape(3, 1, 1)
    out = net.forward()
    stem = Path(names[0]).stem
    for les in ("ma", "he"):
        saved = cv2.imread(str(pred / f"{stem}_{les}.png"), cv2.IMREAD_UNCHANGED)
        assert saved.dtype == np.uint8 and saved.shape == img.shape[:2]
        assert np.abs(saved.astype(int) - np.rint(out[f"prob_{les}"][0, 0] * 255)).max() <= 1
    metrics = json.loads((tmp_path / "t" / "eval" / "metrics.json").read_text())
    assert 0 <= metrics["MA"]["ap"] <= 1 and 0 <= metrics["HE"]["auc_pr"] <= 1
    assert (tmp_path / "t" / "eval" / "report.md").is_file()


def test_full_size_maps(tmp_path, tiny_set, weights):
    data = tmp_path / "set"
    import shutil

    shutil.copytree(tiny_set, data)
    meta = json.loads((data / "meta.json").read_text())
    meta["factor"] = 2
    (data / "meta.json").write_text(json.dumps(meta))
    proc = run_test_net("--weights", weights, "--data", data, "--out", tmp_path / "t", "--full-size", "--no-eval")
    assert proc.returncode == 0, proc.stderr
    w, h = meta["size"]
    m = cv2.imread(str(next((tmp_path / "t" / "pred").glob("*_he.png"))), cv2.IMREAD_UNCHANGED)
    assert m.shape == (2 * h, 2 * w)


def test_weights_that_do_not_fit_are_a_clear_error(caffe, tmp_path, tiny_set):
    from caffe import layers as L

    n = caffe.NetSpec()
    n.data = L.Input(shape=dict(dim=[1, 3, 8, 8]))
    n.fuse_ma = L.Convolution(n.data, num_output=1, kernel_size=3)  # the real fuse_ma is 1x1 over 3 maps
    p = tmp_path / "other.prototxt"
    p.write_text(str(n.to_proto()))
    other = tmp_path / "other.caffemodel"
    caffe.Net(str(p), caffe.TEST).save(str(other))
    proc = run_test_net("--weights", other, "--data", tiny_set, "--out", tmp_path / "t")
    assert proc.returncode == 1 and "fuse_ma" in proc.stderr and "Traceback" not in proc.stderr
    proc = run_test_net("--weights", tmp_path / "missing.caffemodel", "--data", tiny_set)
    assert proc.returncode == 1 and "not found" in proc.stderr
    proc = run_test_net("--weights", other, "--data", tmp_path / "no_set")
    assert proc.returncode == 1 and "make data" in proc.stderr


def test_segment_own_photo(tmp_path, tiny_set, weights):
    photo = tmp_path / "my photo.jpg"
    img = np.full((150, 200, 3), 120, np.uint8)
    cv2.circle(img, (100, 75), 10, (20, 20, 80), -1)
    cv2.imwrite(str(photo), img)
    cmd = [sys.executable, str(REPO / "tools/segment.py"), "--weights", str(weights), "--data", str(tiny_set),
           "--fov-diameter", "96", "--out", str(tmp_path / "o"), str(photo)]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    for suffix in ("ma", "he"):
        out = cv2.imread(str(tmp_path / "o" / f"my photo_{suffix}.png"), cv2.IMREAD_UNCHANGED)
        assert out.shape[:2] == (150, 200)
    overlay = cv2.imread(str(tmp_path / "o" / "my photo_overlay.png"))
    assert overlay.shape[:2] == (150, 2 * 200 + 4)  # the report's overlay: MA and HE panels side by side
    proc = subprocess.run(cmd[:-1] + [str(tmp_path / "missing.jpg")], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1 and "missing.jpg" in proc.stderr


def test_gpu_flag_with_this_build_is_a_clear_error(tmp_path, tiny_set, weights):
    """--gpu on a CPU-only Caffe (or a machine without a driver) is refused before Caffe can abort."""
    import shutil

    from redseg.toolchain.caffe_utils import caffe_has_cuda

    if caffe_has_cuda() and shutil.which("nvidia-smi"):
        pytest.skip("a CUDA build on a machine with a GPU driver: --gpu 0 would really run")
    proc = run_test_net("--weights", weights, "--data", tiny_set, "--out", tmp_path / "t", "--gpu", "0")
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    expected = "nvidia-smi" if caffe_has_cuda() else "built CPU-only"
    assert expected in proc.stderr
    cmd = [sys.executable, str(REPO / "tools/train.py"), "--stage", "1", "--data", str(tiny_set),
           "--run", str(tmp_path / "r"), "--from-scratch", "--gpu", "0", "--no-progress"]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1 and expected in proc.stderr


@pytest.mark.parametrize("variant", ["", "conv1-4"])
def test_side_maps_are_the_sides_the_fuse_layer_combines(caffe, variant):
    """Fig. 7's maps: each branch's fused logit is the fuse layer's weighted sum of the side logits
    that side_maps returns, in stage order (conv1-4: conv1's side has no upsampling)."""
    from redseg.deploy.inference import side_maps
    from redseg.toolchain.caffe_utils import load_net

    deploy = REPO / "prototxt" / ("deploy.prototxt" if not variant else f"ablations/deploy_ma_{variant}.prototxt")
    net = load_net(deploy)
    rng = np.random.default_rng(1)
    for name, blobs in net.params.items():
        if not name.startswith("up_"):  # He-scaled: activations stay O(1), the side logits unsaturated
            w = blobs[0].data
            w[...] = rng.normal(0, np.sqrt(1.0 / np.prod(w.shape[1:])), w.shape)
            blobs[1].data[...] = rng.normal(0, 0.1, blobs[1].data.shape)
    net.blobs["data"].reshape(1, 3, 37, 53)
    net.reshape()
    net.blobs["data"].data[...] = rng.normal(0, 2, (1, 3, 37, 53))
    net.forward()
    maps = side_maps(net)
    stages = {"ma": (1, 2, 3, 4) if variant else (2, 3, 4), "he": (3, 4, 5)}
    assert sorted(maps) == sorted([f"{les}_conv{s}" for les, ss in stages.items() for s in ss] + ["ma_fuse", "he_fuse"])
    for les, ss in stages.items():
        probs = [maps[f"{les}_conv{s}"].astype(np.float64) for s in ss]
        assert all(0.01 < p.min() and p.max() < 0.99 for p in probs)  # unsaturated: the logit is recoverable
        logits = [np.log(p) - np.log1p(-p) for p in probs]
        assert all(m.shape == (37, 53) for m in logits)
        w, b = (p.data.ravel() for p in net.params[f"fuse_{les}"])
        fused = sum(wi * li for wi, li in zip(w, logits, strict=True)) + b[0]
        expect = 1 / (1 + np.exp(-fused))
        assert np.abs(expect - maps[f"{les}_fuse"]).max() < 1e-4


def test_sides_option_writes_fig7_maps(tmp_path, tiny_set, weights):
    proc = run_test_net("--weights", weights, "--data", tiny_set, "--out", tmp_path / "t", "--no-eval", "--sides", 1)
    assert proc.returncode == 0, proc.stderr
    files = sorted(p.name for p in (tmp_path / "t" / "sides").glob("*.png"))
    stem = (tiny_set / "test.txt").read_text().split("\t")[0].split("/")[-1].rsplit(".", 1)[0]
    keys = ["he_conv3", "he_conv4", "he_conv5", "he_fuse", "ma_conv2", "ma_conv3", "ma_conv4", "ma_fuse"]
    assert files == [f"{stem}_{k}.png" for k in keys]
    fused = cv2.imread(str(tmp_path / "t" / "sides" / f"{stem}_ma_fuse.png"), cv2.IMREAD_UNCHANGED)
    pred = cv2.imread(str(tmp_path / "t" / "pred" / f"{stem}_ma.png"), cv2.IMREAD_UNCHANGED)
    assert np.array_equal(fused, pred)
