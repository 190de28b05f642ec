#!/usr/bin/env python3
"""Test a trained Red-Seg on a prepared set's test images, then score it (paper section 3.3).

  python tools/test_net.py --weights runs/idrid/stage2_final.caffemodel [--data data/idrid] [--gpu 0]

Writes <out>/pred/<image>_ma.png and <image>_he.png (8-bit, probability x 255), then runs the
evaluation (tools/evaluate.py's library) into <out>/eval: metrics.json, report.md, pr_curves.png,
overlays. With --gt pointing at a data set as published (IDRiD's folder; DDR, FGADR, e-ophtha MA,
DiaretDB1: --dataset, or recognised) its own full-size labels are used (the authors' protocol
resizes the maps to the label size); --full-size also saves the maps upsampled
to the original resolution. After scoring, <weights>.json beside the weights records the input
mean, the training FOV diameter and each lesion's break-even threshold for tools/segment.py and
tools/export_onnx.py (redseg/deploy/model_info.py).

  python tools/test_net.py --model models/redseg-idrid --data data/idrid [--backend caffe|onnx]

--model takes a model package (tools/package_model.py; docs/model_package.md): every file's digest
is checked before anything is written, the net runs in Caffe or ONNX Runtime (--backend; auto:
Caffe when it imports), with the package's input mean; nothing is written into the package, and
its thresholds are printed beside this test set's break-even ones.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from redseg import cli  # noqa: E402
from redseg.data.prepared_set import list_path, mean_bgr, read_image, read_list, read_meta  # noqa: E402
from redseg.evaluation.report import summary_table  # noqa: E402
from redseg.evaluation.scoring import evaluate  # noqa: E402
from redseg.toolchain.caffe_utils import CaffeInputError  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    ap = cli.parser(__doc__, progress=True)
    model = ap.add_mutually_exclusive_group(required=True)
    model.add_argument("--weights", type=Path, help="trained Red-Seg .caffemodel")
    model.add_argument("--model", type=Path, help="a model package folder (tools/package_model.py)")
    cli.add_backend(ap)
    ap.add_argument("--data", type=Path, default=Path("data/idrid"), help="prepared set (default data/idrid)")
    ap.add_argument(
        "--out", type=Path, help="output folder (default <weights dir>/test_<weights name>; --model: runs/test_<name>)"
    )
    ap.add_argument("--gt", type=Path, help="ground truth for scoring (default: the prepared set's test masks)")
    cli.add_dataset(ap)
    ap.add_argument("--deploy", type=Path, help="deploy prototxt (default prototxt/deploy.prototxt)")
    ap.add_argument(
        "--full-size", action="store_true", help="save maps at the photographs' own size (the set's factor or scale)"
    )
    ap.add_argument("--gpu", type=int, help="GPU id (default: CPU)")
    ap.add_argument("--overlays", type=int, default=3, help="overlay pictures to draw (default 3)")
    ap.add_argument("--no-eval", action="store_true", help="only write the maps")
    ap.add_argument(
        "--no-sidecar",
        action="store_true",
        help="do not write <weights>.json (scoring on another data set than the model's own)",
    )
    ap.add_argument(
        "--sides",
        type=int,
        default=0,
        metavar="N",
        help="also write every side output's map of the first N test images to <out>/sides (paper Fig. 7)",
    )
    args = cli.parse(ap, argv)
    if args.model is not None:
        out = args.out or Path("runs") / f"test_{args.model.resolve().name}"
    else:
        out = args.out or args.weights.parent / f"test_{args.weights.stem}"
    return cli.run(lambda: run(args, out), ap.prog)


def run(args, out: Path) -> int:
    import cv2
    from tqdm import tqdm

    from redseg.deploy.inference import DEPLOY, Segmenter, side_maps, to_u8
    from redseg.fileio import write_image
    from redseg.toolchain.caffe_utils import set_mode

    pkg = None
    if args.model is not None:  # checked before anything is read or written
        from redseg.deploy import package

        pkg = package.open_package(args.model)
        if args.deploy is not None:
            raise CaffeInputError("--deploy is for --weights; a package brings its own deploy.prototxt")
    elif not args.weights.is_file():
        raise CaffeInputError(f"weights file not found: {args.weights}")
    samples = read_list(list_path(args.data, "test"))
    meta = read_meta(args.data)
    if pkg is not None:
        seg, backend = package.segmenter(pkg, args.backend, args.gpu)
        logging.info("package %s through %s, input mean %s", pkg.root, backend, list(seg.mean))
        if args.sides and backend != "caffe":
            raise CaffeInputError("--sides needs the Caffe backend (--backend caffe)")
    else:
        set_mode(args.gpu)
        seg = Segmenter(args.weights, mean_bgr(args.data), args.deploy or DEPLOY)
    pred = out / "pred"
    pred.mkdir(parents=True, exist_ok=True)
    if args.sides:
        (out / "sides").mkdir(exist_ok=True)
    factor = int(meta.get("factor") or 1)
    full_sizes = full_size_of(args.data) if args.full_size and meta.get("factor") is None else {}
    for i, s in enumerate(tqdm(samples, desc="test", unit="img", disable=not cli.show_progress(args))):
        img = read_image(s.image)
        probs = seg(img)
        if i < args.sides:
            for key, prob in side_maps(seg.net).items():
                write_image(out / "sides" / f"{s.name}_{key}.png", to_u8(prob))
        for lesion, prob in probs.items():
            u8 = to_u8(prob)
            if s.name in full_sizes:  # a set rescaled to one FOV diameter: each photograph's own size
                u8 = cv2.resize(u8, tuple(full_sizes[s.name]), interpolation=cv2.INTER_LINEAR)
            elif args.full_size and factor > 1:
                h, w = u8.shape
                u8 = cv2.resize(u8, (w * factor, h * factor), interpolation=cv2.INTER_LINEAR)
            write_image(pred / f"{s.name}_{lesion.lower()}.png", u8)
    logging.info("maps of %d images in %s", len(samples), pred)
    if args.no_eval:
        return 0
    progress = cli.show_progress(args)
    result = evaluate(
        pred, args.gt or args.data, out / "eval", overlays=args.overlays, progress=progress, dataset=args.dataset
    )
    print(summary_table(result))
    print(f"report: {out / 'eval' / 'report.md'}")
    if pkg is not None:
        print_package_thresholds(pkg, result)
    elif not args.no_sidecar:
        write_sidecar(args, result, out / "eval" / "metrics.json")
    return 0


def full_size_of(data: Path) -> dict[str, list[int]]:
    """Each test photograph's size before preparation (summary.json of a set prepared by FOV diameter)."""
    from redseg.fileio import read_json_object

    summary = read_json_object(Path(data) / "summary.json") or {}
    return {name: rec["size_full"] for name, rec in (summary.get("images") or {}).items() if "size_full" in rec}


