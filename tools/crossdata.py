#!/usr/bin/env python3
"""Train Red-Seg on each data set and score every model on every test set: a cross-dataset table.

  make crossdata                          # the prepared sets under data/ (tools/prepare_data.py)
  make crossdata SCHEDULE=demo            # no data: synthetic copies of all five layouts, from scratch
  make crossdata SCHEDULE=smoke           # minutes, tiny synthetic sets (numbers meaningless)
  make crossdata POOLED=1 GPUS="0 1"      # also a model on all training sets together; one per GPU

  python tools/crossdata.py [--data-root data] [--synthetic] [--run runs/crossdata]
                            [--schedule paper|demo|smoke] [--weights VGG16 | --from-scratch]
                            [--pooled] [--gpus 0 1 ...] [--launcher slurm --sbatch "..."]

Uses data/<set> for every set prepared there (idrid, ddr, fgadr, eophtha-ma, diaretdb1); trains on
IDRiD, DDR and FGADR (and --pooled) with the schedule's two stages, and scores each model on every
set's test split at its own label size (the set as published, when its source is still at hand).
Without prepared sets (or with --synthetic) it writes synthetic copies of the five layouts into
the run folder and prepares them at one scale: the synthetic IDRiD's, as the real sets take real
IDRiD's. Writes crossdata.md / crossdata.json in the run folder (docs/datasets.md). Running it
again skips finished experiments and resumes interrupted ones.
"""

from __future__ import annotations

import logging
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from redseg import cli  # noqa: E402
from redseg import config as C  # noqa: E402
from redseg.experiments.slurm import DEFAULT_SIGNAL_SECONDS, LAUNCHERS  # noqa: E402

DEFAULT_VGG16 = Path("models/vgg16/VGG_ILSVRC_16_layers.caffemodel")
# Synthetic copies per schedule: IDRiD (HxW, train, test) and the other layouts' per-split counts.
# The smoke schedule's lr is for tiny images (tools/reproduce.py): IDRiD at 128x192 prepared 4x to
# 48x32, the others rescaled to the same FOV diameter; the demo's IDRiD is `make demo`'s.
SYNTHETIC = {
    "smoke": {
        "idrid": ((128, 192), 3, 2),
        "ddr": {"train": 2, "valid": 1, "test": 2},
        "fgadr": {"all": 10},
        "eophtha-ma": {"MA": 2, "healthy": 1},
        "diaretdb1": {"train": 2, "test": 2},
    },
    "demo": {
        "idrid": ((712, 1072), len(C.TRAIN_IDS), len(C.TEST_IDS)),
        "ddr": {"train": 24, "valid": 6, "test": 12},
        "fgadr": {"all": 40},
        "eophtha-ma": {"MA": 8, "healthy": 4},
        "diaretdb1": {"train": 8, "test": 10},
    },
}


def main(argv: list[str] | None = None) -> int:
    ap = cli.parser(__doc__, progress=True)
    ap.add_argument("--data-root", type=Path, default=Path("data"), help="where the prepared sets are (data/)")
    ap.add_argument(
        "--synthetic", action="store_true", help="synthetic copies of every layout (the default without data)"
    )
    ap.add_argument("--run", type=Path, default=Path("runs/crossdata"), help="run folder (default runs/crossdata)")
    ap.add_argument("--schedule", choices=sorted(C.SCHEDULES), help="default: paper on real data, demo on synthetic")
    ap.add_argument("--weights", type=Path, help=f"ImageNet VGG16 for stage 1 (default {DEFAULT_VGG16} on real data)")
    ap.add_argument("--from-scratch", action="store_true", help="stage 1 without VGG16 (always on synthetic data)")
    ap.add_argument("--pooled", action="store_true", help="also train on all training sets together")
    ap.add_argument("--gpus", type=int, nargs="*", default=[], help="GPU ids: one experiment per GPU at a time")
    ap.add_argument("--only", nargs="+", metavar="NAME", help="only these experiments (e.g. ddr_stage1 ddr)")
    ap.add_argument("--assemble-only", action="store_true", help="rebuild the table, train nothing")
    slurm = ap.add_argument_group("SLURM (docs/cluster.md)")
    slurm.add_argument("--launcher", choices=LAUNCHERS, default="local", help="local (default) or slurm")
    slurm.add_argument("--sbatch", metavar="OPTIONS", help="sbatch options for every job")
    slurm.add_argument("--gather-sbatch", metavar="OPTIONS", help="the gathering job's sbatch options")
    slurm.add_argument("--signal-seconds", type=int, default=DEFAULT_SIGNAL_SECONDS, help="SIGUSR1 before the limit")
    slurm.add_argument("--slurm-task", action="store_true", help="(the batch script's) run the --only experiment")
    slurm.add_argument("--slurm-gather", action="store_true", help="(the gathering job's) report, assemble")
    args = cli.parse(ap, argv)
    return cli.run(lambda: run(args), ap.prog)


