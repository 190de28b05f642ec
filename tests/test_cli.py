"""redseg.cli and the command lines of tools/*.py: one size order, one quiet flag, one exit-code rule."""

from __future__ import annotations

import argparse
import ast
import importlib.util
import logging
import os
import signal
import time
from pathlib import Path

import pytest

from redseg import cli

REPO = Path(__file__).resolve().parent.parent
TOOLS = sorted((REPO / "tools").glob("*.py"))


def test_size_is_height_by_width():
    assert cli.size("712x1072") == (712, 1072)
    assert cli.size("178X268") == (178, 268)
    for bad in ("big", "712", "0x5", "1x2x3"):
        with pytest.raises(argparse.ArgumentTypeError):
            cli.size(bad)
    at_least = cli.size_at_least(32, "the net downsamples 16x")
    assert at_least("32x48") == (32, 48)
    with pytest.raises(argparse.ArgumentTypeError, match="at least 32x32"):
        at_least("16x64")


def test_run_maps_errors_to_exit_codes(capsys):
    assert cli.run(lambda: None, "tool.py") == 0
    assert cli.run(lambda: 3, "tool.py") == 3

    def fails(exc):
        def body():
            raise exc

        return body

    for exc in (ValueError("bad input file x.png"), OSError("disk full"), RuntimeError("no GPU")):
        assert cli.run(fails(exc), "tool.py") == 1
        err = capsys.readouterr().err
        assert err == f"tool.py: error: {exc}\n"
    assert cli.run(fails(KeyboardInterrupt()), "tool.py") == 130
    assert "interrupted" in capsys.readouterr().err
    with pytest.raises(TypeError):  # a bug is not an input error: it keeps its traceback
        cli.run(fails(TypeError("bug")), "tool.py")


def _wait(cond) -> None:
    deadline = time.time() + 5
    while not cond() and time.time() < deadline:
        time.sleep(0.001)


@pytest.fixture
def sigint_default():
    """Python's own Ctrl-C handler for the test ("its usual meaning" below), which a process started
    with SIGINT ignored does not get (a background job of a non-interactive shell, as CI may run
    the suite); the previous handler comes back afterwards."""
    old = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, old)


def test_stop_signals_ask_for_a_stop_and_preempted_exits_75(capsys, sigint_default):
    """SIGUSR1/SIGTERM set the flag (the first one decides; repeats change nothing), a Ctrl-C
    after that stops at once; the old handlers come back; Preempted is exit status 75."""
    before = signal.getsignal(signal.SIGUSR1)
    with cli.StopSignals(interrupt=True) as stop:
        assert not stop.requested
        os.kill(os.getpid(), signal.SIGUSR1)
        _wait(lambda: stop.requested)
        assert stop.preempted and stop.signal_name == "SIGUSR1"
        os.kill(os.getpid(), signal.SIGTERM)  # a forwarded repeat or SLURM's SIGTERM: still stopping
        os.kill(os.getpid(), signal.SIGUSR1)
        time.sleep(0.05)
        assert stop.signal_name == "SIGUSR1"
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
            _wait(lambda: False)
    assert signal.getsignal(signal.SIGUSR1) is before
    with cli.StopSignals() as stop:  # without interrupt=True Ctrl-C keeps its usual meaning
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
            _wait(lambda: False)
        assert not stop.requested

    def preempted():
        raise cli.Preempted("stage 1 preempted at iteration 5")

    assert cli.EXIT_PREEMPTED == 75
    assert cli.run(preempted, "tool.py") == 75
    assert capsys.readouterr().err == ""  # the one line is logged where it was raised


def test_quiet_and_progress_flags():
    ap = cli.parser("doc", progress=True)
    args = ap.parse_args(["-q"])
    assert args.quiet and not cli.show_progress(args)
    assert not cli.show_progress(ap.parse_args(["--no-progress"]))
    assert cli.show_progress(ap.parse_args([]))
    assert not hasattr(cli.parser("doc").parse_args([]), "no_progress")
    with pytest.raises(SystemExit) as e:  # a usage error: argparse's exit status 2
        ap.parse_args(["--bogus"])
    assert e.value.code == 2


@pytest.mark.parametrize("tool", TOOLS, ids=lambda p: p.name)
def test_every_tool_has_main_argv_and_the_shared_flags(tool, capsys):
    tree = ast.parse(tool.read_text())
    main = next(n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "main")
    assert [a.arg for a in main.args.args] == ["argv"] and ast.unparse(main.returns) == "int"
    assert "sys.exit(main())" in tool.read_text()
    spec = importlib.util.spec_from_file_location(f"tool_{tool.stem}", tool)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    level = logging.getLogger().level
    with pytest.raises(SystemExit) as e:
        module.main(["--help"])
    logging.getLogger().setLevel(level)
    assert e.value.code == 0
    assert "-q, --quiet" in capsys.readouterr().out
