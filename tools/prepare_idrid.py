#!/usr/bin/env python3
"""Prepare the IDRiD segmentation data (paper section 3.1) for training and evaluation.

Reads the official archive as downloaded (the folder holding "A. Segmentation", that folder, or
a .zip of either; nothing is extracted), downsamples images (INTER_AREA) and masks (--mask-rule)
by --factor, expands the training set 6x (id, rot90 = counter-clockwise, rot180, rot270, fliph,
flipv) and writes a prepared set as described in docs/data_format.md: PNG images and 0/255 masks,
train.txt / test.txt, meta.json (training mean BGR, options, fingerprint), summary.md/.json.

    python tools/prepare_idrid.py --src ~/IDRiD --out data/idrid
    python tools/prepare_idrid.py --src "A. Segmentation.zip" --out data/idrid --mask-rule area --force

Re-running with the same source and options is a quick no-op; a set prepared differently or left
unfinished is only replaced with --force, and a folder that is not a prepared set never is.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from redseg import cli  # noqa: E402
from redseg.config import DOWNSAMPLE  # noqa: E402
from redseg.data.idrid import prepare  # noqa: E402
from redseg.data.prepare import DEFAULT_LESIONS  # noqa: E402
from redseg.data.prepared_set import MASK_RULES  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    ap = cli.parser(__doc__.split("\n\n")[0], progress=True)
    ap.add_argument("--src", required=True, type=Path, help="IDRiD root, its 'A. Segmentation' folder, or a .zip")
    ap.add_argument("--out", required=True, type=Path, help="prepared set to write, e.g. data/idrid")
    ap.add_argument("--factor", type=int, default=DOWNSAMPLE, help=f"downsampling factor ({DOWNSAMPLE})")
    ap.add_argument(
        "--mask-rule",
        choices=MASK_RULES,
        default="any",
        help="low-res mask pixel is lesion if: any covered pixel is (default; keeps microaneurysms) | "
        "area: >= half the covered area is | nearest: the pixel nearest its centre is",
    )
    ap.add_argument(
        "--lesions",
        default=",".join(DEFAULT_LESIONS),
        help=f"masks to write, comma-separated, must include MA,HE ({','.join(DEFAULT_LESIONS)}; OD allowed)",
    )
    ap.add_argument("--force", action="store_true", help="replace a set prepared differently or unfinished")
    args = cli.parse(ap, argv)
    return cli.run(lambda: run(args), ap.prog)


def run(args) -> int:
    t0 = time.perf_counter()
    meta = prepare(
        args.src,
        args.out,
        factor=args.factor,
        mask_rule=args.mask_rule,
        lesions=[x for x in args.lesions.split(",") if x.strip()],
        force=args.force,
        progress=cli.show_progress(args),
    )
    c = meta["counts"]
    if not meta.get("skipped"):  # a skipped run said "already prepared" through logging
        size = "x".join(map(str, meta["size"])) if meta["size"] else "various sizes"
        print(
            f"prepared {args.out}: {c['train_images']} training images x 6 = {c['train_samples']} samples, "
            f"{c['test_images']} test images, {size}, mask rule {meta['mask_rule']}, "
            f"mean BGR {', '.join(f'{v:.2f}' for v in meta['mean_bgr'])} [{time.perf_counter() - t0:.1f} s]"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
