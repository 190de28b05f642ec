#!/usr/bin/env python3
"""`make vgg16`: fetch the ImageNet VGG16 Caffe model (paper section 3.2 initialises from it) and validate it.

On a connected machine it downloads the Caffe model zoo's VGG_ILSVRC_16_layers.caffemodel (about
528 MB). Offline, or for a file you already have, put the file at --out (or pass --check FILE):
the tool validates that the 13 VGG16 convolutions are there, by name and shape, so that a wrong
file is caught before Caffe would abort on it.
"""

from __future__ import annotations

import argparse
import os
import sys
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from redseg import config as C  # noqa: E402
from redseg.caffe_utils import CaffeInputError, read_caffemodel  # noqa: E402

# The Caffe model zoo entry of Simonyan & Zisserman's 16-layer model (and HED's converted copy).
SOURCES = (
    "http://www.robots.ox.ac.uk/~vgg/software/very_deep/caffe/VGG_ILSVRC_16_layers.caffemodel",
    "https://vcl.ucsd.edu/hed/5stage-vgg.caffemodel",
)


def expected_shapes() -> dict[str, tuple[int, ...]]:
    out, cin = {}, 3
    for stage, nout, nconv in C.VGG16_CONVS:
        for i in range(1, nconv + 1):
            out[f"{stage}_{i}"] = (nout, cin, 3, 3)
            cin = nout
    return out


def validate(path: Path) -> None:
    shapes = read_caffemodel(path)
    for name, shape in expected_shapes().items():
        if name not in shapes:
            raise CaffeInputError(f"{path}: no layer {name}; not an ImageNet VGG16 model")
        if tuple(shapes[name][0]) != shape:
            raise CaffeInputError(f"{path}: {name} weights are {shapes[name][0]}, VGG16 has {shape}")


def download(url: str, out: Path, timeout: float) -> None:
    tmp = out.with_name(out.name + ".part")
    with urllib.request.urlopen(url, timeout=timeout) as r, tmp.open("wb") as f:
        total = int(r.headers.get("Content-Length") or 0)
        from tqdm import tqdm

        with tqdm(total=total or None, unit="B", unit_scale=True, desc=out.name) as bar:
            while chunk := r.read(1 << 20):
                f.write(chunk)
                bar.update(len(chunk))
    validate(tmp)
    os.replace(tmp, out)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path("models/vgg16/VGG_ILSVRC_16_layers.caffemodel"))
    ap.add_argument("--check", type=Path, help="only validate this file")
    ap.add_argument("--url", action="append", help="download from this URL instead (repeatable)")
    ap.add_argument("--timeout", type=float, default=30)
    args = ap.parse_args()
    try:
        if args.check:
            validate(args.check)
            print(f"{args.check}: a valid VGG16 model (13 convolutions by name and shape)")
            return 0
        if args.out.is_file():
            validate(args.out)
            print(f"{args.out}: already present and valid")
            return 0
        args.out.parent.mkdir(parents=True, exist_ok=True)
        errors = []
        for url in args.url or SOURCES:
            try:
                download(url, args.out, args.timeout)
                print(f"{args.out}: downloaded from {url} and validated")
                return 0
            except (OSError, CaffeInputError) as e:
                errors.append(f"  {url}: {e}")
        print(
            "Could not download the ImageNet VGG16 weights:\n" + "\n".join(errors) + "\n"
            f"Download VGG_ILSVRC_16_layers.caffemodel (Caffe model zoo, about 528 MB) on a connected\n"
            f"machine, put it at {args.out} and run `make vgg16` again to validate it; or pass\n"
            "VGG16=/path/to/file to make. Without it, stage 1 can run only with FROM_SCRATCH=1.",
            file=sys.stderr,
        )
        return 1
    except CaffeInputError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
