"""The solver driver: one stage of Red-Seg's two-stage training (paper Algorithm 1, section 3.2).

Stage 1 starts from ImageNet VGG16 weights and minimises the Top-k balanced cross-entropy with the
lambda staircase; stage 2 starts from the final stage-1 weights and minimises FN + FP. Each stage
has its own solver file (prototxt/solver_stage{1,2}.prototxt). For a run this module writes
per-run copies of the solver and train net into the run folder (absolute paths, since Caffe
resolves paths against the working directory; the data list and the schedule filled in), then
steps the solver one iteration at a time so it can show progress, log every loss to CSV, stop on a
NaN, and snapshot on Ctrl-C.

Preemption (docs/training.md#preemption-and-snapshots): SIGUSR1 or SIGTERM, as a batch scheduler
sends before a time limit or when it preempts a job, stops training at the end of the current
iteration with a snapshot, like the first Ctrl-C, and the tool exits with :data:`EXIT_PREEMPTED`
(75) so that the job can be requeued; the requeued run resumes from that snapshot and ends with
the same weights as an uninterrupted one.

Snapshots are whole files or nothing, because a scheduler's SIGKILL may land while one is being
written: the driver takes snapshotting over from Caffe (the run's solver says ``snapshot: 0`` and
the driver snapshots at the schedule's multiples itself, after logging the iteration), Caffe writes
each snapshot into a staging folder, and the driver moves it into the run folder under the usual
names, weights first and solver state last (:func:`write_snapshot`). An automatic resume takes the
newest snapshot that reads whole and says which ones it skipped (:func:`resumable_snapshot`).
"""

from __future__ import annotations

import csv
import dataclasses
import json
import logging
import math
import os
import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from redseg import config as C
from redseg.cli import EXIT_PREEMPTED, Preempted, StopSignals
from redseg.data.prepared_set import list_path, read_list, read_meta
from redseg.fileio import atomic_path, write_json, write_text
from redseg.model.vgg16 import prepare_weights as prepare_vgg16
from redseg.toolchain.caffe_utils import (
    REPO,
    CaffeInputError,
    check_net_param,
    check_weights,
    import_caffe,
    set_mode,
    shared_blob_memory,
)

log = logging.getLogger(__name__)

# The tool's exit status when SIGUSR1/SIGTERM stopped training with a snapshot ("preempted,
# resumable"): a SLURM job requeues on it (redseg.cli, where every tool's statuses are defined).
__all__ = ["EXIT_PREEMPTED", "StageRun", "TrainingError", "train_stage"]

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
    if sp.snapshot_format != caffe_pb2.SolverParameter.BINARYPROTO:
        log.warning("%s: snapshot_format replaced by BINARYPROTO (the driver checks and moves snapshots)", template)
    sp.net = str(run_net.resolve())
    sp.base_lr, sp.max_iter = st.base_lr, st.max_iter
    # The driver snapshots at the schedule's multiples itself (write_snapshot): Caffe must not do it
    # inside solver.step(), where it writes the run folder's files in place. Caffe writes into the
    # staging folder; the files users see keep their names (stage<N>_iter_<i>.*) and iterations.
    sp.snapshot = 0
    sp.snapshot_format = caffe_pb2.SolverParameter.BINARYPROTO
    sp.snapshot_prefix = str((staging_dir(run) / run.prefix.name).resolve())
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
        with shared_blob_memory():  # forward only: no diff is written, no data shares (docs/install.md)
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


def _snapshots(run: StageRun) -> list[tuple[int, Path]]:
    """This stage's solver states in the run folder, newest first: (iteration in the name, path)."""
    states = []
    for p in run.run_dir.glob(f"stage{run.stage}_iter_*.solverstate"):
        m = re.search(r"_iter_(\d+)\.solverstate$", p.name)
        if m:
            states.append((int(m.group(1)), p))
    return sorted(states, reverse=True)


def latest_solverstate(run: StageRun) -> Path | None:
    """The newest solver state with its weights beside it (named in messages; not checked)."""
    return next((p for _, p in _snapshots(run) if p.with_suffix(".caffemodel").is_file()), None)


def staging_dir(run: StageRun) -> Path:
    """Where Caffe writes a snapshot before the driver moves it into the run folder (a hidden
    folder in the run folder, so that the moves are renames on one file system)."""
    return run.run_dir / f".stage{run.stage}-snapshot"


