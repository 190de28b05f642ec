#!/usr/bin/env python3
"""Write synthetic colour fundus photographs in the official IDRiD segmentation layout.

The images stand in for IDRiD (paper section 3.1), which cannot be shipped: same folder and file
names (``A. Segmentation/1. Original Images/...``, ``2. All Segmentation Groundtruths/...``),
JPEG photographs ``IDRiD_NN.jpg`` and colour TIFF masks ``IDRiD_NN_{MA,HE,EX,OD}.tif``; about 20 %
of the images have no haemorrhage and no ``_HE.tif`` (IDRiD: a missing mask means no lesion).
Feed the result to ``tools/prepare_idrid.py`` like the real archive. See redseg/data/synthetic.py.

    python tools/make_synthetic.py --out data/synthetic_idrid            # 54 + 27 at 712x1072 (HxW)
    python tools/make_synthetic.py --out /tmp/s --size 178x268 --n-train 4 --n-test 2 --seed 3
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
from redseg.fileio import write_image  # noqa: E402


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
    ap.add_argument("--out", required=True, type=Path, help="root of the tree (gets 'A. Segmentation/')")
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
    return cli.run(lambda: run(args), ap.prog)


def run(args) -> int:
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
