"""The command lines of tools/*.py: one way to parse, to be quiet and to fail.

Every tool has ``main(argv: list[str] | None = None) -> int`` and ends with
``if __name__ == "__main__": sys.exit(main())``; its ``main`` builds its options on
:func:`parser`, reads them with :func:`parse` and runs its work through :func:`run`. So, in every
tool:

* ``-q``/``--quiet``: warnings and errors only, no progress bar; ``--no-progress`` (tools with a
  progress bar): no progress bar, the messages stay;
* sizes are ``HxW``, height first, as numpy shapes are (:func:`size`): ``--size 712x1072`` is the
  paper's 1072 pixels wide, 712 high;
* exit status 0 on success; 2 for a usage error (argparse's own exit, with the usage on stderr);
  1 for bad input or a failure while running, with one line ``<tool>: error: <message>`` on stderr
  and no traceback; 130 on Ctrl-C.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable
from pathlib import Path

from redseg.fileio import write_json

LOG_FORMAT = "%(levelname)s %(message)s"
# Bad input and failures the tools report in one line: the project's own errors derive from these
# (DataError, CaffeInputError, EvaluationError, IdridError: ValueError; TrainingError: RuntimeError).
INPUT_ERRORS = (ValueError, OSError, RuntimeError)


def parser(doc: str | None, progress: bool = False) -> argparse.ArgumentParser:
    """An ArgumentParser described by the tool's docstring, with ``-q``/``--quiet`` (and
    ``--no-progress`` when the tool shows a progress bar)."""
    ap = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("-q", "--quiet", action="store_true", help="warnings and errors only, no progress bar")
    if progress:
        ap.add_argument("--no-progress", action="store_true", help="no progress bar (messages stay)")
    return ap


def parse(ap: argparse.ArgumentParser, argv: list[str] | None) -> argparse.Namespace:
    """Parse ``argv`` (exit 2 on a usage error) and set up logging: INFO, or WARNING with -q."""
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO, format=LOG_FORMAT)
    return args


def show_progress(args: argparse.Namespace) -> bool:
    """Whether to draw a progress bar: not with -q, not with --no-progress."""
    return not (args.quiet or getattr(args, "no_progress", False))


def size(text: str) -> tuple[int, int]:
    """``HxW`` -> (height, width), both at least 1 (an argparse ``type``)."""
    try:
        h, w = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"size must be HEIGHTxWIDTH, e.g. 712x1072; got {text!r}") from None
    if h < 1 or w < 1:
        raise argparse.ArgumentTypeError(f"size {text}: height and width must be positive")
    return h, w


def size_at_least(minimum: int, why: str) -> Callable[[str], tuple[int, int]]:
    """An argparse ``type`` like :func:`size` that also refuses sides below ``minimum`` (``why``)."""

    def parse_size(text: str) -> tuple[int, int]:
        h, w = size(text)
        if h < minimum or w < minimum:
            raise argparse.ArgumentTypeError(f"size {text}: at least {minimum}x{minimum} ({why})")
        return h, w

    return parse_size


def mean_bgr(text: str) -> list[float]:
    """``B,G,R`` -> three floats: an input mean (an argparse ``type``)."""
    try:
        mean = [float(v) for v in text.split(",")]
    except ValueError:
        mean = []
    if len(mean) != 3:
        raise argparse.ArgumentTypeError(f"--mean-bgr must be three numbers B,G,R, got {text!r}")
    return mean


def save_json(out: Path, result: dict) -> None:
    """Write a tool's JSON result to ``out`` (its folder made, atomically) and print where."""
    out.parent.mkdir(parents=True, exist_ok=True)
    write_json(out, result)
    print(f"\nJSON: {out}")


def run(body: Callable[[], int | None], prog: str) -> int:
    """Run a tool's work: its exit status (0 when it returns None), 1 with the message on stderr for
    bad input or a runtime failure (:data:`INPUT_ERRORS`), 130 on Ctrl-C."""
    try:
        return body() or 0
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130
    except INPUT_ERRORS as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 1
