"""A runner's experiments as SLURM jobs: ``make reproduce LAUNCHER=slurm`` (docs/cluster.md).

Why plain ``sbatch``: it is what users of a cluster have, with nothing to install, and job arrays
and ``--dependency`` already express what the local runner does (one experiment after another, a
stage-2 experiment after the stage-1 one it starts from, then the tables). No Python scheduler
library is involved; this module only writes batch scripts and calls ``sbatch``.

What :func:`submit` submits, for the unfinished experiments of a run folder:

* one **job array**, one task per experiment whose start is ready (the array index is the
  experiment's position in the runner's list); logs ``<run>/slurm/%A_%a.log``;
* each experiment that starts from another one still to run (``two_stage`` after ``stage1``) as
  its own one-task array with ``--dependency=afterok:<JOB>_<INDEX>`` and ``--kill-on-invalid-dep=yes``:
  when the parent fails, SLURM cancels the dependant instead of leaving it pending forever, and the
  gathering job reports it "not run" with the parent's status, as the local runner does;
* one **gathering job** with ``--dependency=afterany:`` on all of them, which runs the runner's
  assemble path (``--slurm-gather``: :func:`reconcile`, then the tables and figures), so a
  failed, cancelled or killed task is reported in its row.

A task runs the runner itself for its one experiment (``<tool> ... --only NAME --slurm-task``),
so a task does exactly what the local runner does for that experiment (same folder, same
records, same completion stamp): a second submission, or ``make reproduce`` on the login node,
skips what is finished and only gathers. The batch script traps SIGUSR1 (``--signal=B:USR1@<s>``,
before the time limit or a preemption) and SIGTERM (``scancel``, preemption), passes them to the
runner, which stops training at the end of the iteration with a snapshot and exits 75
(``redseg.cli.EXIT_PREEMPTED``); after a USR1 the script then requeues its own task
(``scontrol requeue JOB_INDEX``, verified on SLURM 22.05) and the requeued task resumes from the
snapshot. After a SIGTERM it does not requeue: ``scancel`` means stop (a preemption with
``PreemptMode=REQUEUE`` is requeued by SLURM itself).

The module knows nothing of Table 2 or 5: it takes a list of experiments (``name``, ``after``), a
``finished`` test, and the runner's command line. Any runner of that kind (``tools/reproduce.py``
today; another over the same ``run_all``/``assemble`` later) gets ``--launcher slurm`` by passing
its own list and command (:func:`submit`, :func:`reconcile`).

:func:`submit_segment` does the same for screening (``make segment-slurm``): tools/segment.py as a
job array over its ``--num-parts``/``--part-id``, then ``--merge``.
"""

from __future__ import annotations

import logging
import shlex
import shutil
import subprocess
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Protocol

from redseg.cli import EXIT_PREEMPTED  # the tools' "stopped with the work saved; resumable" (75)
from redseg.fileio import read_json_object, write_json, write_text

log = logging.getLogger(__name__)

LAUNCHERS = ("local", "slurm")
FOLDER = "slurm"  # <run>/slurm: batch scripts, logs, the submission record, task exit notes
JOBS = "jobs.json"  # the latest submission: task ids per experiment, the gathering job
DEFAULT_SIGNAL_SECONDS = 300  # --signal=B:USR1@300: time to finish an iteration and snapshot
SBATCH_TIMEOUT = 60  # seconds for one sbatch/squeue call (a controller that does not answer)


class LauncherError(RuntimeError):
    """The scheduler is missing or refused a submission; the message says what to do."""


class Experiment(Protocol):
    """What the launcher needs of a runner's experiment: its folder's name and what it starts from."""

    name: str
    after: str | None


def folder(run: Path) -> Path:
    return run / FOLDER


def require(command: str = "sbatch") -> str:
    """The path of a SLURM command, or one line saying that it is missing."""
    path = shutil.which(command)
    if path is None:
        raise LauncherError(
            f"LAUNCHER=slurm needs `{command}` on PATH and there is none here: run it on a SLURM login "
            "node (or drop LAUNCHER=slurm to run here; docs/cluster.md)"
        )
    return path


