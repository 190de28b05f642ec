"""The floor everything stands on: a real pycaffe, with Python layers, that trains."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import numpy as np
import pytest

from redseg.toolchain.caffe_utils import CaffeInputError, check_net_param, load_net, read_net_param

TINY_NET = """
name: "tiny"
layer { name: "x" type: "Input" top: "x" input_param { shape { dim: 4 dim: 3 dim: 5 dim: 5 } } }
layer { name: "y" type: "Input" top: "y" input_param { shape { dim: 4 dim: 1 dim: 5 dim: 5 } } }
layer { name: "conv" type: "Convolution" bottom: "x" top: "pred"
  convolution_param { num_output: 1 kernel_size: 1 weight_filler { type: "constant" value: 0 } } }
layer { name: "loss" type: "Python" bottom: "pred" bottom: "y" top: "loss" loss_weight: 1
  python_param { module: "floor_layers" layer: "HalfSquaredError" } }
"""


def test_pycaffe_imports_with_python_layer(caffe):
    assert hasattr(caffe, "SGDSolver")
    types = caffe.layer_type_list()
    assert "Python" in types and "Deconvolution" in types and "Crop" in types


def test_tiny_net_with_python_loss_trains(caffe, tmp_path):
    net_path = tmp_path / "net.prototxt"
    net_path.write_text(TINY_NET)
    solver_path = tmp_path / "solver.prototxt"
    solver_path.write_text(
        f'net: "{net_path}"\nbase_lr: 0.01\nlr_policy: "fixed"\nmomentum: 0.9\n'
        f'max_iter: 100\ndisplay: 0\nsnapshot: 0\nsolver_mode: CPU\nsnapshot_prefix: "{tmp_path}/s"\n'
    )
    solver = caffe.SGDSolver(str(solver_path))
    rng = np.random.default_rng(0)
    x = rng.normal(size=(4, 3, 5, 5)).astype(np.float32)
    w_true = np.array([1.0, -2.0, 0.5], dtype=np.float32)
    y = np.einsum("c,nchw->nhw", w_true, x)[:, None]
    solver.net.blobs["x"].data[...] = x
    solver.net.blobs["y"].data[...] = y
    first = solver.net.forward()["loss"].item()
    solver.step(60)
    last = solver.net.forward()["loss"].item()
    assert last < 0.05 * first
    np.testing.assert_allclose(solver.net.params["conv"][0].data.ravel(), w_true, atol=0.1)


def test_unknown_layer_type_is_a_python_error(caffe, tmp_path):
    bad = tmp_path / "bad.prototxt"
    bad.write_text(TINY_NET.replace('type: "Convolution"', 'type: "NoSuchLayer"'))
    with pytest.raises(CaffeInputError, match="NoSuchLayer"):
        load_net(bad)


def test_missing_python_module_and_bottom_are_python_errors(caffe, tmp_path):
    bad = tmp_path / "bad.prototxt"
    bad.write_text(TINY_NET.replace('module: "floor_layers"', 'module: "no_such_module"'))
    with pytest.raises(CaffeInputError, match="no_such_module"):
        check_net_param(read_net_param(bad))
    bad.write_text(TINY_NET.replace('bottom: "pred" bottom: "y"', 'bottom: "pred" bottom: "z"'))
    with pytest.raises(CaffeInputError, match="'z'"):
        load_net(bad)
    with pytest.raises(CaffeInputError, match="not found"):
        load_net(tmp_path / "missing.prototxt")


def test_unchecked_caffe_really_aborts(tmp_path):
    """Why the checks exist: handing the same file straight to Caffe kills the process."""
    bad = tmp_path / "bad.prototxt"
    bad.write_text(TINY_NET.replace('type: "Convolution"', 'type: "NoSuchLayer"'))
    code = textwrap.dedent(f"""
        import os; os.environ["GLOG_minloglevel"] = "2"
        import caffe
        caffe.Net({str(bad)!r}, caffe.TEST)
        print("survived")
    """)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0 and "survived" not in proc.stdout
