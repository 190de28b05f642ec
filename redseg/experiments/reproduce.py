"""Every experiment of the paper in one run: Tables 2 and 5, Figures 6 and 7, and the open choices.

``make reproduce`` (tools/reproduce.py) runs each experiment as the user would by hand, through the
same driver and evaluation (tools/train.py, tools/test_net.py), in its own folder under the run
folder, as a child process: a Caffe abort (a glog CHECK) or a diverged loss ends that experiment
only, which the tables then report, and the others go on. redseg/experiments/reproduction.py assembles the
tables and figures from what the experiments wrote.

The experiments (:data:`EXPERIMENTS`; docs/reproduce.md):

* Table 2: stage 1 only, the stage-2 loss only, the two stages (stage 2 from stage 1's weights);
* Table 5: the MA branch fused from conv2-4 (the main model: Table 2's stage 1), conv2-5, conv1-4,
  stage 1 only, as in the paper;
* the open choices (docs/method.md): the mask rule ``area`` and ``nearest`` beside ``any``, and
  lambda counting only the negatives inside the field of view, stage 1 only, same schedule.

Resumable: an experiment whose folder carries its completion stamp (written last, after its
metrics) is skipped; an interrupted one continues from its snapshots (the driver resumes).
Preemptible: SIGUSR1 or SIGTERM (a batch scheduler's warning before a time limit, or its
preemption) is passed on to the running tools, the training driver snapshots and exits 75
(redseg.cli.EXIT_PREEMPTED), its experiment is recorded "interrupted" (resumable, not failed), no
further experiment starts, and the runner exits 75 too, without assembling the tables. With
several GPUs (``--gpus 0 1 2 3``) independent experiments run side by side, one per GPU; an
experiment waits for the one it starts from (:func:`plan`, :func:`execute`).
"""

from __future__ import annotations

import csv
import dataclasses
import logging
import queue
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from redseg import config as C
from redseg.cli import EXIT_PREEMPTED, Preempted, StopSignals
from redseg.fileio import is_complete, mark_complete, read_json_object, write_json
from redseg.toolchain.caffe_utils import REPO

log = logging.getLogger(__name__)

ABLATIONS = "prototxt/ablations"


@dataclass(frozen=True)
class Experiment:
    """One row of a table: what to train, from what, on which prepared set, and how to test it."""

    name: str  # its folder under the run folder
    title: str  # the row's label
    tables: tuple[str, ...]  # where it appears: "table2", "table5", "choices"
    stage: int = 1  # the stage trained in this experiment's folder
    net: str | None = None  # train net instead of the solver's (an ablation)
    solver: str | None = None  # solver template instead of prototxt/solver_stage<N>.prototxt
    deploy: str | None = None  # deploy net for testing, if not prototxt/deploy.prototxt
    mask_rule: str = "any"  # which prepared set it trains on
    after: str | None = None  # the experiment whose stage-1 weights it starts from
    sides: int = 0  # test images whose side outputs to write (Fig. 7)
    test_loss: bool = False  # the loss on the test list during training (Fig. 6: the main model's stages only)
    data: str | None = None  # the prepared set it trains on, a key of Settings.data (default: mask_rule)
    tests: tuple[str, ...] = ()  # further test sets (keys of Settings.tests) its model is scored on

    @property
    def final(self) -> str:
        return f"stage{self.stage}_final.caffemodel"


