"""The whole `make demo` chain through its command-line tools, at a tiny size: the pieces fit."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def tool(name: str, *args) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, str(REPO / "tools" / name), *map(str, args)],
                          capture_output=True, text=True, timeout=600)  # fmt: skip
    assert proc.returncode == 0, f"{name} failed:\n{proc.stdout}\n{proc.stderr}"
    return proc


def test_synthetic_prepare_train_test_evaluate(tmp_path):
    raw, data, run = tmp_path / "idrid", tmp_path / "data", tmp_path / "run"
    tool("make_synthetic.py", "--out", raw, "--size", "96x128", "--n-train", "2", "--n-test", "2", "-q")
    tool("prepare_idrid.py", "--src", raw, "--out", data, "--factor", "2", "-q")
    assert len((data / "train.txt").read_text().split("\n")) >= 12  # 2 images x 6 augmentations
    tool(
        "train.py",
        "--stage",
        "1",
        "--data",
        data,
        "--run",
        run,
        "--schedule",
        "smoke",
        "--from-scratch",
        "--no-progress",
    )
    tool("train.py", "--stage", "2", "--data", data, "--run", run, "--schedule", "smoke", "--no-progress")
    out = tmp_path / "test"
    proc = tool("test_net.py", "--weights", run / "stage2_final.caffemodel", "--data", data, "--gt", raw,
                "--out", out, "--overlays", "1", "--no-progress")  # fmt: skip
    assert "report:" in proc.stdout
    metrics = json.loads((out / "eval" / "metrics.json").read_text())
    assert metrics["meta"]["gt_kind"] == "official" and metrics["meta"]["n_images"] == 2
    # 64x48 maps scored against the 128x96 labels, as the authors' protocol does
    assert metrics["meta"]["n_resized"] == 4
    for lesion in ("MA", "HE"):
        assert 0.0 <= metrics[lesion]["ap"] <= 1.0
    assert (out / "eval" / "pr_curves.png").stat().st_size > 0
    assert len(list((out / "eval" / "overlays").glob("*.png"))) == 1
    # the stand-alone evaluator on the same maps gives the same numbers
    tool("evaluate.py", "--pred", out / "pred", "--gt", raw, "--out", tmp_path / "again", "--overlays", "0")
    again = json.loads((tmp_path / "again" / "metrics.json").read_text())
    assert again["MA"]["auc_pr"] == metrics["MA"]["auc_pr"] and again["HE"]["ap"] == metrics["HE"]["ap"]