def _call(argv: list[str]) -> str:
    try:
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=SBATCH_TIMEOUT)
    except subprocess.TimeoutExpired:
        raise LauncherError(f"{argv[0]} did not answer within {SBATCH_TIMEOUT} s: {shlex.join(argv)}") from None
    if proc.returncode != 0:
        msg = (proc.stderr.strip() or proc.stdout.strip()).replace("\n", " | ")
        raise LauncherError(f"{shlex.join(argv)} failed ({proc.returncode}): {msg}")
    return proc.stdout.strip()


def sbatch(options: Sequence[str], script: Path) -> str:
    """Submit ``script``; returns the job id (``--parsable`` prints ``ID`` or ``ID;cluster``)."""
    out = _call([require("sbatch"), "--parsable", *options, str(script)])
    job = out.splitlines()[-1].split(";")[0].strip() if out else ""
    if not job.isdigit():
        raise LauncherError(f"sbatch printed no job id for {script}: {out!r}")
    return job


def split_options(text: str | None) -> list[str]:
    """``SBATCH="--partition=gpu --gres=gpu:1"`` as sbatch arguments (shell quoting rules)."""
    try:
        return shlex.split(text or "")
    except ValueError as e:
        raise LauncherError(f"SBATCH options {text!r}: {e}") from None


def plan(experiments: Sequence[Experiment], finished: Callable[[Experiment], bool]):
    """Which unfinished experiments go into the first array (their start is ready) and which wait
    for another one that runs in this submission: ``(first, later)``, each ``[(index, experiment)]``
    with ``index`` the experiment's position in ``experiments``; ``later`` lists a dependant after
    the experiment it waits for. An experiment whose parent is finished, or not in the list, is
    ready (the runner then finds the parent's weights, or reports them missing, as it does locally)."""
    todo = [(i, e) for i, e in enumerate(experiments) if not finished(e)]
    names = {e.name for _, e in todo}
    first = [(i, e) for i, e in todo if e.after not in names]
    later, placed = [], {e.name for _, e in first}
    pending = [(i, e) for i, e in todo if e.after in names]
    while pending:
        ready = [(i, e) for i, e in pending if e.after in placed]
        if not ready:
            raise ValueError(f"experiments wait for each other: {[e.name for _, e in pending]}")
        for item in ready:
            later.append(item)
            placed.add(item[1].name)
            pending.remove(item)
    return first, later


# The end of every batch script that runs preemptible work: CMD (a bash array) runs in a process
# group of its own; SIGUSR1 (--signal=B:USR1@<s>: the time limit or a preemption is near) and
# SIGTERM (scancel, preemption) are passed to that group, whose tools stop at their next safe point
# with their work saved and exit 75; after a USR1 the task requeues itself and its next start
# resumes. TASK and NOTE (where the exit status and the signal are noted) are set before.
PREEMPTIBLE = """child=""
got=""
# shellcheck disable=SC2317  # run by the traps below
pass_on() {{
    got=${{got:-$1}}
    echo "redseg: task $TASK: SIG$1 from SLURM at $(date '+%T'), passed to the work"
    if [[ -n $child ]]; then kill -s "$1" -- "-$child" 2>/dev/null || kill -s "$1" "$child" 2>/dev/null || true; fi
}}
trap 'pass_on USR1' USR1
trap 'pass_on TERM' TERM
set -m  # job control: the work gets a process group of its own (its id is $child)
"${{CMD[@]}}" &
child=$!
set +m
while kill -0 "$child" 2>/dev/null; do wait "$child" || true; done  # a trapped signal ends a wait early
rc=0
wait "$child" || rc=$?
echo "$rc ${{got:-none}} $(date +%s)" >"$NOTE"
echo "redseg: task $TASK: exited $rc at $(date '+%F %T')"
if [[ $got != TERM ]] && {{ [[ $rc -eq {preempted} ]] || [[ -n $got && $rc -gt 128 ]]; }}; then
    # warned before the time limit or a preemption, work saved: requeue; the next start resumes
    echo "redseg: task $TASK: requeueing (scontrol requeue $TASK); it resumes where it stopped"
    if scontrol requeue "$TASK"; then
        sleep 120  # SLURM ends this start of the task now; never report it finished
    fi
    echo "redseg: task $TASK: could not requeue; submit again to resume" >&2
fi
exit "$rc"
"""

