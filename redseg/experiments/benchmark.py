"""Timing Red-Seg's real nets: where an iteration's time goes (docs/performance.md).

On a GPU a Red-Seg iteration at 1072x712 takes a fraction of a second, while the 8 Python loss
layers (paper section 2.2) and the Python data layer run on the CPU every iteration, so their cost
decides whether the paper's 103,680 iterations take hours or days. This module measures, on the
nets that training really uses (``redseg.model.net``: the stage-1 and stage-2 train nets, the deploy
net) and on images it makes itself (no IDRiD needed):

* one training iteration (``solver.step(1)``) of stage 1 and of stage 2, with a per-layer
  breakdown in the style of ``caffe time`` taken inside those same iterations (pycaffe's
  ``before_forward``/``after_forward``/``before_backward``/``after_backward`` callbacks);
* the 8 loss layers' forward + backward together (``net._forward(i, i)``/``net._backward(i, i)``
  on the real logits), and the float64 reference implementation of the losses
  (redseg/model/reference_losses.py, the tests' numerical oracle) on the same inputs, with a check that
  both give the same numbers;
* the data layer per iteration in steady state (every sample cached);
* one deploy forward pass, scoring a 27-image test set (IDRiD's test size) with
  ``redseg.evaluation.scoring.evaluate``, and the peak resident memory;
* first (:func:`run_memory_benchmark`), each net in a fresh process of its own, with Caffe's
  shared im2col buffer (make setup's patch, docs/install.md) and with one buffer per layer
  (``REDSEG_SHARED_COL=0``, upstream's layout), and with the shared im2col buffer and shared blob
  diffs (``REDSEG_SHARED_DIFF=1``, what the training driver builds): peak resident memory and
  seconds per iteration; the deploy net at several sizes (the largest photograph within 16 GB);
  and, from the blob shapes, the GPU memory an iteration needs both ways;
* separately (:func:`run_onnx_benchmark`, ``tools/benchmark.py --onnx``): one photograph through
  the deploy net in pycaffe and through its ONNX export (redseg/deploy/onnx_export.py) in ONNX Runtime,
  side by side on the same input, with the largest difference of the probabilities.

Every timing is repeated; results carry the median and the interquartile range.
"""

from __future__ import annotations

import gc
import json
import logging
import os
import platform
import re
import resource
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import cv2
import numpy as np

from redseg import config as C
from redseg.data.prepared_set import list_path, read_list, read_mask, write_list
from redseg.fileio import mark_complete, write_image, write_json
from redseg.model import reference_losses
from redseg.toolchain import blas
from redseg.toolchain.caffe_utils import (
    REPO,
    SHARED_COL_ENV,
    SHARED_DATA_ENV,
    SHARED_DIFF_ENV,
    caffe_shared_col,
    caffe_shared_data,
    caffe_shared_diff,
    import_caffe,
    set_mode,
)

log = logging.getLogger(__name__)

TARGET_SIZE = (712, 1072)  # (H, W): the paper's 4x-downsampled IDRiD images
N_TEST_IMAGES = 27  # IDRiD's test set: IDRiD_55 .. IDRiD_81
# Same tolerances as tests/model/test_losses.py: float32 layers against the float64 oracle.
LOSS_RTOL = 1e-5
GRAD_RTOL, GRAD_ATOL = 1e-4, 1e-6


@dataclass
class BenchConfig:
    size: tuple[int, int] = TARGET_SIZE  # (H, W)
    gpu: int | None = None
    repeats: int = 3  # heavy measurements: training iterations, deploy forward, scoring
    fast_repeats: int = 20  # light ones: loss layers, data layer
    warmup: int = 1  # untimed iterations / forward passes first (lazy allocation, caches)
    n_train: int = 2  # training images (distinct samples for the data layer)
    seed: int = 0
    stages: tuple[int, ...] = (1, 2)
    workdir: Path | None = None  # default: a temporary folder, removed afterwards
    memory: bool = True  # each net's peak memory in a process of its own, shared and own im2col buffers
    memory_only: bool = False  # only that (no in-process timings, loss layers, scoring)
    deploy_scales: tuple[float, ...] = (0.5, 1.0)  # deploy net sizes (x size) for the largest photograph
    memory_rounds: int = 1  # each net, each way, this many fresh processes (taking turns)
    extra: dict = field(default_factory=dict)


# --- statistics ---------------------------------------------------------------------------------


def summarize(samples: list[float], digits: int = 4) -> dict:
    """Median, quartiles, IQR, min, max and the samples themselves (rounded), of one measurement."""
    a = np.asarray(samples, dtype=np.float64)
    q1, med, q3 = np.percentile(a, [25, 50, 75])

    def r(v: float) -> float:
        return float(f"{v:.{digits}g}")

    return {
        "median": r(med),
        "iqr": r(q3 - q1),
        "q1": r(q1),
        "q3": r(q3),
        "min": r(a.min()),
        "max": r(a.max()),
        "n": int(a.size),
        "samples": [r(v) for v in a],
    }


def _timed(fn: Callable[[], object], repeats: int, scale: float = 1.0) -> list[float]:
    out = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        out.append((time.perf_counter() - t0) * scale)
    return out


