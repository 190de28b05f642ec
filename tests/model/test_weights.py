"""Weights files are checked before Caffe sees them: VGG16 validation, legacy (V1) model zoo files."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from redseg import config as C
from redseg.toolchain.caffe_utils import CaffeInputError, check_weights, load_net

REPO = Path(__file__).resolve().parents[2]


def vgg_like_v1_model(path: Path, wrong: str | None = None) -> Path:
    """A caffemodel in the old V1 format of the model zoo's VGG16: `layers`, 4-D legacy blob dims."""
    from caffe.proto import caffe_pb2

    param = caffe_pb2.NetParameter(name="VGG_ILSVRC_16_layers")
    cin = 3
    for stage, nout, nconv in C.VGG16_CONVS:
        for i in range(1, nconv + 1):
            layer = param.layers.add(name=f"{stage}_{i}", type=caffe_pb2.V1LayerParameter.CONVOLUTION)
            k = 5 if layer.name == wrong else 3
            w = layer.blobs.add(num=nout, channels=cin, height=k, width=k)
            w.data.extend([0.01] * (nout * cin * k * k))
            b = layer.blobs.add(num=1, channels=1, height=1, width=nout)
            b.data.extend([0.0] * nout)
            cin = nout
    fc = param.layers.add(name="fc8", type=caffe_pb2.V1LayerParameter.INNER_PRODUCT)
    fc.blobs.add(num=1, channels=1, height=10, width=4).data.extend([0.0] * 40)
    path.write_bytes(param.SerializeToString())
    return path


def fetch(*args):
    return subprocess.run([sys.executable, str(REPO / "tools/fetch_vgg16.py"), *map(str, args)],
                          capture_output=True, text=True, timeout=300)  # fmt: skip


def test_legacy_vgg16_file_is_accepted_and_copied(caffe, tmp_path):
    model = vgg_like_v1_model(tmp_path / "vgg.caffemodel")
    assert fetch("--check", model).returncode == 0
    net = load_net(REPO / "prototxt" / "deploy.prototxt")
    from redseg.training.train import VGG16_LAYERS

    copied = check_weights(model, net, strict=False, required=VGG16_LAYERS)
    assert sorted(copied) == sorted(VGG16_LAYERS)
    net.copy_from(str(model))  # Caffe agrees: no abort, and the values arrived
    assert net.params["conv5_3"][0].data.mean() == pytest.approx(0.01)


def test_wrong_vgg16_file_is_rejected(caffe, tmp_path):
    model = vgg_like_v1_model(tmp_path / "bad.caffemodel", wrong="conv3_2")
    proc = fetch("--check", model)
    assert proc.returncode == 1 and "conv3_2" in proc.stderr
    net = load_net(REPO / "prototxt" / "deploy.prototxt")
    with pytest.raises(CaffeInputError, match="conv3_2"):
        check_weights(model, net, strict=False)


def test_offline_fetch_says_what_to_download(tmp_path):
    proc = fetch("--out", tmp_path / "v.caffemodel", "--url", "http://127.0.0.1:9/none.caffemodel",
                 "--keras-url", "http://127.0.0.1:9/none.h5", "--timeout", 2)  # fmt: skip
    assert proc.returncode == 1
    assert "VGG_ILSVRC_16_layers.caffemodel" in proc.stderr and str(tmp_path / "v.caffemodel") in proc.stderr
    assert not (tmp_path / "v.caffemodel").exists()
