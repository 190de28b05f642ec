#!/usr/bin/env python3
"""Reproduce the paper's Tables 2 and 5, Figures 6 and 7 and the open choices in one command.

  make reproduce                           # synthetic set, demo schedule, from scratch (docs/reproduce.md)
  make reproduce IDRID=/path/to/IDRiD      # real IDRiD, the paper's schedule, ImageNet VGG16 weights
  make reproduce SCHEDULE=smoke            # minutes: every row and both figures on a tiny set (numbers meaningless)
  make reproduce IDRID=... GPUS="0 1 2 3"  # independent experiments side by side, one per GPU

  python tools/reproduce.py [--idrid DIR] [--run runs/reproduce] [--schedule demo|paper|smoke]
                            [--weights VGG16] [--from-scratch] [--gpus 0 1 ...] [--only NAME ...]

  make reproduce LAUNCHER=slurm SBATCH="--partition=gpu --gres=gpu:1 --time=4:00:00"
  python tools/reproduce.py ... --launcher slurm [--sbatch "..."] [--signal-seconds 300]

Each experiment runs tools/train.py and tools/test_net.py in its own folder under --run; then
reproduction.md / reproduction.json and the two figures are written there. Running it again skips
finished experiments and resumes interrupted ones from their snapshots. Exit status 1 when an
experiment failed (it is reported in the tables; the others still ran).

--launcher slurm prepares the data here, submits the unfinished experiments as a SLURM job array
(a stage-2 experiment after its stage-1 task, --dependency) and a gathering job that writes the
tables when they end, prints the job ids and how to follow them, and returns (docs/cluster.md).
"""

from __future__ import annotations

import argparse
import logging
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from redseg import cli  # noqa: E402
from redseg import config as C  # noqa: E402
from redseg.experiments.reproduce import EXPERIMENTS  # noqa: E402
from redseg.experiments.slurm import DEFAULT_SIGNAL_SECONDS, LAUNCHERS  # noqa: E402

DEFAULT_VGG16 = Path("models/vgg16/VGG_ILSVRC_16_layers.caffemodel")
# The synthetic set per schedule: (HxW of the photographs, (train, test) counts). The demo's is
# IDRiD-shaped (54 + 27 photographs, prepared at 268x178, as `make demo`). The smoke schedule's lr
# (1e-6) is for tiny images: from scratch it diverges within 5 iterations at 268x178 and even at
# 134x89 (measured), so its set is tiny: 3 + 2 photographs prepared at 48x32. It shows every row
# and both figures in minutes; its numbers mean nothing.
SYNTHETIC = {"smoke": ((128, 192), (3, 2))}
SYNTHETIC_DEFAULT = ((712, 1072), (len(C.TRAIN_IDS), len(C.TEST_IDS)))


def main(argv: list[str] | None = None) -> int:
    ap = cli.parser(__doc__, progress=True)
    ap.add_argument("--idrid", type=Path, help="the official IDRiD (folder holding 'A. Segmentation', or its zip)")
    ap.add_argument("--run", type=Path, default=Path("runs/reproduce"), help="run folder (default runs/reproduce)")
    ap.add_argument(
        "--schedule", choices=sorted(C.SCHEDULES), help="default: paper with --idrid, demo on the synthetic set"
    )
    ap.add_argument("--weights", type=Path, help=f"ImageNet VGG16 for stage 1 (default {DEFAULT_VGG16} with --idrid)")
    ap.add_argument("--from-scratch", action="store_true", help="stage 1 without VGG16 (always on the synthetic set)")
    ap.add_argument("--gpus", type=int, nargs="*", default=[], help="GPU ids: one experiment per GPU at a time")
    names = [e.name for e in EXPERIMENTS]
    ap.add_argument("--only", nargs="+", choices=names, metavar="NAME", help=f"only these: {', '.join(names)}")
    ap.add_argument("--synthetic-size", type=cli.size, help="HxW of the synthetic photographs (default: see above)")
    ap.add_argument("--synthetic-count", type=_pair, help="TRAIN,TEST synthetic photographs (default: see above)")
    ap.add_argument("--assemble-only", action="store_true", help="rebuild the tables and figures, train nothing")
    slurm = ap.add_argument_group("SLURM (docs/cluster.md)")
    slurm.add_argument(
        "--launcher", choices=LAUNCHERS, default="local", help="local (default): run here; slurm: sbatch"
    )
    slurm.add_argument(
        "--sbatch", metavar="OPTIONS", help='sbatch options for every job, e.g. "--partition=gpu --gres=gpu:1"'
    )
    slurm.add_argument(
        "--gather-sbatch", metavar="OPTIONS", help="sbatch options of the gathering job (default: --sbatch's)"
    )
    slurm.add_argument(
        "--signal-seconds",
        type=int,
        default=DEFAULT_SIGNAL_SECONDS,
        help=f"SIGUSR1 this long before the time limit: snapshot and requeue (default {DEFAULT_SIGNAL_SECONDS})",
    )
    slurm.add_argument("--slurm-task", action="store_true", help="(the batch script's) run the --only experiment here")
    slurm.add_argument("--slurm-gather", action="store_true", help="(the gathering job's) report the tasks, assemble")
    args = cli.parse(ap, argv)
    return cli.run(lambda: run(args), ap.prog)