TASK_SCRIPT = """#!/usr/bin/env bash
# One experiment of {run} per array task (redseg/experiments/slurm.py wrote this; sbatch keeps its
# own copy of a script at submission, so rewriting this file changes no queued task). The task
# runs the runner for its one experiment, which trains (or resumes) and tests it in its folder.
set -euo pipefail
NAMES=({names})
RUNNER=({runner})
TASK=${{SLURM_ARRAY_JOB_ID}}_${{SLURM_ARRAY_TASK_ID}}
NAME=${{NAMES[$SLURM_ARRAY_TASK_ID]}}
NOTE={notes}/$TASK.exit
echo "redseg: task $TASK: $NAME on $(hostname), start $((${{SLURM_RESTART_COUNT:-0}} + 1)), $(date '+%F %T')"
GPU=()  # --gres=gpu:N: SLURM shows the task its GPUs as 0..N-1; the experiment takes the first
if [[ -n ${{CUDA_VISIBLE_DEVICES:-}} && ${{CUDA_VISIBLE_DEVICES}} != NoDevFiles ]]; then GPU=(--gpus 0); fi
CMD=("${{RUNNER[@]}}" --only "$NAME" --slurm-task "${{GPU[@]}}")
"""

GATHER_SCRIPT = """#!/usr/bin/env bash
# The tables and figures of {run} once every task has ended (--dependency=afterany): the runner's
# assemble path, which also reports the tasks that failed, were cancelled or never ran.
# Written by redseg/experiments/slurm.py.
set -euo pipefail
echo "redseg: gathering {run} on $(hostname), $(date '+%F %T')"
exec {gather} --slurm-gather
"""


def submit(
    run: Path,
    experiments: Sequence[Experiment],
    finished: Callable[[Experiment], bool],
    runner: Sequence[str],
    sbatch_options: str | None = None,
    gather_options: str | None = None,
    signal_seconds: int = DEFAULT_SIGNAL_SECONDS,
    job_name: str = "redseg",
    chdir: Path | None = None,
) -> dict:
    """Submit the unfinished ``experiments`` of ``run`` and the gathering job; returns the
    submission record (also written to ``<run>/slurm/jobs.json``).

    ``runner`` is the runner's command line for this run folder without ``--only`` (for example
    ``[python, tools/reproduce.py, --run, RUN, --schedule, smoke]``); a task appends ``--only NAME
    --slurm-task`` and the gathering job ``--slurm-gather``. ``sbatch_options`` go to every job
    (partition, GPUs, time); ``gather_options`` replace them for the gathering job (default: the
    same). The jobs start in ``chdir`` (default: this working directory, so that relative paths in
    ``runner`` mean what they meant here). With every experiment finished, only the gathering job
    is submitted."""
    require("sbatch")
    if signal_seconds < 1:
        raise LauncherError(f"--signal-seconds must be at least 1, got {signal_seconds}")
    opts = split_options(sbatch_options)
    gopts = opts if gather_options is None else split_options(gather_options)
    out = folder(run)
    out.mkdir(parents=True, exist_ok=True)
    first, later = plan(experiments, finished)
    names = [e.name for e in experiments]
    task_sh, gather_sh = out / "task.sh", out / "gather.sh"
    task = TASK_SCRIPT.format(
        run=run, names=_words(names), runner=_words(runner), notes=shlex.quote(str(out))
    ) + PREEMPTIBLE.format(preempted=EXIT_PREEMPTED)
    write_text(task_sh, task)
    write_text(gather_sh, GATHER_SCRIPT.format(run=run, gather=_words(runner)))
    common = [f"--chdir={chdir or Path.cwd()}", "--export=ALL"]
    task_opts = [
        *common,
        f"--job-name={job_name}",
        f"--output={out}/%A_%a.log",
        "--open-mode=append",  # a requeued task's log goes on after the first start's
        "--requeue",
        f"--signal=B:USR1@{signal_seconds}",
        *opts,
    ]
    tasks: dict[str, str] = {}
    jobs: list[str] = []
    if first:
        array = ",".join(str(i) for i, _ in first)
        job = sbatch([*task_opts, f"--array={array}"], task_sh)
        jobs.append(job)
        tasks.update({e.name: f"{job}_{i}" for i, e in first})
    for i, e in later:
        dep = [f"--dependency=afterok:{tasks[e.after]}", "--kill-on-invalid-dep=yes"]
        job = sbatch([*task_opts, f"--array={i}", *dep], task_sh)
        jobs.append(job)
        tasks[e.name] = f"{job}_{i}"
    gather_dep = [f"--dependency=afterany:{':'.join(jobs)}"] if jobs else []
    gather = sbatch(
        [*common, f"--job-name={job_name}-gather", f"--output={out}/gather_%j.log", *gather_dep, *gopts],
        gather_sh,
    )
    record = {
        "submitted": time.strftime("%Y-%m-%d %H:%M:%S"),
        "submitted_unix": time.time(),
        "tasks": tasks,
        "after": {e.name: tasks[e.after] for _, e in later},
        "skipped": [e.name for e in experiments if e.name not in tasks],
        "jobs": jobs,
        "gather": gather,
        "sbatch": opts,
        "signal_seconds": signal_seconds,
    }
    write_json(out / JOBS, record)
    for name, task in tasks.items():
        log.info(
            "%s: SLURM task %s%s", name, task, f" (after {record['after'][name]})" if name in record["after"] else ""
        )
    return record