EXPERIMENTS: tuple[Experiment, ...] = (
    Experiment("stage1", "stage 1 only (Top-k CE)", ("table2", "table5", "choices"), sides=3, test_loss=True),
    Experiment("two_stage", "two stages (Red-Seg)", ("table2",), stage=2, after="stage1", sides=3, test_loss=True),
    # [assumption, docs/method.md#stage-2-only-ablation] the paper gives no settings for this row:
    # FN + FP from the initial weights at stage 1's schedule (the same budget as the row above).
    Experiment(
        "stage2_only",
        "stage-2 loss only (FN + FP)",
        ("table2",),
        solver=f"{ABLATIONS}/solver_l2_only.prototxt",
    ),
    Experiment(
        "ma_conv2-5",
        "MA fused from conv2-5",
        ("table5",),
        net=f"{ABLATIONS}/train_stage1_ma_conv2-5.prototxt",
        deploy=f"{ABLATIONS}/deploy_ma_conv2-5.prototxt",
    ),
    Experiment(
        "ma_conv1-4",
        "MA fused from conv1-4",
        ("table5",),
        net=f"{ABLATIONS}/train_stage1_ma_conv1-4.prototxt",
        deploy=f"{ABLATIONS}/deploy_ma_conv1-4.prototxt",
    ),
    Experiment("mask_area", "masks downsampled by `area`", ("choices",), mask_rule="area"),
    Experiment("mask_nearest", "masks downsampled by `nearest`", ("choices",), mask_rule="nearest"),
    Experiment(
        "negatives_fov",
        "lambda counts negatives in the FOV only",
        ("choices",),
        net=f"{ABLATIONS}/train_stage1_negatives_fov.prototxt",
    ),
)


BY_NAME = {e.name: e for e in EXPERIMENTS}


@dataclass(frozen=True)
class TestSet:
    """A test set a model is scored on: its prepared set and the labels at their own size."""

    data: Path  # the prepared set (its test.txt is what the model segments)
    gt: Path | None  # the set as published (scored at its label size), None: the prepared set's masks
    dataset: str  # its layout (redseg.data.datasets)

    def gt_args(self) -> list[str]:
        return ["--gt", str(self.gt), "--dataset", self.dataset] if self.gt is not None else []


def test_folder(exp: Experiment, key: str) -> str:
    """Where an experiment's model is scored on test set ``key``: ``test`` on its own, else ``test_<key>``."""
    return "test" if key == exp.data else f"test_{key}"


@dataclass
class Settings:
    """What every experiment of one reproduction shares."""

    run: Path  # the run folder (runs/reproduce)
    gt: Path  # the official-layout root with the full-size labels (IDRiD or the synthetic set)
    data: dict[str, Path]  # prepared set per mask rule
    schedule: C.TrainingSchedule
    weights: Path | None  # ImageNet VGG16 for stage 1; None: from scratch
    synthetic: bool
    python: str = sys.executable
    progress: bool = True
    tests: dict[str, TestSet] = field(default_factory=dict)  # by key, for Experiment.data / .tests

    def folder(self, exp: Experiment) -> Path:
        return self.run / exp.name


@dataclass
class Outcome:
    """What happened to one experiment in this invocation."""

    name: str
    # "done", "skipped" (finished earlier), "failed", "not run" (what it starts from failed),
    # "interrupted" (stopped by SIGUSR1/SIGTERM, or not started after one: resumable, run again)
    status: str
    gpu: int | None = None
    seconds: float = 0.0
    error: str = ""
    steps: list[dict] = field(default_factory=list)


def finished(folder: Path, exp: Experiment) -> bool:
    """Final weights and metrics present (every test set's), and the completion stamp written after them."""
    tests = ["test"] + [test_folder(exp, k) for k in exp.tests]
    return (
        is_complete(folder)
        and (folder / exp.final).is_file()
        and all((folder / t / "eval" / "metrics.json").is_file() for t in tests)
    )


def iterations(exp: Experiment, schedule: C.TrainingSchedule) -> int:
    """The solver iterations of the experiment's own stage (the ETA's unit)."""
    return (schedule.stage1 if exp.stage == 1 else schedule.stage2).max_iter


