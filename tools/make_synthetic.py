#!/usr/bin/env python3
"""Write synthetic colour fundus photographs in a public data set's published layout (IDRiD default).

The images stand in for IDRiD (paper section 3.1), which cannot be shipped: same folder and file
names (``A. Segmentation/1. Original Images/...``, ``2. All Segmentation Groundtruths/...``),
JPEG photographs ``IDRiD_NN.jpg`` and colour TIFF masks ``IDRiD_NN_{MA,HE,EX,OD}.tif``; about 20 %
of the images have no haemorrhage and no ``_HE.tif`` (IDRiD: a missing mask means no lesion).
Feed the result to ``tools/prepare_idrid.py`` like the real archive. See redseg/data/synthetic.py.

``--layout ddr|fgadr|eophtha-ma|diaretdb1`` writes a copy of that data set's layout instead, with
its own camera (frame, field of view, colour cast, lesion density) and mask encoding
(redseg/data/synthetic_layouts.py, docs/data_format.md); only --out, --seed, --n, --top, --force
and --sample apply there.

    python tools/make_synthetic.py --out data/synthetic_idrid            # 54 + 27 at 712x1072 (HxW)
    python tools/make_synthetic.py --out /tmp/s --size 178x268 --n-train 4 --n-test 2 --seed 3
    python tools/make_synthetic.py --layout ddr --out /tmp/ddr --n train=4,valid=2,test=3
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import cv2  # noqa: E402

from redseg import cli  # noqa: E402
from redseg.config import IDRID_IMAGES_DIR, IDRID_SEG_DIR, IDRID_SPLIT_DIRS, TEST_IDS, TRAIN_IDS  # noqa: E402
from redseg.data.synthetic import (  # noqa: E402
    DEFAULT_MA_RADIUS_AT_REF,
    REFERENCE_WIDTH,
    SyntheticParams,
    generate_idrid_tree,
    preview,
)
from redseg.data.synthetic_layouts import (  # noqa: E402
    EOPHTHA_TOPS,
    LAYOUTS,
    generate_layout,
    parse_counts,
    resolve_counts,
)
from redseg.fileio import write_image  # noqa: E402

# Options of the IDRiD renderer only: another layout draws with its own cameras.
IDRID_ONLY = ("size", "n_train", "n_test", "ma_radius", "ma_count", "he_count", "no_he_fraction", "ex_fraction")


def _pair(kind):
    def parse(text: str):
        try:
            lo, hi = (kind(v) for v in text.split(","))
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected MIN,MAX, got {text!r}") from None
        return lo, hi

    return parse


def main(argv: list[str] | None = None) -> int:
    ap = cli.parser(__doc__.split("\n\n")[0], progress=True)
    ap.add_argument("--out", required=True, type=Path, help="root of the tree (idrid: gets 'A. Segmentation/')")
    ap.add_argument(
        "--layout", choices=list(LAYOUTS), default="idrid", help="whose published layout and cameras (idrid)"
    )
    ap.add_argument(
        "--n",
        type=_counts,
        default=None,
        metavar="SPLIT=N,...",
        help="images per split, e.g. train=4,valid=2,test=3 (ddr train/valid/test, fgadr all, "
        "eophtha-ma MA/healthy, diaretdb1 train/test, idrid train/test); the rest keep their default",
    )
    ap.add_argument(
        "--top", choices=EOPHTHA_TOPS, default=EOPHTHA_TOPS[0], help="eophtha-ma: spelling of the top folder"
    )
    ap.add_argument(
        "--size",
        type=cli.size_at_least(16, "a fundus needs room"),
        default=(712, REFERENCE_WIDTH),
        help=f"HEIGHTxWIDTH of the images (712x{REFERENCE_WIDTH})",
    )
    ap.add_argument("--n-train", type=int, default=len(TRAIN_IDS), help="training images IDRiD_01.. (54)")
    ap.add_argument("--n-test", type=int, default=len(TEST_IDS), help="test images, ids continue (27)")
    ap.add_argument("--seed", type=int, default=0, help="same seed and options -> identical files (0)")
    ap.add_argument(
        "--ma-radius",
        type=_pair(float),
        default=None,
        help="MIN,MAX microaneurysm radius in pixels of the written images (default "
        f"{DEFAULT_MA_RADIUS_AT_REF[0]:g},{DEFAULT_MA_RADIUS_AT_REF[1]:g} at width {REFERENCE_WIDTH}, "
        "scaled with the width, at least 1)",
    )
    ap.add_argument("--ma-count", type=_pair(int), default=(5, 25), help="MIN,MAX MA per image (5,25)")
    ap.add_argument("--he-count", type=_pair(int), default=(1, 8), help="MIN,MAX HE per image with HE (1,8)")
    ap.add_argument("--no-he-fraction", type=float, default=0.2, help="share of images without HE (0.2)")
    ap.add_argument("--ex-fraction", type=float, default=0.3, help="share of images with hard exudates (0.3)")
    ap.add_argument("--sample", type=Path, help="also write a half-size JPEG preview of the first image here")
    ap.add_argument("--force", action="store_true", help="replace an existing synthetic set at --out")
    args = cli.parse(ap, argv)
    if args.layout != "idrid":
        given = [o for o in IDRID_ONLY if getattr(args, o) != ap.get_default(o)]
        if given:
            ap.error(f"--{given[0].replace('_', '-')} applies to --layout idrid only")
    if args.top != EOPHTHA_TOPS[0] and args.layout != "eophtha-ma":
        ap.error("--top applies to --layout eophtha-ma only")
    if args.n is not None:
        try:
            resolve_counts(args.layout, args.n)
        except ValueError as e:
            ap.error(f"--n: {e}")
    return cli.run(lambda: run(args), ap.prog)


def _counts(text: str) -> dict[str, int]:
    try:
        return parse_counts(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected SPLIT=N[,SPLIT=N...], got {text!r}") from None


def run_layout(args) -> int:
    t0 = time.perf_counter()
    info = generate_layout(
        args.layout, args.out, args.seed, args.n, force=args.force, progress=cli.show_progress(args), top=args.top
    )
    counts = ", ".join(f"{k} {v}" for k, v in info["counts"].items())
    logging.info("%s: %s images in %s [%.1f s]", args.layout, counts, args.out, time.perf_counter() - t0)
    if args.sample:
        rec = next(iter(info["images"].values()))
        img = cv2.imread(str(args.out / rec["path"]), cv2.IMREAD_COLOR)
        small = preview(img, max(1, img.shape[1] // 2))
        args.sample.parent.mkdir(parents=True, exist_ok=True)
        write_image(args.sample, small, [cv2.IMWRITE_JPEG_QUALITY, 88])
        logging.info("preview of %s -> %s (%s)", rec["path"], args.sample, "x".join(map(str, small.shape[:2])))
    return 0


def run(args) -> int:
    if args.layout != "idrid":
        return run_layout(args)
    if args.n is not None:
        args.n_train = args.n.get("train", args.n_train)
        args.n_test = args.n.get("test", args.n_test)
    params = SyntheticParams(
        width=args.size[1],
        height=args.size[0],
        ma_radius=args.ma_radius,
        ma_count=args.ma_count,
        he_count=args.he_count,
        no_he_fraction=args.no_he_fraction,
        ex_fraction=args.ex_fraction,
    )
    t0 = time.perf_counter()
    info = generate_idrid_tree(
        args.out, args.n_train, args.n_test, args.seed, params, force=args.force, progress=cli.show_progress(args)
    )
    n = len(info["images"])
    no_he = sorted(k for k, v in info["images"].items() if "HE" not in v["lesions"])
    logging.info(
        "%d images (%d train, %d test) at %dx%d (HxW) in %s [%.1f s]; without HE: %s",
        n,
        args.n_train,
        args.n_test,
        params.height,
        params.width,
        args.out,
        time.perf_counter() - t0,
        ", ".join(no_he) or "none",
    )
    if args.sample:
        split = "train" if args.n_train else "test"
        first = sorted(args.out.glob(f"{IDRID_SEG_DIR}/{IDRID_IMAGES_DIR}/{IDRID_SPLIT_DIRS[split]}/*.jpg"))[0]
        img = cv2.imread(str(first), cv2.IMREAD_COLOR)
        small = preview(img, max(1, params.width // 2))
        args.sample.parent.mkdir(parents=True, exist_ok=True)
        write_image(args.sample, small, [cv2.IMWRITE_JPEG_QUALITY, 88])
        logging.info("preview of %s -> %s (%s)", first.name, args.sample, "x".join(map(str, small.shape[:2])))
    return 0


if __name__ == "__main__":
    sys.exit(main())
