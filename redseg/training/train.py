"""The solver driver: one stage of Red-Seg's two-stage training (paper Algorithm 1, section 3.2).

Stage 1 starts from ImageNet VGG16 weights and minimises the Top-k balanced cross-entropy with the
lambda staircase; stage 2 starts from the final stage-1 weights and minimises FN + FP. Each stage
has its own solver file (prototxt/solver_stage{1,2}.prototxt). For a run this module writes
per-run copies of the solver and train net into the run folder (absolute paths, since Caffe
resolves paths against the working directory; the data list and the schedule filled in), then
steps the solver one iteration at a time so it can show progress, log every loss to CSV, stop on a
NaN, and snapshot on Ctrl-C.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import logging
import math
import re
import shutil
import signal
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from redseg import config as C
from redseg.data.prepared_set import list_path, read_list, read_meta
from redseg.fileio import atomic_path, write_json, write_text
from redseg.model.vgg16 import prepare_weights as prepare_vgg16
from redseg.toolchain.caffe_utils import (
    REPO,
    CaffeInputError,
    check_net_param,
    check_weights,
    import_caffe,
    read_binary_proto,
    set_mode,
)

log = logging.getLogger(__name__)

VGG16_LAYERS = tuple(f"{stage}_{i}" for stage, _, n in C.VGG16_CONVS for i in range(1, n + 1))


class TrainingError(RuntimeError):
    pass


@dataclass
class StageRun:
    stage: int
    data: Path  # a prepared set (holds train.txt and meta.json)
    run_dir: Path
    schedule: C.TrainingSchedule
    solver: Path | None = None  # template; default prototxt/solver_stage{stage}.prototxt
    net: Path | None = None  # train net instead of the solver's (e.g. a Table 5 ablation)
    weights: Path | None = None  # VGG16 (stage 1) or stage-1 weights (stage 2)
    resume: str | None = "auto"  # a .solverstate, "auto" (latest in run_dir, if any) or None
    gpu: int | None = None
    from_scratch: bool = False
    force: bool = False
    progress: bool = True
    # Budgets: override the schedule's lr / iteration count for this stage (a short trial at the
    # paper's lr, say). The Top-k staircase keeps the schedule's S and M, so a shortened stage 1 is
    # the beginning of the full one. The run records them (stage<N>_run.json).
    base_lr: float | None = None
    max_iter: int | None = None
    # Fig. 6: evaluate the train net's losses on the prepared set's test list every
    # ``test_interval`` iterations of the schedule (stage<N>_test_log.csv).
    test_loss: bool = True

    @property
    def prefix(self) -> Path:
        return self.run_dir / f"stage{self.stage}"

    @property
    def final(self) -> Path:
        return self.run_dir / f"stage{self.stage}_final.caffemodel"

    @property
    def stage_schedule(self) -> C.StageSchedule:
        """This stage's solver settings: the schedule's, with the run's budgets applied."""
        st = self.schedule.stage1 if self.stage == 1 else self.schedule.stage2
        if self.base_lr is not None:
            st = dataclasses.replace(st, base_lr=float(self.base_lr))
        if self.max_iter is not None:
            st = dataclasses.replace(st, max_iter=int(self.max_iter))
        return st

    @property
    def overrides(self) -> dict:
        """The budgets that differ from the schedule's values."""
        st = self.schedule.stage1 if self.stage == 1 else self.schedule.stage2
        out = {}
        if self.base_lr is not None and not math.isclose(self.base_lr, st.base_lr):
            out["base_lr"] = float(self.base_lr)
        if self.max_iter is not None and self.max_iter != st.max_iter:
            out["max_iter"] = int(self.max_iter)
        return out

    def record(self) -> dict:
        """What this stage trains with, for stage<N>_run.json and the reproduction's tables."""
        st = self.stage_schedule
        paper = self.schedule.name == "paper" and not self.overrides and not self.from_scratch
        return {
            "stage": self.stage,
            "schedule": self.schedule.name,
            "base_lr": st.base_lr,
            "max_iter": st.max_iter,
            "lambda_period": self.schedule.lambda_period,
            "overrides": self.overrides,
            "from_scratch": self.from_scratch,
            "paper_settings": paper,
            "net": str(self.net) if self.net else None,
            "solver": str(self.solver) if self.solver else None,
            "weights": str(self.weights) if self.weights else None,
            "data": str(self.data),
        }