def _words(argv: Sequence[str]) -> str:
    """A command line as bash words (quoted where needed)."""
    return " ".join(shlex.quote(str(a)) for a in argv)


def follow(run: Path, record: dict, writes: Path | None = None, last: str = "gathering job") -> str:
    """What to type to follow and cancel a submission (printed after :func:`submit` and
    :func:`submit_segment`); ``writes`` is what the last job writes (default: reproduction.md)."""
    ids = [*record["jobs"], record["gather"]]
    lines = []
    if record["tasks"]:
        lines.append(f"submitted {len(record['tasks'])} task(s) to SLURM:")
        for name, task in record["tasks"].items():
            dep = record["after"].get(name)
            lines.append(f"  {name:<14} task {task}" + (f", after {dep} (afterok)" if dep else ""))
    if record["skipped"]:
        lines.append(f"finished already (skipped): {', '.join(record['skipped'])}")
    lines.append(f"{last} {record['gather']}: writes {writes or run / 'reproduction.md'} when the others end")
    lines.append("follow:")
    lines.append(f"  squeue -j {','.join(ids)}")
    if shutil.which("sacct"):
        lines.append(f"  sacct -j {','.join(ids)} -X -o JobID,JobName,State,ExitCode,Elapsed   (with accounting)")
    if record["jobs"]:
        lines.append(f"  tail -f {folder(run)}/{{{','.join(record['jobs'])}}}_*.log")
    lines.append(f"  tail -f {folder(run)}/{'gather' if last == 'gathering job' else 'merge'}_{record['gather']}.log")
    lines.append(f"cancel: scancel {' '.join(ids)}   (one task: scancel JOB_INDEX, e.g. {_example(record)})")
    if last == "gathering job":
        lines.append("afterwards, here: the same make command without LAUNCHER only gathers (nothing is retrained)")
    return "\n".join(lines)


def _example(record: dict) -> str:
    return next(iter(record["tasks"].values()), record["gather"])