def print_package_thresholds(pkg, result: dict) -> None:
    """The package's thresholds beside this test set's break-even ones (the package is not changed)."""
    from redseg import config as C
    from redseg.deploy.model_info import break_even_thresholds

    here = break_even_thresholds(result)
    theirs = pkg.info.thresholds
    for lesion in C.LESIONS:
        t, b = theirs.get(lesion), here.get(lesion)
        print(
            f"{lesion}: the package's threshold {'none' if t is None else f'{t:.4f}'}, "
            f"break-even on this set {'none' if b is None else f'{b:.4f}'}"
        )


def write_sidecar(args, result: dict, metrics_json: Path) -> None:
    """<weights>.json: the mean, the training FOV diameter and the break-even thresholds that
    tools/segment.py and the ONNX export read (redseg/deploy/model_info.py); a warning if it cannot be written."""
    from redseg.data.prepared_set import fov_diameter
    from redseg.deploy.model_info import from_evaluation, write_model_info

    info = from_evaluation(result, mean_bgr(args.data), fov_diameter(args.data), metrics_json)
    try:
        print(f"model sidecar: {write_model_info(args.weights, info)}")
    except OSError as e:
        logging.warning("cannot write the model sidecar beside %s: %s", args.weights, e)


if __name__ == "__main__":
    sys.exit(main())