def _sync(path: Path) -> None:
    """Flush a file's (or a folder's) data to disk: a rename is then never seen before the data it
    names, even after a crash of the machine (a SIGKILL alone cannot lose written data)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_snapshot(run: StageRun, solver) -> Path:
    """Snapshot the solver as whole files: ``stage<N>_iter_<i>.caffemodel`` and ``.solverstate`` in
    the run folder appear complete or not at all. Returns the solver state's path.

    Caffe writes both into :func:`staging_dir` (the run's snapshot_prefix points there). A
    .solverstate names the weights file Caffe restores from (``learned_net``), so it is rewritten
    to the final name before anything moves; then the weights are renamed into place and the solver
    state last: the solver state is the commit point, and a kill between the two renames leaves an
    orphaned .caffemodel that nothing resumes from (auto-resume starts from solver states) and the
    next snapshot of that iteration replaces.
    """
    from caffe.proto import caffe_pb2

    staging = staging_dir(run)
    staging.mkdir(parents=True, exist_ok=True)
    solver.snapshot()
    name = f"{run.prefix.name}_iter_{solver.iter}"
    tmp_model, tmp_state = staging / f"{name}.caffemodel", staging / f"{name}.solverstate"
    model, state = run.run_dir / tmp_model.name, run.run_dir / tmp_state.name
    msg = caffe_pb2.SolverState()
    msg.ParseFromString(tmp_state.read_bytes())
    msg.learned_net = str(model.resolve())
    tmp_state.write_bytes(msg.SerializeToString())
    _sync(tmp_model)
    _sync(tmp_state)
    os.replace(tmp_model, model)
    os.replace(tmp_state, state)
    _sync(run.run_dir)
    staging.rmdir()  # empty again: nothing of this snapshot is left behind
    return state


def _weights_problem(path: Path, net) -> str | None:
    """Why ``path`` cannot restore ``net``'s weights (missing, cut short, another net's), or None."""
    from caffe.proto import caffe_pb2
    from google.protobuf.message import DecodeError

    if not path.is_file():
        return f"its weights file is missing: {path}"
    param = caffe_pb2.NetParameter()
    try:
        param.ParseFromString(path.read_bytes())
    except DecodeError as e:
        return f"its weights file {path} is not a whole Caffe model ({e})"
    have = {layer.name: list(layer.blobs) for layer in param.layer}
    for name, blobs in net.params.items():
        got = have.get(name)
        if got is None or len(got) != len(blobs):
            return f"its weights file {path} lacks layer '{name}' (cut short?)"
        for b, want in zip(got, blobs, strict=True):
            if len(b.data) != want.data.size:
                return f"its weights file {path} holds {len(b.data)} values for '{name}', expected {want.data.size}"
    return None


def snapshot_weights(state_path: Path) -> Path:
    """The weights a snapshot resumes with: the .caffemodel beside its .solverstate, of the same
    name, as Caffe always writes the pair, rather than the path the state records
    (``learned_net``, absolute): a run folder copied or moved elsewhere still records the old path,
    and Caffe would restore from there, silently, if that old folder still exists."""
    return state_path.with_suffix(".caffemodel").resolve()


def snapshot_problem(state_path: Path, net) -> str | None:
    """Why the snapshot ``state_path`` cannot be resumed from, or None when it reads whole: the
    solver state parses, its iteration is the one in its name, its momentum history fits ``net``,
    and its weights file (:func:`snapshot_weights`) exists and holds every parameter of ``net``.

    Caffe's restore aborts the process (a glog CHECK) on any of these, or silently keeps the
    initial weights of a layer missing from a cut-short .caffemodel; hence the checks first.
    """
    from caffe.proto import caffe_pb2
    from google.protobuf.message import DecodeError

    state = caffe_pb2.SolverState()
    try:
        state.ParseFromString(state_path.read_bytes())
    except OSError as e:
        return f"cannot read it: {e.strerror or e}"
    except DecodeError as e:
        return f"not a whole Caffe solver state ({e})"
    if not state.learned_net:
        return "not a Caffe .solverstate (no learned_net)"
    m = re.search(r"_iter_(\d+)\.solverstate$", state_path.name)
    if m and state.iter != int(m.group(1)):
        return f"it holds iteration {state.iter}, its name says {m.group(1)}"
    params = [b for blobs in net.params.values() for b in blobs]
    hist = list(state.history)
    if not hist or len(hist) % len(params):  # SGD keeps one history blob per parameter, Adam two
        return f"{len(hist)} history blobs, the net has {len(params)} parameter blobs (cut short?)"
    for i, h in enumerate(hist):
        if len(h.data) != params[i % len(params)].data.size:
            return f"history blob {i} holds {len(h.data)} values, expected {params[i % len(params)].data.size}"
    return _weights_problem(snapshot_weights(state_path), net)


def restore(run: StageRun, solver, state_path: Path) -> None:
    """``solver.restore`` from a checked snapshot, with the weights of :func:`snapshot_weights`:
    when its ``learned_net`` names another file, Caffe is given a copy of the state that names
    the right one (in the staging folder, removed after)."""
    from caffe.proto import caffe_pb2

    state = caffe_pb2.SolverState()
    state.ParseFromString(state_path.read_bytes())
    weights = snapshot_weights(state_path)
    if Path(state.learned_net) == weights:
        solver.restore(str(state_path))
        return
    log.warning("%s names the weights %s; resuming with %s", state_path, state.learned_net, weights)
    state.learned_net = str(weights)
    staging = staging_dir(run)
    staging.mkdir(parents=True, exist_ok=True)
    tmp = staging / state_path.name
    tmp.write_bytes(state.SerializeToString())
    try:
        solver.restore(str(tmp))
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def resumable_snapshot(run: StageRun, net) -> Path | None:
    """The newest snapshot of this stage that reads whole (:func:`snapshot_problem`), or None.

    A snapshot cut short (a SIGKILL while an older driver, or Caffe itself, wrote it in place; a
    full disk) must not block the resume when a good one sits beside it: each one skipped is
    logged with why.
    """
    found = _snapshots(run)
    for _, path in found:
        problem = snapshot_problem(path, net)
        if problem is None:
            return path
        log.warning("not resuming from %s: %s", path, problem)
    if found:
        log.warning("stage %d: none of its %d snapshots reads whole: starting afresh", run.stage, len(found))
    return None


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
    """Run one stage to its max_iter; returns the final weights' path.

    Raises :class:`redseg.cli.Preempted` when SIGUSR1/SIGTERM stopped it (snapshot written) and
    KeyboardInterrupt on Ctrl-C (snapshot written on the first).
    """
    if run.final.is_file() and not run.force:
        log.info("stage %d already finished: %s (pass --force to train it again)", run.stage, run.final)
        return run.final
    samples = read_list(list_path(run.data, "train"))  # names the first missing file, before Caffe starts
    read_meta(run.data)
    validate_budget(run.base_lr, run.max_iter)
    if run.test_loss and run.stage_schedule.test_interval:
        read_list(list_path(run.data, "test"))
    if run.resume not in (None, "auto") and not Path(run.resume).is_file():
        raise CaffeInputError(f"solver state not found: {run.resume}")
    # From here a scheduler's signal (or Ctrl-C) only asks to stop at the next iteration boundary:
    # building the solver takes seconds, and dying then would not be "preempted, resumable".
    with StopSignals(interrupt=True, stops_after="this iteration, with a snapshot") as stop:
        return _train(run, stop, len(samples))


def _stopped(run: StageRun, stop: StopSignals, state: Path | None, it: int, max_iter: int):
    """Report a stop on a signal (one line) and raise what the tool turns into its exit status."""
    if stop.preempted:
        log.warning(
            "%s: stage %d stopped at iteration %d of %d; %s; exit %d (preempted, resumable): run the same "
            "command again to resume",
            stop.signal_name, run.stage, it, max_iter,
            f"snapshot {state}" if state else "no snapshot (nothing to resume from yet)",
            EXIT_PREEMPTED,
        )  # fmt: skip
        raise Preempted(f"stage {run.stage} preempted at iteration {it}")
    if state is not None:
        log.warning("interrupted: snapshot %s written; run the same command again to resume", state)
    raise KeyboardInterrupt


def _train(run: StageRun, stop: StopSignals, n_samples: int) -> Path:
    caffe = set_mode(run.gpu)
    shutil.rmtree(staging_dir(run), ignore_errors=True)  # what a kill left mid-snapshot: never trusted
    solver_path = materialise(run)
    # The train net's intermediate blobs share their diff and data memory by liveness (the shared
    # diff and data memory, docs/install.md; REDSEG_SHARED_DIFF=0 or REDSEG_SHARED_DATA=0 opts
    # out): nothing here reads them after backward, and each forward is followed by one backward.
    with shared_blob_memory():
        solver = caffe.get_solver(str(solver_path))
    net = solver.net
    resume = None
    if run.resume == "auto":
        resume = None if run.force else resumable_snapshot(run, net)
    elif run.resume:
        resume = Path(run.resume)
        problem = snapshot_problem(resume, net)
        if problem:
            raise CaffeInputError(f"{resume}: {problem}")
    if resume is None:
        _archive_previous(run)
    write_json(run.run_dir / f"stage{run.stage}_run.json", run.record())
    if resume is not None:
        restore(run, solver, resume)
        log.info("resumed stage %d from %s at iteration %d", run.stage, resume, solver.iter)
    else:
        _init_weights(run, net)
    for layer in _topk_layers(net):
        layer.iteration = solver.iter  # continue the lambda staircase after a resume
    if solver.iter:
        _data_layer(net).skip(solver.iter)  # and the same sample sequence
    max_iter = run.stage_schedule.max_iter
    snap_every = run.stage_schedule.snapshot
    start_iter = solver.iter
    last_snapshot = resume  # the snapshot of the current iteration, if any
    if stop.requested:  # a signal while the solver was being built: nothing new to save
        _stopped(run, stop, resume, solver.iter, max_iter)
    names = [b for b in net.outputs if b.startswith("loss_")]
    loss_log = LossLog(run.run_dir / f"stage{run.stage}_log.csv", names, solver.iter)
    test = None
    if run.test_loss and run.stage_schedule.test_interval:
        test = TestLoss(caffe, run, solver, names, solver.iter)
        if solver.iter == 0:
            test()
    log.info(
        "stage %d: %d training samples, iterations %d..%d, lr %g, %s",
        run.stage, n_samples, solver.iter + 1, max_iter, run.stage_schedule.base_lr, run.schedule.description,
    )  # fmt: skip
    bar = _progress(run, solver.iter, max_iter)
    topk = _topk_layers(net)
    try:
        while solver.iter < max_iter and not stop.requested:
            t0 = time.perf_counter()
            try:
                solver.step(1)
            except FloatingPointError as e:  # a loss layer saw NaN/inf and stopped the step
                raise TrainingError(
                    f"stage {run.stage}: {e}; training stopped at iteration {solver.iter + 1}. "
                    f"Last good snapshot: {latest_solverstate(run) or 'none'}. Check the data and the lr."
                ) from e
            last_snapshot = None
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
            # After the iteration's log rows: a resume from this snapshot keeps exactly those rows.
            if snap_every and solver.iter % snap_every == 0:
                last_snapshot = write_snapshot(run, solver)
            if bar is not None:
                post = {"MA": f"{ma:.4g}", "HE": f"{he:.4g}"}
                if topk:
                    post["lambda"] = f"{lam:.4f}"
                bar.set_postfix(post, refresh=False)
                bar.update(1)
    finally:
        if bar is not None:
            bar.close()
        loss_log.close()
        if test is not None:
            test.close()
    if solver.iter < max_iter:  # stopped by a signal at an iteration boundary: weights, state and logs agree
        if last_snapshot is None and solver.iter > start_iter:
            last_snapshot = write_snapshot(run, solver)
        _stopped(run, stop, last_snapshot or latest_solverstate(run), solver.iter, max_iter)
    if last_snapshot is None:
        write_snapshot(run, solver)  # the last iteration, when max_iter is no multiple of `snapshot` (97,200)
    with atomic_path(run.final) as tmp:
        shutil.copyfile(run.run_dir / f"stage{run.stage}_iter_{max_iter}.caffemodel", tmp)
    log.info("stage %d finished: %s", run.stage, run.final)
    return run.final


def _progress(run: StageRun, start: int, total: int):
    if not run.progress:
        return None
    from tqdm import tqdm

    return tqdm(total=total, initial=start, desc=f"stage {run.stage}", unit="it", dynamic_ncols=True)
