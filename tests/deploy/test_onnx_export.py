"""The ONNX export (redseg/deploy/onnx_export.py, tools/export_onnx.py) against real pycaffe and ONNX Runtime.

The exported model must give pycaffe's probabilities (to 1e-4) at odd input sizes, where Caffe's
ceil rounding of the pooled size and the crop offsets decide every pixel, for the main deploy net
and a fusion variant; the fixed-size export (static crops) must do so in OpenCV's DNN module. The
weights are random (no trained model needed), scaled so that the probabilities spread over (0, 1)
rather than sit at 0, 1 or 0.5, where a wrong conversion could hide.
"""

from __future__ import annotations

import json
import logging
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from redseg import config as C
from redseg.deploy.inference import OnnxSegmenter, Segmenter, read_onnx_info
from redseg.deploy.model_info import ModelInfo, read_model_info
from redseg.deploy.onnx_export import UnsupportedLayerError, export

REPO = Path(__file__).resolve().parents[2]
DEPLOYS = {
    "main": REPO / "prototxt" / "deploy.prototxt",
    "ma_conv1-4": REPO / "prototxt" / "ablations" / "deploy_ma_conv1-4.prototxt",
}
SIZES = [(37, 53), (64, 64), (101, 77)]  # (H, W): odd sides make Caffe's ceil pooling and the crops matter
MEAN = (20.0, 60.0, 110.0)
TOL = 1e-4


def random_weights(caffe, deploy: Path, out: Path, seed: int) -> Path:
    """He-scaled random convolutions (the bilinear deconvolutions as Caffe fills them), the fuse
    convolutions scaled so that the fused logits have a spread of about 2 on a random image."""
    net = caffe.Net(str(deploy), caffe.TEST)
    rng = np.random.default_rng(seed)
    for name, blobs in net.params.items():
        if name.startswith("up_"):
            continue  # fixed bilinear kernels
        w = blobs[0].data
        w[...] = rng.normal(0.0, np.sqrt(2.0 / np.prod(w.shape[1:])), w.shape)
        if len(blobs) > 1:
            blobs[1].data[...] = rng.normal(0.0, 0.1, blobs[1].data.shape)
    h, w = SIZES[-1]
    net.blobs["data"].reshape(1, 3, h, w)
    net.reshape()
    net.blobs["data"].data[...] = rng.uniform(0, 255, (1, 3, h, w)) - np.reshape(MEAN, (1, 3, 1, 1))
    net.forward()
    for les in ("ma", "he"):
        fuse = net.blobs[f"fuse_{les}"].data
        scale = 2.0 / max(float(fuse.std()), 1e-6)
        net.params[f"fuse_{les}"][0].data[...] *= scale
        net.params[f"fuse_{les}"][1].data[...] = -float(fuse.mean()) * scale
    net.save(str(out))
    return out


@pytest.fixture(scope="module", params=list(DEPLOYS), ids=list(DEPLOYS))
def exported(request, caffe, tmp_path_factory):
    """(deploy, weights, ONNX model without a stored mean) of one deploy net."""
    tmp = tmp_path_factory.mktemp(f"onnx_{request.param}")
    deploy = DEPLOYS[request.param]
    weights = random_weights(caffe, deploy, tmp / "random.caffemodel", seed=len(request.param))
    model = export(weights, tmp / "model.onnx", deploy=deploy, verify_size=None)
    return deploy, weights, model