def rss_mb() -> float:
    """Current resident set size (MB) of this process."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except OSError:  # not Linux
        return float("nan")


def peak_rss_mb() -> float:
    """Peak resident set size (MB) of this process so far (ru_maxrss: KiB on Linux, bytes on macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if platform.system() == "Darwin" else peak / 2**10


def machine_info(gpu: int | None) -> dict:
    info: dict = {
        "cpu": platform.processor() or platform.machine(),
        "logical_cpus": os.cpu_count(),
        "usable_cpus": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "python": platform.python_version(),
        "numpy": np.__version__,
        "platform": platform.platform(),
        "mode": "CPU" if gpu is None else f"GPU {gpu}",
    }
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                info["cpu"] = line.split(":", 1)[1].strip()
                break
        mem = Path("/proc/meminfo").read_text().split("\n")[0].split()
        info["memory_gb"] = round(int(mem[1]) / 2**20, 1)
    except (OSError, IndexError, ValueError):
        pass
    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_CORETYPE"):
        if os.environ.get(var):
            info[var] = os.environ[var]
    if gpu is not None and shutil.which("nvidia-smi"):
        import subprocess

        try:
            out = subprocess.run(
                ["nvidia-smi", "-i", str(gpu), "--query-gpu=name,driver_version", "--format=csv,noheader"],
                capture_output=True,
                text=True,
                timeout=30,
            ).stdout.strip()
            info["gpu"] = out
        except (OSError, subprocess.SubprocessError):
            pass
    return info


# --- a prepared set made on the spot ------------------------------------------------------------


def _scene(rng: np.random.Generator, h: int, w: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A synthetic fundus photograph with MA and HE masks (redseg.data.synthetic), at exactly h x w."""
    from redseg.data.synthetic import SyntheticParams, render_fundus

    img = render_fundus(rng, SyntheticParams(width=w, height=h))
    empty = np.zeros((h, w), bool)
    return img.image, img.masks.get("MA", empty), img.masks.get("HE", empty)


def make_benchmark_set(root: Path, size: tuple[int, int], n_train: int, n_test: int, seed: int = 0) -> Path:
    """A prepared set (docs/data_format.md) of ``n_train`` training and ``n_test`` test images at ``size``.

    Images come from the synthetic fundus renderer, so lesion densities are like IDRiD's. Rendering
    costs about a second per image at 1072x712, so the test set reuses a few rendered scenes under
    ``n_test`` names (scoring time does not depend on which pictures they are).
    """
    h, w = size
    rng = np.random.default_rng(seed)
    lines: dict[str, list[list[str]]] = {"train": [], "test": []}
    mean_acc = np.zeros(3)
    n_test_scenes = min(n_test, 2)
    for split, n, scenes in (("train", n_train, n_train), ("test", n_test, n_test_scenes)):
        (root / split / "images").mkdir(parents=True, exist_ok=True)
        (root / split / "masks").mkdir(parents=True, exist_ok=True)
        rendered = [_scene(rng, h, w) for _ in range(scenes)]
        for i in range(n):
            name = f"IDRiD_{i + 1:02d}" if split == "train" else f"IDRiD_{i + 55:02d}"
            img, ma, he = rendered[i % scenes]
            if split == "train":
                mean_acc += img.reshape(-1, 3).mean(axis=0)
            paths = [f"{split}/images/{name}.png", f"{split}/masks/{name}_MA.png", f"{split}/masks/{name}_HE.png"]
            for rel, arr in zip(paths, (img, ma.astype(np.uint8) * 255, he.astype(np.uint8) * 255), strict=True):
                write_image(root / rel, arr)
            lines[split].append(paths)
    for split, rows in lines.items():
        write_list(list_path(root, split), rows)
    meta = {"mean_bgr": [round(v, 4) for v in (mean_acc / max(n_train, 1)).tolist()], "factor": 1, "size": [w, h]}
    write_json(root / "meta.json", meta)
    mark_complete(root)
    return root


def make_prediction_maps(root: Path, pred_dir: Path, seed: int = 0) -> int:
    """8-bit maps ``<name>_ma.png``/``<name>_he.png`` for the set's test images: blurred masks + noise."""
    rng = np.random.default_rng(seed)
    pred_dir.mkdir(parents=True, exist_ok=True)
    n = 0
    for sample in read_list(list_path(root, "test")):
        for les, path in sample.masks.items():
            m = read_mask(path).astype(np.float32)
            p = cv2.GaussianBlur(m, (0, 0), 2.0) * 0.8 + rng.random(m.shape, dtype=np.float32) * 0.3
            write_image(pred_dir / f"{sample.name}_{les.lower()}.png", np.clip(p * 255, 0, 255).astype(np.uint8))
        n += 1
    return n


# --- per-layer timing inside real iterations ------------------------------------------------------


class LayerTimer:
    """Per-layer forward/backward wall time, collected by pycaffe's net callbacks during iterations.

    Like ``caffe time`` but inside ``solver.step``: the numbers add up to the iteration, and the
    Python layers are timed exactly where Caffe calls them. Callbacks cannot be removed from a
    net, so they stay registered and record only while :attr:`active`. In GPU mode Caffe's layers
    return once their kernels are queued; a layer that reads blobs on the host (our Python layers)
    then waits for the queue, so on a GPU the per-layer split is indicative only (the iteration
    total is exact: the benchmark reads a loss on the host after each step).
    """

    def __init__(self, net):
        self.names = list(net._layer_names)
        self.types = [self._type(layer) for layer in net.layers]
        self.python = [layer.type == "Python" for layer in net.layers]
        n = len(self.names)
        self.fwd = np.zeros(n)
        self.bwd = np.zeros(n)
        self.iterations: list[tuple[np.ndarray, np.ndarray]] = []
        self.active = False
        self._t0 = 0.0
        net.before_forward(self._start)
        net.after_forward(self._end_fwd)
        net.before_backward(self._start)
        net.after_backward(self._end_bwd)

    @staticmethod
    def _type(layer) -> str:
        return type(layer).__name__ if layer.type == "Python" else layer.type

    def _start(self, i: int) -> None:
        self._t0 = time.perf_counter()

    def _end_fwd(self, i: int) -> None:
        if self.active:
            self.fwd[i] += time.perf_counter() - self._t0

    def _end_bwd(self, i: int) -> None:
        if self.active:
            self.bwd[i] += time.perf_counter() - self._t0

    def begin(self) -> None:
        self.fwd[:] = 0
        self.bwd[:] = 0
        self.active = True

    def end(self) -> None:
        self.active = False
        self.iterations.append((self.fwd.copy(), self.bwd.copy()))

    def python_ms(self, j: int) -> float:
        """Time spent in the Python layers during recorded iteration ``j`` (ms)."""
        f, b = self.iterations[j]
        py = np.asarray(self.python)
        return float((f[py].sum() + b[py].sum()) * 1e3)

    def table(self, j: int) -> list[dict]:
        """Forward/backward ms per layer in recorded iteration ``j``, in net order.

        One real iteration (the benchmark passes the one of median duration) rather than per-layer
        medians, so that the rows add up to that iteration's time.
        """
        f, b = self.iterations[j][0] * 1e3, self.iterations[j][1] * 1e3
        return [
            {
                "index": i,
                "name": self.names[i],
                "type": self.types[i],
                "python": self.python[i],
                "forward_ms": round(float(f[i]), 3),
                "backward_ms": round(float(b[i]), 3),
            }
            for i in range(len(self.names))
        ]


def conv_gflop(net) -> float:
    """Multiply-adds x 2 of the net's Convolution/Deconvolution layers in one forward pass (GFLOP)."""
    total = 0.0
    for name, layer in zip(net._layer_names, net.layers, strict=True):
        if layer.type not in ("Convolution", "Deconvolution") or name not in net.params:
            continue
        w = net.params[name][0].data.shape  # conv: (out, in, kh, kw); deconv: (in, out, kh, kw)
        bottom = net.blobs[net.bottom_names[name][0]].data.shape
        top = net.blobs[net.top_names[name][0]].data.shape
        if layer.type == "Convolution":
            total += 2.0 * np.prod(top) * w[1] * w[2] * w[3]
        else:
            total += 2.0 * np.prod(bottom) * w[1] * w[2] * w[3]
    return total / 1e9


def _loss_layer_indices(net) -> list[int]:
    return [
        i
        for i, layer in enumerate(net.layers)
        if layer.type == "Python" and type(layer).__name__ in ("TopKBalancedCELoss", "FNFPLoss")
    ]


def _data_layer_index(net) -> int:
    return next(i for i, layer in enumerate(net.layers) if type(layer).__name__ == "RedSegData")


def _write_stage(workdir: Path, stage: int, train_list: Path, gpu: bool) -> Path:
    """The stage's train net (redseg.model.net, as `make prototxt` writes it) and a solver; returns the solver."""
    from redseg.model.net import NetOptions, redseg, solver_text

    net_path = workdir / f"stage{stage}_train.prototxt"
    net_path.write_text(str(redseg(NetOptions(stage=stage, train_list=str(train_list)))))
    st = C.SCHEDULES["paper"].stage1 if stage == 1 else C.SCHEDULES["paper"].stage2
    st = C.StageSchedule(st.base_lr, max_iter=10**8, snapshot=0, display=0)  # never snapshots
    solver = workdir / f"stage{stage}_solver.prototxt"
    solver.write_text(solver_text(str(net_path), st, f"benchmark stage {stage}", str(workdir / "snap"), gpu))
    return solver


def _check_against_reference(net, idx: list[int], stage: int) -> dict:
    """Fast layers' last loss and gradient vs the reference on the same blobs."""
    worst_loss, worst_grad, ok = 0.0, 0.0, True
    for i in idx:
        name = net._layer_names[i]
        xb, yb = net.bottom_names[name]
        x, y = net.blobs[xb].data, net.blobs[yb].data
        fast_loss = net.blobs[net.top_names[name][0]].data.item()
        fast_grad = net.blobs[xb].diff
        if stage == 1:
            ref_loss, ref_grad = reference_losses.reference_topk(x, y, net.layers[i].last["lambda_"])
        else:
            ref_loss, ref_grad = reference_losses.reference_fnfp(x, y)
        rel = abs(fast_loss - ref_loss) / max(abs(ref_loss), 1e-30)
        excess = np.abs(fast_grad - ref_grad) - (GRAD_ATOL + GRAD_RTOL * np.abs(ref_grad))
        worst_loss = max(worst_loss, rel)
        worst_grad = max(worst_grad, float(excess.max()) + GRAD_ATOL)
        ok &= rel <= LOSS_RTOL and bool((excess <= 0).all())
    return {"max_rel_loss_diff": float(f"{worst_loss:.3g}"), "max_grad_excess": float(f"{worst_grad:.3g}"), "ok": ok}


def _time_reference(net, idx: list[int], stage: int, repeats: int) -> list[float]:
    inputs = []
    for i in idx:
        name = net._layer_names[i]
        xb, yb = net.bottom_names[name]
        lam = net.layers[i].last["lambda_"] if stage == 1 else None
        inputs.append((net.blobs[xb].data.copy(), net.blobs[yb].data.copy(), lam))

    def run():
        for x, y, lam in inputs:
            if stage == 1:
                reference_losses.reference_topk(x, y, lam)
            else:
                reference_losses.reference_fnfp(x, y)

    return _timed(run, repeats, 1e3)


def time_stage(cfg: BenchConfig, stage: int, data_root: Path, workdir: Path) -> dict:
    """Iterations, per-layer table, loss layers (and reference), data layer of one training stage."""
    caffe = import_caffe()
    solver_path = _write_stage(workdir, stage, list_path(data_root, "train").resolve(), cfg.gpu is not None)
    solver = caffe.get_solver(str(solver_path))
    net = solver.net
    timer = LayerTimer(net)
    loss_blob = next(b for b in net.outputs if b.startswith("loss_"))
    log.info("stage %d: %d warm-up + %d timed iterations", stage, cfg.warmup, cfg.repeats)
    for _ in range(cfg.warmup):
        solver.step(1)
        net.blobs[loss_blob].data.item()
    iters = []
    for _ in range(cfg.repeats):
        timer.begin()
        t0 = time.perf_counter()
        solver.step(1)
        net.blobs[loss_blob].data.item()  # on a GPU: wait for the queued kernels
        iters.append(time.perf_counter() - t0)
        timer.end()
    out: dict = {"iteration_s": summarize(iters), "rss_mb": round(rss_mb(), 1)}
    mid = int(np.argsort(iters)[(len(iters) - 1) // 2])  # the iteration of median duration
    out["layers"] = timer.table(mid)
    out["layers_iteration_s"] = round(iters[mid], 4)
    # Python layers (data + 8 losses) inside the real iterations: median over iterations of their share.
    py = [timer.python_ms(j) for j in range(len(iters))]
    out["python_layers_in_iteration_ms"] = summarize(py)
    out["python_share"] = round(float(np.median([p / (1e3 * t) for p, t in zip(py, iters, strict=True)])), 5)
    out["conv_gflop_forward"] = round(conv_gflop(net), 2)

    # The 8 loss layers on the real logits of the last iteration: forward of all, then backward.
    idx = _loss_layer_indices(net)

    def losses():
        for i in idx:
            net._forward(i, i)
        for i in reversed(idx):
            net._backward(i, i)

    losses()
    out["loss_layers_ms"] = summarize(_timed(losses, cfg.fast_repeats, 1e3))
    out["n_loss_layers"] = len(idx)
    out["loss_check"] = _check_against_reference(net, idx, stage)
    out["reference_loss_layers_ms"] = summarize(_time_reference(net, idx, stage, cfg.repeats))
    out["loss_speedup"] = round(out["reference_loss_layers_ms"]["median"] / out["loss_layers_ms"]["median"], 2)

    # The data layer alone in steady state: every sample is cached after the iterations above.
    d = _data_layer_index(net)
    for _ in range(cfg.n_train + 1):
        net._forward(d, d)
    out["data_layer_ms"] = summarize(_timed(lambda: net._forward(d, d), cfg.fast_repeats, 1e3))

    return out  # the solver and its net (GBs at full size) go with this frame: the caller collects


def time_deploy(cfg: BenchConfig, workdir: Path) -> dict:
    """One deploy forward pass (what tools/test_net.py does per image), random weights and image."""
    from redseg.model.net import NetOptions, redseg

    caffe = import_caffe()
    path = workdir / "deploy.prototxt"
    path.write_text(str(redseg(NetOptions(stage="deploy"))))
    net = caffe.Net(str(path), caffe.TEST)
    h, w = cfg.size
    net.blobs["data"].reshape(1, 3, h, w)
    net.reshape()
    net.blobs["data"].data[...] = np.random.default_rng(cfg.seed).normal(0, 40, (1, 3, h, w))

    def fwd():
        net.forward()
        net.blobs["prob_he"].data.item(0)

    for _ in range(cfg.warmup):
        fwd()
    return {"forward_s": summarize(_timed(fwd, cfg.repeats)), "rss_mb": round(rss_mb(), 1)}


def time_scoring(cfg: BenchConfig, data_root: Path, workdir: Path) -> dict:
    """redseg.evaluation.scoring.evaluate on the set's 27 test images (no overlays), as tools/evaluate.py runs it."""
    from redseg.evaluation.scoring import evaluate

    pred = workdir / "pred"
    n = make_prediction_maps(data_root, pred, cfg.seed)

    def score():
        evaluate(pred, data_root, workdir / "eval", overlays=0, progress=False)

    evaluate_logger = logging.getLogger("redseg.evaluation.scoring")
    level = evaluate_logger.level
    evaluate_logger.setLevel(logging.WARNING)
    try:
        score()
        return {"scoring_s": summarize(_timed(score, cfg.repeats)), "n_images": n}
    finally:
        evaluate_logger.setLevel(level)


def gpu_estimate(result: dict) -> dict:
    """The paper schedule's wall time: measured on this machine, and estimated for a GPU.

    Caffe's own layers are dominated by the 3x3 convolutions, whose FLOPs are counted from the
    net. A GPU's sustained throughput on them cannot be measured here, so the estimate is given
    for an assumed range, 4 and 8 TFLOP/s (the paper's GTX 1080 Ti peaks at about 11 TFLOP/s
    fp32). The Python layers stay on the host CPU whatever the mode, so their measured time is
    added unchanged, plus the PCIe copies they cause (8 logit maps down, 8 diffs and the image
    up, at ~10 GB/s). Each case also says what an iteration would cost with the reference losses.
    """
    st = result["stages"]
    if "stage1" not in st:
        return {}
    h, w = result["size"]
    iter_gflop = 3 * st["stage1"]["conv_gflop_forward"]  # backward: data and weight gradients, ~2x forward
    copies_ms = (16 + 3) * h * w * 4 / 10e9 * 1e3
    py_ms = {s: v["python_layers_in_iteration_ms"]["median"] for s, v in st.items()}
    loss_ms = {s: v["loss_layers_ms"]["median"] for s, v in st.items()}
    ref_ms = {s: v["reference_loss_layers_ms"]["median"] for s, v in st.items() if "reference_loss_layers_ms" in v}
    n = {"stage1": C.SCHEDULES["paper"].stage1.max_iter, "stage2": C.SCHEDULES["paper"].stage2.max_iter}
    it_s = {s: v["iteration_s"]["median"] for s, v in st.items()}
    out: dict = {
        "conv_gflop_per_iteration": round(iter_gflop, 1),
        "achieved_gflops": round(iter_gflop / it_s["stage1"], 1),
        "paper_schedule_hours_here": round(sum(n[s] * it_s.get(s, it_s["stage1"]) for s in n) / 3600, 1),
        "copies_ms": round(copies_ms, 2),
        "cases": [],
    }
    for tflops in (4.0, 8.0):
        net_s = iter_gflop / (tflops * 1e3)
        per_iter = {s: net_s + (py_ms.get(s, py_ms["stage1"]) + copies_ms) / 1e3 for s in n}
        case = {
            "sustained_tflops": tflops,
            "gpu_net_s": round(net_s, 3),
            "iteration_s_stage1": round(per_iter["stage1"], 3),
            "python_share_on_gpu": round((py_ms["stage1"] + copies_ms) / 1e3 / per_iter["stage1"], 3),
            "paper_schedule_hours": round(sum(n[s] * per_iter[s] for s in n) / 3600, 1),
        }
        if len(ref_ms) == len(st):
            slow = {
                s: per_iter[s] + (ref_ms.get(s, ref_ms["stage1"]) - loss_ms.get(s, loss_ms["stage1"])) / 1e3 for s in n
            }
            case["iteration_s_stage1_reference_losses"] = round(slow["stage1"], 3)
            case["paper_schedule_hours_reference_losses"] = round(sum(n[s] * slow[s] for s in n) / 3600, 1)
        out["cases"].append(case)
    return out


# --- memory: each net in a process of its own, with the shared im2col buffer and without --------

MEMORY_BUDGET_GB = 16  # the largest photograph at full resolution within 16 GiB of resident memory
# GPUs by memory, for the estimate of what a stage-1 iteration needs on a GPU (GiB as sold: 8 GB = 8 GiB).
GPU_CARDS = (
    (8, "GTX 1080, RTX 2080, RTX 3070"),
    (11, "GTX 1080 Ti, RTX 2080 Ti (the paper's card)"),
    (12, "RTX 3060 12 GB, TITAN X/Xp"),
    (16, "V100 16 GB, T4, RTX A4000, RTX 4060 Ti 16 GB"),
    (24, "RTX 3090, RTX 4090, A10, RTX A5000"),
)
GPU_CONTEXT_GIB = 0.5  # CUDA context, cuBLAS handle and kernels: a few hundred MB, not part of the net


def conv_buffers(net, param, train: bool) -> dict[str, int]:
    """Floats of each convolution layer's im2col buffer as upstream Caffe sizes it.

    ``BaseConvolutionLayer::Reshape``: kernel_dim x group rows (input channels x kernel area) by the
    output's spatial size; a Deconvolution's by its input's, with its output channels. A 1x1
    convolution (stride 1, no padding) reads its input as its columns, but upstream allocates its
    buffer anyway in the backward pass (``backward_cpu_gemm``), so it counts in a train net.
    """
    conv = {lay.name: lay.convolution_param for lay in param.layer if lay.type in ("Convolution", "Deconvolution")}
    out = {}
    for name, layer in zip(net._layer_names, net.layers, strict=True):
        if name not in conv:
            continue
        cp = conv[name]
        kernel = list(cp.kernel_size) or [cp.kernel_h, cp.kernel_w]
        kh, kw = (kernel * 2)[:2] if len(kernel) == 1 else kernel[:2]
        stride = list(cp.stride) or [1]
        pad = list(cp.pad) or [0]
        bottom = net.blobs[net.bottom_names[name][0]].data.shape
        top = net.blobs[net.top_names[name][0]].data.shape
        one_by_one = kh == kw == 1 and set(stride) == {1} and set(pad) == {0}
        if one_by_one and not train:
            continue
        if layer.type == "Convolution":
            out[name] = int(bottom[1] * kh * kw * top[2] * top[3])
        else:
            out[name] = int(top[1] * kh * kw * bottom[2] * bottom[3])
    return out


def net_memory(net, param, train: bool) -> dict:
    """Bytes a net needs, from its blob shapes (float32): what a GPU holds for one iteration.

    Blobs' data, and their diffs in a train net (an upper bound: Caffe allocates a diff when a
    layer first writes it); parameters' data and diffs, and the SGD momentum history in a train
    net; max-pooling's indices; the im2col buffers, their sum (upstream) and the largest one (the
    shared buffer). Python layers' own numpy arrays and the CUDA context are not counted.
    """
    blobs = sum(b.count for b in net.blobs.values())
    params = sum(p.count for ps in net.params.values() for p in ps)
    pool_idx = sum(
        net.blobs[net.top_names[n][0]].count
        for n, lay in zip(net._layer_names, net.layers, strict=True)
        if lay.type == "Pooling"
    )
    cols = conv_buffers(net, param, train)
    largest = max(cols, key=cols.get)
    base = 4 * (blobs * (2 if train else 1) + params * (3 if train else 1) + pool_idx)
    return {
        "blobs_data_bytes": 4 * blobs,
        "blobs_diff_bytes": 4 * blobs if train else 0,
        "params_bytes": 4 * params,
        "solver_history_bytes": 4 * params if train else 0,
        "params_diff_bytes": 4 * params if train else 0,
        "pooling_indices_bytes": 4 * pool_idx,
        "col_buffers_bytes": {k: 4 * v for k, v in sorted(cols.items(), key=lambda kv: -kv[1])},
        "col_sum_bytes": 4 * sum(cols.values()),
        "col_largest": largest,
        "col_largest_bytes": 4 * cols[largest],
        "total_own_bytes": base + 4 * sum(cols.values()),
        "total_shared_bytes": base + 4 * cols[largest],
    }


def _memory_child(spec: dict) -> dict:
    """In a fresh process: build one net, run it, report its peak resident memory and timings."""
    import sys

    caffe = set_mode(spec.get("gpu"))
    from redseg.toolchain.caffe_utils import read_net_param

    start_rss = rss_mb()
    h, w = spec["size"]
    if spec["net"] == "deploy":
        net = caffe.Net(spec["prototxt"], caffe.TEST)
        net.blobs["data"].reshape(1, 3, h, w)
        net.reshape()
        net.blobs["data"].data[...] = np.random.default_rng(spec.get("seed", 0)).normal(0, 40, (1, 3, h, w))
        param, train = read_net_param(spec["prototxt"]), False

        def run():
            net.forward()
            net.blobs["prob_he"].data.item(0)

    else:
        solver = caffe.get_solver(spec["solver"])
        net = solver.net
        param, train = read_net_param(spec["prototxt"]), True
        loss_blob = next(b for b in net.outputs if b.startswith("loss_"))

        def run():
            solver.step(1)
            net.blobs[loss_blob].data.item()

    for _ in range(spec["warmup"]):
        run()
    seconds = _timed(run, spec["repeats"])
    out = {
        "start_rss_mb": round(start_rss, 1),
        "peak_rss_mb": round(peak_rss_mb(), 1),
        "seconds": seconds,
        "paper": net_memory(net, param, train),
        "shared_col": caffe_shared_col() and os.environ.get(SHARED_COL_ENV, "1") != "0",
        "shared_diff": caffe_shared_diff() and os.environ.get(SHARED_DIFF_ENV) == "1",
        "shared_data": caffe_shared_data() and os.environ.get(SHARED_DATA_ENV) == "1",
    }
    print(json.dumps(out), file=sys.stdout, flush=True)
    return out


def _run_child(spec: dict, shared: bool, timeout: float = 3600, diff: bool = False) -> dict:
    import subprocess
    import sys

    env = {**os.environ, SHARED_COL_ENV: "1" if shared else "0"}
    env.update({SHARED_DIFF_ENV: "1" if diff else "0", SHARED_DATA_ENV: "1" if diff else "0"})
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH", "")) if p)
    env["GLOG_minloglevel"] = "0"  # Caffe's log lines of its memory plans
    cmd = [sys.executable, "-m", "redseg.experiments.benchmark", "--memory-child", json.dumps(spec)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-5:]
        raise RuntimeError(
            f"memory child ({spec['net']} at {spec['size']}, shared={shared}) failed: {' | '.join(tail)}"
        )
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    arena = _ARENA_LOG.findall(proc.stderr)
    if arena:  # the first plan: the net as built, at this size
        out["arena"] = {"bytes": int(arena[0][0]), "items_bytes": int(arena[0][1])}
    return out


# Caffe's log line of the shared data memory's plan (redseg/toolchain/caffe_source.py)
_ARENA_LOG = re.compile(r"Red-Seg shared data memory: .* in one arena of (\d+) bytes instead of (\d+)")


def _mem_available_mb() -> float | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) / 1024
    except (OSError, ValueError):
        pass
    return None


def _fit_line(points: list[tuple[float, float]]) -> tuple[float, float] | None:
    """Least-squares (a, b) of y = a + b x, or None with fewer than two distinct x."""
    if len({x for x, _ in points}) < 2:
        return None
    x, y = np.asarray(points, dtype=np.float64).T
    b, a = np.polyfit(x, y, 1)
    return float(a), float(b)


def largest_photograph(scan: list[dict], budget_gb: float = MEMORY_BUDGET_GB) -> dict:
    """The most pixels the deploy net can take within ``budget_gb`` GiB, both ways, from the measured
    peaks at several sizes (a straight line in the pixels: every blob and buffer scales with them).

    tools/segment.py runs the net once per photograph on the crop to the field of view's bounding
    box, at full resolution when the training FOV diameter is the photograph's own. So the limit is
    on that crop: an IDRiD-shaped photograph (4288x2848, FOV 4 x 853 px wide, cut at the top and
    bottom: a crop of 1.2 x the height by the height) and, more strictly, a 3:2 frame cropped whole.
    """
    fov_w = C.IDRID_QUARTER_FOV_DIAMETER_PX * C.DOWNSAMPLE
    W, H = C.IDRID_FULL_SIZE
    out: dict = {
        "budget_gb": budget_gb,
        "basis": "least-squares line through the deploy net's measured peak resident memory (whole process) "
        "against its input pixels; tools/segment.py runs this net once per photograph on the FOV crop, at full "
        "resolution when --fov-diameter is the photograph's own",
    }
    for mode in ("shared", "own"):
        pts = [(s["pixels"], s[mode]["peak_rss_mb"]) for s in scan if isinstance(s.get(mode), dict)]
        line = _fit_line(pts)
        if line is None:
            out[mode] = None
            continue
        a, b = line
        pixels = (budget_gb * 1024 - a) / b
        h_frame = int(np.sqrt(pixels / 1.5))
        h_idrid = int(np.sqrt(pixels / (fov_w / H)))  # crop fov_w/H x h by h
        out[mode] = {
            "mb_fixed": round(a, 1),
            "mb_per_megapixel": round(b * 1e6, 1),
            "points": len(pts),
            "max_pixels": int(pixels),
            "max_megapixels": round(pixels / 1e6, 2),
            "frame_3x2": [int(1.5 * h_frame), h_frame],
            "idrid_shaped": [int(W / H * h_idrid), h_idrid],
            "idrid_full_size_crop_gb": round((a + b * fov_w * H) / 1024, 1),
        }
    return out


def gpu_memory_estimate(paper: dict, arena: dict | None = None) -> dict:
    """GiB a net needs on a GPU at the measured size (:func:`net_memory`), shared and upstream, and
    with the shared diff and data memory's ``arena`` (Caffe's plan: its bytes, and the bytes of the
    data and diffs it holds) when given; which cards that admits (with :data:`GPU_CONTEXT_GIB` for
    the CUDA context)."""
    out: dict = {
        "basis": "float32 blob shapes of the net at this size: data + diff of every blob, parameters' data, diff "
        "and momentum, max-pooling indices, and the im2col buffers (their sum upstream, the largest one shared); "
        "diff: as shared, with the data and diffs Caffe's plan puts in its arena counted as the arena's size; "
        f"a card fits when that plus {GPU_CONTEXT_GIB} GiB for the CUDA context is within its memory. cuDNN is "
        "not used (docs/gpu.md); the Python layers' arrays live on the host.",
        "context_gib": GPU_CONTEXT_GIB,
    }
    totals = {"shared": paper["total_shared_bytes"], "own": paper["total_own_bytes"]}
    if arena:
        totals["diff"] = paper["total_shared_bytes"] - arena["items_bytes"] + arena["bytes"]
    for mode, total in totals.items():
        gib = total / 2**30
        out[mode] = {
            "gib": round(gib, 2),
            "cards": [f"{mem} GB: {names}" for mem, names in GPU_CARDS if gib + GPU_CONTEXT_GIB <= mem],
            "smallest_card_gb": next((mem for mem, _ in GPU_CARDS if gib + GPU_CONTEXT_GIB <= mem), None),
        }
    return out


def run_memory_benchmark(cfg: BenchConfig, data_root: Path, workdir: Path) -> dict:
    """Peak resident memory and seconds per iteration of each net (stage-1 and stage-2 train nets,
    deploy net), each in a fresh process, with the shared im2col buffer and with one per layer
    (REDSEG_SHARED_COL=0, upstream's layout); the deploy net also at ``cfg.deploy_scales`` of the
    size, for the largest photograph within 16 GB; the GPU memory on paper."""
    from redseg.model.net import NetOptions, redseg

    shared_build = caffe_shared_col()
    modes = ("shared", "own") if shared_build else ("own",)
    # "diff": the shared im2col buffer and shared blob diffs and data (REDSEG_SHARED_DIFF=1,
    # REDSEG_SHARED_DATA=1), as the training driver builds its nets with a build that has the patches
    all_modes = modes + (("diff",) if shared_build and caffe_shared_diff() else ())
    gpu = cfg.gpu is not None
    specs = {}
    for stage in (1, 2):
        if stage in cfg.stages:
            solver = _write_stage(workdir, stage, list_path(data_root, "train").resolve(), gpu)
            specs[f"stage{stage}"] = {
                "net": f"stage{stage}",
                "solver": str(solver),
                "prototxt": str(workdir / f"stage{stage}_train.prototxt"),
            }
    deploy = workdir / "deploy.prototxt"
    deploy.write_text(str(redseg(NetOptions(stage="deploy"))))
    specs["deploy"] = {"net": "deploy", "prototxt": str(deploy)}
    common = {"size": list(cfg.size), "warmup": cfg.warmup, "repeats": cfg.repeats, "gpu": cfg.gpu, "seed": cfg.seed}
    result: dict = {
        "shared_col_build": shared_build,
        "shared_diff_build": "diff" in all_modes,
        "how": "each net in a fresh process (python -m redseg.experiments.benchmark --memory-child): "
        f"{cfg.warmup} warm-up + {cfg.repeats} timed iterations (train nets: solver.step(1); deploy: forward), "
        "then its peak resident memory (getrusage ru_maxrss); shared: the patched Caffe's default, own: "
        f"{SHARED_COL_ENV}=0 (one buffer per layer, as upstream); diff: shared im2col buffer and "
        f"{SHARED_DIFF_ENV}=1 and {SHARED_DATA_ENV}=1 (blob diffs and data share memory by liveness, as the "
        f"training driver runs); shared and own run with {SHARED_DIFF_ENV}=0 and {SHARED_DATA_ENV}=0",
        "nets": {},
    }
    if not shared_build:
        result["note"] = "this Caffe has no shared im2col buffer (make setup SHARED_COL=0, or CAFFE_ROOT): own only"
    for i, (name, spec) in enumerate(specs.items()):
        entry: dict = {"gpu_estimate": None}
        runs: dict[str, list[dict]] = {m: [] for m in all_modes}
        for r in range(cfg.memory_rounds):
            order = all_modes if (i + r) % 2 == 0 else tuple(reversed(all_modes))  # alternate which goes first
            for mode in order:
                log.info(
                    "memory: %s at %dx%d, %s (round %d of %d)",
                    name, cfg.size[1], cfg.size[0], mode, r + 1, cfg.memory_rounds,
                )  # fmt: skip
                runs[mode].append(
                    _run_child({**spec, **common}, shared=mode in ("shared", "diff"), diff=mode == "diff")
                )
        for mode, children in runs.items():
            peak = max(c["peak_rss_mb"] for c in children)
            start_rss = min(c["start_rss_mb"] for c in children)
            entry[mode] = {
                "peak_rss_mb": peak,
                "peak_rss_mb_per_round": [c["peak_rss_mb"] for c in children],
                "start_rss_mb": start_rss,
                "net_mb": round(peak - start_rss, 1),
                "seconds": summarize([t for c in children for t in c["seconds"]]),
            }
            entry["paper"] = children[0]["paper"]
        arena = next((c["arena"] for c in runs.get("diff", []) if "arena" in c), None)
        entry["gpu_estimate"] = gpu_memory_estimate(entry["paper"], arena)
        if arena:
            entry["arena"] = arena
        if "shared" in entry and "own" in entry:
            entry["saved_mb"] = round(entry["own"]["peak_rss_mb"] - entry["shared"]["peak_rss_mb"], 1)
            entry["saved_mb_paper"] = round(
                (entry["paper"]["col_sum_bytes"] - entry["paper"]["col_largest_bytes"]) / 2**20, 1
            )
            entry["ratio"] = round(entry["own"]["peak_rss_mb"] / entry["shared"]["peak_rss_mb"], 2)
            entry["speed_ratio"] = round(entry["shared"]["seconds"]["median"] / entry["own"]["seconds"]["median"], 3)
        if "diff" in entry:
            entry["saved_diff_mb"] = round(entry["shared"]["peak_rss_mb"] - entry["diff"]["peak_rss_mb"], 1)
            entry["speed_ratio_diff"] = round(
                entry["diff"]["seconds"]["median"] / entry["shared"]["seconds"]["median"], 3
            )
        result["nets"][name] = entry
        gc.collect()
    # The deploy net at other sizes, for the largest photograph within the budget.
    h, w = cfg.size
    full = {"size": [h, w], "pixels": h * w, **{m: result["nets"]["deploy"][m] for m in modes}}
    scan = [full]
    avail = _mem_available_mb()
    for s in sorted(set(cfg.deploy_scales) - {1.0}):
        size = [max(32, round(h * s)), max(32, round(w * s))]
        point: dict = {"size": size, "pixels": size[0] * size[1]}
        for mode in modes:
            ref = full[mode]
            predicted = ref["start_rss_mb"] + ref["net_mb"] * point["pixels"] / full["pixels"]
            if avail is not None and predicted > 0.6 * avail:  # a shared machine: leave others room
                point[mode] = f"not run: about {predicted / 1024:.1f} GB predicted, {avail / 1024:.1f} GB available"
                continue
            log.info("memory: deploy at %dx%d, %s im2col buffer", size[1], size[0], mode)
            child = _run_child(
                {**specs["deploy"], **common, "size": size, "repeats": 1, "warmup": 0}, shared=mode == "shared"
            )
            point[mode] = {
                "peak_rss_mb": child["peak_rss_mb"],
                "start_rss_mb": child["start_rss_mb"],
                "seconds": summarize(child["seconds"]),
            }
        scan.append(point)
    result["deploy_scan"] = sorted(scan, key=lambda p: p["pixels"])
    result["largest_photograph"] = largest_photograph(result["deploy_scan"])
    if "stage1" in result["nets"]:
        result["gpu_estimate_stage1"] = result["nets"]["stage1"]["gpu_estimate"]
    return result


def run_benchmark(cfg: BenchConfig) -> dict:
    """Everything above; returns the result dict that tools/benchmark.py prints and writes as JSON."""
    start = time.perf_counter()
    load_start = os.getloadavg() if hasattr(os, "getloadavg") else None
    set_mode(cfg.gpu)
    own_tmp = cfg.workdir is None
    workdir = Path(tempfile.mkdtemp(prefix="redseg-bench-")) if own_tmp else Path(cfg.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    try:
        t = time.perf_counter()
        data_root = make_benchmark_set(workdir / "data", cfg.size, cfg.n_train, N_TEST_IMAGES, cfg.seed)
        log.info("benchmark set at %dx%d made in %.1f s", cfg.size[1], cfg.size[0], time.perf_counter() - t)
        result: dict = {
            "tool": "tools/benchmark.py",
            "size": list(cfg.size),
            "machine": machine_info(cfg.gpu),
            "blas": blas.describe(),  # which OpenBLAS kernels Caffe runs (redseg/toolchain/blas.py)
            "settings": {k: v for k, v in asdict(cfg).items() if k not in ("workdir", "extra")},
            "stages": {},
        }
        result["settings"]["stages"] = list(cfg.stages)
        result["settings"]["deploy_scales"] = list(cfg.deploy_scales)
        if cfg.memory or cfg.memory_only:  # first: the children then share the machine with a small parent
            result["memory"] = run_memory_benchmark(cfg, data_root, workdir)
        if cfg.memory_only:
            return _finish(result, start, load_start)
        for stage in cfg.stages:
            result["stages"][f"stage{stage}"] = time_stage(cfg, stage, data_root, workdir)
            gc.collect()  # free one stage's net before the next one is built
        log.info("deploy forward: %d warm-up + %d timed", cfg.warmup, cfg.repeats)
        result["deploy"] = time_deploy(cfg, workdir)
        gc.collect()
        log.info("scoring %d test images x %d", N_TEST_IMAGES, cfg.repeats + 1)
        result["scoring"] = time_scoring(cfg, data_root, workdir)
    finally:
        if own_tmp:
            shutil.rmtree(workdir, ignore_errors=True)
    st = result["stages"]
    result["iteration_s"] = {s: v["iteration_s"] for s, v in st.items()}
    result["loss_layers_ms"] = {s: v["loss_layers_ms"] for s, v in st.items()}
    result["reference_loss_layers_ms"] = {s: v["reference_loss_layers_ms"] for s, v in st.items()}
    result["loss_speedup"] = {s: v["loss_speedup"] for s, v in st.items()}
    result["loss_check"] = {s: v["loss_check"] for s, v in st.items()}
    first = next(iter(st.values()), None)
    result["data_layer_ms"] = first["data_layer_ms"] if first else None
    result["python_share"] = {s: v["python_share"] for s, v in st.items()}
    result["forward_s"] = result["deploy"]["forward_s"]
    result["scoring_s"] = result["scoring"]["scoring_s"]
    result["gpu_estimate"] = gpu_estimate(result)
    return _finish(result, start, load_start)


def _finish(result: dict, start: float, load_start) -> dict:
    result["peak_rss_mb"] = round(peak_rss_mb(), 1)
    result["machine"]["loadavg_start"] = [round(v, 2) for v in load_start] if load_start else None
    result["machine"]["loadavg_end"] = [round(v, 2) for v in os.getloadavg()] if load_start else None
    result["elapsed_s"] = round(time.perf_counter() - start, 1)
    return result


# --- pycaffe against ONNX Runtime -----------------------------------------------------------------


def run_onnx_benchmark(cfg: BenchConfig) -> dict:
    """One deploy forward pass at ``cfg.size`` in pycaffe and in ONNX Runtime, both on the CPU,
    on the same input (``cfg.gpu`` is not used: a like-for-like CPU comparison).

    The deploy net gets its fillers' random weights (no trained model needed: the time does not
    depend on the values), saved and exported as tools/export_onnx.py does. Both use every
    usable core (OpenBLAS's default; ONNX Runtime's intra-op threads set to match), taking turns.
    """
    import onnxruntime as ort

    from redseg.deploy.onnx_export import export
    from redseg.model.net import NetOptions, redseg

    start = time.perf_counter()
    load_start = os.getloadavg() if hasattr(os, "getloadavg") else None
    caffe = set_mode(None)
    own_tmp = cfg.workdir is None
    workdir = Path(tempfile.mkdtemp(prefix="redseg-onnx-bench-")) if own_tmp else Path(cfg.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    h, w = cfg.size
    try:
        deploy = workdir / "deploy.prototxt"
        deploy.write_text(str(redseg(NetOptions(stage="deploy"))))
        caffe.set_random_seed(cfg.seed)
        net = caffe.Net(str(deploy), caffe.TEST)
        weights = workdir / "random.caffemodel"
        net.save(str(weights))
        model = export(weights, workdir / "redseg.onnx", deploy=deploy, mean_bgr=C.LSEG_MEAN_BGR, force=True)
        x = np.random.default_rng(cfg.seed).normal(0, 40, (1, 3, h, w)).astype(np.float32)
        net.blobs["data"].reshape(1, 3, h, w)
        net.reshape()
        net.blobs["data"].data[...] = x

        def caffe_fwd():
            net.forward()
            net.blobs["prob_he"].data.item(0)

        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads = machine_info(None)["usable_cpus"]  # as many as OpenBLAS uses
        sess = ort.InferenceSession(str(model), opts, providers=["CPUExecutionProvider"])
        got: dict = {}

        def onnx_fwd():
            got["out"] = sess.run(["prob_ma", "prob_he"], {"data": x})

        log.info("pycaffe and ONNX Runtime in turn: %d warm-up + %d timed at %dx%d", cfg.warmup, cfg.repeats, h, w)
        for _ in range(max(cfg.warmup, 1)):
            caffe_fwd()
            onnx_fwd()
        caffe_s, onnx_s = [], []
        for _ in range(cfg.repeats):  # alternating, so that a load change on a shared machine hits both
            caffe_s += _timed(caffe_fwd, 1)
            onnx_s += _timed(onnx_fwd, 1)
        diff = max(
            float(np.abs(net.blobs[b].data - y).max()) for b, y in zip(("prob_ma", "prob_he"), got["out"], strict=True)
        )
    finally:
        if own_tmp:
            shutil.rmtree(workdir, ignore_errors=True)
    machine = machine_info(None)
    cpu = blas.cpu_info()
    if cpu:  # a virtual machine's model name can be as vague as "Intel(R) Xeon(R) Processor"
        simd = [f for f in ("avx512f", "avx2", "fma") if f in cpu["flags"]]
        machine["cpu_id"] = f"{cpu['vendor']} family {cpu['family']} model {cpu['model']}, {' '.join(simd) or 'no AVX'}"
    machine["loadavg_start"] = [round(v, 2) for v in load_start] if load_start else None
    machine["loadavg_end"] = [round(v, 2) for v in os.getloadavg()] if load_start else None
    result = {
        "tool": "tools/benchmark.py --onnx",
        "size": [h, w],
        "machine": machine,
        "blas": blas.describe(),
        "onnxruntime": {"version": ort.__version__, "providers": sess.get_providers(), "intra_op_threads": threads},
        "settings": {"repeats": cfg.repeats, "warmup": cfg.warmup, "seed": cfg.seed},
        "pycaffe_forward_s": summarize(caffe_s),
        "onnxruntime_forward_s": summarize(onnx_s),
        "max_abs_prob_diff": float(f"{diff:.3g}"),
        "peak_rss_mb": round(peak_rss_mb(), 1),
    }
    result["onnx_speedup"] = round(result["pycaffe_forward_s"]["median"] / result["onnxruntime_forward_s"]["median"], 2)
    result["elapsed_s"] = round(time.perf_counter() - start, 1)
    return result


def format_onnx_report(result: dict) -> str:
    h, w = result["size"]
    m = result["machine"]
    o = result["onnxruntime"]
    return "\n".join(
        [
            f"One photograph at {w}x{h} (W x H), deploy forward pass, CPU: {m.get('cpu')} "
            f"({m.get('cpu_id', '?')}; {m.get('usable_cpus')} usable CPUs)",
            f"load average at start {m.get('loadavg_start')}, at end {m.get('loadavg_end')}; "
            f"{result['elapsed_s']:.0f} s in all",
            result["blas"]["summary"] if result.get("blas") else "BLAS: not recorded",
            "",
            f"{'measurement':44s} median (IQR, runs)",
            f"{'pycaffe forward [s]':44s} {_ms(result['pycaffe_forward_s'], 1, 3)}",
            f"{'ONNX Runtime ' + o['version'] + ' forward [s]':44s} {_ms(result['onnxruntime_forward_s'], 1, 3)}"
            f"  ({o['intra_op_threads']} threads)",
            f"{'ONNX Runtime speed-up over pycaffe':44s} {result['onnx_speedup']:.2f}x",
            f"{'max |prob. difference|':44s} {result['max_abs_prob_diff']:.2g}",
            f"{'peak resident memory [MB]':44s} {result['peak_rss_mb']:.0f}",
        ]
    )


# --- report ---------------------------------------------------------------------------------------


def _ms(stats: dict, scale: float = 1.0, nd: int = 1) -> str:
    return f"{stats['median'] * scale:.{nd}f} (IQR {stats['iqr'] * scale:.{nd}f}, n={stats['n']})"


def layer_summary(table: list[dict], iteration_ms: float) -> list[tuple[str, float, float]]:
    """(group, forward+backward ms, share of the iteration) for Caffe's layer types and ours."""
    groups: dict[str, float] = {}
    for r in table:
        key = f"{r['type']} (ours, Python)" if r["python"] else r["type"]
        groups[key] = groups.get(key, 0.0) + r["forward_ms"] + r["backward_ms"]
    rows = sorted(groups.items(), key=lambda kv: -kv[1])
    rest = iteration_ms - sum(groups.values())
    rows.append(("solver update + Caffe overhead", rest))
    return [(k, v, v / iteration_ms) for k, v in rows]


def format_memory(mem: dict | None, size) -> list[str]:
    """The memory section's table: each net's peak, both ways; the 16 GB photograph; the GPU estimate."""
    if not mem:
        return []
    h, w = size
    lines = ["", f"Memory at {w}x{h}, each net in a process of its own (peak resident MB; s per iteration / forward):"]
    if mem.get("note"):
        lines.append(f"  {mem['note']}")
    lines.append(
        f"  {'net':8s} {'shared':>9s} {'own':>9s} {'saved':>9s} {'paper':>9s} {'own/shared':>10s}"
        f" {'s shared':>9s} {'s own':>9s}" + (f" {'diff':>9s} {'s diff':>9s}" if mem.get("shared_diff_build") else "")
    )
    for name, e in mem["nets"].items():

        def cell(mode: str, key: str, e=e) -> str:
            return f"{e[mode][key]:9.0f}" if mode in e else f"{'-':>9s}"

        def secs(mode: str, e=e) -> str:
            return f"{e[mode]['seconds']['median']:9.3f}" if mode in e else f"{'-':>9s}"

        saved = f"{e['saved_mb']:9.0f}" if "saved_mb" in e else f"{'-':>9s}"
        paper = f"{e['saved_mb_paper']:9.0f}" if "saved_mb_paper" in e else f"{'-':>9s}"
        ratio = f"{e['ratio']:9.2f}x" if "ratio" in e else f"{'-':>10s}"
        lines.append(
            f"  {name:8s} {cell('shared', 'peak_rss_mb')} {cell('own', 'peak_rss_mb')} {saved} {paper} {ratio}"
            f" {secs('shared')} {secs('own')}"
            + (f" {cell('diff', 'peak_rss_mb')} {secs('diff')}" if mem.get("shared_diff_build") else "")
        )
    lines.append(
        "  (paper: the im2col buffers' sum minus the largest one, from the blob shapes; in a train net it counts "
        "the 1x1 convolutions' buffers, which upstream allocates in the backward pass but never writes)"
    )
    if mem.get("shared_diff_build"):
        lines.append(
            "  (diff: the shared im2col buffer, REDSEG_SHARED_DIFF=1 and REDSEG_SHARED_DATA=1, the blob diffs and data "
            "sharing memory by liveness, as the training driver builds its nets; shared and own: both 0)"
        )
    big = mem.get("largest_photograph") or {}
    for mode in ("shared", "own"):
        b = big.get(mode)
        if b:
            lines.append(
                f"  deploy net within {big['budget_gb']} GB, {mode}: {b['max_megapixels']} MP "
                f"({b['mb_fixed']:.0f} MB + {b['mb_per_megapixel']:.0f} MB/MP from {b['points']} sizes): an "
                f"IDRiD-shaped photograph up to {b['idrid_shaped'][0]}x{b['idrid_shaped'][1]}, a 3:2 frame "
                f"cropped whole up to {b['frame_3x2'][0]}x{b['frame_3x2'][1]}; IDRiD's full 4288x2848 would "
                f"need {b['idrid_full_size_crop_gb']} GB"
            )
    g = mem.get("gpu_estimate_stage1")
    if g:
        for mode in ("diff", "shared", "own"):
            if mode not in g:
                continue
            lines.append(
                f"  GPU, stage-1 iteration on paper, {mode}: {g[mode]['gib']} GiB + {g['context_gib']} GiB context; "
                f"smallest card: {g[mode]['smallest_card_gb'] or 'over 24'} GB"
            )
    return lines


def format_report(result: dict, top_layers: int = 12) -> str:
    h, w = result["size"]
    m = result["machine"]
    lines = [
        f"Red-Seg benchmark at {w}x{h} (W x H), {m['mode']}, {m.get('cpu')} ({m.get('usable_cpus')} usable CPUs)",
        f"load average at start {m.get('loadavg_start')}, at end {m.get('loadavg_end')}; "
        f"{result['elapsed_s']:.0f} s in all",
        result["blas"]["summary"] if result.get("blas") else "BLAS: not recorded",
        "",
    ]
    if "forward_s" not in result:  # --memory-only
        return "\n".join(lines + format_memory(result.get("memory"), result["size"]))
    lines.append(f"{'measurement':44s} median (IQR, runs)")
    for s, v in result["stages"].items():
        lines.append(f"{'training iteration, ' + s + ' [s]':44s} {_ms(v['iteration_s'], 1, 3)}")
    for s, v in result["stages"].items():
        label = f"{v['n_loss_layers']} loss layers fwd+bwd, {s} [ms]"
        lines.append(f"{label:44s} {_ms(v['loss_layers_ms'], 1, 2)}")
        if "reference_loss_layers_ms" in v:
            ref = v["reference_loss_layers_ms"]
            lines.append(f"{'  reference implementation [ms]':44s} {_ms(ref, 1, 1)}")
            chk = v["loss_check"]
            lines.append(
                f"{'  speed-up over the reference':44s} {v['loss_speedup']:.1f}x "
                f"(same numbers: {'yes' if chk['ok'] else 'NO'}, max rel. loss diff {chk['max_rel_loss_diff']:.2g})"
            )
    if result.get("data_layer_ms"):
        lines.append(f"{'data layer per iteration [ms]':44s} {_ms(result['data_layer_ms'], 1, 2)}")
    for s, v in result["stages"].items():
        lines.append(
            f"{'Python layers in a ' + s + ' iteration':44s} {v['python_layers_in_iteration_ms']['median']:.1f} ms "
            f"= {100 * v['python_share']:.2f} % of the iteration"
        )
    lines.append(f"{'deploy forward pass [s]':44s} {_ms(result['forward_s'], 1, 3)}")
    lines.append(f"{'scoring 27 test images [s]':44s} {_ms(result['scoring_s'], 1, 3)}")
    lines.append(f"{'peak resident memory of this process [MB]':44s} {result['peak_rss_mb']:.0f}")
    lines += format_memory(result.get("memory"), result["size"])
    for s, v in result["stages"].items():
        it_ms = v["layers_iteration_s"] * 1e3
        lines += ["", f"Where a {s} iteration goes (caffe time style; the timed iteration of median length):"]
        lines.append(f"  {'layer type':40s} {'ms':>10s} {'share':>8s}")
        for k, ms, share in layer_summary(v["layers"], it_ms):
            lines.append(f"  {k:40s} {ms:10.1f} {100 * share:7.2f}%")
        top = sorted(v["layers"], key=lambda r: -(r["forward_ms"] + r["backward_ms"]))[:top_layers]
        lines.append(f"  slowest layers: {'name':22s} {'type':20s} {'fwd ms':>9s} {'bwd ms':>9s}")
        for r in top:
            lines.append(f"  {'':16s} {r['name']:22s} {r['type']:20s} {r['forward_ms']:9.1f} {r['backward_ms']:9.1f}")
    g = result.get("gpu_estimate") or {}
    if g.get("cases"):
        hours = g["paper_schedule_hours_here"]
        lines += [
            "",
            f"Paper schedule ({C.SCHEDULES['paper'].stage1.max_iter:,} + {C.SCHEDULES['paper'].stage2.max_iter:,} "
            f"iterations) at this size: {hours:,} h = {hours / 24:.1f} days here ({m['mode']}, "
            f"{g['achieved_gflops']} GFLOP/s of convolutions); on a GPU (estimate, docs/performance.md):",
        ]
        for c in g["cases"]:
            ref = ""
            if "paper_schedule_hours_reference_losses" in c:
                ref = f" (with the reference losses: {c['paper_schedule_hours_reference_losses']} h)"
            lines.append(
                f"  at {c['sustained_tflops']:g} TFLOP/s: {c['iteration_s_stage1']:.3f} s/iteration, Python layers "
                f"{100 * c['python_share_on_gpu']:.0f} % of it; {c['paper_schedule_hours']} h in all{ref}"
            )
    return "\n".join(lines)


def _child_main(argv: list[str]) -> int:
    """``python -m redseg.experiments.benchmark --memory-child SPEC``: :func:`_memory_child` (JSON on stdout)."""
    if len(argv) != 2 or argv[0] != "--memory-child":
        print("usage: python -m redseg.experiments.benchmark --memory-child JSON (run by run_memory_benchmark)")
        return 2
    _memory_child(json.loads(argv[1]))
    return 0


if __name__ == "__main__":
    import sys

    sys.exit(_child_main(sys.argv[1:]))