def _resolve(p: str) -> Path:
    """A path from a solver file: absolute, else against the working directory, else the repo."""
    path = Path(p)
    if path.is_absolute() or path.exists():
        return path.resolve()
    return (REPO / path).resolve()


def validate_budget(base_lr: float | None, max_iter: int | None) -> None:
    """Refuse budgets Caffe would choke on, before it starts."""
    if base_lr is not None and not (math.isfinite(base_lr) and base_lr > 0):
        raise CaffeInputError(f"--base-lr must be a positive number, got {base_lr}")
    if max_iter is not None and max_iter < 1:
        raise CaffeInputError(f"--max-iter must be at least 1, got {max_iter}")


def materialise(run: StageRun) -> Path:
    """Write the run's solver and train net (and, for the test loss, the same net reading the test
    list); returns the solver path."""
    import_caffe()
    from caffe.proto import caffe_pb2
    from google.protobuf import text_format

    template = run.solver or REPO / "prototxt" / f"solver_stage{run.stage}.prototxt"
    if not Path(template).is_file():
        raise CaffeInputError(f"solver file not found: {template}")
    sp = caffe_pb2.SolverParameter()
    text_format.Merge(Path(template).read_text(), sp)
    net_path = Path(run.net) if run.net else _resolve(sp.net)
    if not net_path.is_file():
        raise CaffeInputError(f"train net not found: {net_path}")
    npar = caffe_pb2.NetParameter()
    text_format.Merge(net_path.read_text(), npar)
    train_list = list_path(run.data, "train").resolve()
    s1 = run.schedule.stage1
    n_data = 0
    for layer in npar.layer:
        if layer.type != "Python":
            continue
        pp = layer.python_param
        params = json.loads(pp.param_str) if pp.param_str else {}
        if pp.layer == "RedSegData":
            params["list"] = str(train_list)
            n_data += 1
        elif pp.layer == "TopKBalancedCELoss":
            # The staircase is defined over stage 1's iterations (section 2.2).
            params.update(period=run.schedule.lambda_period, max_iter=s1.max_iter)
        pp.param_str = json.dumps(params, sort_keys=True)
    if n_data != 1:
        raise CaffeInputError(f"{net_path}: expected one RedSegData layer, found {n_data}")
    check_net_param(npar, str(net_path))
    run.run_dir.mkdir(parents=True, exist_ok=True)
    run_net = run.run_dir / f"stage{run.stage}_train.prototxt"
    write_text(run_net, text_format.MessageToString(npar))
    if run.test_loss and run.stage_schedule.test_interval:
        test_list = list_path(run.data, "test").resolve()
        for layer in npar.layer:
            if layer.type == "Python" and layer.python_param.layer == "RedSegData":
                params = json.loads(layer.python_param.param_str)
                params.update(list=str(test_list), shuffle=False)
                layer.python_param.param_str = json.dumps(params, sort_keys=True)
        write_text(test_loss_net_path(run), text_format.MessageToString(npar))
    if sp.iter_size not in (0, 1):
        raise CaffeInputError(
            f"{template}: iter_size {sp.iter_size}; Red-Seg trains with batch size 1 and iter_size 1 "
            "(section 3.2), and the Top-k lambda schedule counts one forward pass per iteration"
        )
    st = run.stage_schedule
    for key, ours in (("base_lr", st.base_lr), ("max_iter", st.max_iter), ("snapshot", st.snapshot)):
        theirs = getattr(sp, key)
        if sp.HasField(key) and not math.isclose(theirs, ours):
            log.warning("%s: %s %g replaced by %g from --schedule %s", template, key, theirs, ours, run.schedule.name)
    sp.net = str(run_net.resolve())
    sp.base_lr, sp.max_iter, sp.snapshot = st.base_lr, st.max_iter, st.snapshot
    sp.snapshot_prefix = str(run.prefix.resolve())
    sp.display = 0  # the driver reports progress itself
    sp.solver_mode = caffe_pb2.SolverParameter.GPU if run.gpu is not None else caffe_pb2.SolverParameter.CPU
    run_solver = run.run_dir / f"stage{run.stage}_solver.prototxt"
    write_text(run_solver, text_format.MessageToString(sp))
    return run_solver


def test_loss_net_path(run: StageRun) -> Path:
    return run.run_dir / f"stage{run.stage}_testloss.prototxt"