def active_jobs(run: Path) -> list[str]:
    """The jobs of the run folder's latest submission still queued or running (``squeue``); empty
    when there was none, when they have all ended, or when ``squeue`` is not here to ask."""
    record = read_json_object(folder(run) / JOBS)
    squeue = shutil.which("squeue")
    if not record or squeue is None:
        return []
    ids = [*record.get("jobs", []), record.get("gather", "")]
    ids = [i for i in ids if i]
    if not ids:
        return []
    try:
        proc = subprocess.run(
            [squeue, "-h", "-o", "%i", "-j", ",".join(ids)], capture_output=True, text=True, timeout=SBATCH_TIMEOUT
        )
    except subprocess.TimeoutExpired:
        log.warning("squeue did not answer within %d s: not checking %s's jobs", SBATCH_TIMEOUT, run)
        return []
    if proc.returncode != 0:  # ended jobs the controller no longer knows ("Invalid job id"), or no controller
        return []
    return [line.strip() for line in proc.stdout.splitlines() if line.strip()]


def refuse_if_active(run: Path) -> None:
    """Running the run folder's experiments here, or submitting them again, while SLURM still has
    them would train the same experiment twice in one folder."""
    active = active_jobs(run)
    if active:
        raise LauncherError(
            f"{run} has SLURM jobs still queued or running ({', '.join(active)}): wait for them "
            f"(squeue -j {','.join(active)}) or cancel them (scancel ...) first"
        )


def task_note(run: Path, task: str) -> tuple[int, str] | None:
    """The exit status and the signal (``USR1``, ``TERM`` or ``none``) a task's script noted."""
    try:
        rc, got, _ = (folder(run) / f"{task}.exit").read_text().split()
        return int(rc), got
    except (OSError, ValueError):
        return None


def reconcile(
    run: Path,
    experiments: Sequence[Experiment],
    finished: Callable[[Experiment], bool],
    record_path: Callable[[Experiment], Path],
) -> dict[str, str]:
    """Before the gathering job assembles the tables: give every experiment of the latest
    submission that did not finish a record that says why, in the runner's format (``status``,
    ``error``), so its row reports it as the local runner would. Returns ``{name: status}`` of
    the records written.

    * its parent did not finish: "not run" (SLURM cancelled it: ``--kill-on-invalid-dep``);
    * the task noted a SIGTERM: "cancelled" (``scancel``, the time limit, a preemption);
      a new submission resumes it from its snapshot;
    * the runner wrote a record in this submission ("failed", with its log's last lines): kept;
    * otherwise: "failed", the task ended without a word (killed, out of memory, a lost node).
    """
    record = read_json_object(folder(run) / JOBS)
    if not record:
        return {}
    since = float(record.get("submitted_unix", 0.0))
    by_name = {e.name: e for e in experiments}
    written = {}
    for name, task in record.get("tasks", {}).items():
        exp = by_name.get(name)
        if exp is None or finished(exp):
            continue
        path = record_path(exp)
        old = read_json_object(path) or {}
        fresh = path.is_file() and path.stat().st_mtime >= since
        note = task_note(run, task)
        log_file = folder(run) / f"{task}.log"
        parent = by_name.get(exp.after) if exp.after else None
        if parent is not None and exp.after in record.get("tasks", {}) and not finished(parent):
            status, error = "not run", f"{exp.after} did not finish (SLURM task {record['tasks'][exp.after]})"
        elif note is not None and note[1] == "TERM":
            status = "cancelled"
            error = f"SLURM task {task} got SIGTERM (scancel, time limit or preemption); submit again to resume"
        elif fresh and old.get("status") not in (None, "done", "skipped"):
            continue  # the runner's own record of this submission says what failed
        else:
            status = "failed"
            if note is None:
                error = f"SLURM task {task} ended without finishing (killed, or never started); log: {log_file}"
            else:
                error = f"SLURM task {task} exited {note[0]}; log: {log_file}"
        path.parent.mkdir(parents=True, exist_ok=True)
        write_json(
            path,
            {
                **old,
                "name": name,
                "status": status,
                "error": error,
                "slurm_task": task,
                "seconds": old.get("seconds", 0.0),
            },
        )
        written[name] = status
        log.warning("%s: %s (%s)", name, status, error)
    return written


def submission_seconds(run: Path) -> float | None:
    """Seconds since the latest submission (the gathering job's wall time of the whole run)."""
    record = read_json_object(folder(run) / JOBS)
    return time.time() - float(record["submitted_unix"]) if record and "submitted_unix" in record else None


