#!/usr/bin/env python3
"""Write every net and solver prototxt from redseg/model/net.py (`make prototxt`)."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from redseg import cli  # noqa: E402
from redseg.model.net import generate  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    ap = cli.parser(__doc__)
    ap.add_argument("--out", default="prototxt", help="output folder (default: prototxt)")
    args = cli.parse(ap, argv)
    return cli.run(lambda: run(args), ap.prog)


def run(args) -> int:
    for path in generate(args.out):
        if not args.quiet:
            print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
