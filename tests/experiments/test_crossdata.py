"""make crossdata (tools/crossdata.py, redseg/experiments/crossdata.py) on synthetic copies of the five layouts.

One smoke run (`make crossdata SCHEDULE=smoke`, about a minute and a half on 2 cores): real training
through Caffe on IDRiD, DDR and FGADR copies, every model scored on every test split by the real
scoring, then the table checked against the scores each test step wrote.
"""

from __future__ import annotations

import json
import subprocess

import pytest
from conftest import REPO

from redseg.data.datasets import open_source

TRAIN = ["idrid", "ddr", "fgadr"]
TEST = ["idrid", "ddr", "fgadr", "eophtha-ma", "diaretdb1"]


def _make(run, data_root, *extra) -> subprocess.CompletedProcess:
    cmd = ["make", "--no-print-directory", "crossdata", "SCHEDULE=smoke", f"RUN={run}", f"DATA_ROOT={data_root}"]
    return subprocess.run(cmd + list(extra), cwd=REPO, capture_output=True, text=True, timeout=900)


@pytest.fixture(scope="module")
def crossed(smoke_crossdata):
    return smoke_crossdata


def test_every_model_on_every_test_set_and_the_table_is_their_scores(crossed):
    run, r = crossed
    assert r["train_sets"] == TRAIN and r["test_sets"] == TEST and r["synthetic"] is True
    for train in TRAIN:
        assert r["experiments"][train]["status"] == "done", r["experiments"][train]
        for test in TEST:
            folder = run / train / ("test" if test == train else f"test_{test}") / "eval"
            metrics = json.loads((folder / "metrics.json").read_text())
            cell = r["matrix"][train][test]
            for les in ("MA", "HE"):
                assert cell[les]["auc_pr"] == metrics[les]["auc_pr"]
                assert cell[les]["ap"] == metrics[les]["ap"]
            assert metrics["meta"]["gt_kind"] == "official", "scored against the set as published"
            assert metrics["meta"]["gt_info"].get("dataset", "idrid") == test


def test_eophtha_he_is_not_scored_and_the_diagonal_is_marked(crossed):
    run, r = crossed
    for train in TRAIN:
        he = r["matrix"][train]["eophtha-ma"]["HE"]
        assert he["not_scored"] and (he["auc_pr"] is None or he["auc_pr"] != he["auc_pr"])  # null or nan, never 0
        assert r["matrix"][train]["eophtha-ma"]["MA"]["not_scored"] is None
    md = (run / "crossdata.md").read_text()
    assert "Synthetic data" in md
    rows: dict[str, str] = {}
    for line in md.splitlines():  # the first table: AUC_PR
        if line.startswith("| "):
            rows.setdefault(line.split("|")[1].strip(), line)
    assert rows["DDR"].split("|")[3].strip().startswith("**"), "the diagonal cell is bold"
    assert not rows["DDR"].split("|")[2].strip().startswith("**")
    assert rows["IDRiD"].split("|")[5].strip().endswith("n.s.")


def test_scored_at_each_sets_own_label_size(crossed):
    """DDR's labels keep its cameras' sizes although the model saw the photographs rescaled."""
    run, r = crossed
    metrics = json.loads((run / "idrid" / "test_ddr" / "eval" / "metrics.json").read_text())
    with open_source(run / "synthetic" / "ddr") as src:
        sizes = {tuple(src.read_image(it.image).shape[1::-1]) for it in src.items("test")}
    assert {tuple(s) for s in metrics["meta"]["label_sizes"]} == sizes
    assert {tuple(s) for s in metrics["meta"]["prediction_sizes"]}.isdisjoint(sizes)
    meta = json.loads((run / "data" / "ddr" / "meta.json").read_text())
    idrid = json.loads((run / "data" / "idrid" / "meta.json").read_text())
    assert meta["fov"]["target_px"] == pytest.approx(idrid["fov_diameter_px"], abs=1e-3)


def test_a_second_run_skips_every_finished_experiment(crossed):
    run, r = crossed
    weights = run / "ddr" / "stage2_final.caffemodel"
    stamp = weights.stat().st_mtime_ns
    proc = _make(run, run.parent / "empty")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert weights.stat().st_mtime_ns == stamp
    again = json.loads((run / "crossdata.json").read_text())
    assert again["matrix"] == r["matrix"]