# --- screening at scale: tools/segment.py over a job array, then --merge ---------------------------

PART_SCRIPT = """#!/usr/bin/env bash
# One part of the screening into {out} per array task: tools/segment.py takes --num-parts and
# --part-id from SLURM's array variables (redseg/experiments/slurm.py wrote this). A photograph
# finished before (its record in the output folder) is not segmented again, so a requeued or
# resubmitted part goes on where it stopped.
set -euo pipefail
TASK=${{SLURM_ARRAY_JOB_ID}}_${{SLURM_ARRAY_TASK_ID}}
NOTE={notes}/$TASK.exit
echo "redseg: task $TASK: part $((SLURM_ARRAY_TASK_ID - SLURM_ARRAY_TASK_MIN)) of $SLURM_ARRAY_TASK_COUNT on" \\
    "$(hostname), start $((${{SLURM_RESTART_COUNT:-0}} + 1)), $(date '+%F %T')"
CMD=({segment})
"""

MERGE_SCRIPT = """#!/usr/bin/env bash
# The one summary of {out} once every part has ended (--dependency=afterany: a missing part is
# named in this job's log). Written by redseg/experiments/slurm.py.
set -euo pipefail
echo "redseg: merging the parts of {out} on $(hostname), $(date '+%F %T')"
exec {merge}
"""


def submit_segment(
    out: Path,
    parts: int,
    segment: Sequence[str],
    merge: Sequence[str],
    sbatch_options: str | None = None,
    merge_options: str | None = None,
    signal_seconds: int = DEFAULT_SIGNAL_SECONDS,
    job_name: str = "redseg-segment",
    chdir: Path | None = None,
) -> dict:
    """Submit ``segment`` (tools/segment.py's command line without --num-parts/--part-id) as an
    array of ``parts`` tasks, and ``merge`` (``tools/segment.py --merge OUT``) after them all;
    logs and scripts in ``<out>/slurm``. Returns the record (also ``<out>/slurm/jobs.json``)."""
    require("sbatch")
    if parts < 1:
        raise LauncherError(f"--parts must be at least 1, got {parts}")
    if signal_seconds < 1:
        raise LauncherError(f"--signal-seconds must be at least 1, got {signal_seconds}")
    opts = split_options(sbatch_options)
    mopts = opts if merge_options is None else split_options(merge_options)
    where = folder(out)
    where.mkdir(parents=True, exist_ok=True)
    part_sh, merge_sh = where / "part.sh", where / "merge.sh"
    write_text(
        part_sh,
        PART_SCRIPT.format(out=out, notes=shlex.quote(str(where)), segment=_words(segment))
        + PREEMPTIBLE.format(preempted=EXIT_PREEMPTED),
    )
    write_text(merge_sh, MERGE_SCRIPT.format(out=out, merge=_words(merge)))
    common = [f"--chdir={chdir or Path.cwd()}", "--export=ALL"]
    array = sbatch(
        [
            *common,
            f"--job-name={job_name}",
            f"--output={where}/%A_%a.log",
            "--open-mode=append",
            "--requeue",
            f"--signal=B:USR1@{signal_seconds}",
            f"--array=0-{parts - 1}",
            *opts,
        ],
        part_sh,
    )
    merged = sbatch(
        [
            *common,
            f"--job-name={job_name}-merge",
            f"--output={where}/merge_%j.log",
            f"--dependency=afterany:{array}",
            *mopts,
        ],
        merge_sh,
    )
    record = {
        "submitted": time.strftime("%Y-%m-%d %H:%M:%S"),
        "submitted_unix": time.time(),
        "tasks": {f"part {i}": f"{array}_{i}" for i in range(parts)},
        "after": {},
        "skipped": [],
        "jobs": [array],
        "gather": merged,
        "sbatch": opts,
        "signal_seconds": signal_seconds,
    }
    write_json(where / JOBS, record)
    log.info("screening of %s: array %s (%d parts), merge job %s", out, array, parts, merged)
    return record