def commands(exp: Experiment, s: Settings, gpu: int | None) -> list[tuple[str, list[str]]]:
    """The tool invocations of one experiment, as a user would type them: (step, argv)."""
    out = s.folder(exp)
    data = s.data[exp.data or exp.mask_rule]
    own = s.tests.get(exp.data) if exp.data else None
    gpu_args = ["--gpu", str(gpu)] if gpu is not None else []
    train = [s.python, str(REPO / "tools" / "train.py"), "-q", "--stage", str(exp.stage)]
    train += ["--data", str(data), "--run", str(out), "--schedule", s.schedule.name, *gpu_args]
    if exp.stage == 1:
        train += ["--weights", str(s.weights)] if s.weights else ["--from-scratch"]
    else:
        train += ["--weights", str(s.run / exp.after / "stage1_final.caffemodel")]
    if exp.net:
        train += ["--net", str(REPO / exp.net)]
    if exp.solver:
        train += ["--solver", str(REPO / exp.solver)]
    if not exp.test_loss:
        train += ["--no-test-loss"]
    test = [s.python, str(REPO / "tools" / "test_net.py"), "-q", "--weights", str(out / exp.final)]
    gt_args = own.gt_args() if own is not None else ["--gt", str(s.gt)]
    test += ["--data", str(data), *gt_args, "--out", str(out / "test"), "--overlays", "0", *gpu_args]
    if exp.deploy:
        test += ["--deploy", str(REPO / exp.deploy)]
    if exp.sides:
        test += ["--sides", str(exp.sides)]
    steps = [("train", train), ("test", test)]
    for key in exp.tests:  # the same model on other test sets (make crossdata)
        if key == exp.data:
            continue
        ts = s.tests[key]
        argv = [s.python, str(REPO / "tools" / "test_net.py"), "-q", "--weights", str(out / exp.final)]
        argv += ["--data", str(ts.data), *ts.gt_args(), "--out", str(out / test_folder(exp, key))]
        argv += ["--overlays", "0", "--no-sidecar"]  # the model's thresholds stay its own test set's
        steps.append((test_folder(exp, key), argv + gpu_args))
    return steps


def _last_iteration(log_csv: Path) -> int:
    """The last iteration in a stage's loss log (0 when there is none yet)."""
    try:
        with log_csv.open(newline="") as f:
            rows = list(csv.reader(f))
    except OSError:
        return 0
    for row in reversed(rows[1:]):
        if row and row[0].isdigit():
            return int(row[0])
    return 0


class Children:
    """The runner's running tools, so that a scheduler's SIGUSR1/SIGTERM reaches them.

    Under SLURM only the batch script is told (``--signal=B:USR1@T``), and a script passes the
    signal on to the processes it knows; the tools this runner starts are its own children, so
    the runner passes it on (:meth:`forward`, from the signal handler) and stops starting new
    ones (:attr:`stopped`). A child that exits 75 by itself (signalled directly) stops the runner
    too: a scheduler's signal means the whole job is ending.
    """

    def __init__(self):
        # re-entrant: the signal handler runs in the main thread, which may be inside start() itself
        self.lock = threading.RLock()
        self.procs: set[subprocess.Popen] = set()
        self.signum: int | None = None
        self.stopped = False

    def forward(self, signum: int) -> None:
        with self.lock:
            if signum in (signal.SIGUSR1, signal.SIGTERM):
                self.signum, self.stopped = signum, True
            procs = [p for p in self.procs if p.poll() is None]
        for p in procs:
            p.send_signal(signum)

    def start(self, argv: list[str], **kw) -> subprocess.Popen:
        with self.lock:
            proc = subprocess.Popen(argv, **kw)
            self.procs.add(proc)
            late = self.signum  # a signal that came while this child was being started
        if late is not None:
            proc.send_signal(late)
        return proc

    def finished(self, proc: subprocess.Popen) -> None:
        with self.lock:
            self.procs.discard(proc)


