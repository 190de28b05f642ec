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

from redseg.toolchain import blas  # noqa: E402

blas.configure()  # before any test module imports Caffe (OpenBLAS picks its kernels when it loads)

from redseg.toolchain.caffe_utils import import_caffe  # noqa: E402


@pytest.fixture(scope="session")
def caffe():
    c = import_caffe()
    c.set_mode_cpu()
    return c


@pytest.fixture(scope="session")
def venv_python() -> str:
    """The interpreter the tools run under (the one running the tests)."""
    return sys.executable


def write_prepared_set(root: Path, n: int = 4, size: tuple[int, int] = (64, 48), seed: int = 0) -> Path:
    """A tiny prepared set in the layout of docs/data_format.md, made directly (no IDRiD needed).

    Dark round "lesions" on a bright noisy background: MA small dots, HE larger blobs; the last
    image has no HE. Returns the folder.
    """
    import json

    import cv2
    import numpy as np

    rng = np.random.default_rng(seed)
    w, h = size
    for split in ("train", "test"):
        (root / split / "images").mkdir(parents=True, exist_ok=True)
        (root / split / "masks").mkdir(parents=True, exist_ok=True)
        lines = []
        for i in range(n):
            name = f"IDRiD_{i + 1:02d}" if split == "train" else f"IDRiD_{i + 55:02d}"
            img = np.clip(rng.normal(150, 10, (h, w, 3)), 0, 255).astype(np.uint8)
            ma = np.zeros((h, w), np.uint8)
            he = np.zeros((h, w), np.uint8)
            for _ in range(3):
                cv2.circle(ma, (int(rng.integers(4, w - 4)), int(rng.integers(4, h - 4))), 1, 255, -1)
            if i < n - 1:
                cv2.circle(he, (int(rng.integers(8, w - 8)), int(rng.integers(8, h - 8))), 5, 255, -1)
            img[ma > 0] = (30, 30, 90)
            img[he > 0] = (20, 20, 70)
            cv2.imwrite(str(root / split / "images" / f"{name}.png"), img)
            cv2.imwrite(str(root / split / "masks" / f"{name}_MA.png"), ma)
            cv2.imwrite(str(root / split / "masks" / f"{name}_HE.png"), he)
            lines.append(f"{split}/images/{name}.png\t{split}/masks/{name}_MA.png\t{split}/masks/{name}_HE.png")
        (root / f"{split}.txt").write_text("\n".join(lines) + "\n")
    (root / "meta.json").write_text(json.dumps({"mean_bgr": [140.0, 140.0, 145.0], "factor": 1, "size": [w, h]}))
    (root / ".complete").write_text("")
    return root


@pytest.fixture(scope="session")
def tiny_set(tmp_path_factory) -> Path:
    return write_prepared_set(tmp_path_factory.mktemp("tiny_set"))


def save_random_model(path: Path, seed: int = 0, deploy: Path | None = None, std: float = 0.05) -> Path:
    """A Red-Seg model as Caffe saves it: the deploy net (default prototxt/deploy.prototxt) with
    seeded Gaussian weights and biases in every learnable layer (the bilinear upsampling stays)."""
    import numpy as np

    from redseg.toolchain.caffe_utils import load_net

    net = load_net(deploy or REPO / "prototxt" / "deploy.prototxt")
    rng = np.random.default_rng(seed)
    for name, blobs in net.params.items():
        if not name.startswith("up_"):
            for b in blobs:
                b.data[...] = rng.normal(0, std, b.data.shape)
    net.save(str(path))
    return path


@pytest.fixture(scope="session")
def smoke_reproduction(tmp_path_factory) -> tuple[Path, dict]:
    """`make reproduce SCHEDULE=smoke` (tools/reproduce.py --schedule smoke), run once per session:
    its run folder, and its experiments as reproduction.json had them when it finished. Shared
    because it costs a minute or more of two cores: tests/experiments/test_reproduce.py goes on to
    change the folder (skip, resume, a failure), test_slurm.py compares the SLURM run with the copy."""
    import json
    import subprocess

    run = tmp_path_factory.mktemp("repro") / "run"
    cmd = [sys.executable, str(REPO / "tools" / "reproduce.py"), "--no-progress", "--run", str(run)]
    cmd += ["--schedule", "smoke"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, f"{cmd} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}"
    return run, json.loads((run / "reproduction.json").read_text())["experiments"]


@pytest.fixture(scope="session")
def smoke_crossdata(tmp_path_factory) -> tuple[Path, dict]:
    """`make crossdata SCHEDULE=smoke` on synthetic copies of the five layouts (no prepared set under
    DATA_ROOT), run once per session: its run folder and crossdata.json. Shared by
    tests/experiments/test_crossdata.py and test_slurm.py (the SLURM run is compared with it)."""
    import json
    import subprocess

    base = tmp_path_factory.mktemp("crossdata")
    (base / "empty").mkdir()
    run = base / "run"
    cmd = ["make", "--no-print-directory", "crossdata", "SCHEDULE=smoke", f"RUN={run}", f"DATA_ROOT={base / 'empty'}"]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, f"{cmd} failed ({proc.returncode}):\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}"
    return run, json.loads((run / "crossdata.json").read_text())


@pytest.fixture(scope="session")
def built(caffe) -> Path:
    """The build folder of the Caffe these tests import (``<cache>/caffe-<key>/``)."""
    build = Path(caffe.__file__).resolve().parents[3]
    if not (build / "source.tar.gz").is_file():
        pytest.skip(f"{build} was not built by this project's make setup (no source.tar.gz): CAFFE_ROOT in use")
    return build


@pytest.fixture(scope="session")
def pristine(built, tmp_path_factory) -> Path:
    """The unpatched Caffe source tree of that build, unpacked (the patch tests copy it)."""
    from redseg.toolchain import caffe_source

    return caffe_source.unpack(built / "source.tar.gz", tmp_path_factory.mktemp("pristine") / "t")
