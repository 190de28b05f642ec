#!/usr/bin/env python3
"""Get a Red-Seg model package, check every file's digest, and say what it is (docs/model_package.md).

  python tools/fetch_model.py models/redseg-idrid.tar.gz --out models/
  python tools/fetch_model.py https://example.org/redseg-idrid.tar.gz --out models/
  python tools/fetch_model.py file:///srv/models/redseg-idrid --out models/

The source: a package folder, a .tar.gz/.tgz/.zip archive of one, or a URL of either (file://,
http://, https://; a folder over http(s) is read through its SHA256SUMS). It lands in
--out/<name> (default name: the folder's or the archive's), fetched and checked in a work folder
first, so a failed or interrupted fetch leaves nothing under the final name; an existing package
is kept unless --force. A package whose format_version is newer than this project reads is
refused. Exit status 0 when the package is in place and sound, 1 otherwise.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from redseg import cli  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    ap = cli.parser(__doc__)
    ap.add_argument("source", help="package folder, .tar.gz/.zip archive, or a file:// or http(s):// URL of either")
    ap.add_argument("--out", type=Path, default=Path("models"), help="folder to put the package in (default models/)")
    ap.add_argument("--name", help="the package's folder name under --out (default: the source's)")
    ap.add_argument("--force", action="store_true", help="replace an existing package of that name")
    args = cli.parse(ap, argv)
    return cli.run(lambda: run(args), ap.prog)


def run(args) -> int:
    from redseg.deploy.package import describe, fetch_package

    pkg = fetch_package(args.source, args.out, name=args.name, force=args.force)
    print(describe(pkg))
    return 0


if __name__ == "__main__":
    sys.exit(main())