def _tool(name: str, *argv: str) -> None:
    cmd = [sys.executable, str(Path(__file__).resolve().parent / name), "-q", *argv]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed: {proc.stderr.strip() or proc.stdout.strip()}")


def synthetic_sets(run: Path, schedule: str) -> Path:
    """Synthetic copies of the five layouts, prepared at the synthetic IDRiD's scale; returns their root."""
    from redseg.experiments.crossdata import read_prepared

    spec = SYNTHETIC.get(schedule, SYNTHETIC["demo"])
    src, root = run / "synthetic", run / "data"
    (h, w), n_train, n_test = spec["idrid"]
    logging.info("synthetic IDRiD (%d + %d at %dx%d) -> %s", n_train, n_test, h, w, src / "idrid")
    _tool("make_synthetic.py", "--out", str(src / "idrid"), "--size", f"{h}x{w}", "--n-train", str(n_train),
          "--n-test", str(n_test))  # fmt: skip
    _tool("prepare_data.py", "--dataset", "idrid", "--src", str(src / "idrid"), "--out", str(root / "idrid"))
    meta = read_prepared(root / "idrid")
    fov = meta.get("fov_diameter_px") or 0.83 * meta["size"][0]
    for layout in ("ddr", "fgadr", "eophtha-ma", "diaretdb1"):
        counts = ",".join(f"{k}={v}" for k, v in spec[layout].items())
        logging.info("synthetic %s (%s) -> %s, FOV %.1f px", layout, counts, root / layout, fov)
        _tool("make_synthetic.py", "--layout", layout, "--out", str(src / layout), "--n", counts)
        _tool("prepare_data.py", "--dataset", layout, "--src", str(src / layout), "--out", str(root / layout),
              "--fov-diameter", f"{fov:.3f}")  # fmt: skip
    return root