def run_experiment(
    exp: Experiment, s: Settings, gpu: int | None, bar=None, children: Children | None = None
) -> Outcome:
    """Train and test one experiment in its folder; its record is ``experiment.json``."""
    children = children or Children()
    folder = s.folder(exp)
    if finished(folder, exp):
        prev = read_json_object(folder / "experiment.json") or {}
        return Outcome(exp.name, "skipped", gpu, float(prev.get("seconds", 0.0)), steps=prev.get("steps", []))
    folder.mkdir(parents=True, exist_ok=True)
    outcome = Outcome(exp.name, "done", gpu)
    t0 = time.monotonic()
    total = iterations(exp, s.schedule)
    log_csv = folder / f"stage{exp.stage}_log.csv"
    if bar is not None:  # the bar was drawn at the start: its clock (and so its ETA) starts now
        bar.reset(total=total)
        bar.initial = bar.n = _last_iteration(log_csv)  # a resumed stage: its rate counts from here
    for step, argv in commands(exp, s, gpu):
        if children.stopped:
            outcome.status, outcome.error = "interrupted", f"stopped before {step} (resumable: run again)"
            break
        t_step = time.monotonic()
        with (folder / f"{step}.log").open("a") as logf:
            logf.write(f"\n$ {' '.join(argv)}\n")
            logf.flush()
            proc = children.start(argv, stdout=logf, stderr=subprocess.STDOUT, cwd=REPO)
            try:
                while proc.poll() is None:
                    if bar is not None:
                        done = _last_iteration(log_csv) if step == "train" else total
                        bar.update(done - bar.n)
                        bar.set_postfix_str(step, refresh=True)
                    time.sleep(0.2 if children.stopped else 1.0)
            finally:
                children.finished(proc)
        outcome.steps.append({"step": step, "argv": argv, "seconds": round(time.monotonic() - t_step, 1)})
        # 75: the driver snapshotted on SIGUSR1/SIGTERM. Any other end after the runner passed such a
        # signal on (test_net.py has no snapshot to write and just ends) is the same stop, not a failure.
        if proc.returncode == EXIT_PREEMPTED or (proc.returncode != 0 and children.stopped):
            children.stopped = True
            outcome.status = "interrupted"
            outcome.error = f"{step} stopped (exit {proc.returncode}) by a scheduler's signal; resumable: run again"
            break
        if proc.returncode != 0:
            tail = (folder / f"{step}.log").read_text(errors="replace").strip().splitlines()[-3:]
            outcome.status = "failed"
            outcome.error = f"{step} exited with {proc.returncode}: " + " | ".join(tail)
            break
    outcome.seconds = round(time.monotonic() - t0, 1)
    record = {
        "name": exp.name,
        "title": exp.title,
        "status": outcome.status,
        "error": outcome.error,
        "gpu": gpu,
        "seconds": outcome.seconds,
        "steps": outcome.steps,
        "schedule": s.schedule.name,
    }
    write_json(folder / "experiment.json", record)
    if outcome.status == "done":
        mark_complete(folder, f"{exp.name} finished {time.strftime('%Y-%m-%d %H:%M:%S')}\n")
    if bar is not None:
        bar.update(total - bar.n)
        bar.set_postfix_str(outcome.status, refresh=True)
    return outcome


# --- several GPUs ---------------------------------------------------------------------------------


def plan(experiments: Sequence[Experiment], slots: Sequence[int | None], cost: Callable[[Experiment], float]):
    """Which slot (GPU id, or None for the CPU) runs which experiment, and when: greedy list
    scheduling in the given order, an experiment starting when a slot is free and what it starts
    from has finished. Returns ``[(name, slot, start, end)]`` in start order; :func:`execute`
    follows the same policy with real durations."""
    free = {slot: 0.0 for slot in slots}
    end: dict[str, float] = {}
    pending = list(experiments)
    out = []
    while pending:
        slot = min(free, key=lambda k: (free[k], list(slots).index(k)))
        ready = [e for e in pending if e.after is None or e.after in end]
        if not ready:
            raise ValueError(f"experiments wait for ones that are not planned: {[e.name for e in pending]}")
        # the earliest possible start among the ready ones (an experiment may wait for its parent)
        exp = min(ready, key=lambda e: max(free[slot], end.get(e.after, 0.0)))
        start = max(free[slot], end.get(exp.after, 0.0))
        end[exp.name] = free[slot] = start + cost(exp)
        out.append((exp.name, slot, start, end[exp.name]))
        pending.remove(exp)
    return sorted(out, key=lambda r: (r[2], str(r[1])))


