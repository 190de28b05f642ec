#!/usr/bin/env python3
"""Write every net and solver prototxt from redseg/net.py (`make prototxt`)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from redseg.net import generate  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--out", default="prototxt", help="output folder (default: prototxt)")
    args = ap.parse_args()
    for path in generate(args.out):
        print(path)


if __name__ == "__main__":
    main()
