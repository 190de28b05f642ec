"""make reproduce (tools/reproduce.py, redseg/experiments/reproduce.py, redseg/experiments/reproduction.py).

The scheduling across GPUs is checked as a plan and with a stand-in worker (no GPU here); the
whole runner end to end on a tiny synthetic set with the smoke schedule, through real Caffe:
the tables against each run's metrics.json, both figures, skip, resume, and a failed experiment.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import cv2
import pytest

from redseg import config as C
from redseg.cli import EXIT_PREEMPTED, Preempted
from redseg.experiments.reproduce import EXPERIMENTS, Experiment, Outcome, execute, plan

REPO = Path(__file__).resolve().parents[2]
BY_NAME = {e.name: e for e in EXPERIMENTS}


def cost(e: Experiment) -> float:
    return float(C.SCHEDULES["paper"].stage2.max_iter if e.stage == 2 else C.SCHEDULES["paper"].stage1.max_iter)


def test_plan_spreads_experiments_over_gpus_and_waits_for_stage1():
    rows = plan(EXPERIMENTS, [0, 1, 2, 3], cost)
    assert sorted(r[0] for r in rows) == sorted(BY_NAME)
    assert {r[1] for r in rows} == {0, 1, 2, 3}
    start = {r[0]: r[2] for r in rows}
    end = {r[0]: r[3] for r in rows}
    assert start["two_stage"] >= end["stage1"]
    for gpu in range(4):  # one experiment at a time per GPU
        spans = sorted((r[2], r[3]) for r in rows if r[1] == gpu)
        assert all(a[1] <= b[0] for a, b in zip(spans, spans[1:], strict=False))
    makespan = max(end.values())
    assert makespan <= sum(map(cost, EXPERIMENTS)) / 4 + cost(BY_NAME["stage1"])  # about a quarter
    # one slot (the CPU): one after another, in order, the total time
    cpu = plan(EXPERIMENTS, [None], cost)
    assert [r[0] for r in cpu] == [e.name for e in EXPERIMENTS]
    assert max(r[3] for r in cpu) == sum(map(cost, EXPERIMENTS))


def test_execute_runs_side_by_side_respects_order_and_reports_failures():
    """A stand-in worker: four GPUs in use at once, never two experiments on one GPU, two_stage
    after stage1; when stage1 fails, two_stage is "not run" and the others still run."""
    lock = threading.Lock()
    busy: dict[int, str] = {}
    seen: list[tuple[str, int | None, float, float]] = []
    most = [0]

    def worker(exp: Experiment, gpu):
        t0 = time.monotonic()
        with lock:
            assert gpu not in busy, f"{exp.name} on GPU {gpu}, busy with {busy.get(gpu)}"
            busy[gpu] = exp.name
            most[0] = max(most[0], len(busy))
        time.sleep(0.15 if exp.stage == 1 else 0.05)
        with lock:
            del busy[gpu]
            seen.append((exp.name, gpu, t0, time.monotonic()))
        return Outcome(exp.name, "failed" if exp.name == fail else "done", gpu)

    fail = None
    out = execute(EXPERIMENTS, [0, 1, 2, 3], worker)
    assert [o.status for o in out] == ["done"] * len(EXPERIMENTS)
    assert most[0] == 4
    times = {name: (t0, t1) for name, _, t0, t1 in seen}
    assert times["two_stage"][0] >= times["stage1"][1]

    seen.clear()
    fail = "stage1"
    out = {o.name: o for o in execute(EXPERIMENTS, [0, 1], worker)}
    assert out["stage1"].status == "failed"
    assert out["two_stage"].status == "not run" and "stage1 failed" in out["two_stage"].error
    assert all(out[n].status == "done" for n in BY_NAME if n not in ("stage1", "two_stage"))
    assert "two_stage" not in {s[0] for s in seen}


def test_a_worker_exception_is_a_failed_experiment_not_a_stopped_run():
    def worker(exp, gpu):
        if exp.name == "ma_conv2-5":
            raise OSError("disk full")
        return Outcome(exp.name, "done", gpu)

    out = {o.name: o for o in execute(EXPERIMENTS, [None], worker)}
    assert out["ma_conv2-5"].status == "failed" and "disk full" in out["ma_conv2-5"].error
    assert sum(o.status == "done" for o in out.values()) == len(EXPERIMENTS) - 1


STAND_IN = """
import pathlib, signal, sys, time
folder = pathlib.Path(sys.argv[1])
def stop(signum, frame):
    (folder / "got").write_text(signal.Signals(signum).name)
    sys.exit(75)  # as tools/train.py after its snapshot
