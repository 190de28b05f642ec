#!/usr/bin/env python3
"""Segment your own fundus photographs with a trained Red-Seg.

  python tools/segment.py --weights runs/idrid/stage2_final.caffemodel --data data/idrid photo1.jpg photo2.png

Each photograph is resized to the training resolution (--width, default 1072 px wide as IDRiD's
4x-downsampled images; the paper's section 3.1), passed once through prototxt/deploy.prototxt,
and written to --out as <name>_ma.png / <name>_he.png (8-bit probability maps at the photo's own
size) and <name>_overlay.png (the evaluation report's overlay, redseg.report.draw_overlay: MA and
HE panels side by side, the probability above 0.5 magenta to white over the photo, at most 1072
px wide each). The input mean comes from the prepared set the model was trained on (--data) or
--mean-bgr.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from redseg import cli  # noqa: E402
from redseg import config as C  # noqa: E402
from redseg.prepared_set import DataError, mean_bgr, read_image  # noqa: E402


def three_numbers(text: str) -> list[float]:
    try:
        mean = [float(v) for v in text.split(",")]
    except ValueError:
        mean = []
    if len(mean) != 3:
        raise argparse.ArgumentTypeError(f"--mean-bgr must be three numbers B,G,R, got {text!r}")
    return mean


def main(argv: list[str] | None = None) -> int:
    ap = cli.parser(__doc__)
    ap.add_argument("images", nargs="+", type=Path)
    ap.add_argument("--weights", type=Path, required=True)
    ap.add_argument("--data", type=Path, help="prepared set whose training mean to use")
    ap.add_argument(
        "--mean-bgr", type=three_numbers, help="B,G,R input mean instead of --data (default: the L-Seg IDRiD mean)"
    )
    ap.add_argument("--width", type=int, default=C.IDRID_FULL_SIZE[0] // C.DOWNSAMPLE, help="network input width")
    ap.add_argument("--out", type=Path, default=Path("runs/segment"))
    ap.add_argument("--gpu", type=int)
    args = cli.parse(ap, argv)
    return cli.run(lambda: run(args), ap.prog)


def run(args) -> int:
    import cv2

    from redseg.caffe_utils import set_mode
    from redseg.fileio import write_image
    from redseg.inference import Segmenter, to_u8
    from redseg.report import draw_overlay

    if args.mean_bgr:
        mean = args.mean_bgr
    elif args.data:
        mean = mean_bgr(args.data)
    else:
        mean = C.LSEG_MEAN_BGR
        logging.warning("no --data or --mean-bgr: using the L-Seg IDRiD mean %s", mean)
    for p in args.images:  # every input readable before the net is built
        if not p.is_file():
            raise DataError(f"image not found: {p}")
    set_mode(args.gpu)
    seg = Segmenter(args.weights, mean)
    args.out.mkdir(parents=True, exist_ok=True)
    for path in args.images:
        img = read_image(path)
        h, w = img.shape[:2]
        small = cv2.resize(img, (args.width, max(1, round(h * args.width / w))), interpolation=cv2.INTER_AREA)
        maps = {k: cv2.resize(to_u8(v), (w, h), interpolation=cv2.INTER_LINEAR) for k, v in seg(small).items()}
        for lesion, u8 in maps.items():
            write_image(args.out / f"{path.stem}_{lesion.lower()}.png", u8)
        write_image(args.out / f"{path.stem}_overlay.png", draw_overlay(path.stem, img, maps))
        print(args.out / f"{path.stem}_overlay.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