class TestLoss:
    """Fig. 6's test curve: the train net's losses averaged over the test list, weights shared.

    A net built from the run's train net with its data layer reading the test list in order shares
    the solver's weights (``Net.share_with``: no copy) and runs forward once per test image. It is
    built for each evaluation and dropped after it, so it holds memory only while it runs. The
    Top-k layers use the solver's current lambda.
    """

    def __init__(self, caffe, run: StageRun, solver, names: list[str], resume_iter: int):
        self.caffe, self.run, self.solver, self.names = caffe, run, solver, names
        self.n_images = len(read_list(list_path(run.data, "test")))
        self.interval = run.stage_schedule.test_interval
        self.log = LossLog(run.run_dir / f"stage{run.stage}_test_log.csv", names, resume_iter)

    def due(self, it: int, max_iter: int) -> bool:
        return it % self.interval == 0 or it == max_iter

    def __call__(self) -> dict:
        t0 = time.perf_counter()
        net = self.caffe.Net(str(test_loss_net_path(self.run)), self.caffe.TEST)
        try:
            net.share_with(self.solver.net)
            topk = _topk_layers(net)
            for layer in topk:
                layer.iteration = max(self.solver.iter, 1)
            sums = dict.fromkeys(self.names, 0.0)
            for _ in range(self.n_images):
                try:
                    net.forward()
                except FloatingPointError:  # a loss layer saw NaN/inf: the training step will stop on it too
                    sums = dict.fromkeys(self.names, math.nan)
                    break
                for n in self.names:
                    sums[n] += net.blobs[n].data.item()
        finally:
            _data_layer(net).pool.shutdown(wait=True)
            del net
        vals = {n: v / self.n_images for n, v in sums.items()}
        bad = [n for n, v in vals.items() if not math.isfinite(v)]
        ma = sum(v for n, v in vals.items() if n.startswith("loss_ma"))
        he = sum(v for n, v in vals.items() if n.startswith("loss_he"))
        lam = topk_lambda_at(self.run, self.solver.iter) if topk else float("nan")
        row = {"iter": self.solver.iter, "lambda": lam, "loss_ma": ma, "loss_he": he}
        self.log.write({**row, "seconds": time.perf_counter() - t0, **vals})
        if bad:
            log.warning("test loss %s is %s at iteration %d", bad[0], vals[bad[0]], self.solver.iter)
        return row

    def close(self) -> None:
        self.log.close()


def topk_lambda_at(run: StageRun, it: int) -> float:
    from redseg.model.topk_schedule import topk_lambda

    return topk_lambda(max(it, 1), C.LAMBDA0, run.schedule.lambda_period, run.schedule.stage1.max_iter)


def latest_solverstate(run: StageRun) -> Path | None:
    states = []
    for p in run.run_dir.glob(f"stage{run.stage}_iter_*.solverstate"):
        m = re.search(r"_iter_(\d+)\.solverstate$", p.name)
        if m and p.with_suffix(".caffemodel").is_file():
            states.append((int(m.group(1)), p))
    return max(states)[1] if states else None


def _archive_previous(run: StageRun) -> None:
    """Starting a stage afresh: move its earlier outputs aside (never delete, never mix them in).

    Old snapshots would otherwise be taken for this run's (auto-resume, the final copy), and a
    retrained stage 1 makes every stage-2 output derived from the old one stale too.
    """
    stages = (1, 2) if run.stage == 1 else (2,)
    old = [
        p
        for st in stages
        for pattern in (f"stage{st}_iter_*", f"stage{st}_final.caffemodel", f"stage{st}_log.csv")
        for p in run.run_dir.glob(pattern)
    ]
    if not old:
        return
    dest = run.run_dir / time.strftime(f"previous-stage{run.stage}-%Y%m%d-%H%M%S")
    dest.mkdir(parents=True)
    for p in old:
        p.rename(dest / p.name)
    log.warning("stage %d starts afresh: %d earlier output files moved to %s", run.stage, len(old), dest)


def check_solverstate(path: Path) -> None:
    """Caffe's restore CHECK-fails on a missing or foreign file: check it first."""
    state = read_binary_proto(path, "SolverState", "solver state")
    if not state.learned_net:
        raise CaffeInputError(f"{path}: not a Caffe .solverstate (no learned_net)")
    learned = Path(state.learned_net)
    if not learned.is_absolute():
        learned = Path.cwd() / learned
    if not learned.is_file():
        raise CaffeInputError(f"{path}: the weights it refers to are missing: {state.learned_net}")


