"""`make reproduce LAUNCHER=slurm` (redseg/experiments/slurm.py) on a real SLURM, not a mock.

The session starts a one-node cluster with tools/slurm_local.sh (Debian's slurm-wlm and munge:
munged, slurmctld and slurmd on localhost, in a private folder) and stops it at the end. That needs
root; SLURM is installed with apt-get when missing (as on CI, where .ci/run installs it first).
Elsewhere the cluster tests skip and say why. What is checked, through real pycaffe and files:

* the smoke reproduction submitted with `make reproduce SCHEDULE=smoke LAUNCHER=slurm` gives every
  experiment the local runner's numbers on this machine, with logs named JOB_INDEX and two_stage
  after stage1's task;
* a second submission of the finished folder only gathers, and `make reproduce` here afterwards
  only gathers too;
* a task cancelled mid-way is reported "cancelled", its dependant "not run", and the others finish;
  a USR1 to a training task's batch shell requeues it and the requeued task resumes from its
  snapshot; submitting the folder again runs only what did not finish, resuming it.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from redseg import config as C
from redseg.experiments import slurm
from redseg.experiments.reproduce import EXPERIMENTS, Experiment

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "tools" / "slurm_local.sh"
PORT = "6837"  # not SLURM's default 6817: a cluster started by hand on this machine stays untouched
WAIT = 600  # seconds: every wait for the cluster is bounded
RESTART_WAIT = 300  # seconds for a requeued task's second start: the hold (31 s here), then a loaded machine


@pytest.fixture(scope="module")
def smoke_local(smoke_reproduction) -> dict:
    """The local runner's smoke reproduction on this machine (tests/conftest.py, shared with
    test_reproduce.py): its experiments' records and numbers, the reference for the SLURM run's."""
    return smoke_reproduction[1]


def _sh(*args, timeout: float, env=None) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(SCRIPT), *args], capture_output=True, text=True, timeout=timeout, env=env)


@pytest.fixture(scope="session")
def cluster():
    """A one-node SLURM cluster for the session; SLURM_CONF points the clients at it."""
    if os.geteuid() != 0:
        pytest.skip("the one-node SLURM cluster runs its daemons as root: run the tests as root (as CI does)")
    missing = [c for c in ("sbatch", "slurmctld", "slurmd", "munged") if shutil.which(c) is None]
    if missing and os.environ.get("REDSEG_SLURM_INSTALL_FAILED"):  # .ci/run tried already
        pytest.skip(f"SLURM is not installed: {os.environ['REDSEG_SLURM_INSTALL_FAILED']}")
    if missing:
        if shutil.which("apt-get") is None:
            pytest.skip(f"SLURM is not installed ({', '.join(missing)} missing) and there is no apt-get here")
        proc = _sh("install", timeout=960)
        if proc.returncode != 0:
            pytest.skip(f"installing SLURM with apt-get failed: {(proc.stderr or proc.stdout).strip()[-300:]}")
    folder = tempfile.mkdtemp(prefix="redseg-slurm-")  # short: munge's socket path must fit in 108 bytes
    env = {**os.environ, "SLURM_LOCAL_DIR": folder, "SLURM_LOCAL_PORT": PORT}
    old = os.environ.get("SLURM_CONF")
    proc = _sh("start", timeout=180, env=env)
    try:
        assert proc.returncode == 0, f"tools/slurm_local.sh start failed:\n{proc.stdout}\n{proc.stderr}"
        os.environ["SLURM_CONF"] = f"{folder}/slurm.conf"
        yield Path(folder)
    finally:
        _sh("stop", timeout=180, env=env)
        if old is None:
            os.environ.pop("SLURM_CONF", None)
        else:
            os.environ["SLURM_CONF"] = old
        shutil.rmtree(folder, ignore_errors=True)


def make_reproduce(run: Path, *variables: str, timeout: float = 600) -> subprocess.CompletedProcess:
    """`make reproduce` as a user types it (-o setup: Caffe is built; the suite's `make test` ran setup)."""
    cmd = ["make", "-s", "-o", "setup", "reproduce", "SCHEDULE=smoke", f"RUN={run}", f"PY={sys.executable}", *variables]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=REPO)
    assert proc.returncode == 0, f"{cmd} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}"
    return proc