def execute(
    experiments: Sequence[Experiment],
    slots: Sequence[int | None],
    worker: Callable[[Experiment, int | None], Outcome],
    stopped: Callable[[], bool] = lambda: False,
) -> list[Outcome]:
    """Run ``worker(experiment, slot)`` for every experiment, one at a time per slot, the slots
    side by side (a thread each); an experiment starts once the one it starts from has finished,
    and is "not run" if that one failed. Once ``stopped()`` (a scheduler's signal), none starts:
    those are "interrupted". Returns the outcomes in the experiments' order."""
    lock = threading.Condition()
    outcomes: dict[str, Outcome] = {}
    pending = list(experiments)
    running: set[str] = set()
    errors: queue.Queue = queue.Queue()
    names = {e.name for e in experiments}

    def next_for_slot() -> Experiment | None:
        with lock:
            while True:
                if stopped():
                    return None
                for e in pending:
                    waits = e.after in names  # a parent outside this selection: its folder decides
                    parent = outcomes.get(e.after) if waits else None
                    if waits and parent is None:
                        continue  # its parent is still running or waiting
                    pending.remove(e)
                    if parent is not None and parent.status not in ("done", "skipped"):
                        outcomes[e.name] = Outcome(e.name, "not run", error=f"{e.after} {parent.status}")
                        lock.notify_all()
                        break  # look again from the start
                    running.add(e.name)
                    return e
                else:
                    if not pending:
                        return None
                    lock.wait()

    def slot_loop(slot: int | None) -> None:
        try:
            while (exp := next_for_slot()) is not None:
                try:
                    res = worker(exp, slot)
                except Exception as e:  # the runner's own failure for this experiment: report, go on
                    log.exception("%s failed in the runner", exp.name)
                    res = Outcome(exp.name, "failed", slot, error=f"{type(e).__name__}: {e}")
                with lock:
                    running.discard(exp.name)
                    outcomes[exp.name] = res
                    lock.notify_all()
        except BaseException as e:  # pragma: no cover - Ctrl-C in a worker thread
            errors.put(e)

    threads = [threading.Thread(target=slot_loop, args=(slot,), daemon=True) for slot in slots]
    for t in threads:
        t.start()
    for t in threads:
        while t.is_alive():
            t.join(0.5)
    if not errors.empty():
        raise errors.get()
    not_started = Outcome("", "interrupted", error="not started: the run was stopped by a signal")
    return [outcomes.get(e.name) or dataclasses.replace(not_started, name=e.name) for e in experiments]


def run_all(s: Settings, experiments: Sequence[Experiment] = EXPERIMENTS, gpus: Sequence[int] = ()) -> list[Outcome]:
    """Every experiment, one progress line each with its ETA. Raises :class:`redseg.cli.Preempted`
    (the tool exits 75) when SIGUSR1/SIGTERM stopped it: see :class:`Children`."""
    from tqdm import tqdm

    slots: list[int | None] = list(gpus) or [None]
    bars = {}
    for i, exp in enumerate(experiments):
        total = iterations(exp, s.schedule)
        bars[exp.name] = tqdm(
            total=total,
            desc=f"{exp.name:<13}",
            unit="it",
            position=i,
            leave=True,
            disable=not s.progress,
            dynamic_ncols=True,
        )
    children = Children()
    try:
        with StopSignals(on_signal=children.forward, stops_after="the running experiments' current iteration"):
            outcomes = execute(
                experiments,
                slots,
                lambda e, g: run_experiment(e, s, g, bars[e.name], children),
                lambda: children.stopped,
            )
    finally:
        for b in bars.values():
            b.close()
    by_name = {e.name: e for e in experiments}
    for o in outcomes:
        if o.status == "not run":  # its record says so (an older record would claim otherwise)
            s.folder(by_name[o.name]).mkdir(parents=True, exist_ok=True)
            rec = {"name": o.name, "status": o.status, "error": o.error, "gpu": None, "seconds": 0.0, "steps": []}
            write_json(s.folder(by_name[o.name]) / "experiment.json", rec)
        msg = f"{o.name}: {o.status}" + (f" ({o.error})" if o.error else "") + f", {o.seconds:.0f} s"
        (log.warning if o.status in ("failed", "not run", "interrupted") else log.info)(msg)
    stopped = [o.name for o in outcomes if o.status == "interrupted"]
    if stopped:
        name = signal.Signals(children.signum).name if children.signum else "a tool's exit 75"
        log.warning(
            "stopped by %s: %s interrupted; exit %d (preempted, resumable): run the same command again to resume",
            name, ", ".join(stopped), EXIT_PREEMPTED,
        )  # fmt: skip
        raise Preempted(f"{len(stopped)} experiments interrupted")
    return outcomes


