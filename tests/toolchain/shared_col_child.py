"""Child processes of tests/toolchain/test_shared_col.py: one Caffe run in a process of its own, with
the shared im2col buffer on or off as the parent set REDSEG_SHARED_COL (read when a convolution
layer is set up; redseg/toolchain/caffe_source.py).

    python shared_col_child.py train DATA RUN OUT.npz [STAGE MAX_ITER]
        the package's own training driver (redseg.training.train.train_stage, the demo schedule,
        from scratch, MAX_ITER iterations, the test-loss net sharing the weights as in training),
        recording after every backward pass each loss and a digest of every parameter's
        gradient and weights (before that iteration's update); then the deploy net
        (redseg.deploy.inference.Segmenter) on the set's test images with the final weights.
        Writes the record and the maps to OUT.npz.
    python shared_col_child.py memory SIZE
        a net of 3x3, dilated, strided, grouped and 1x1 convolutions and a deconvolution at
        SIZE x SIZE; one forward + backward pass; prints JSON: its peak resident memory above the
        process's before the net existed (VmHWM), every blob's data and diff digest.
"""

from __future__ import annotations

import hashlib
import json
import sys
import tempfile
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from redseg.toolchain import blas  # noqa: E402

blas.configure()  # the kernels the suite runs, before Caffe loads OpenBLAS

from redseg.toolchain.caffe_utils import import_caffe  # noqa: E402


def vm_hwm_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def digest(a: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(a).tobytes()).hexdigest()[:16]


def train(data: Path, run_dir: Path, out: Path, stage: int = 1, max_iter: int = 20) -> None:
    from redseg import config as C
    from redseg.data.prepared_set import list_path, read_list, read_meta
    from redseg.deploy.inference import Segmenter
    from redseg.training.train import StageRun, train_stage

    caffe = import_caffe()
    caffe.set_mode_cpu()
    losses: list[list[float]] = []
    grads: list[list[str]] = []
    datas: list[list[str]] = []
    names: list[str] = []
    get_solver = caffe.get_solver

    def recording_solver(path):
        solver = get_solver(path)
        net = solver.net
        names[:] = [f"{layer}/{i}" for layer, blobs in net.params.items() for i in range(len(blobs))]
        loss_blobs = [b for b in net.outputs if b.startswith("loss_")]

        def after_backward(i: int) -> None:
            if i == 0:  # the last layer of the backward pass: the diffs are this iteration's gradients
                losses.append([net.blobs[b].data.item() for b in loss_blobs])
                grads.append([digest(p.diff) for blobs in net.params.values() for p in blobs])
                datas.append([digest(p.data) for blobs in net.params.values() for p in blobs])

        net.after_backward(after_backward)
        return solver

    caffe.get_solver = recording_solver
    weights = None if stage == 1 else run_dir / "stage1_final.caffemodel"
    run = StageRun(
        stage=stage,
        data=data,
        run_dir=run_dir,
        schedule=C.SCHEDULES["demo"],
        from_scratch=stage == 1,
        weights=weights,
        max_iter=max_iter,
        progress=False,
    )
    final = train_stage(run)
    caffe.get_solver = get_solver
    seg = Segmenter(final, read_meta(data)["mean_bgr"])
    maps = {}
    import cv2

    for sample in read_list(list_path(data, "test")):
        for lesion, prob in seg(cv2.imread(str(sample.image))).items():
            maps[f"map/{sample.name}/{lesion}"] = prob
    np.savez(
        out,
        losses=np.asarray(losses, dtype=np.float64),
        grads=np.asarray(grads),
        datas=np.asarray(datas),
        params=np.asarray(names),
        weights=np.frombuffer(final.read_bytes(), dtype=np.uint8),
        **maps,
    )


_MEMORY_NET = """name: "shared-col-check"
force_backward: true
layer {{ name: "data" type: "Input" top: "data" input_param {{ shape {{ dim: 1 dim: 8 dim: {s} dim: {s} }} }} }}
layer {{ name: "target" type: "Input" top: "target" input_param {{ shape {{ dim: 1 dim: 2 dim: {s} dim: {s} }} }} }}
layer {{ name: "c1" type: "Convolution" bottom: "data" top: "c1"
  convolution_param {{ num_output: 32 kernel_size: 3 pad: 1 {fill} }} }}
layer {{ name: "c2" type: "Convolution" bottom: "c1" top: "c2"
  convolution_param {{ num_output: 32 kernel_size: 3 pad: 2 dilation: 2 {fill} }} }}
layer {{ name: "c3" type: "Convolution" bottom: "c2" top: "c3"
  convolution_param {{ num_output: 32 kernel_size: 3 pad: 1 group: 4 {fill} }} }}
layer {{ name: "c4" type: "Convolution" bottom: "c3" top: "c4"
  convolution_param {{ num_output: 32 kernel_size: 3 pad: 1 {fill} }} }}
layer {{ name: "c5" type: "Convolution" bottom: "c4" top: "c5"
  convolution_param {{ num_output: 16 kernel_size: 3 stride: 2 pad: 1 {fill} }} }}
layer {{ name: "side" type: "Convolution" bottom: "c5" top: "side"
  convolution_param {{ num_output: 2 kernel_size: 1 {fill} }} }}
layer {{ name: "up" type: "Deconvolution" bottom: "side" top: "up"
  convolution_param {{ num_output: 2 kernel_size: 4 stride: 2 pad: 1 {fill} }} }}
layer {{ name: "loss" type: "EuclideanLoss" bottom: "up" bottom: "target" top: "loss" }}
"""


def memory(size: int) -> None:
    caffe = import_caffe()
    caffe.set_mode_cpu()
    caffe.set_random_seed(1)
    with tempfile.NamedTemporaryFile("w", suffix=".prototxt", delete=False) as f:
        f.write(_MEMORY_NET.format(s=size, fill='weight_filler { type: "gaussian" std: 0.1 }'))
    before = vm_hwm_mb()
    net = caffe.Net(f.name, caffe.TRAIN)
    Path(f.name).unlink()
    rng = np.random.default_rng(0)
    net.blobs["data"].data[...] = rng.normal(0, 1, net.blobs["data"].data.shape)
    net.blobs["target"].data[...] = rng.normal(0, 1, net.blobs["target"].data.shape)
    for _ in range(2):  # twice: the second pass runs on buffers the first one left
        net.forward()
        net.backward()
    blobs = {f"blob/{k}/data": digest(b.data) for k, b in net.blobs.items()}
    blobs.update({f"blob/{k}/diff": digest(b.diff) for k, b in net.blobs.items()})
    blobs.update({f"param/{k}/{i}": digest(p.diff) for k, ps in net.params.items() for i, p in enumerate(ps)})
    print(json.dumps({"peak_above_start_mb": vm_hwm_mb() - before, "digests": blobs}))


if __name__ == "__main__":
    cmd, args = sys.argv[1], sys.argv[2:]
    if cmd == "train":
        train(Path(args[0]), Path(args[1]), Path(args[2]), *(int(a) for a in args[3:5]))
    elif cmd == "memory":
        memory(int(args[0]))
    else:
        sys.exit(f"unknown command {cmd}")