def queued(ids: list[str]) -> list[str] | None:
    """The jobs of ``ids`` still in the queue ("ID STATE" lines); None when squeue did not answer
    (a busy controller: not a sign that they have ended)."""
    try:
        proc = subprocess.run(
            ["squeue", "-h", "-o", "%i %T", "-j", ",".join(ids)], capture_output=True, text=True, timeout=60
        )
    except subprocess.TimeoutExpired:
        return None
    if proc.returncode != 0:  # "Invalid job id": ended long enough ago for the controller to forget it
        return [] if "invalid job id" in proc.stderr.lower() else None
    return proc.stdout.split("\n") if proc.stdout.strip() else []


def job_state(job: str) -> str | None:
    """squeue's state of one job ("PENDING", "RUNNING", "COMPLETING", ...); "" once it has left the
    queue; None when squeue did not answer (a busy controller: ask again)."""
    try:
        proc = subprocess.run(["squeue", "-h", "-o", "%T", "-j", job], capture_output=True, text=True, timeout=60)
    except subprocess.TimeoutExpired:
        return None
    if proc.returncode != 0:  # "Invalid job id": ended long enough ago for the controller to forget it
        return "" if "invalid job id" in proc.stderr.lower() else None
    return proc.stdout.strip()


def cluster_report(cluster: Path, job: str, lines: int = 40) -> str:
    """What the cluster says about a job: `scontrol show job`, and the tails of the controller's
    and the node daemon's logs (tools/slurm_local.sh keeps them in the cluster's folder)."""
    try:
        show = subprocess.run(["scontrol", "show", "job", job], capture_output=True, text=True, timeout=60)
        parts = [f"$ scontrol show job {job}\n{(show.stdout + show.stderr).strip()}"]
    except subprocess.TimeoutExpired:
        parts = [f"$ scontrol show job {job}\n(no answer within 60 s)"]
    for name in ("slurmctld.log", "slurmd.log"):
        path = cluster / name
        tail = path.read_text(errors="replace").splitlines()[-lines:] if path.is_file() else ["(none)"]
        parts.append(f"--- the last {len(tail)} lines of {path}\n" + "\n".join(tail))
    return "\n".join(parts)


def wait_for_restart(cluster: Path, run: Path, task: str, timeout: float = RESTART_WAIT) -> None:
    """Until a requeued task's second start shows in its log (bounded), following the task's state;
    fails at once when the task leaves the queue without starting again, with what SLURM says.

    SLURM holds a requeued job for the job credential's lifetime plus a second before it may start
    again (its BeginTime; AuthInfo=cred_expire, 120 s by default, 30 s on tools/slurm_local.sh's
    cluster): the new start's launch credential must be newer than the revocation of the old
    start's, or slurmd refuses the launch ("already killed, do not launch batch job") and SLURM
    cancels the task. So the test waits for it and never sets StartTime=now (which, within the
    second of the requeue, made the task vanish and the gathering job run at once)."""
    log = run / "slurm" / f"{task}.log"

    def text() -> str:
        return log.read_text() if log.is_file() else ""

    end = time.monotonic() + timeout
    while True:
        state = job_state(task)  # before the log: a second start that ends in between still shows
        if ", start 2," in text():
            return
        if state == "" or time.monotonic() > end:
            what = "left the queue without starting again" if state == "" else f"did not start again in {timeout} s"
            raise AssertionError(
                f"requeued task {task} {what} (state {state!r}); its log:\n{text()}\n{cluster_report(cluster, task)}"
            )
        time.sleep(0.5)


def wait_for(run: Path, record: dict, timeout: float = WAIT) -> None:
    """Until every job of the submission has left the queue (bounded; the logs in the message)."""
    ids = [*record["jobs"], record["gather"]]
    end = time.monotonic() + timeout
    while (still := queued(ids)) is None or still:
        if time.monotonic() > end:
            logs = "\n".join(f"--- {p.name}\n{p.read_text()[-1500:]}" for p in sorted((run / "slurm").glob("*.log")))
            raise AssertionError(f"jobs {ids} still queued after {timeout} s: {queued(ids)}\n{logs}")
        time.sleep(0.5)


