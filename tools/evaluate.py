#!/usr/bin/env python3
"""Score MA/HE prediction maps against lesion ground truth (the authors' protocol, paper section 3.3).

    python tools/evaluate.py --pred runs/x/pred --gt data/IDRiD [--out DIR] [--at-pred-size]
    python tools/evaluate.py --pred runs/x/pred --gt ~/DDR-dataset [--dataset ddr]

--pred holds <image>_ma.png and <image>_he.png (8-bit, probability x 255); --gt is a data set as
published (IDRiD's folder holding "A. Segmentation"; DDR, FGADR, e-ophtha MA or DiaretDB1 as a
folder or .zip, recognised or named by --dataset: its test split at its own label size,
docs/datasets.md) or a prepared set (tools/prepare_data.py). A lesion the set has no ground truth
for (HE on e-ophtha MA) is reported as not scored. Writes metrics.json, report.md, pr_curves.png
and overlays/ (see docs/evaluation.md).
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from redseg import cli  # noqa: E402
from redseg.evaluation.report import summary_table  # noqa: E402
from redseg.evaluation.scoring import INTERPOLATIONS, evaluate  # noqa: E402


def default_out(pred: Path) -> Path:
    """``<parent>/eval`` beside a folder named ``pred``, else ``<parent>/<name>_eval``.

    A sibling, not a subfolder, so the prediction folder keeps only predictions; named after the
    prediction folder when that is not plain ``pred`` so two runs' folders side by side do not
    overwrite each other's report.
    """
    pred = pred.resolve()
    return pred.parent / ("eval" if pred.name == "pred" else f"{pred.name}_eval")


def main(argv: list[str] | None = None) -> int:
    ap = cli.parser(__doc__, progress=True)
    ap.add_argument("--pred", required=True, type=Path, help="folder of <image>_ma.png / <image>_he.png")
    ap.add_argument("--gt", required=True, type=Path, help="a data set as published, or a prepared set")
    cli.add_dataset(ap)
    ap.add_argument("--out", type=Path, help="output folder (default: see default_out: <pred>/../eval)")
    ap.add_argument(
        "--at-pred-size",
        action="store_true",
        help="downsize the labels to the prediction size ('any' rule) instead of resizing the "
        "predictions to the label size (the authors' protocol)",
    )
    ap.add_argument("--overlays", type=int, default=3, help="number of overlay images (default 3)")
    ap.add_argument(
        "--interp",
        choices=sorted(INTERPOLATIONS),
        default="linear",
        help="how predictions are resized to the label size (default linear)",
    )
    args = cli.parse(ap, argv)
    if args.overlays < 0:
        ap.error("--overlays must be >= 0")
    return cli.run(lambda: run(args), ap.prog)


def run(args) -> int:
    out = args.out if args.out is not None else default_out(args.pred)
    result = evaluate(
        args.pred,
        args.gt,
        out,
        at_pred_size=args.at_pred_size,
        overlays=args.overlays,
        interpolation=args.interp,
        progress=cli.show_progress(args),
        dataset=args.dataset,
    )
    print(summary_table(result))
    print(f"\nreport: {Path(out) / 'report.md'}\nmetrics: {Path(out) / 'metrics.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
