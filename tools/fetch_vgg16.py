#!/usr/bin/env python3
"""`make vgg16`: get the ImageNet VGG16 weights (paper section 3.2 initialises from them) and validate them.

Tries, in order: a file already at --out (any form); Keras' HDF5 file placed by hand in --out's
folder; the Caffe model zoo's VGG_ILSVRC_16_layers.caffemodel and HED's 5stage-vgg.caffemodel;
Keras' vgg16_weights_tf_dim_ordering_tf_kernels_notop.h5 from its two addresses (size and md5
checked), converted into a Caffe weights file at --out. Every result is validated: the 13 VGG16
convolutions, by name and shape, so that a wrong file is caught before Caffe would abort on it.

    python tools/fetch_vgg16.py --out models/vgg16/VGG_ILSVRC_16_layers.caffemodel
    python tools/fetch_vgg16.py --check ~/Downloads/vgg16_weights_tf_dim_ordering_tf_kernels_notop.h5

See docs/weights.md.
"""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from redseg import cli  # noqa: E402
from redseg.model import vgg16  # noqa: E402

DEFAULT_OUT = Path("models/vgg16") / vgg16.CAFFE_NAME


def manual_help(out: Path) -> str:
    """How to place the weights by hand (the message of a failed fetch)."""
    return (
        "Download one of these on a connected machine:\n"
        f"  - {vgg16.CAFFE_NAME} (Caffe model zoo, about 528 MB): put it at {out}\n"
        f"  - {vgg16.KERAS_NOTOP.name} ({vgg16.KERAS_NOTOP.size:,} bytes, md5 {vgg16.KERAS_NOTOP.md5})\n"
        f"    or {vgg16.KERAS_FULL.name} (with the top layers; md5 {vgg16.KERAS_FULL.md5}):\n"
        f"    put it in {out.parent}/\n"
        "then run `make vgg16` again to convert and validate it; or pass VGG16=/path/to/either/file to\n"
        "make (recognised by content). Without them, stage 1 can run only with FROM_SCRATCH=1 (not the\n"
        "paper's setting). See docs/weights.md."
    )


def main(argv: list[str] | None = None) -> int:
    ap = cli.parser(__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"where the Caffe weights go ({DEFAULT_OUT})")
    ap.add_argument("--check", type=Path, help="only validate this file (a Keras file is converted beside it)")
    ap.add_argument(
        "--url",
        action="append",
        help="try this Caffe model address instead of the known ones (repeatable)",
    )
    ap.add_argument(
        "--keras-url",
        action="append",
        help=f"try this address of {vgg16.KERAS_NOTOP.name} instead of Keras' (repeatable; size and md5 checked)",
    )
    ap.add_argument("--timeout", type=float, default=30, help="seconds without data before an address fails")
    args = cli.parse(ap, argv)
    return cli.run(lambda: run(args), ap.prog)


def run(args) -> int:
    if args.check:
        path = vgg16.prepare_weights(args.check)
        via = "" if path == args.check else f" (converted to {path})"
        print(f"{args.check}: valid VGG16 weights{via}: 13 convolutions by name and shape")
        return 0
    keras = (vgg16.KERAS_NOTOP,)
    if args.keras_url:
        keras = (dataclasses.replace(vgg16.KERAS_NOTOP, urls=tuple(args.keras_url)),)
    try:
        path, source = vgg16.fetch(args.out, caffe_urls=args.url or vgg16.CAFFE_URLS, keras=keras, timeout=args.timeout)
    except vgg16.FetchError as e:  # every address tried: say why each failed, and what to do by hand
        print(
            "Could not get the ImageNet VGG16 weights. Tried, in order:\n"
            + "\n".join(f"  {url}\n    -> {why}" for url, why in e.attempts)
            + "\n"
            + manual_help(args.out),
            file=sys.stderr,
        )
        return 1
    print(f"{path}: valid VGG16 weights, from {source}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