def _topk_layers(net):
    return [lay for lay in net.layers if type(lay).__name__ == "TopKBalancedCELoss"]


def _data_layer(net):
    return next(lay for lay in net.layers if type(lay).__name__ == "RedSegData")


def _init_weights(run: StageRun, net) -> None:
    if run.stage == 1:
        if run.from_scratch or run.weights is None or not run.weights.is_file():
            if not run.from_scratch:
                raise CaffeInputError(
                    f"no ImageNet VGG16 weights at {run.weights}. Run `make vgg16` (or download "
                    "VGG_ILSVRC_16_layers.caffemodel from the Caffe model zoo, or Keras' "
                    "vgg16_weights_tf_dim_ordering_tf_kernels_notop.h5; docs/weights.md) and pass --weights, "
                    "or pass --from-scratch (make: FROM_SCRATCH=1) to train without them (not the paper's setting)."
                )
            log.warning("*" * 78)
            log.warning("TRAINING FROM SCRATCH: no ImageNet VGG16 weights (the paper starts from them).")
            log.warning("Results will not match the paper's; fine for demos and tests only.")
            log.warning("*" * 78)
            return
        # A Caffe model (V1 or V2) or Keras' HDF5 file, told apart by content; the latter is
        # converted once and cached beside it (redseg/model/vgg16.py, docs/weights.md). check_weights
        # then checks the result against this net.
        weights = prepare_vgg16(run.weights, validate=False)
        copied = check_weights(weights, net, strict=False, required=VGG16_LAYERS)
        via = "" if weights == run.weights else f" (converted: {weights})"
        log.info("stage 1: %d layers initialised from %s%s", len(copied), run.weights, via)
    else:
        if run.weights is None or not run.weights.is_file():
            raise CaffeInputError(
                f"stage 2 starts from the final stage-1 weights, not found at {run.weights}; run stage 1 first"
            )
        weights = run.weights
        check_weights(weights, net, strict=True)
        log.info("stage 2: initialised from %s", weights)
    net.copy_from(str(weights))


class LossLog:
    """CSV of every iteration's losses; rows past a resume point are dropped (never trusted)."""

    def __init__(self, path: Path, columns: list[str], resume_iter: int):
        self.path = path
        self.columns = ["iter", "lambda", "loss_ma", "loss_he", "seconds", *columns]
        rows = []
        if resume_iter > 0 and path.is_file():
            with path.open(newline="") as f:
                rows = [r for r in csv.DictReader(f) if r.get("iter", "").isdigit() and int(r["iter"]) <= resume_iter]
        with atomic_path(path) as tmp, tmp.open("w", newline="") as f:
            w = csv.DictWriter(f, self.columns, extrasaction="ignore")
            w.writeheader()
            w.writerows(rows)
        self.f = path.open("a", newline="")
        self.w = csv.DictWriter(self.f, self.columns, extrasaction="ignore")

    def write(self, row: dict) -> None:
        self.w.writerow(row)
        self.f.flush()  # one short line per iteration: the log is complete whenever training stops

    def close(self) -> None:
        self.f.close()


