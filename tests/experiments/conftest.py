"""Shared by the reproduction's tests: the local smoke reproduction, run once per session.

Why shared: the SLURM launcher's test (test_slurm.py) must show that its numbers equal the local
runner's on the same machine, and a smoke reproduction costs about a minute of two cores; its
numbers are captured here when it finishes, before any test changes the folder.
"""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def reproduce_smoke(run: Path, *args, check: bool = True, timeout: float = 900) -> subprocess.CompletedProcess:
    """tools/reproduce.py with the smoke schedule: what `make reproduce SCHEDULE=smoke` runs."""
    cmd = [sys.executable, str(REPO / "tools" / "reproduce.py"), "--no-progress", "--run", str(run)]
    cmd += ["--schedule", "smoke", *map(str, args)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"{cmd} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc


@dataclass(frozen=True)
class SmokeRun:
    run: Path
    experiments: dict  # reproduction.json's "experiments" as the run left them (status, metrics, ...)


@pytest.fixture(scope="session")
def smoke_local(tmp_path_factory) -> SmokeRun:
    """The local runner's smoke reproduction; ``experiments`` is a copy taken when it finished."""
    run = tmp_path_factory.mktemp("repro_local") / "run"
    reproduce_smoke(run)
    return SmokeRun(run, json.loads((run / "reproduction.json").read_text())["experiments"])
