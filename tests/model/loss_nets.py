"""A one-layer Caffe net around a loss layer, shared by the loss tests."""

from __future__ import annotations

import json

NET = """
force_backward: true
layer {{ name: "x" type: "Input" top: "x" input_param {{ shape {{ dim: {n} dim: 1 dim: {h} dim: {w} }} }} }}
layer {{ name: "y" type: "Input" top: "y" input_param {{ shape {{ dim: {n} dim: 1 dim: {h} dim: {w} }} }} }}
layer {{ name: "loss" type: "Python" bottom: "x" bottom: "y" top: "loss" loss_weight: {lw}
  python_param {{ module: "losses" layer: "{layer}" param_str: '{param}' }} }}
"""


def make_net(caffe, tmp_path, layer, shape=(1, 12, 16), param=None, lw=1.0, phase="TRAIN"):
    """(net, the loss layer's Python instance) for logits and labels of shape N x 1 x H x W."""
    n, h, w = shape
    path = tmp_path / f"{layer}_{n}_{h}_{w}.prototxt"
    path.write_text(NET.format(n=n, h=h, w=w, lw=lw, layer=layer, param=json.dumps(param or {})))
    net = caffe.Net(str(path), caffe.TRAIN if phase == "TRAIN" else caffe.TEST)
    return net, net.layers[list(net._layer_names).index("loss")]


def run(net, x, y):
    """Forward + backward: (loss, gradient w.r.t. the logits)."""
    net.blobs["x"].data[...] = x
    net.blobs["y"].data[...] = y
    loss = net.forward()["loss"].item()
    net.backward()
    return loss, net.blobs["x"].diff.copy()
