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
* separately (:func:`run_onnx_benchmark`, ``tools/benchmark.py --onnx``): one photograph through
  the deploy net in pycaffe and through its ONNX export (redseg/deploy/onnx_export.py) in ONNX Runtime,
  side by side on the same input, with the largest difference of the probabilities.

Every timing is repeated; results carry the median and the interquartile range.
"""

from __future__ import annotations

import gc
import logging
import os
import platform
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
from redseg.toolchain.caffe_utils import import_caffe, set_mode

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
    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
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
    result["peak_rss_mb"] = round(peak_rss_mb(), 1)
    result["gpu_estimate"] = gpu_estimate(result)
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


def format_report(result: dict, top_layers: int = 12) -> str:
    h, w = result["size"]
    m = result["machine"]
    lines = [
        f"Red-Seg benchmark at {w}x{h} (W x H), {m['mode']}, {m.get('cpu')} ({m.get('usable_cpus')} usable CPUs)",
        f"load average at start {m.get('loadavg_start')}, at end {m.get('loadavg_end')}; "
        f"{result['elapsed_s']:.0f} s in all",
        result["blas"]["summary"] if result.get("blas") else "BLAS: not recorded",
        "",
        f"{'measurement':44s} median (IQR, runs)",
    ]
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
    lines.append(f"{'peak resident memory [MB]':44s} {result['peak_rss_mb']:.0f}")
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
