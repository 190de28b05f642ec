#!/usr/bin/env python3
"""Segment fundus photographs from any camera with a trained Red-Seg, and summarise them.

  python tools/segment.py --weights runs/idrid/stage2_final.caffemodel --out runs/segment photos/ x.jpg
  python tools/segment.py --onnx runs/idrid/redseg.onnx --out runs/segment photos/   # no Caffe needed
  python tools/segment.py --model models/NAME --out runs/segment photos/   # a package (docs/model_package.md)
  python tools/segment.py --onnx M --out OUT --num-parts 8 --part-id 3 photos/        # one part of eight
  python tools/segment.py --merge OUT                                                 # the parts' one summary

RESEARCH TOOL, NOT A DIAGNOSIS. Inputs are files or folders (a folder: its image files, sorted).
Each photograph's circular field of view (FOV) is found, cropped and rescaled so that its diameter
matches the training images' (the model's sidecar <weights>.json or ONNX metadata, --data, or
IDRiD's at a quarter size), the net runs once, and the maps come back at the photograph's own
pixels. Written to --out: <name>_ma.png / <name>_he.png (8-bit probability maps, 0 outside the
FOV), <name>_overlay.png (redseg.evaluation.report's overlay), thumbs/<name>.jpg, and the screening summary
summary.csv, summary.json and index.html: lesion counts (connected components of at least
--min-size pixels at the network's scale), HE area, counts per image-oriented quadrant, the
threshold of each lesion and its source. An unreadable or non-fundus file is listed with its
reason and skipped. A photograph done before with the same model and settings (its record in
OUT/records/) is not segmented again.

Many photographs: --num-parts N --part-id I (default: $SLURM_ARRAY_TASK_COUNT and
$SLURM_ARRAY_TASK_ID minus $SLURM_ARRAY_TASK_MIN in a SLURM job array) does part I of the sorted
inputs (every N-th, from the I-th) into the same --out and writes OUT/parts/part-I-of-N.json
instead of the summary; --merge OUT then writes the one summary.csv / summary.json / index.html,
identical to a single run's, once every part is there (refused when parts are missing or disagree
on inputs, model or settings).

Exit status: 0 when at least one photograph was segmented (a part: when it finished); 1 when none
was (or on bad options); 2 on a usage error; 75 when SIGUSR1/SIGTERM stopped it after a photograph
(preempted, resumable: run it again). See docs/segment.md.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from redseg import cli  # noqa: E402
from redseg import config as C  # noqa: E402


def thresholds(text: str) -> dict[str, float]:
    """``0.4`` (every lesion) or ``MA=0.4,HE=0.5``; each in [0, 1]."""
    out: dict[str, float] = {}
    try:
        if "=" not in text:
            out = dict.fromkeys(C.LESIONS, float(text))
        else:
            for part in text.split(","):
                key, value = part.split("=")
                key = key.strip().upper()
                if key not in C.LESIONS:
                    raise ValueError(key)
                out[key] = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"--threshold must be a number in [0, 1] or {'=T,'.join(C.LESIONS)}=T, got {text!r}"
        ) from None
    if not all(0.0 <= t <= 1.0 for t in out.values()):
        raise argparse.ArgumentTypeError(f"--threshold values must lie in [0, 1], got {text!r}")
    return out


def positive(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        v = -1.0
    if not v > 0:
        raise argparse.ArgumentTypeError(f"must be a positive number of pixels, got {text!r}")
    return v


def main(argv: list[str] | None = None) -> int:
    ap = cli.parser(__doc__, progress=True)
    ap.add_argument("inputs", nargs="*", type=Path, help="photographs, or folders of them")
    model = ap.add_mutually_exclusive_group(required=True)
    model.add_argument("--weights", type=Path, help="trained Red-Seg .caffemodel (needs pycaffe)")
    model.add_argument("--onnx", type=Path, help="exported model (tools/export_onnx.py; needs only onnxruntime)")
    model.add_argument(
        "--model", type=Path, help="a model package (tools/package_model.py): every file checked, then --backend"
    )
    model.add_argument(
        "--merge", type=Path, metavar="OUT", help="write OUT's summary from its parts (OUT/parts/), segment nothing"
    )
    ap.add_argument("--out", type=Path, default=Path("runs/segment"), help="output folder (default runs/segment)")
    ap.add_argument("--data", type=Path, help="the prepared set the model was trained on: its mean and FOV diameter")
    ap.add_argument("--mean-bgr", type=cli.mean_bgr, help="B,G,R input mean (default: the model's, else --data's)")
    ap.add_argument(
        "--fov-diameter", type=positive, help="training FOV diameter in pixels (default: --data's, else the model's)"
    )
    ap.add_argument(
        "--threshold",
        type=thresholds,
        help="probability threshold, T or MA=T,HE=T (default: the model's break-even threshold, else 0.5)",
    )
    ap.add_argument(
        "--min-size",
        type=int,
        default=C.MIN_COMPONENT_PX,
        help=f"smallest lesion counted, pixels at the network's scale (default {C.MIN_COMPONENT_PX}; 1 counts all)",
    )
    ap.add_argument("--deploy", type=Path, help="deploy prototxt for --weights (default prototxt/deploy.prototxt)")
    ap.add_argument("--gpu", type=int, help="GPU id for --weights (default: CPU; --onnx uses CUDA when it can)")
    cli.add_backend(ap)
    ap.add_argument(
        "--num-parts",
        type=int,
        metavar="N",
        help="split the inputs into N parts (default: $SLURM_ARRAY_TASK_COUNT, or 1)",
    )
    ap.add_argument(
        "--part-id",
        type=int,
        metavar="I",
        help="do part I, 0..N-1 (default: $SLURM_ARRAY_TASK_ID - $SLURM_ARRAY_TASK_MIN in a job array)",
    )
    args = cli.parse(ap, argv)
    if args.merge is None and not args.inputs:
        ap.error("the photographs (or folders) to segment are required, unless --merge OUT")
    if args.merge is not None and (args.inputs or args.num_parts is not None or args.part_id is not None):
        ap.error("--merge OUT takes no photographs, --num-parts or --part-id: it merges the parts already in OUT")
    return cli.run(lambda: run(args), ap.prog)


def _slurm_int(name: str) -> int | None:
    value = os.environ.get(name)
    if value is None or value == "":
        return None
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"${name} is {value!r}, not a number") from None


def part_of(args) -> tuple[int, int, str]:
    """(part id, number of parts, where they came from): the options, else the SLURM job array's
    variables (a contiguous array, e.g. --array=0-7 or 1-8), else the whole batch as one part."""
    count = _slurm_int("SLURM_ARRAY_TASK_COUNT")
    task = _slurm_int("SLURM_ARRAY_TASK_ID")
    first = _slurm_int("SLURM_ARRAY_TASK_MIN") or 0
    num_parts, source = args.num_parts, "--num-parts"
    if num_parts is None:
        num_parts, source = (count, "$SLURM_ARRAY_TASK_COUNT") if count is not None else (1, "default")
    part_id = args.part_id
    if part_id is None:
        if task is not None and num_parts > 1:
            part_id, source = task - first, f"{source}, $SLURM_ARRAY_TASK_ID {task} - $SLURM_ARRAY_TASK_MIN {first}"
        elif num_parts == 1:
            part_id = 0
        else:
            raise ValueError(f"--num-parts {num_parts} needs --part-id I (0..{num_parts - 1}), or a SLURM job array")
    if num_parts < 1:
        raise ValueError(f"--num-parts must be at least 1, got {num_parts} ({source})")
    if not 0 <= part_id < num_parts:
        raise ValueError(f"--part-id must be in 0..{num_parts - 1} for {num_parts} parts, got {part_id} ({source})")
    return part_id, num_parts, source


def fingerprint(args, seg) -> dict:
    """What decides a photograph's outputs besides the photograph and the settings: the model's
    bytes (and the deploy net's), the engine and the input mean. A record or part made with
    anything else is not reused or merged."""
    from redseg.fileio import file_digest

    fp = {"engine": "onnx" if args.onnx else "caffe", "model_sha256": file_digest(args.onnx or args.weights)}
    if not args.onnx:
        from redseg.deploy.inference import DEPLOY

        fp["deploy_sha256"] = file_digest(args.deploy or DEPLOY)
    fp["mean_bgr"] = [round(float(v), 6) for v in seg.mean]
    return fp


def _caffe_model(args, mean):
    """A Caffe Segmenter and its sidecar (imports Caffe: only for --weights)."""
    from redseg.deploy.inference import DEPLOY, Segmenter
    from redseg.deploy.model_info import read_model_info, sidecar_path
    from redseg.toolchain.caffe_utils import CaffeInputError, set_mode

    if not args.weights.is_file():
        raise CaffeInputError(f"weights file not found: {args.weights}")
    info = read_model_info(args.weights)
    if mean is None and info is not None:
        mean = info.mean_bgr
    if mean is None:
        mean = C.LSEG_MEAN_BGR
        logging.warning(
            "no sidecar %s, --data or --mean-bgr: using the L-Seg IDRiD mean %s", sidecar_path(args.weights), mean
        )
    set_mode(args.gpu)
    seg = Segmenter(args.weights, mean, args.deploy or DEPLOY)
    if info is None:
        return seg, None, None, f"no sidecar {sidecar_path(args.weights)}"
    return seg, info.fov_diameter_px, info.thresholds, f"sidecar {sidecar_path(args.weights)}"


def _onnx_model(args, mean):
    """An ONNX Runtime segmenter and its metadata (never imports Caffe)."""
    from redseg.deploy.inference import OnnxSegmenter

    if args.gpu is not None:
        logging.warning("--gpu is for --weights; ONNX Runtime picks CUDA itself when onnxruntime-gpu is installed")
    seg = OnnxSegmenter(args.onnx, mean_bgr=mean)
    info = seg.info
    return seg, info.fov_diameter_px, info.thresholds, f"ONNX metadata of {args.onnx}"


def _package_model(args, mean):
    """A model package's segmenter (Caffe or ONNX Runtime: --backend) with its FOV diameter and
    thresholds; its files' digests were checked in segment(), before anything was written."""
    from redseg.deploy import package

    pkg = args.package
    if args.deploy is not None:
        raise package.PackageError("--deploy is for --weights; a package brings its own deploy.prototxt")
    seg, backend = package.segmenter(pkg, args.backend, args.gpu, mean_bgr=mean)
    logging.info("model package %s through %s", pkg.root, "Caffe" if backend == "caffe" else "ONNX Runtime")
    if backend == "caffe":  # fingerprint() and the summary name the files that run
        args.weights, args.deploy = pkg.root / package.WEIGHTS, pkg.root / package.DEPLOY
    else:
        args.onnx = pkg.root / package.ONNX
    info = pkg.info
    return seg, info.fov_diameter_px, info.thresholds, f"package {pkg.root}"


def _summarise(out: Path, rows: list[dict], settings: dict, how: str = "") -> int:
    """The one summary (a single run's or merged parts'), its line, and the exit rule: 0 when at
    least one photograph was segmented."""
    from redseg.deploy import screening

    paths = screening.write_summary(out, rows, settings)
    n_ok = sum(r["status"] == "ok" for r in rows)
    print(f"{n_ok} of {len(rows)} photographs segmented{how}; summary: {paths['csv']}, {paths['html']}")
    print(screening.DISCLAIMER)
    if n_ok == 0:
        raise screening.ScreeningError(f"no photograph could be segmented ({len(rows)} skipped; see {paths['csv']})")
    return 0


def merge(out: Path) -> int:
    from redseg.deploy import screening

    rows, settings = screening.merge_parts(out)
    return _summarise(out, rows, settings, " (merged parts)")


def run(args) -> int:
    if args.merge is not None:
        return merge(args.merge)
    # From here SIGUSR1/SIGTERM (a scheduler's time limit or preemption) stop the batch after the
    # photograph in hand, with every photograph done kept (exit 75; the rerun skips them).
    with cli.StopSignals(stops_after="this photograph") as stop:
        return segment(args, stop)


def segment(args, stop) -> int:
    from redseg.data.prepared_set import fov_diameter, mean_bgr
    from redseg.deploy import screening

    if args.model is not None:  # every file's digest, before anything is read or written
        from redseg.deploy.package import open_package

        args.package = open_package(args.model)
    inputs = screening.list_inputs(args.inputs)
    if not inputs:
        raise screening.ScreeningError(f"no image files in {', '.join(map(str, args.inputs))}")
    screening.check_out(args.out, args.inputs)
    part_id, num_parts, source = part_of(args)
    indices = screening.part_indices(len(inputs), num_parts, part_id) if num_parts > 1 else None
    if indices is not None:
        logging.info("part %d of %d (%s): %d of %d inputs", part_id, num_parts, source, len(indices), len(inputs))
    mean = args.mean_bgr
    data_fov = None
    if args.data is not None:
        if mean is None:
            mean = [float(v) for v in mean_bgr(args.data)]
        if args.fov_diameter is None:  # an older set without it is measured: not when it is given
            data_fov = (fov_diameter(args.data), f"--data {args.data} (meta.json fov_diameter_px, or measured)")
    load = _package_model if args.model else _onnx_model if args.onnx else _caffe_model
    seg, model_fov, model_thr, model_src = load(args, mean)
    settings = screening.resolve_settings(
        str(args.onnx or args.weights),
        model_fov,
        model_thr,
        model_src,
        data_fov=data_fov,
        fov_diameter=args.fov_diameter,
        threshold=args.threshold,
        min_size=args.min_size,
    )
    logging.info("training FOV diameter %.1f px (%s)", settings.fov_diameter_px, settings.fov_source)
    for lesion in C.LESIONS:
        logging.info("%s threshold %.4f (%s)", lesion, settings.thresholds[lesion], settings.threshold_sources[lesion])
    fp = fingerprint(args, seg)
    rows = screening.screen(
        inputs,
        seg,
        settings,
        args.out,
        progress=cli.show_progress(args),
        indices=indices,
        fingerprint=fp,
        stop=lambda: stop.signal_name if stop.preempted else None,
    )
    if indices is not None:
        part = screening.write_part(args.out, rows, indices, settings, part_id, num_parts, inputs, fp)
        n_ok = sum(r["status"] == "ok" for r in rows)
        print(f"part {part_id} of {num_parts}: {n_ok} of {len(rows)} photographs segmented; {part}")
        print(f"when every part is done: python tools/segment.py --merge {args.out}")
        return 0
    return _summarise(args.out, rows, settings)


if __name__ == "__main__":
    sys.exit(main())