signal.signal(signal.SIGUSR1, stop)
signal.signal(signal.SIGTERM, stop)
(folder / "ready").write_text("")
time.sleep(120)
sys.exit(3)
"""


@pytest.mark.parametrize("sig", [signal.SIGUSR1, signal.SIGTERM], ids=lambda s: s.name)
def test_a_schedulers_signal_is_passed_to_the_running_tool_and_the_runner_stops_preempted(tmp_path, monkeypatch, sig):
    """The runner gets SIGUSR1 (SLURM's --signal=B:USR1, passed on by the batch script) or SIGTERM
    while a tool runs: the tool gets it, exits 75; its experiment is "interrupted" (no stamp, not
    "failed"), the next one never starts, its test step neither, and the runner raises Preempted
    (exit 75). A stand-in tool, so the signal lands while it runs, every time."""
    import redseg.experiments.reproduce as R

    child = tmp_path / "tool.py"
    child.write_text(STAND_IN)
    test_step = [sys.executable, "-c", f"open({str(tmp_path / 'test-ran')!r}, 'w')"]
    monkeypatch.setattr(
        R, "commands", lambda e, s, g: [("train", [sys.executable, str(child), str(s.folder(e))]), ("test", test_step)]
    )
    s = R.Settings(tmp_path / "run", tmp_path, {}, C.SCHEDULES["smoke"], None, True, progress=False)
    first, second = BY_NAME["stage1"], BY_NAME["ma_conv2-5"]
    caught = []
    guard = signal.signal(sig, lambda n, f: caught.append(n))  # should the runner not catch it: no dead pytest

    def signal_when_ready():
        deadline = time.time() + 60
        while not (s.folder(first) / "ready").exists() and time.time() < deadline:
            time.sleep(0.02)
        os.kill(os.getpid(), sig)

    threading.Thread(target=signal_when_ready, daemon=True).start()
    try:
        with pytest.raises(Preempted):
            R.run_all(s, [first, second])
    finally:
        signal.signal(sig, guard)
    assert not caught
    assert (s.folder(first) / "got").read_text() == sig.name
    rec = json.loads((s.folder(first) / "experiment.json").read_text())
    assert rec["status"] == "interrupted" and f"exit {EXIT_PREEMPTED}" in rec["error"]
    assert [st["step"] for st in rec["steps"]] == ["train"]
    assert not (s.folder(first) / ".complete").exists() and not (tmp_path / "test-ran").exists()
    assert not s.folder(second).exists()  # never started


# --- end to end ----------------------------------------------------------------------------------


def reproduce(run: Path, *args, check=True):
    cmd = [sys.executable, str(REPO / "tools" / "reproduce.py"), "--no-progress", "--run", str(run)]
    cmd += ["--schedule", "smoke", *map(str, args)]  # what `make reproduce SCHEDULE=smoke` runs
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    if check and proc.returncode != 0:
        raise AssertionError(f"{cmd} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc


@pytest.fixture(scope="module")
def reproduced(smoke_reproduction) -> Path:
    """The session's smoke reproduction (tests/conftest.py), which these tests then change."""
    return smoke_reproduction[0]


def test_every_row_and_the_tables_equal_each_runs_metrics(reproduced):
    result = json.loads((reproduced / "reproduction.json").read_text())
    exps = result["experiments"]
    assert set(exps) == set(BY_NAME)
    for name, e in exps.items():
        assert e["status"] == "done", (name, e["error"])
        m = json.loads((reproduced / name / "test" / "eval" / "metrics.json").read_text())
        for les in C.LESIONS:
            assert e["metrics"][les]["auc_pr"] == m[les]["auc_pr"]
            assert e["metrics"][les]["ap"] == m[les]["ap"]
            assert e["metrics"][les]["precision"] == m[les]["break_even"]["precision"]
            assert e["metrics"][les]["recall_at_0.5"] == m[les]["at_0.5"]["recall"]
        assert e["paper_settings"] is False  # smoke schedule, from scratch
    md = (reproduced / "reproduction.md").read_text()
    assert "synthetic fundus photographs" in md
    two = exps["two_stage"]["metrics"]
    assert f"{two['MA']['auc_pr']:.4f}" in md.split("## Table 2")[1].split("## Table 5")[0]
    assert f"{C.PAPER_TABLE5['conv2-5']['auc_pr']:.4f}" in md  # the paper's numbers beside ours
    # the two-stage row trained stage 2 from the stage-1 experiment's weights
    run2 = json.loads((reproduced / "two_stage" / "stage2_run.json").read_text())
    assert run2["weights"] == str(reproduced / "stage1" / "stage1_final.caffemodel")
    # each row trained what it says: the FOV row's net counts negatives in the FOV, area's data
    assert '\\"negatives\\": \\"fov\\"' in (reproduced / "negatives_fov" / "stage1_train.prototxt").read_text()
    meta = json.loads((reproduced / "data_area" / "meta.json").read_text())
    assert meta["mask_rule"] == "area"


def test_figures_are_written(reproduced):
    for name, min_w in (("fig6_loss_curves.png", 600), ("fig7_side_outputs.png", 1000)):
        img = cv2.imread(str(reproduced / name))
        assert img is not None and img.shape[1] >= min_w, name
    sides = sorted(p.name for p in (reproduced / "two_stage" / "test" / "sides").glob("*.png"))
    assert len(sides) == 2 * 8  # two test images (3 asked, 2 exist) x 8 maps
    rows = (reproduced / "stage1" / "stage1_test_log.csv").read_text().splitlines()
    assert [r.split(",")[0] for r in rows[1:]] == ["0", "5", "10"]
    assert (reproduced / "two_stage" / "stage2_test_log.csv").is_file()
    assert not (reproduced / "ma_conv2-5" / "stage1_test_log.csv").exists()  # Fig. 6 needs the main model only


def test_second_run_skips_finished_and_resumes_interrupted(reproduced):
    before = {p: p.stat().st_mtime_ns for p in reproduced.glob("*/experiment.json")}
    t0 = time.monotonic()
    reproduce(reproduced)
    assert time.monotonic() - t0 < 60
    assert {p: p.stat().st_mtime_ns for p in reproduced.glob("*/experiment.json")} == before
    # an interrupted experiment: no stamp, no final weights, its last snapshot gone
    exp = reproduced / "ma_conv2-5"
    for p in (".complete", "stage1_final.caffemodel", "stage1_iter_10.caffemodel", "stage1_iter_10.solverstate"):
        (exp / p).unlink()
    reproduce(reproduced, "--only", "ma_conv2-5")
    assert (exp / ".complete").is_file()
    assert not list(exp.glob("previous-stage1-*"))  # resumed, not restarted
    iters = [r.split(",")[0] for r in (exp / "stage1_log.csv").read_text().splitlines()[1:]]
    assert iters == [str(i) for i in range(1, 11)]


def test_sigusr1_stops_the_runner_with_75_and_the_rerun_resumes_the_experiment(reproduced):
    """The real runner and driver: SIGUSR1 to tools/reproduce.py while an experiment trains; the
    driver snapshots, both exit 75 (the experiment "interrupted"); the rerun resumes it."""
    exp = reproduced / "ma_conv1-4"
    for p in [exp / ".complete", exp / "stage1_final.caffemodel", *exp.glob("stage1_iter_*")]:
        p.unlink()
    cmd = [sys.executable, str(REPO / "tools" / "reproduce.py"), "--no-progress", "--run", str(reproduced)]
    proc = subprocess.Popen([*cmd, "--schedule", "smoke", "--only", "ma_conv1-4"], stderr=subprocess.PIPE, text=True)
    log = exp / "stage1_log.csv"
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:  # trains afresh: the old log moves aside first
        if list(exp.glob("previous-stage1-*")) and log.is_file() and len(log.read_text().splitlines()) >= 2:
            break
        time.sleep(0.02)
    proc.send_signal(signal.SIGUSR1)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == EXIT_PREEMPTED, err
    assert "preempted, resumable" in err
    rec = json.loads((exp / "experiment.json").read_text())
    assert rec["status"] == "interrupted" and not (exp / ".complete").exists()
    assert "preempted, resumable" in (exp / "train.log").read_text()  # the driver got it and snapshotted
    stopped = max(int(p.stem.split("_")[-1]) for p in exp.glob("stage1_iter_*.solverstate"))

    reproduce(reproduced, "--only", "ma_conv1-4")
    assert json.loads((exp / "experiment.json").read_text())["status"] == "done"
    assert f"at iteration {stopped}" in (exp / "train.log").read_text().split("resumed stage 1 from")[-1]
    iters = [r.split(",")[0] for r in log.read_text().splitlines()[1:]]
    assert iters == [str(i) for i in range(1, 11)]


def test_failed_experiment_is_reported_and_its_dependant_not_run(reproduced):
    for name, final in (("stage1", "stage1_final.caffemodel"), ("two_stage", "stage2_final.caffemodel")):
        (reproduced / name / ".complete").unlink()
        (reproduced / name / final).unlink()
    for p in (reproduced / "stage1").glob("stage1_iter_*"):  # stage 1 trains again ...
        p.unlink()
    images = sorted((reproduced / "data" / "train" / "images").iterdir())
    whole = {p: p.read_bytes() for p in images}
    for p in images:  # ... on training images cut short
        p.write_bytes(whole[p][:100])
    try:
        proc = reproduce(reproduced, "--only", "stage1", "two_stage", check=False)
    finally:
        for p, data in whole.items():
            p.write_bytes(data)
    assert proc.returncode == 1
    exps = json.loads((reproduced / "reproduction.json").read_text())["experiments"]
    assert exps["stage1"]["status"] == "failed" and "train/images/" in exps["stage1"]["error"]
    assert exps["two_stage"]["status"] == "not run"
    assert exps["ma_conv1-4"]["status"] == "done"  # the others keep their results
    md = (reproduced / "reproduction.md").read_text()
    table2 = md.split("## Table 2")[1].split("## Table 5")[0]
    assert "| stage 1 only (Top-k CE) † | ours | failed |" in table2


def test_other_settings_in_the_same_folder_are_refused(reproduced):
    proc = subprocess.run(
        [sys.executable, str(REPO / "tools" / "reproduce.py"), "-q", "--run", str(reproduced), "--schedule", "demo"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 1 and "other settings" in proc.stderr and "schedule" in proc.stderr
