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
  and no traceback; 130 on Ctrl-C; 75 (:data:`EXIT_PREEMPTED`, BSD's EX_TEMPFAIL) when stopped by
  SIGUSR1 or SIGTERM with the work so far saved: run the same command again to resume (a batch
  scheduler's preemption or time limit; a SLURM job requeues on it). :class:`StopSignals` is how a
  long loop turns those signals into a stop at a safe point.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading
from collections.abc import Callable
from pathlib import Path

from redseg.fileio import write_json

log = logging.getLogger(__name__)

LOG_FORMAT = "%(levelname)s %(message)s"
# Bad input and failures the tools report in one line: the project's own errors derive from these
# (DataError, CaffeInputError, EvaluationError, IdridError: ValueError; TrainingError: RuntimeError).
INPUT_ERRORS = (ValueError, OSError, RuntimeError)
# "Preempted, resumable": stopped by SIGUSR1/SIGTERM at a safe point, everything needed to resume
# saved. BSD sysexits' EX_TEMPFAIL ("try again later"), so schedulers and wrappers can tell it from a
# failure (1) and requeue the job; not os.EX_TEMPFAIL, which exists on Unix only.
EXIT_PREEMPTED = 75
PREEMPT_SIGNALS = ("SIGUSR1", "SIGTERM")


class Preempted(Exception):
    """A run stopped on SIGUSR1/SIGTERM with its work saved (already logged where it was raised);
    :func:`run` exits with :data:`EXIT_PREEMPTED`. Not an :data:`INPUT_ERRORS` error: nothing failed."""


class StopSignals:
    """SIGUSR1 and SIGTERM (and, with ``interrupt``, the first Ctrl-C) set :attr:`requested` instead
    of killing the process, so that a loop can stop at its next safe point (the end of a training
    iteration, of a photograph) with its work saved.

    Why both: a SLURM job asks for ``--signal=B:USR1@<seconds>`` before its time limit and is sent
    SIGTERM when preempted or at the limit, then SIGKILL after a grace period; whichever comes
    first, the loop has that grace period to finish the step in hand and save. Repeats of either
    signal change nothing (a batch script may forward one that the process already got). A second
    Ctrl-C raises KeyboardInterrupt at once (stop without saving), as a user pressing it twice
    means. :attr:`signal_name` says which signal asked (``"SIGINT"`` for Ctrl-C), :attr:`preempted`
    whether it was a scheduler's. Handlers can only be set from the main thread; elsewhere this
    does nothing (an in-process caller keeps its own handlers). Use as a context manager: the old
    handlers come back on exit.
    """

    def __init__(self, interrupt: bool = False, on_signal=None, stops_after: str = "the current step"):
        self.signal_name: str | None = None
        self.interrupt = interrupt
        self.stops_after = stops_after  # for the one line logged on the first signal
        self.on_signal = on_signal  # called with the signal number on every one received (e.g. to forward it)
        self._old: dict[int, object] = {}

    @property
    def requested(self) -> bool:
        return self.signal_name is not None

    @property
    def preempted(self) -> bool:
        return self.signal_name in PREEMPT_SIGNALS

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            names = [*PREEMPT_SIGNALS, *(("SIGINT",) if self.interrupt else ())]
            for name in names:
                num = getattr(signal, name, None)
                if num is not None:
                    self._old[num] = signal.signal(num, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for num, old in self._old.items():
            signal.signal(num, old)
        self._old.clear()

    def _handle(self, signum, frame) -> None:
        name = signal.Signals(signum).name
        if self.on_signal is not None:
            self.on_signal(signum)
        first = not self.requested
        if name == "SIGINT":
            if self.requested:
                raise KeyboardInterrupt
            self.signal_name = name
        elif not self.preempted:  # the first of SIGUSR1/SIGTERM (after a Ctrl-C too) decides
            self.signal_name = name
        if first:
            again = " (Ctrl-C again: stop without saving)" if name == "SIGINT" else ""
            log.warning("%s: stopping after %s%s", name, self.stops_after, again)


def parser(doc: str | None, progress: bool = False) -> argparse.ArgumentParser:
    """An ArgumentParser described by the tool's docstring, with ``-q``/``--quiet`` (and
    ``--no-progress`` when the tool shows a progress bar)."""
    ap = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("-q", "--quiet", action="store_true", help="warnings and errors only, no progress bar")
    if progress:
        ap.add_argument("--no-progress", action="store_true", help="no progress bar (messages stay)")
    return ap


def add_backend(ap: argparse.ArgumentParser) -> None:
    """``--backend``: what runs a model package (``--model``): one meaning for every tool."""
    ap.add_argument(
        "--backend",
        choices=("auto", "caffe", "onnx"),
        default="auto",
        help="what runs --model (default: Caffe if it imports, else ONNX Runtime)",
    )


def add_dataset(ap: argparse.ArgumentParser) -> None:
    """``--dataset``: which published layout ``--gt`` / ``--src`` holds (docs/datasets.md)."""
    from redseg.config import DATASETS

    ap.add_argument("--dataset", choices=DATASETS, help="the data set's layout (default: recognised from its folders)")


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
    bad input or a runtime failure (:data:`INPUT_ERRORS`), 130 on Ctrl-C, :data:`EXIT_PREEMPTED` when
    the work stopped on SIGUSR1/SIGTERM with its state saved (:class:`Preempted`; logged where raised)."""
    try:
        return body() or 0
    except Preempted:
        return EXIT_PREEMPTED
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130
    except INPUT_ERRORS as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 1