def jobs(run: Path) -> dict:
    return json.loads((run / "slurm" / "jobs.json").read_text())


def results(run: Path) -> dict:
    return json.loads((run / "reproduction.json").read_text())["experiments"]


# --- no cluster needed ---------------------------------------------------------------------------


def test_slurm_launcher_without_sbatch_says_so_in_one_line(tmp_path):
    bin_dir = tmp_path / "bin"  # a PATH with the interpreter's folder and the basic tools, no SLURM
    bin_dir.mkdir()
    env = {**os.environ, "PATH": str(bin_dir)}
    cmd = [sys.executable, str(REPO / "tools" / "reproduce.py"), "-q", "--run", str(tmp_path / "run")]
    proc = subprocess.run([*cmd, "--schedule", "smoke", "--launcher", "slurm"], capture_output=True, text=True, env=env)
    assert proc.returncode == 1
    assert proc.stderr.count("\n") == 1 and "needs `sbatch` on PATH" in proc.stderr, proc.stderr
    assert not (tmp_path / "run").exists()  # nothing prepared before the check


def test_plan_puts_dependants_after_their_parents_and_skips_finished():
    done: set[str] = set()
    first, later = slurm.plan(EXPERIMENTS, lambda e: e.name in done)
    assert [e.name for _, e in first] == [e.name for e in EXPERIMENTS if e.name != "two_stage"]
    assert [(i, e.name) for i, e in later] == [(1, "two_stage")]  # its index in the list: the array index
    done = {"stage1", "ma_conv1-4"}
    first, later = slurm.plan(EXPERIMENTS, lambda e: e.name in done)
    assert "two_stage" in [e.name for _, e in first] and not later  # its parent is finished: ready
    assert {e.name for _, e in first}.isdisjoint(done)
    chain = [Experiment("c", "", (), after="b"), Experiment("b", "", (), after="a"), Experiment("a", "", ())]
    first, later = slurm.plan(chain, lambda e: False)
    assert [e.name for _, e in first] == ["a"] and [e.name for _, e in later] == ["b", "c"]


def test_reconcile_reports_tasks_that_left_no_record(tmp_path):
    """The gathering job's view of a submission: a cancelled task, its dependant, a killed task,
    and a failure the runner recorded itself, each in the runner's record format."""
    run = tmp_path / "run"
    (run / "slurm").mkdir(parents=True)
    exps = [
        Experiment("p", "", ()),
        Experiment("d", "", (), after="p"),
        Experiment("k", "", ()),
        Experiment("f", "", ()),
    ]
    (run / "slurm" / "jobs.json").write_text(
        json.dumps({"submitted_unix": time.time() - 5, "tasks": {"p": "9_0", "d": "10_1", "k": "9_2", "f": "9_3"}})
    )
    (run / "slurm" / "9_0.exit").write_text("75 TERM 0\n")
    (run / "f").mkdir()
    (run / "f" / "experiment.json").write_text(json.dumps({"status": "failed", "error": "train exited with 1"}))
    written = slurm.reconcile(run, exps, lambda e: False, lambda e: run / e.name / "experiment.json")
    assert written == {"p": "cancelled", "d": "not run", "k": "failed"}
    rec = {e.name: json.loads((run / e.name / "experiment.json").read_text()) for e in exps}
    assert "9_0" in rec["p"]["error"] and "p did not finish" in rec["d"]["error"]
    assert "killed, or never started" in rec["k"]["error"]
    assert rec["f"] == {"status": "failed", "error": "train exited with 1"}  # the runner's own record stays


def test_the_batch_scripts_are_valid_bash(tmp_path):
    """Every script the launchers write parses (bash -n), and passes shellcheck where it is installed."""
    scripts = {
        "task.sh": slurm.TASK_SCRIPT.format(run="/r", names="a b", runner="py tool", notes="/r/slurm")
        + slurm.PREEMPTIBLE.format(preempted=75),
        "part.sh": slurm.PART_SCRIPT.format(out="/o", notes="/o/slurm", segment="py seg")
        + slurm.PREEMPTIBLE.format(preempted=75),
        "gather.sh": slurm.GATHER_SCRIPT.format(run="/r", gather="py tool"),
        "merge.sh": slurm.MERGE_SCRIPT.format(out="/o", merge="py seg --merge /o"),
    }
    for name, text in scripts.items():
        (tmp_path / name).write_text(text)
        proc = subprocess.run(["bash", "-n", str(tmp_path / name)], capture_output=True, text=True)
        assert proc.returncode == 0, (name, proc.stderr)
    if shutil.which("shellcheck"):
        paths = [str(tmp_path / n) for n in scripts] + [str(SCRIPT)]
        proc = subprocess.run(["shellcheck", *paths], capture_output=True, text=True)
        assert proc.returncode == 0, proc.stdout


