#!/usr/bin/env python3
"""Screen many photographs on a SLURM cluster: tools/segment.py as a job array, then one summary.

  make segment-slurm PHOTOS=photos/ PARTS=8 [WEIGHTS=... | BACKEND=onnx ONNX=...] [SEGMENT_OUT=...]
                     [SBATCH="--partition=gpu --gres=gpu:1 --time=2:00:00"]
  python tools/segment_slurm.py --parts 8 --out runs/segment [--sbatch "..."] -- --onnx M.onnx photos/

Everything after ``--`` goes to tools/segment.py (the model, its options, the photographs or
folders); this tool adds --out, and each array task takes its part from SLURM's array variables
(tools/segment.py --num-parts/--part-id default to them). A job with --dependency=afterany on the
array then runs ``tools/segment.py --merge OUT``: summary.csv, summary.json and index.html, the
same as one run over every photograph, or one line naming the parts that are missing. Tasks ask
for --signal=B:USR1@<s> and --requeue: a part warned before its time limit stops after the
photograph in hand and requeues itself; photographs already done are not segmented again.
Scripts, logs (%A_%a.log) and the job ids (jobs.json) go to OUT/slurm/. docs/cluster.md.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from redseg import cli  # noqa: E402
from redseg.experiments import slurm  # noqa: E402

SEGMENT = Path(__file__).resolve().parent / "segment.py"
OWN = ("--out", "--num-parts", "--part-id", "--merge")  # set here or by the array, not passed through


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    ours, theirs = (argv[: argv.index("--")], argv[argv.index("--") + 1 :]) if "--" in argv else (argv, [])
    ap = cli.parser(__doc__)
    ap.add_argument("--parts", type=int, required=True, metavar="N", help="array tasks (parts of the inputs)")
    ap.add_argument("--out", type=Path, default=Path("runs/segment"), help="output folder (default runs/segment)")
    ap.add_argument("--sbatch", metavar="OPTIONS", help='sbatch options for every job, e.g. "--partition=gpu"')
    ap.add_argument("--merge-sbatch", metavar="OPTIONS", help="sbatch options of the merge job (default: --sbatch's)")
    ap.add_argument(
        "--signal-seconds",
        type=int,
        default=slurm.DEFAULT_SIGNAL_SECONDS,
        help=f"SIGUSR1 this long before the time limit (default {slurm.DEFAULT_SIGNAL_SECONDS})",
    )
    args = cli.parse(ap, ours)
    clash = [a for a in theirs if a.split("=")[0] in OWN]
    if clash:
        ap.error(f"{', '.join(clash)} after --: this tool sets --out (use --out before --) and the parts")
    if not theirs:
        ap.error("tools/segment.py's model and photographs go after --, e.g. -- --onnx M.onnx photos/")
    return cli.run(lambda: run(args, theirs), ap.prog)


def run(args: argparse.Namespace, segment_args: list[str]) -> int:
    out = args.out.resolve()
    slurm.refuse_if_active(out)
    segment = [sys.executable, str(SEGMENT), "--no-progress", "--out", str(out), *segment_args]
    merge = [sys.executable, str(SEGMENT), "--merge", str(out)]
    record = slurm.submit_segment(
        out,
        args.parts,
        segment,
        merge,
        sbatch_options=args.sbatch,
        merge_options=args.merge_sbatch,
        signal_seconds=args.signal_seconds,
        job_name=f"redseg-segment-{out.name}",
    )
    print(slurm.follow(out, record, writes=out / "summary.csv", last="merge job"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