def test_onnx_gives_pycaffe_probabilities_at_odd_sizes(exported, caplog):
    import onnx

    deploy, weights, model = exported
    caffe_seg = Segmenter(weights, MEAN, deploy)
    onnx_seg = OnnxSegmenter(model, mean_bgr=MEAN, providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(1)
    for h, w in SIZES:
        img = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        want, got = caffe_seg(img), onnx_seg(img)
        for lesion in C.LESIONS:
            p = want[lesion]
            assert got[lesion].shape == (h, w) and got[lesion].dtype == np.float32
            # Not a trivial comparison: the probabilities spread, neither saturated nor all 0.5.
            assert p.std() > 0.05 and 0.02 < p.mean() < 0.98, (lesion, h, w, p.mean(), p.std())
            diff = float(np.abs(got[lesion] - p).max())
            assert diff <= TOL, f"{deploy.name} {lesion} at {h}x{w}: max |diff| {diff:.3g}"
    # What the graph is made of: opset, dynamic sides, Caffe's layers as the module says.
    m = onnx.load(str(model))
    assert m.opset_import[0].version >= 17
    dims = [d.dim_param or d.dim_value for d in m.graph.input[0].type.tensor_type.shape.dim]
    assert m.graph.input[0].name == "data" and dims == [1, 3, "height", "width"]
    assert [o.name for o in m.graph.output] == ["prob_ma", "prob_he"]
    ops = {n.op_type for n in m.graph.node}
    assert {"Conv", "ConvTranspose", "Slice", "MaxPool", "Concat", "Sigmoid", "Relu"} <= ops
    pools = [n for n in m.graph.node if n.op_type == "MaxPool"]
    assert all(a.i == 1 for n in pools for a in n.attribute if a.name == "ceil_mode")
    # No mean stored: the L-Seg mean, with a warning.
    with caplog.at_level(logging.WARNING, logger="redseg.deploy.inference"):
        seg = OnnxSegmenter(model, providers=["CPUExecutionProvider"])
    assert np.allclose(seg.mean, C.LSEG_MEAN_BGR) and "no input mean" in caplog.text
    stages = read_onnx_info(model).fusion_stages
    assert stages == {"MA": [1, 2, 3, 4] if "conv1-4" in deploy.name else [2, 3, 4], "HE": [3, 4, 5]}


def test_fixed_size_onnx_runs_in_opencv_dnn_like_pycaffe(caffe, tmp_path):
    """The fixed-size export in OpenCV DNN against pycaffe at an odd size (ceil pooling and crops
    matter there); OpenCV refuses the dynamic export (its Shape nodes)."""
    import cv2
    import onnx

    h, w = SIZES[0]
    weights = random_weights(caffe, DEPLOYS["main"], tmp_path / "w.caffemodel", seed=5)
    fixed = export(weights, tmp_path / "fixed.onnx", mean_bgr=MEAN, input_size=(h, w))  # checked in both
    model = onnx.load(str(fixed))
    assert "Shape" not in {n.op_type for n in model.graph.node}
    assert [d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim] == [1, 3, h, w]
    assert json.loads({p.key: p.value for p in model.metadata_props}["input_size"]) == [h, w]
    img = np.random.default_rng(2).integers(0, 256, (h, w, 3), dtype=np.uint8)
    want = Segmenter(weights, MEAN)(img)
    net = cv2.dnn.readNetFromONNX(str(fixed))
    blob = (img.astype(np.float32) - np.float32(MEAN)).transpose(2, 0, 1)[None]
    net.setInput(np.ascontiguousarray(blob), "data")
    got = dict(zip(C.LESIONS, net.forward(["prob_ma", "prob_he"]), strict=True))
    for lesion in C.LESIONS:
        assert want[lesion].std() > 0.05
        assert float(np.abs(got[lesion][0, 0] - want[lesion]).max()) <= TOL
    dynamic = export(weights, tmp_path / "dynamic.onnx", mean_bgr=MEAN, verify_size=None)
    with pytest.raises(cv2.error):
        cv2.dnn.readNetFromONNX(str(dynamic))


def test_segmenting_with_onnx_loads_no_caffe(exported):
    _, _, model = exported
    code = (
        "import sys, numpy as np\n"
        "from redseg.deploy.inference import OnnxSegmenter\n"
        f"seg = OnnxSegmenter({str(model)!r}, mean_bgr=(1, 2, 3))\n"
        "out = seg(np.zeros((33, 41, 3), np.uint8))\n"
        "assert out['MA'].shape == (33, 41), out['MA'].shape\n"
        "print(sorted(m for m in sys.modules if m == 'caffe' or m.startswith('caffe.')))\n"
    )
    r = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "[]"


def test_a_file_that_is_no_model_is_a_clear_error(tmp_path):
    bad = tmp_path / "model.onnx"
    bad.write_bytes(b"not a model")
    with pytest.raises(ValueError, match="cannot load it as a model"):
        OnnxSegmenter(bad)
    with pytest.raises(FileNotFoundError):
        read_onnx_info(tmp_path / "missing.onnx")


def test_unknown_layer_types_are_refused_by_name(caffe, tmp_path):
    proto = tmp_path / "odd.prototxt"
    proto.write_text(
        'layer { name: "data" type: "Input" top: "data" input_param { shape { dim: 1 dim: 3 dim: 8 dim: 8 } } }\n'
        'layer { name: "conv1" type: "Convolution" bottom: "data" top: "conv1"\n'
        "  convolution_param { num_output: 2 kernel_size: 3 } }\n"
        'layer { name: "norm1" type: "LRN" bottom: "conv1" top: "norm1" }\n'
        'layer { name: "drop1" type: "Dropout" bottom: "norm1" top: "norm1" }\n'
        'layer { name: "norm2" type: "LRN" bottom: "norm1" top: "norm2" }\n'
    )
    weights = tmp_path / "odd.caffemodel"
    caffe.Net(str(proto), caffe.TEST).save(str(weights))
    with pytest.raises(UnsupportedLayerError) as e:
        export(weights, tmp_path / "odd.onnx", deploy=proto)
    assert isinstance(e.value, ValueError)
    msg = str(e.value)
    assert "type 'LRN' (layers norm1, norm2)" in msg and "type 'Dropout' (layer drop1)" in msg
    assert "conv1" not in msg.split("Supported")[0] and not (tmp_path / "odd.onnx").exists()


def test_export_refuses_a_model_that_differs_from_caffe(exported, monkeypatch, tmp_path):
    from redseg.deploy import onnx_export

    deploy, weights, _ = exported
    pool_attrs = onnx_export._pool_attrs
    monkeypatch.setattr(onnx_export, "_pool_attrs", lambda layer: {**pool_attrs(layer), "ceil_mode": 0})
    with pytest.raises(onnx_export.ExportCheckError, match="at 37x53"):  # floor pooling: the sizes disagree
        export(weights, tmp_path / "floor.onnx", deploy=deploy, verify_size=(37, 53))
    assert not (tmp_path / "floor.onnx").exists()


def _tool():
    import importlib.util

    spec = importlib.util.spec_from_file_location("tool_export_onnx", REPO / "tools" / "export_onnx.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_tool_writes_model_with_sidecar_metadata_and_keeps_an_existing_one(caffe, tmp_path, capsys):
    weights = random_weights(caffe, DEPLOYS["main"], tmp_path / "stage2_final.caffemodel", seed=3)
    side = {"mean_bgr": [11.0, 22.0, 33.0], "fov_diameter_px": 1003.5, "thresholds": {"MA": 0.3, "HE": 0.45}}
    side |= {"threshold_rule": "break-even", "source": "runs/x/metrics.json"}
    Path(f"{weights}.json").write_text(json.dumps({**side, "other": "not copied"}))
    out = tmp_path / "onnx" / "redseg.onnx"
    tool = _tool()
    assert tool.main(["-q", "--weights", str(weights), "--out", str(out)]) == 0
    info = read_onnx_info(out)
    assert info.mean_bgr == (11.0, 22.0, 33.0) and info.fov_diameter_px == 1003.5
    assert info.thresholds == {"MA": 0.3, "HE": 0.45} and info.deploy == "deploy.prototxt"
    assert "other" not in info.raw and json.loads(info.raw["weights"]) == "stage2_final.caffemodel"
    assert info.threshold_rule == "break-even"
    assert ModelInfo.from_metadata(info.raw) == read_model_info(weights)  # the sidecar, round trip
    assert np.allclose(OnnxSegmenter(out, providers=["CPUExecutionProvider"]).mean, side["mean_bgr"])
    capsys.readouterr()

    before = out.read_bytes()
    assert tool.main(["-q", "--weights", str(weights), "--out", str(out), "--mean-bgr", "1,2,3"]) == 1
    err = capsys.readouterr().err
    assert ": error: " in err and "--force" in err and err.count("\n") == 1
    assert out.read_bytes() == before
    assert tool.main(["-q", "--weights", str(weights), "--out", str(out), "--mean-bgr", "1,2,3", "--force"]) == 0
    assert read_onnx_info(out).mean_bgr == (1.0, 2.0, 3.0)  # given over the sidecar's
    assert sorted(p.name for p in out.parent.iterdir()) == ["redseg.onnx"]  # no temporary left

    bad = tmp_path / "bad.prototxt"
    bad.write_text(DEPLOYS["main"].read_text().replace('type: "Sigmoid"', 'type: "TanH"'))
    assert tool.main(["-q", "--weights", str(weights), "--out", str(tmp_path / "x.onnx"), "--deploy", str(bad)]) == 1
    err = capsys.readouterr().err
    assert "type 'TanH' (layers prob_ma, prob_he)" in err and err.count("\n") == 1


def test_benchmark_times_pycaffe_and_onnxruntime_side_by_side(tmp_path, capsys):
    import importlib.util

    spec = importlib.util.spec_from_file_location("tool_benchmark", REPO / "tools" / "benchmark.py")
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    out = tmp_path / "onnx.json"
    assert tool.main(["-q", "--onnx", "--size", "37x53", "--repeats", "2", "--warmup", "0", "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["size"] == [37, 53] and result["max_abs_prob_diff"] <= TOL
    for key in ("pycaffe_forward_s", "onnxruntime_forward_s"):
        assert result[key]["n"] == 2 and result[key]["median"] > 0
    assert result["onnxruntime"]["providers"] == ["CPUExecutionProvider"] and result["machine"]["cpu"]
    assert "ONNX Runtime speed-up over pycaffe" in capsys.readouterr().out
