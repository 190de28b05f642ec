"""Child processes of tests/toolchain/test_shared_diff.py: one Caffe run in a process of its own, with
the shared diff and data memory on or off as the parent set REDSEG_SHARED_DIFF and
REDSEG_SHARED_DATA (read when a Net is constructed; redseg/toolchain/caffe_source.py).

    python shared_diff_child.py sizes [--read-diffs] SIZE [SIZE ...]
        a net of in-place ReLUs, convolutions (3x3, 1x1), max pooling, a deconvolution, a crop,
        splits (blobs with two consumers), a concat, eltwise sums and a sigmoid, built at the
        first SIZE and run (forward + backward, twice each) at every SIZE after it in turn, so
        the net is reshaped up and down between backward passes. Prints JSON: the loss and every
        blob's data after each forward pass, every parameter's gradient after each backward pass,
        how many distinct diff buffers the blobs had after the last pass, and the peak resident
        memory above the process's before the net existed (VmHWM). --read-diffs: read every blob's whole diff
        after each forward pass (before the backward pass binds the shared diffs again).
    python shared_diff_child.py train ...
        as shared_col_child.py train (the package's training driver, then the deploy net).
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from shared_col_child import digest, import_caffe, train, vm_hwm_mb  # noqa: E402

_NET = """name: "shared-diff-check"
layer {{ name: "data" type: "Input" top: "data" input_param {{ shape {{ dim: 1 dim: 3 dim: {s} dim: {s} }} }} }}
layer {{ name: "target" type: "Input" top: "target" input_param {{ shape {{ dim: 1 dim: 1 dim: {s} dim: {s} }} }} }}
layer {{ name: "c1" type: "Convolution" bottom: "data" top: "c1"
  convolution_param {{ num_output: 16 kernel_size: 3 pad: 1 {fill} }} }}
layer {{ name: "r1" type: "ReLU" bottom: "c1" top: "c1" }}
layer {{ name: "c2" type: "Convolution" bottom: "c1" top: "c2"
  convolution_param {{ num_output: 16 kernel_size: 3 pad: 1 {fill} }} }}
layer {{ name: "r2" type: "ReLU" bottom: "c2" top: "c2" }}
layer {{ name: "p1" type: "Pooling" bottom: "c2" top: "p1" pooling_param {{ pool: MAX kernel_size: 2 stride: 2 }} }}
layer {{ name: "c3" type: "Convolution" bottom: "p1" top: "c3"
  convolution_param {{ num_output: 32 kernel_size: 3 pad: 1 {fill} }} }}
layer {{ name: "r3" type: "ReLU" bottom: "c3" top: "c3" }}
layer {{ name: "s1" type: "Convolution" bottom: "c2" top: "s1"
  convolution_param {{ num_output: 1 kernel_size: 1 {fill} }} }}
layer {{ name: "s2" type: "Convolution" bottom: "c3" top: "s2"
  convolution_param {{ num_output: 1 kernel_size: 1 {fill} }} }}
layer {{ name: "u2" type: "Deconvolution" bottom: "s2" top: "u2"
  convolution_param {{ num_output: 1 kernel_size: 4 stride: 2 pad: 1 {fill} }} }}
layer {{ name: "k2" type: "Crop" bottom: "u2" bottom: "data" top: "k2" crop_param {{ axis: 2 offset: 0 }} }}
layer {{ name: "e" type: "Eltwise" bottom: "s1" bottom: "k2" top: "e" }}
layer {{ name: "g" type: "Sigmoid" bottom: "e" top: "g" }}
layer {{ name: "cat" type: "Concat" bottom: "s1" bottom: "k2" top: "cat" }}
layer {{ name: "f" type: "Convolution" bottom: "cat" top: "f"
  convolution_param {{ num_output: 1 kernel_size: 1 {fill} }} }}
layer {{ name: "fuse" type: "Eltwise" bottom: "f" bottom: "g" top: "fuse" }}
layer {{ name: "loss" type: "EuclideanLoss" bottom: "fuse" bottom: "target" top: "loss" }}
"""


def sizes(sides: list[int], read_diffs: bool = False) -> None:
    caffe = import_caffe()
    caffe.set_mode_cpu()
    caffe.set_random_seed(1)
    with tempfile.NamedTemporaryFile("w", suffix=".prototxt", delete=False) as f:
        f.write(_NET.format(s=sides[0], fill='weight_filler { type: "gaussian" std: 0.1 }'))
    before = vm_hwm_mb()
    net = caffe.Net(f.name, caffe.TRAIN)
    Path(f.name).unlink()
    rng = np.random.default_rng(0)
    passes = []
    for side in sides[1:]:
        net.blobs["data"].reshape(1, 3, side, side)
        net.blobs["target"].reshape(1, 1, side, side)
        net.reshape()
        for _ in range(2):
            net.blobs["data"].data[...] = rng.normal(0, 1, net.blobs["data"].data.shape)
            net.blobs["target"].data[...] = rng.normal(0, 1, net.blobs["target"].data.shape)
            loss = float(net.forward()["loss"])
            data = {k: digest(b.data) for k, b in net.blobs.items()}  # (not kept after backward)
            if read_diffs:  # every blob's diff readable in full after a reshape (a shared diff
                # too small is replaced by the blob's own) before the backward pass binds them again
                for b in net.blobs.values():
                    b.diff.astype(np.float64).sum()
            for ps in net.params.values():
                for p in ps:
                    p.diff[...] = 0
            net.backward()
            passes.append(
                {
                    "side": side,
                    "loss": loss.hex(),
                    "grads": {f"{k}/{i}": digest(p.diff) for k, ps in net.params.items() for i, p in enumerate(ps)},
                    "data": data,
                }
            )
    buffers = {b.diff.__array_interface__["data"][0] for b in net.blobs.values()}
    print(
        json.dumps(
            {
                "peak_above_start_mb": vm_hwm_mb() - before,
                "passes": passes,
                "blobs": len(net.blobs),
                "diff_buffers": len(buffers),
            }
        )
    )


if __name__ == "__main__":
    cmd, args = sys.argv[1], sys.argv[2:]
    if cmd == "sizes":
        read = args[:1] == ["--read-diffs"]
        sizes([int(a) for a in args[read:]], read)
    elif cmd == "train":
        train(Path(args[0]), Path(args[1]), Path(args[2]), *(int(a) for a in args[3:5]))
    else:
        sys.exit(f"unknown command {cmd}")
