#!/usr/bin/env python3
"""Export a trained Red-Seg to ONNX, to run it with ONNX Runtime (CPU or GPU) without Caffe.

  python tools/export_onnx.py --weights runs/idrid/stage2_final.caffemodel --out runs/idrid/redseg.onnx

Converts the deploy net (default prototxt/deploy.prototxt; a fusion variant with --deploy
prototxt/ablations/deploy_ma_conv2-5.prototxt) layer by layer (redseg/deploy/onnx_export.py): input
`data` float32 1x3xHxW (BGR minus the training mean) of any height and width, outputs `prob_ma`
and `prob_he`. The model's metadata records the mean (from the weights' sidecar <weights>.json,
--data or --mean-bgr), the FOV diameter and thresholds of the sidecar, and the fusion stages.
Before writing, the model is run against pycaffe on one random image (--no-verify skips it).
An existing --out is kept unless --force. See docs/onnx.md.

--input-size HxW exports a fixed-size model instead: it takes only HxW inputs, its crops have
constant ends (no Shape node), and OpenCV's DNN module (cv2.dnn.readNetFromONNX) runs it; it is
checked against pycaffe at that size in ONNX Runtime and in OpenCV DNN.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from redseg import cli  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    ap = cli.parser(__doc__)
    ap.add_argument("--weights", type=Path, required=True, help="trained Red-Seg .caffemodel")
    ap.add_argument("--out", type=Path, required=True, help="ONNX model to write")
    ap.add_argument("--deploy", type=Path, help="deploy prototxt (default prototxt/deploy.prototxt)")
    mean = ap.add_mutually_exclusive_group()
    mean.add_argument("--data", type=Path, help="prepared set whose training mean to store (its meta.json)")
    mean.add_argument("--mean-bgr", type=cli.mean_bgr, help="B,G,R input mean to store")
    ap.add_argument("--input-size", type=cli.size, help="HxW: a fixed-size export (OpenCV DNN runs only such a model)")
    ap.add_argument("--force", action="store_true", help="overwrite an existing --out")
    ap.add_argument("--no-verify", action="store_true", help="skip the comparison with pycaffe before writing")
    args = cli.parse(ap, argv)
    return cli.run(lambda: run(args), ap.prog)


def run(args) -> int:
    from redseg.data.prepared_set import mean_bgr
    from redseg.deploy.onnx_export import export

    mean = args.mean_bgr
    if args.data is not None:
        mean = [float(v) for v in mean_bgr(args.data)]
    out = export(
        args.weights,
        args.out,
        deploy=args.deploy,
        mean_bgr=mean,
        force=args.force,
        verify_size=None if args.no_verify else (67, 93),
        input_size=args.input_size,
    )
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
