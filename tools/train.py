#!/usr/bin/env python3
"""Train one stage of Red-Seg (paper Algorithm 1): `make stage1 stage2` calls this.

  python tools/train.py --stage 1 --data data/idrid --run runs/idrid --weights VGG16.caffemodel [--gpu 0]
  python tools/train.py --stage 2 --data data/idrid --run runs/idrid            # from stage1_final

Re-running a stage resumes from its latest snapshot (Ctrl-C writes one); a finished stage is not
trained again unless --force. --max-iter / --base-lr replace the schedule's values for a short
trial (recorded in <run>/stage<N>_run.json; the run is then not at the paper's settings). Every
schedule's test interval, the train net's losses on the test list go to <run>/stage<N>_test_log.csv.

Exit status: 0 finished; 1 bad input or a failure (one line on stderr); 130 Ctrl-C (the first one
snapshots); 75 (EXIT_PREEMPTED) stopped by SIGUSR1 or SIGTERM at the end of an iteration with a
snapshot: preempted, resumable, run the same command again (a SLURM job requeues on it).
Snapshots are written whole or not at all, and a resume skips one cut short
(docs/training.md#preemption-and-snapshots).
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from redseg import cli  # noqa: E402
from redseg import config as C  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    ap = cli.parser(__doc__, progress=True)
    ap.add_argument("--stage", type=int, choices=(1, 2), required=True)
    ap.add_argument("--data", type=Path, default=Path("data/idrid"), help="prepared set (default data/idrid)")
    ap.add_argument("--run", type=Path, default=Path("runs/idrid"), help="run folder for snapshots and logs")
    ap.add_argument("--schedule", choices=sorted(C.SCHEDULES), default="paper", help="default: paper")
    ap.add_argument("--solver", type=Path, help="solver template (default prototxt/solver_stage<N>.prototxt)")
    ap.add_argument("--net", type=Path, help="train net instead of the solver's (e.g. prototxt/ablations/...)")
    ap.add_argument(
        "--weights",
        type=Path,
        help="init weights: ImageNet VGG16 (stage 1); default <run>/stage1_final (stage 2)",
    )
    ap.add_argument("--from-scratch", action="store_true", help="stage 1 without VGG16 weights (not the paper's)")
    ap.add_argument("--resume", default="auto", help="a .solverstate, 'auto' (default: latest in --run) or 'no'")
    ap.add_argument("--gpu", type=int, help="GPU id (default: CPU)")
    ap.add_argument("--force", action="store_true", help="train again even if the stage has finished")
    ap.add_argument("--max-iter", type=int, help="iterations of this stage instead of the schedule's (make: ITERS=)")
    ap.add_argument("--base-lr", type=float, help="learning rate of this stage instead of the schedule's (make: LR=)")
    ap.add_argument(
        "--no-test-loss", action="store_true", help="do not evaluate the losses on the test list (Fig. 6's curve)"
    )
    args = cli.parse(ap, argv)
    return cli.run(lambda: run(args), ap.prog)


def run(args) -> int:
    from redseg.training.train import StageRun, train_stage

    weights = args.weights
    if weights is None and args.stage == 2:
        weights = args.run / "stage1_final.caffemodel"
    run = StageRun(
        stage=args.stage,
        data=args.data,
        run_dir=args.run,
        schedule=C.SCHEDULES[args.schedule],
        solver=args.solver,
        net=args.net,
        weights=weights,
        resume=None if args.resume == "no" else args.resume,
        gpu=args.gpu,
        from_scratch=args.from_scratch,
        force=args.force,
        progress=cli.show_progress(args),
        base_lr=args.base_lr,
        max_iter=args.max_iter,
        test_loss=not args.no_test_loss,
    )
    print(train_stage(run))
    return 0


if __name__ == "__main__":
    sys.exit(main())