def train_stage(run: StageRun) -> Path:
    """Run one stage to its max_iter; returns the final weights' path."""
    if run.final.is_file() and not run.force:
        log.info("stage %d already finished: %s (pass --force to train it again)", run.stage, run.final)
        return run.final
    samples = read_list(list_path(run.data, "train"))  # names the first missing file, before Caffe starts
    read_meta(run.data)
    validate_budget(run.base_lr, run.max_iter)
    if run.test_loss and run.stage_schedule.test_interval:
        read_list(list_path(run.data, "test"))
    caffe = set_mode(run.gpu)
    resume = None
    if run.resume == "auto":
        resume = None if run.force else latest_solverstate(run)
    elif run.resume:
        resume = Path(run.resume)
    if resume is not None:
        check_solverstate(resume)
    else:
        _archive_previous(run)
    solver_path = materialise(run)
    write_json(run.run_dir / f"stage{run.stage}_run.json", run.record())
    solver = caffe.get_solver(str(solver_path))
    net = solver.net
    if resume is not None:
        solver.restore(str(resume))
        log.info("resumed stage %d from %s at iteration %d", run.stage, resume, solver.iter)
    else:
        _init_weights(run, net)
    for layer in _topk_layers(net):
        layer.iteration = solver.iter  # continue the lambda staircase after a resume
    if solver.iter:
        _data_layer(net).skip(solver.iter)  # and the same sample sequence
    max_iter = run.stage_schedule.max_iter
    start_iter = solver.iter
    names = [b for b in net.outputs if b.startswith("loss_")]
    loss_log = LossLog(run.run_dir / f"stage{run.stage}_log.csv", names, solver.iter)
    test = None
    if run.test_loss and run.stage_schedule.test_interval:
        test = TestLoss(caffe, run, solver, names, solver.iter)
        if solver.iter == 0:
            test()
    log.info(
        "stage %d: %d training samples, iterations %d..%d, lr %g, %s",
        run.stage, len(samples), solver.iter + 1, max_iter, run.stage_schedule.base_lr, run.schedule.description,
    )  # fmt: skip
    bar = _progress(run, solver.iter, max_iter)
    topk = _topk_layers(net)
    stop = _StopAtIterationEnd()
    try:
        while solver.iter < max_iter:
            if stop.requested:
                raise KeyboardInterrupt
            t0 = time.perf_counter()
            try:
                solver.step(1)
            except FloatingPointError as e:  # a loss layer saw NaN/inf and stopped the step
                raise TrainingError(
                    f"stage {run.stage}: {e}; training stopped at iteration {solver.iter + 1}. "
                    f"Last good snapshot: {latest_solverstate(run) or 'none'}. Check the data and the lr."
                ) from e
            dt = time.perf_counter() - t0
            vals = {n: net.blobs[n].data.item() for n in names}
            bad = [n for n, v in vals.items() if not math.isfinite(v)]
            if bad:
                last = latest_solverstate(run)
                raise TrainingError(
                    f"stage {run.stage}: loss {bad[0]} is {vals[bad[0]]} at iteration {solver.iter}; "
                    f"training stopped. Last good snapshot: {last or 'none'}. Check the data and the lr."
                )
            ma = sum(v for n, v in vals.items() if n.startswith("loss_ma"))
            he = sum(v for n, v in vals.items() if n.startswith("loss_he"))
            lam = topk[0].last.get("lambda_", float("nan")) if topk else float("nan")
            loss_log.write({"iter": solver.iter, "lambda": lam, "loss_ma": ma, "loss_he": he, "seconds": dt, **vals})
            if test is not None and test.due(solver.iter, max_iter):
                row = test()
                log.info("iteration %d: test loss MA %.4g, HE %.4g", solver.iter, row["loss_ma"], row["loss_he"])
            if bar is not None:
                post = {"MA": f"{ma:.4g}", "HE": f"{he:.4g}"}
                if topk:
                    post["lambda"] = f"{lam:.4f}"
                bar.set_postfix(post, refresh=False)
                bar.update(1)
        if stop.requested:
            raise KeyboardInterrupt
    except KeyboardInterrupt:
        loss_log.close()
        if stop.requested:  # a clean iteration boundary: weights, solver state and log agree
            solver.snapshot()
            state = run.run_dir / f"stage{run.stage}_iter_{solver.iter}.solverstate"
            log.warning("interrupted: snapshot %s written; run the same command again to resume", state)
        raise
    finally:
        stop.restore()
        if bar is not None:
            bar.close()
        loss_log.close()
        if test is not None:
            test.close()
    snap_every = run.stage_schedule.snapshot
    if solver.iter > start_iter and not (snap_every and max_iter % snap_every == 0):
        solver.snapshot()  # Caffe snapshots only at multiples of `snapshot` (97,200 is not one)
    with atomic_path(run.final) as tmp:
        shutil.copyfile(run.run_dir / f"stage{run.stage}_iter_{max_iter}.caffemodel", tmp)
    log.info("stage %d finished: %s", run.stage, run.final)
    return run.final


class _StopAtIterationEnd:
    """First Ctrl-C: finish the current iteration, snapshot, stop. Second Ctrl-C: stop at once."""

    def __init__(self):
        self.requested = False
        self.old = None
        if threading.current_thread() is threading.main_thread():
            self.old = signal.signal(signal.SIGINT, self._handle)

    def _handle(self, signum, frame):
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        log.warning("Ctrl-C: stopping after this iteration with a snapshot (Ctrl-C again: stop without one)")

    def restore(self):
        if self.old is not None:
            signal.signal(signal.SIGINT, self.old)


def _progress(run: StageRun, start: int, total: int):
    if not run.progress:
        return None
    from tqdm import tqdm

    return tqdm(total=total, initial=start, desc=f"stage {run.stage}", unit="it", dynamic_ncols=True)