# --- on the one-node cluster ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def submitted(cluster, tmp_path_factory):
    """`make reproduce SCHEDULE=smoke LAUNCHER=slurm`, waited for; (run folder, its printout, seconds)."""
    run = tmp_path_factory.mktemp("repro_slurm") / "run"
    t0 = time.monotonic()
    proc = make_reproduce(run, "LAUNCHER=slurm")
    wait_for(run, jobs(run))
    return run, proc.stdout, time.monotonic() - t0


def test_smoke_reproduction_through_slurm_equals_the_local_run(submitted, smoke_local):
    run, printout, seconds = submitted
    record = jobs(run)
    array = record["jobs"][0]
    names = [e.name for e in EXPERIMENTS]
    assert record["tasks"] == {  # one array, two_stage after stage1's task in an array of its own
        **{n: f"{array}_{i}" for i, n in enumerate(names) if n != "two_stage"},
        "two_stage": f"{record['jobs'][1]}_1",
    }
    assert record["after"] == {"two_stage": f"{array}_0"}
    for name, task in record["tasks"].items():
        log = (run / "slurm" / f"{task}.log").read_text()
        assert f"task {task}: {name} on" in log and f"task {task}: exited 0" in log, log
    for expected in (f"squeue -j {','.join([*record['jobs'], record['gather']])}", "tail -f", "scancel"):
        assert expected in printout, printout
    ours, local = results(run), smoke_local
    assert set(ours) == set(local) == set(names)
    for name in names:
        assert ours[name]["status"] == "done", (name, ours[name].get("error"))
        assert local[name]["status"] == "done", (name, local[name].get("error"))
        assert ours[name]["metrics"] == local[name]["metrics"], name  # every number, to the last digit
    for les in C.LESIONS:  # and the tables were assembled from them
        auc = ours["two_stage"]["metrics"][les]["auc_pr"]
        assert f"{auc:.4f}" in (run / "reproduction.md").read_text()
    print(f"smoke reproduction through SLURM: {seconds:.0f} s")


def test_a_second_submission_only_gathers_and_so_does_a_local_run(submitted):
    run = submitted[0]
    before = {p: p.stat().st_mtime_ns for p in run.glob("*/experiment.json")}
    assert len(before) == len(EXPERIMENTS)
    proc = make_reproduce(run, "LAUNCHER=slurm")
    record = jobs(run)
    assert record["tasks"] == {} and record["jobs"] == []
    assert "finished already (skipped)" in proc.stdout
    wait_for(run, record)
    assert (run / "slurm" / f"gather_{record['gather']}.log").is_file()
    t0 = time.monotonic()
    make_reproduce(run)  # on the login node, afterwards: the same folder, nothing to train
    assert time.monotonic() - t0 < 60
    assert {p: p.stat().st_mtime_ns for p in run.glob("*/experiment.json")} == before
    assert all(e["status"] in ("done", "skipped") for e in results(run).values())


def test_crossdata_through_slurm_equals_the_local_run(cluster, smoke_crossdata, tmp_path):
    """`make crossdata SCHEDULE=smoke LAUNCHER=slurm`: the same runner's experiments as SLURM tasks
    (stage 2 after its stage-1 task), then the gathering job's table, equal to the local run's."""
    local_run, local = smoke_crossdata
    run = tmp_path / "run"
    (tmp_path / "empty").mkdir()
    cmd = ["make", "-s", "-o", "setup", "crossdata", "SCHEDULE=smoke", f"RUN={run}", f"PY={sys.executable}"]
    cmd += [f"DATA_ROOT={tmp_path / 'empty'}", "LAUNCHER=slurm"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=REPO)
    assert proc.returncode == 0, f"{cmd} failed:\n{proc.stdout}\n{proc.stderr}"
    record = jobs(run)
    assert set(record["after"]) == {"idrid", "ddr", "fgadr"}  # each stage 2 waits for its stage-1 task
    wait_for(run, record)
    ours = json.loads((run / "crossdata.json").read_text())
    assert all(ours["experiments"][k]["status"] == "done" for k in ("idrid", "ddr", "fgadr")), ours["experiments"]
    assert ours["matrix"] == local["matrix"]  # every number, to the last digit