def settings_json(s: Settings) -> dict:
    return {
        "run": str(s.run),
        "gt": str(s.gt),
        "data": {k: str(v) for k, v in s.data.items()},
        "schedule": s.schedule.name,
        "schedule_description": s.schedule.description,
        "weights": str(s.weights) if s.weights else None,
        "synthetic": s.synthetic,
    }


class ReproductionError(ValueError):
    """The run folder holds a reproduction made differently; the message says what to do."""


def check_settings(s: Settings) -> None:
    """Refuse to mix experiments of different settings in one run folder (their finished
    experiments would be skipped and land in the same tables)."""
    old = read_json_object(s.run / "settings.json")
    if not old:
        return
    new = settings_json(s)
    differ = [k for k in ("gt", "schedule", "weights", "synthetic") if old.get(k) != new[k]]
    if differ:
        diffs = "; ".join(f"{k}: {old.get(k)!r} there, {new[k]!r} now" for k in differ)
        raise ReproductionError(
            f"{s.run} holds a reproduction with other settings ({diffs}). Use another run folder "
            "(RUN=..., --run) or move that one away; nothing was changed."
        )


def save_settings(s: Settings) -> None:
    write_json(s.run / "settings.json", settings_json(s))


def load_outcomes(s: Settings, experiments: Sequence[Experiment] = EXPERIMENTS) -> dict[str, dict]:
    """Each experiment's record (``experiment.json``), or a "not run" record."""
    out = {}
    for exp in experiments:
        rec = read_json_object(s.folder(exp) / "experiment.json") or {"status": "not run", "error": "no record"}
        if rec.get("status") == "done" and not finished(s.folder(exp), exp):
            rec = {**rec, "status": "failed", "error": "outputs incomplete (no completion stamp)"}
        out[exp.name] = rec
    return out


def run_task(s: Settings, exp: Experiment, gpus: Sequence[int]) -> int:
    """One experiment inside a SLURM task (``--slurm-task``): the local runner's own path for it (the same folder,
    records and stamp), without preparing data (the submission did) or assembling (the gathering
    job does). Exits 75 when SIGUSR1/SIGTERM stopped it with a snapshot (the batch script requeues)."""
    data = s.data[exp.data or exp.mask_rule]
    if not is_complete(data):
        raise FileNotFoundError(f"prepared set {data} is not there: the submission prepares it (submit again)")
    s.progress = False
    snaps = s.folder(exp).glob(f"stage{exp.stage}_iter_*.solverstate")
    states = [int(i) for p in snaps if (i := p.stem.rsplit("_", 1)[1]).isdigit()]
    if states and not finished(s.folder(exp), exp):
        log.info("%s: resumes from its latest snapshot, iteration %d", exp.name, max(states))
    outcomes = run_all(s, [exp], gpus)
    return 0 if all(o.status in ("done", "skipped") for o in outcomes) else 1


def vgg16_weights(weights: Path | None, default: Path) -> Path:
    """The ImageNet VGG16 weights stage 1 starts from (the paper's), or a clear error saying how to get them."""
    weights = weights or default
    if not weights.is_file():
        raise FileNotFoundError(
            f"no ImageNet VGG16 weights at {weights}: run `make vgg16` (docs/weights.md), pass "
            "VGG16=/path (--weights), or FROM_SCRATCH=1 (--from-scratch; not the paper's setting)"
        )
    return weights
