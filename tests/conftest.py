"""Shared test fixtures: pycaffe imported quietly, the repo and python_layers on sys.path."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))
os.environ.setdefault("GLOG_minloglevel", "2")

from redseg.caffe_utils import import_caffe  # noqa: E402


@pytest.fixture(scope="session")
def caffe():
    c = import_caffe()
    c.set_mode_cpu()
    return c


@pytest.fixture(scope="session")
def venv_python() -> str:
    """The interpreter the tools run under (the one running the tests)."""
    return sys.executable