def _rows(path: Path) -> int:
    try:
        return len(path.read_text().splitlines()) - 1
    except OSError:
        return 0


@pytest.fixture(scope="module")
def interrupted(cluster, tmp_path_factory):
    """stage1, two_stage and ma_conv1-4 on photographs twice the smoke size (about 0.5-1 s per
    iteration here, so a signal lands mid-training): stage1 cancelled (scancel) and ma_conv1-4
    sent USR1 (scancel --signal=USR1 --batch) once each has logged two iterations."""
    run = tmp_path_factory.mktemp("repro_interrupted") / "run"
    only = ["stage1", "two_stage", "ma_conv1-4"]
    tool = [sys.executable, str(REPO / "tools" / "reproduce.py"), "-q", "--no-progress", "--run", str(run)]
    tool += ["--schedule", "smoke", "--synthetic-size", "256x384", "--launcher", "slurm", "--only", *only]
    proc = subprocess.run(tool, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    record = jobs(run)
    # while SLURM has them, running the folder here (or submitting it again) is refused
    local = subprocess.run(tool[: tool.index("--launcher")], capture_output=True, text=True, timeout=120)
    pending = {"stage1": ["scancel", record["tasks"]["stage1"]]}
    pending["ma_conv1-4"] = ["scancel", "--signal=USR1", "--batch", record["tasks"]["ma_conv1-4"]]
    sent: dict[str, int] = {}
    end = time.monotonic() + 300
    while pending and time.monotonic() < end:
        for name in list(pending):
            done = _rows(run / name / "stage1_log.csv")
            if done >= 2:
                subprocess.run(pending.pop(name), check=True, timeout=60)
                sent[name] = done
        time.sleep(0.05)
    assert not pending, f"never saw two iterations of {list(pending)}"
    # the USR1'd task requeues itself; SLURM starts it again after the requeue hold (wait_for_restart)
    wait_for_restart(cluster, run, record["tasks"]["ma_conv1-4"])
    wait_for(run, record)
    return run, record, sent, local


def test_a_folder_with_queued_jobs_is_refused_here(interrupted):
    run, record, _, local = interrupted
    assert local.returncode == 1 and "still queued or running" in local.stderr, local.stderr
    assert local.stderr.count("\n") == 1  # one line
    assert not (run / "ma_conv2-5").exists()  # nothing ran here


def test_a_cancelled_task_is_reported_and_the_others_finish(interrupted):
    run, record, sent, _ = interrupted
    exps = results(run)
    assert exps["stage1"]["status"] == "cancelled", exps["stage1"]
    assert record["tasks"]["stage1"] in exps["stage1"]["error"]
    assert exps["two_stage"]["status"] == "not run" and "stage1 did not finish" in exps["two_stage"]["error"]
    assert exps["ma_conv1-4"]["status"] == "done"
    table2 = (run / "reproduction.md").read_text().split("## Table 2")[1].split("## Table 5")[0]
    assert "| stage 1 only (Top-k CE) † | ours | cancelled |" in table2
    assert "| two stages (Red-Seg) † | ours | not run |" in table2
    # stopped at an iteration boundary with a snapshot, not killed mid-way
    states = sorted(run.glob("stage1/stage1_iter_*.solverstate"))
    assert states, "the cancelled task left no snapshot to resume from"


def test_usr1_requeues_the_task_and_it_resumes_from_its_snapshot(interrupted):
    run, record, sent, _ = interrupted
    task = record["tasks"]["ma_conv1-4"]
    log = (run / "slurm" / f"{task}.log").read_text()
    assert "SIGUSR1 from SLURM" in log and f"requeueing (scontrol requeue {task})" in log, log
    assert ", start 2," in log, log  # SLURM ran the task a second time
    resumed = [line for line in log.splitlines() if "resumes from its latest snapshot, iteration" in line]
    assert resumed and int(resumed[-1].rsplit(" ", 1)[1]) >= sent["ma_conv1-4"] > 0, log
    assert f"task {task}: exited 0" in log
    exp = run / "ma_conv1-4"
    assert (exp / ".complete").is_file()
    assert not list(exp.glob("previous-stage1-*"))  # resumed, not restarted
    iters = [r.split(",")[0] for r in (exp / "stage1_log.csv").read_text().splitlines()[1:]]
    assert iters == [str(i) for i in range(1, 11)]  # every iteration once


def test_submitting_again_runs_only_what_did_not_finish_and_resumes_it(interrupted):
    run = interrupted[0]
    finished_before = (run / "ma_conv1-4" / "experiment.json").stat().st_mtime_ns
    tool = [sys.executable, str(REPO / "tools" / "reproduce.py"), "-q", "--no-progress", "--run", str(run)]
    tool += ["--schedule", "smoke", "--synthetic-size", "256x384", "--launcher", "slurm"]
    proc = subprocess.run([*tool, "--only", "stage1", "two_stage", "ma_conv1-4"], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    record = jobs(run)
    assert sorted(record["tasks"]) == ["stage1", "two_stage"] and record["skipped"] == ["ma_conv1-4"]
    wait_for(run, record)
    exps = results(run)
    assert exps["stage1"]["status"] == exps["two_stage"]["status"] == exps["ma_conv1-4"]["status"] == "done"
    assert (run / "ma_conv1-4" / "experiment.json").stat().st_mtime_ns == finished_before
    log = (run / "slurm" / f"{record['tasks']['stage1']}.log").read_text()
    assert "stage1: resumes from its latest snapshot" in log, log
    assert not list((run / "stage1").glob("previous-stage1-*"))


def test_a_screening_array_of_two_parts_is_merged_into_one_runs_summary(cluster, caffe, tmp_path):
    """`make segment-slurm PARTS=2`: tools/segment.py as a two-task array (each its part from
    SLURM's array variables) and --merge after it; the summary equals one local run's, byte for byte."""
    import cv2
    import numpy as np
    from conftest import save_random_model

    from redseg.data.synthetic import SyntheticParams, render_fundus
    from redseg.deploy.model_info import ModelInfo, write_model_info

    model = save_random_model(tmp_path / "model.caffemodel", seed=0)
    write_model_info(model, ModelInfo([30.0, 60.0, 120.0], 64.0, {"MA": 0.3, "HE": 0.7}, "test", "m.json"))
    photos = tmp_path / "photos"
    photos.mkdir()
    for i in range(3):
        img = render_fundus(np.random.default_rng(i), SyntheticParams(160, 106)).image
        cv2.imwrite(str(photos / f"eye{i}.png"), img)
    single = tmp_path / "single"
    tool = [sys.executable, str(REPO / "tools" / "segment.py"), "-q", "--no-progress", "--weights", str(model)]
    proc = subprocess.run([*tool, "--out", str(single), str(photos)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    out = tmp_path / "screened"
    cmd = ["make", "-s", "-o", "setup", "segment-slurm", f"PY={sys.executable}", f"PHOTOS={photos}", "PARTS=2"]
    proc = subprocess.run(
        [*cmd, f"WEIGHTS={model}", f"SEGMENT_OUT={out}"], capture_output=True, text=True, timeout=300, cwd=REPO
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "merge job" in proc.stdout and "squeue -j" in proc.stdout
    record = jobs(out)
    wait_for(out, record)
    array = record["jobs"][0]
    for i in (0, 1):
        log = (out / "slurm" / f"{array}_{i}.log").read_text()
        assert f"part {i} of 2" in log and f"task {array}_{i}: exited 0" in log, log
    assert sorted(p.name for p in (out / "parts").iterdir()) == ["part-0-of-2.json", "part-1-of-2.json"]
    merge_log = (out / "slurm" / f"merge_{record['gather']}.log").read_text()
    for name in ("summary.csv", "summary.json", "index.html"):
        assert (out / name).is_file(), merge_log
        assert (out / name).read_bytes() == (single / name).read_bytes(), name