def run(args) -> int:
    from redseg.experiments import crossdata as X
    from redseg.experiments import slurm
    from redseg.experiments.reproduce import Settings, check_settings, run_all, run_task, save_settings

    t0 = time.monotonic()
    args.run = args.run.resolve()
    found = X.find_sets(args.data_root)
    synthetic = args.synthetic or not found
    args.schedule = args.schedule or ("demo" if synthetic else "paper")
    schedule = C.SCHEDULES[args.schedule]
    if args.launcher == "slurm" and args.gpus:
        raise ValueError("GPUS= is for one machine; with LAUNCHER=slurm each task gets its GPU from SBATCH")
    weights = None
    if not (synthetic or args.from_scratch):
        from redseg.experiments.reproduce import vgg16_weights

        weights = vgg16_weights(args.weights, DEFAULT_VGG16)
    if synthetic:
        if not found:
            logging.info("no prepared sets under %s: synthetic copies of every layout", args.data_root)
        root = args.run / "data"
        if not (args.slurm_task or args.slurm_gather or args.assemble_only):
            args.run.mkdir(parents=True, exist_ok=True)
            root = synthetic_sets(args.run, args.schedule)
        found = X.find_sets(root)
    if not found:
        raise FileNotFoundError(f"no prepared sets found (tools/prepare_data.py --out {args.data_root}/<set>)")
    sets = dict(found)
    train_keys = [k for k in X.TRAIN_SETS if k in sets and sets[k][1]["counts"]["train_images"]]
    test_keys = [k for k in C.DATASETS if k in sets and sets[k][1]["counts"]["test_images"]]
    if not train_keys:
        raise FileNotFoundError(f"none of {', '.join(X.TRAIN_SETS)} is prepared: nothing to train on")
    tests = {k: X.test_set(*sets[k]) for k in test_keys}
    data = {k: sets[k][0] for k in sets}
    if args.pooled and len(train_keys) > 1:
        pooled = X.make_pooled(args.run / "data_pooled", {k: sets[k] for k in train_keys})
        data[X.POOLED] = pooled
        from redseg.experiments.reproduce import TestSet

        tests[X.POOLED] = TestSet(pooled, None, X.POOLED)
        train_keys.append(X.POOLED)
    exps = X.experiments(train_keys, test_keys)
    if args.only:
        unknown = sorted(set(args.only) - {e.name for e in exps})
        if unknown:
            raise ValueError(f"--only: no experiment {', '.join(unknown)}; there are {', '.join(e.name for e in exps)}")
        exps = [e for e in exps if e.name in args.only]
    s = Settings(args.run, args.run, data, schedule, weights, synthetic, progress=cli.show_progress(args), tests=tests)
    check_settings(s)
    if args.slurm_task:
        if len(exps) != 1:
            raise ValueError("--slurm-task runs one experiment: --only NAME")
        return run_task(s, exps[0], args.gpus)
    if args.slurm_gather:
        written = slurm.reconcile(
            s.run, exps, lambda e: X.finished(s.folder(e), e), lambda e: s.folder(e) / "experiment.json"
        )
        X.assemble(s, train_keys, test_keys, sets, environment(), slurm.submission_seconds(s.run) or 0.0)
        print(f"\n{s.run / 'crossdata.md'}")
        return 1 if written else 0
    save_settings(s)
    if args.launcher == "slurm" and not args.assemble_only:
        slurm.refuse_if_active(args.run)
        slurm.require("sbatch")
        record = slurm.submit(
            s.run,
            exps,
            lambda e: X.finished(s.folder(e), e),
            runner_argv(args),
            sbatch_options=args.sbatch,
            gather_options=args.gather_sbatch,
            signal_seconds=args.signal_seconds,
            job_name=f"redseg-{s.run.name}",
        )
        print(slurm.follow(s.run, record, writes=s.run / "crossdata.md"))
        return 0
    outcomes = [] if args.assemble_only else run_all(s, exps, args.gpus)
    X.assemble(s, train_keys, test_keys, sets, environment(), time.monotonic() - t0)
    print((s.run / "crossdata.md").read_text())
    failed = [o.name for o in outcomes if o.status in ("failed", "not run")]
    if failed:
        logging.error("failed or not run: %s (see crossdata.md and each folder's train.log / test.log)", failed)
        return 1
    return 0


def runner_argv(args) -> list[str]:
    """This run as a command line for the SLURM jobs (a task adds --only NAME --slurm-task)."""
    argv = [sys.executable, str(Path(__file__).resolve()), "--no-progress", "--run", str(args.run)]
    argv += ["--schedule", args.schedule, "--data-root", str(args.data_root)]
    if args.synthetic:
        argv += ["--synthetic"]
    if args.from_scratch:
        argv += ["--from-scratch"]
    elif args.weights:
        argv += ["--weights", str(args.weights)]
    if args.pooled:
        argv += ["--pooled"]
    return argv


def environment() -> dict:
    from redseg.experiments.benchmark import machine_info

    info = machine_info(None)
    return {k: info.get(k) for k in ("cpu", "usable_cpus", "memory_gb", "python")}


if __name__ == "__main__":
    sys.exit(main())