def _pair(text: str) -> tuple[int, int]:
    try:
        a, b = (int(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected TRAIN,TEST counts, e.g. 54,27; got {text!r}") from None
    if a < 1 or b < 1:
        raise argparse.ArgumentTypeError(f"counts must be at least 1, got {text!r}")
    return a, b


def _tool(name: str, *argv: str) -> None:
    cmd = [sys.executable, str(Path(__file__).resolve().parent / name), "-q", *argv]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed: {proc.stderr.strip() or proc.stdout.strip()}")


def data_paths(args) -> tuple[Path, dict[str, Path]]:
    """The labels' root (IDRiD, or the synthetic set made here) and the prepared set per mask rule."""
    gt = args.run / "idrid" if args.idrid is None else args.idrid
    return gt, {
        r: args.run / ("data" if r == "any" else f"data_{r}") for r in sorted({e.mask_rule for e in EXPERIMENTS})
    }


def prepare_data(args, gt: Path, data: dict[str, Path]) -> None:
    """Make the synthetic set (without --idrid) and prepare each set; both reuse finished outputs."""
    if args.idrid is None:
        size, count = SYNTHETIC.get(args.schedule, SYNTHETIC_DEFAULT)
        h, w = args.synthetic_size or size
        n_train, n_test = args.synthetic_count or count
        logging.info("synthetic fundus set (%d + %d photographs, %dx%d) -> %s", n_train, n_test, h, w, gt)
        _tool(
            "make_synthetic.py",
            "--out",
            str(gt),
            "--size",
            f"{h}x{w}",
            "--n-train",
            str(n_train),
            "--n-test",
            str(n_test),
        )
    for rule, out in data.items():
        logging.info("prepared set, mask rule %s -> %s", rule, out)
        _tool("prepare_idrid.py", "--src", str(gt), "--out", str(out), "--mask-rule", rule)


def environment(gpus: list[int]) -> dict:
    from pathlib import Path as _P

    from redseg.experiments.benchmark import machine_info
    from redseg.toolchain import blas
    from redseg.toolchain.caffe_utils import import_caffe

    caffe = import_caffe()
    info = machine_info(None)
    build = _P(caffe.__file__).resolve().parents[3].name  # the cache folder: caffe-<source>-p<patches>-<variant>
    return {
        "cpu": info.get("cpu"),
        "usable_cpus": info.get("usable_cpus"),
        "memory_gb": info.get("memory_gb"),
        "python": info.get("python"),
        "gpus": gpus,
        "caffe": build,
        "blas": blas.summary(blas.describe()),
    }


def run(args) -> int:
    from redseg.experiments import slurm
    from redseg.experiments.reproduce import Settings, check_settings, run_all, save_settings
    from redseg.experiments.reproduction import assemble

    t0 = time.monotonic()
    args.run = args.run.resolve()
    experiments = [e for e in EXPERIMENTS if not args.only or e.name in args.only]
    synthetic = args.idrid is None
    args.schedule = args.schedule or ("demo" if synthetic else "paper")
    schedule = C.SCHEDULES[args.schedule]
    if args.launcher == "slurm" and args.gpus:
        raise ValueError(
            "GPUS= is for one machine; with LAUNCHER=slurm each task gets its GPU from SBATCH='--gres=gpu:1'"
        )
    if args.slurm_task and (not args.only or len(args.only) != 1):
        raise ValueError("--slurm-task runs one experiment: --only NAME")
    weights = None
    if not (synthetic or args.from_scratch):
        from redseg.experiments.reproduce import vgg16_weights

        weights = vgg16_weights(args.weights, DEFAULT_VGG16)
    gt, data = data_paths(args)
    s = Settings(args.run, gt, data, schedule, weights, synthetic, progress=cli.show_progress(args))
    check_settings(s)  # before anything is written
    if args.slurm_task:
        from redseg.experiments.reproduce import run_task

        return run_task(s, experiments[0], args.gpus)
    if args.slurm_gather:
        return gather(s, args)
    if not args.assemble_only:
        slurm.refuse_if_active(args.run)  # its experiments are SLURM's until those jobs end
        if args.launcher == "slurm":
            slurm.require("sbatch")
        args.run.mkdir(parents=True, exist_ok=True)
        prepare_data(args, gt, {e.mask_rule: data[e.mask_rule] for e in experiments})
    save_settings(s)
    if args.launcher == "slurm" and not args.assemble_only:
        return submit(s, args, experiments)
    outcomes = []
    if not args.assemble_only:
        outcomes = run_all(s, experiments, args.gpus)
    result = assemble(s, environment(args.gpus), time.monotonic() - t0)
    print(f"\n{args.run / 'reproduction.md'}")
    failed = [o.name for o in outcomes if o.status in ("failed", "not run")]
    if failed:
        logging.error("failed or not run: %s (see reproduction.md and each folder's train.log / test.log)", failed)
        return 1
    bad = [k for k, v in result["experiments"].items() if v["status"] not in ("done", "skipped")]
    if bad and not args.only:
        logging.warning("experiments without results: %s", ", ".join(bad))
    return 0


# --- LAUNCHER=slurm (redseg/experiments/slurm.py, docs/cluster.md) ---------------------------------


def runner_argv(args) -> list[str]:
    """This run folder's reproduction as a command line for the SLURM jobs, without --only: a task
    adds ``--only NAME --slurm-task``, the gathering job ``--slurm-gather``. Paths as the user gave
    them (the jobs start in this working directory): settings.json records them so, and a task
    whose settings differed from the submission's would be refused."""
    argv = [sys.executable, str(Path(__file__).resolve()), "--no-progress", "--run", str(args.run)]
    argv += ["--schedule", args.schedule]
    if args.idrid is not None:
        argv += ["--idrid", str(args.idrid)]
    if args.from_scratch:
        argv += ["--from-scratch"]
    elif args.idrid is not None:
        argv += ["--weights", str(args.weights or DEFAULT_VGG16)]
    if args.synthetic_size:
        argv += ["--synthetic-size", "x".join(map(str, args.synthetic_size))]
    if args.synthetic_count:
        argv += ["--synthetic-count", ",".join(map(str, args.synthetic_count))]
    return argv


def submit(s, args, experiments) -> int:
    """Submit the unfinished experiments (the data is prepared already, here) and the gathering job."""
    from redseg.experiments import slurm
    from redseg.experiments.reproduce import finished

    record = slurm.submit(
        s.run,
        experiments,
        lambda e: finished(s.folder(e), e),
        runner_argv(args),
        sbatch_options=args.sbatch,
        gather_options=args.gather_sbatch,
        signal_seconds=args.signal_seconds,
        job_name=f"redseg-{s.run.name}",
    )
    print(slurm.follow(s.run, record))
    return 0


def gather(s, args) -> int:
    """The gathering job: every task of the latest submission that did not finish gets a record
    saying why (redseg.experiments.slurm.reconcile), then the tables and figures. Exit status 1
    when one of them did not finish (the job's state then says so)."""
    from redseg.experiments import slurm
    from redseg.experiments.reproduce import finished
    from redseg.experiments.reproduction import assemble

    written = slurm.reconcile(
        s.run, EXPERIMENTS, lambda e: finished(s.folder(e), e), lambda e: s.folder(e) / "experiment.json"
    )
    seconds = slurm.submission_seconds(s.run) or 0.0
    assemble(s, {**environment([]), "launcher": "slurm"}, seconds)
    print(f"\n{s.run / 'reproduction.md'}")
    return 1 if written else 0


if __name__ == "__main__":
    sys.exit(main())
