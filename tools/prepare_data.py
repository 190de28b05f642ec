#!/usr/bin/env python3
"""Prepare any supported lesion data set (IDRiD, DDR, FGADR, e-ophtha MA, DiaretDB1) for Red-Seg.

Reads the set as downloaded (its folder or a .zip; nothing is extracted), checks it against the
published layout and counts (a partial download is refused by name unless --allow-partial), brings
every photograph to one scale and writes a prepared set (docs/data_format.md): train.txt (6x
augmented), val.txt where the set has a validation split, test.txt, meta.json (mask and split
rules, field-of-view statistics, the lesions it cannot score). docs/datasets.md has each set.

    python tools/prepare_data.py --dataset ddr --src ~/DDR-dataset --out data/ddr
    python tools/prepare_data.py --dataset fgadr --src ~/FGADR.zip --out data/fgadr
    python tools/prepare_data.py --dataset idrid --src ~/IDRiD --out data/idrid        # the paper's 4x

The scale: every set but IDRiD is rescaled so that each photograph's field of view is
--fov-diameter pixels across (853: IDRiD at a quarter size, measured); IDRiD keeps the paper's
--factor 4 unless --fov-diameter is given. A rerun with the same source and options is a no-op.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from redseg import cli  # noqa: E402
from redseg.config import DOWNSAMPLE, IDRID_QUARTER_FOV_DIAMETER_PX  # noqa: E402
from redseg.data.datasets import open_source  # noqa: E402
from redseg.data.prepare import DEFAULT_LESIONS, PrepareOptions, prepare_source  # noqa: E402
from redseg.data.prepared_set import MASK_RULES  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    ap = cli.parser(__doc__.split("\n\n")[0], progress=True)
    cli.add_dataset(ap)
    ap.add_argument("--src", required=True, type=Path, help="the data set as downloaded: its folder or a .zip")
    ap.add_argument(
        "--out", type=Path, help="prepared set to write (default data/<dataset>, where make crossdata looks)"
    )
    ap.add_argument(
        "--fov-diameter",
        type=float,
        help=f"rescale each photograph so that its FOV is this many pixels across (default "
        f"{IDRID_QUARTER_FOV_DIAMETER_PX:g}, IDRiD at a quarter size; IDRiD itself: --factor)",
    )
    ap.add_argument("--factor", type=int, default=DOWNSAMPLE, help=f"IDRiD's downsampling factor ({DOWNSAMPLE})")
    ap.add_argument("--mask-rule", choices=MASK_RULES, default="any", help="how masks are resized (any)")
    ap.add_argument(
        "--lesions", default=",".join(DEFAULT_LESIONS), help=f"masks to write ({','.join(DEFAULT_LESIONS)})"
    )
    ap.add_argument("--allow-partial", action="store_true", help="go on (with a warning) when images are missing")
    ap.add_argument("--force", action="store_true", help="replace a set prepared differently or unfinished")
    args = cli.parse(ap, argv)
    return cli.run(lambda: run(args), ap.prog)


def run(args) -> int:
    t0 = time.perf_counter()
    with open_source(args.src, args.dataset, allow_partial=args.allow_partial) as source:
        fov = args.fov_diameter
        if fov is None and source.dataset != "idrid":
            fov = IDRID_QUARTER_FOV_DIAMETER_PX
        lesions = tuple(x.strip().upper() for x in args.lesions.split(",") if x.strip())
        lesions = tuple(x for x in lesions if x in source.lesions or x in ("MA", "HE"))
        options = PrepareOptions(args.factor, args.mask_rule, lesions, fov)
        args.out = args.out or Path("data") / source.dataset
        meta = prepare_source(source, args.out, options, force=args.force, progress=cli.show_progress(args))
    if not meta.get("skipped"):
        c = meta["counts"]
        parts = [f"{c['train_images']} training images x 6 = {c['train_samples']} samples"] if c["train_images"] else []
        if "val_images" in c:
            parts.append(f"{c['val_images']} validation images")
        parts.append(f"{c['test_images']} test images")
        f = meta["fov"]
        scale = (
            f"FOV {f['target_px']:g} px (scales {f['scale_factors']['min']:.3f}-{f['scale_factors']['max']:.3f})"
            if f["target_px"]
            else f"factor {meta['factor']}"
        )
        not_scored = f"; not scored: {', '.join(meta['not_scored'])}" if meta["not_scored"] else ""
        print(
            f"prepared {meta['dataset']} -> {args.out}: {', '.join(parts)}; {scale}; "
            f"mask rule {meta['mask_rule']}{not_scored} [{time.perf_counter() - t0:.1f} s]"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
