#!/usr/bin/env python3
"""Package a trained Red-Seg as one folder that others can check and use (docs/model_package.md).

  python tools/package_model.py --run runs/idrid --out models/redseg-idrid
  make package RUN=runs/idrid NAME=redseg-idrid

Writes --out (built under a temporary name, renamed at the end; an existing one is kept unless
--force): deploy.prototxt, the weights (the run's stage2_final.caffemodel, else stage1_final, or
--weights) and their sidecar, the ONNX export (any input size, checked against pycaffe) and a
fixed-size one (--input-size HxW, default the training images' size; OpenCV DNN runs only that
one), readme.md (the Caffe Model Zoo's front matter, then the model card), metadata.json (the same
for tools), each evaluation's metrics.json and pr_curves.png, and SHA256SUMS. The evaluations: each
--eval DIR (a tools/test_net.py output folder or its eval/ folder; NAME=DIR names the test set),
else the one the weights' sidecar names, else <run>/test/eval. Use the package with
tools/segment.py --model and tools/test_net.py --model; fetch one with tools/fetch_model.py.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from redseg import cli  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    ap = cli.parser(__doc__)
    ap.add_argument("--run", type=Path, help="training run folder (stage<N>_final.caffemodel, stage<N>_run.json)")
    ap.add_argument("--out", type=Path, required=True, help="package folder to write, e.g. models/NAME")
    ap.add_argument("--weights", type=Path, help="weights to package (default: the run's stage2, else stage1 final)")
    ap.add_argument("--deploy", type=Path, help="deploy prototxt (default prototxt/deploy.prototxt)")
    ap.add_argument(
        "--eval",
        action="append",
        default=[],
        metavar="[NAME=]DIR",
        help="an evaluation to report (test_net.py's --out or its eval/); repeat, one per test set",
    )
    ap.add_argument("--name", help="the model's name in readme.md and metadata.json (default: --out's folder name)")
    size = ap.add_mutually_exclusive_group()
    size.add_argument(
        "--input-size", type=cli.size, help="HxW of the fixed-size ONNX export (default: the training images' size)"
    )
    size.add_argument("--no-fixed-onnx", action="store_true", help="leave the fixed-size ONNX export out")
    ap.add_argument("--license", default="CC-BY-4.0", help="licence of the weights (default CC-BY-4.0)")
    ap.add_argument("--url", help="where the package will be published (zoo caffemodel_url: URL/model.caffemodel)")
    ap.add_argument("--version", default="1", help="the model's version string (default 1)")
    ap.add_argument("--archive", action="store_true", help="also write <out>.tar.gz (for tools/fetch_model.py)")
    ap.add_argument("--force", action="store_true", help="replace an existing --out")
    args = cli.parse(ap, argv)
    if args.run is None and args.weights is None:
        ap.error("give --run or --weights")
    return cli.run(lambda: run(args), ap.prog)


def run(args) -> int:
    from redseg.deploy.package import BuildOptions, archive, build_package, describe, open_package

    out = build_package(
        BuildOptions(
            out=args.out,
            run=args.run,
            weights=args.weights,
            deploy=args.deploy,
            evals=args.eval,
            name=args.name,
            input_size=args.input_size,
            fixed_onnx=not args.no_fixed_onnx,
            license=args.license,
            url=args.url,
            version=args.version,
            force=args.force,
        )
    )
    print(describe(open_package(out)))
    if args.archive:
        print(f"archive: {archive(out)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
