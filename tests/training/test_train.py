"""tools/train.py end to end on tiny generated images: two stages, snapshots, resume, bad weights."""

from __future__ import annotations

import csv
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import write_prepared_set

from redseg import config as C
from redseg.model.topk_schedule import topk_lambda

REPO = Path(__file__).resolve().parents[2]
SMOKE = C.SCHEDULES["smoke"]
SUFFIXES = ("caffemodel", "solverstate")


def train(*args, check=True, **kw):
    cmd = [
        sys.executable,
        str(REPO / "tools" / "train.py"),
        "--schedule",
        "smoke",
        "--no-progress",
        *map(str, args),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, **kw)
    if check and proc.returncode != 0:
        raise AssertionError(f"{cmd} failed:\n{proc.stdout}\n{proc.stderr}")
    return proc


def read_log(path: Path) -> list[dict]:
    with path.open() as f:
        return [{k: float(v) for k, v in row.items()} for row in csv.DictReader(f)]


@pytest.fixture(scope="module")
def one_image(tmp_path_factory) -> Path:
    """One training image: every iteration sees it, so the loss curve is comparable."""
    return write_prepared_set(tmp_path_factory.mktemp("one"), n=1, size=(64, 48), seed=3)


@pytest.fixture(scope="module")
def two_stage_run(tmp_path_factory, one_image):
    run = tmp_path_factory.mktemp("run")
    train("--stage", 1, "--data", one_image, "--run", run, "--from-scratch")
    train("--stage", 2, "--data", one_image, "--run", run)
    return run


def test_two_stages_write_snapshots_logs_and_final_weights(two_stage_run):
    run = two_stage_run
    for stage, st in ((1, SMOKE.stage1), (2, SMOKE.stage2)):
        assert (run / f"stage{stage}_final.caffemodel").stat().st_size > 1_000_000
        for it in range(st.snapshot, st.max_iter + 1, st.snapshot):
            assert (run / f"stage{stage}_iter_{it}.caffemodel").is_file()
            assert (run / f"stage{stage}_iter_{it}.solverstate").is_file()
        rows = read_log(run / f"stage{stage}_log.csv")
        assert [int(r["iter"]) for r in rows] == list(range(1, st.max_iter + 1))
    rows1 = read_log(run / "stage1_log.csv")
    expected = [topk_lambda(r, C.LAMBDA0, SMOKE.lambda_period, SMOKE.stage1.max_iter) for r in range(1, 11)]
    assert [r["lambda"] for r in rows1] == pytest.approx(expected)
    # Same image, same lambda within a period: the stage-1 loss falls as the net learns.
    assert rows1[2]["loss_ma"] + rows1[2]["loss_he"] < rows1[0]["loss_ma"] + rows1[0]["loss_he"]
    rows2 = read_log(run / "stage2_log.csv")
    total2 = [r["loss_ma"] + r["loss_he"] for r in rows2]
    assert total2[-1] < total2[0]
    assert all(np.isfinite(list(r.values())).all() for r in rows1)
    assert all(np.isnan(r.pop("lambda")) and np.isfinite(list(r.values())).all() for r in rows2)  # no lambda


def test_stage2_starts_from_stage1_weights(caffe, two_stage_run):
    """Stage 2's first iteration is computed with stage 1's final weights: equal at a frozen layer."""
    from redseg.toolchain.caffe_utils import read_caffemodel

    a = read_caffemodel(two_stage_run / "stage1_final.caffemodel")
    b = read_caffemodel(two_stage_run / "stage2_final.caffemodel")
    assert a == b  # same layers and shapes
    n1 = caffe.Net(
        str(REPO / "prototxt" / "deploy.prototxt"), str(two_stage_run / "stage1_final.caffemodel"), caffe.TEST
    )
    n2 = caffe.Net(
        str(REPO / "prototxt" / "deploy.prototxt"), str(two_stage_run / "stage2_final.caffemodel"), caffe.TEST
    )
    # The bilinear upsampling is fixed (lr_mult 0): identical in both stages.
    np.testing.assert_array_equal(n1.params["up_he_conv5"][0].data, n2.params["up_he_conv5"][0].data)
    # Stage 2 at lr 1e-7 for 4 iterations moves the weights only a little from stage 1's.
    w1, w2 = n1.params["conv3_1"][0].data, n2.params["conv3_1"][0].data
    assert 0 < np.abs(w1 - w2).max() < 0.1 * np.abs(w1).max()


def test_finished_stage_is_not_retrained(two_stage_run, one_image):
    before = (two_stage_run / "stage1_final.caffemodel").stat().st_mtime_ns
    proc = train("--stage", 1, "--data", one_image, "--run", two_stage_run, "--from-scratch")
    assert "already finished" in proc.stderr
    assert (two_stage_run / "stage1_final.caffemodel").stat().st_mtime_ns == before


@pytest.fixture(scope="module")
def clean_run(tmp_path_factory, tiny_set) -> Path:
    """Stage 1 on the tiny set, never interrupted: what every interrupted run must end with."""
    run = tmp_path_factory.mktemp("clean")
    train("--stage", 1, "--data", tiny_set, "--run", run, "--from-scratch")
    return run


def start_and_signal(run: Path, data: Path, sig: signal.Signals, rows: int, repeat: int = 1):
    """Start stage 1 of tools/train.py, send ``sig`` once ``rows`` iterations are logged; returns
    (exit status, stderr, the newest snapshot's iteration)."""
    cmd = [sys.executable, str(REPO / "tools/train.py"), "--schedule", "smoke", "--no-progress",
           "--stage", "1", "--data", str(data), "--run", str(run), "--from-scratch"]  # fmt: skip
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    log = run / "stage1_log.csv"
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if log.is_file() and len(log.read_text().splitlines()) >= 1 + rows:  # header + rows
            break
        time.sleep(0.02)
    for _ in range(repeat):
        proc.send_signal(sig)
    _, err = proc.communicate(timeout=300)
    states = sorted(run.glob("stage1_iter_*.solverstate"))
    stopped = max((int(p.stem.split("_")[-1]) for p in states), default=0)
    return proc.returncode, err, stopped


def same_log(a: Path, b: Path) -> None:
    for got, want in zip(read_log(a), read_log(b), strict=True):
        for k in ("iter", "lambda", "loss_ma", "loss_he"):
            assert got[k] == pytest.approx(want[k], rel=1e-6, abs=1e-9, nan_ok=True), (got["iter"], k)


def test_ctrl_c_snapshots_and_resume_continues_schedule_and_data(tmp_path, tiny_set, clean_run):
    """Interrupt stage 1, resume it: lambda and the sample sequence continue, losses equal a clean run."""
    run = tmp_path / "interrupted"
    code, err, stopped = start_and_signal(run, tiny_set, signal.SIGINT, rows=6)
    assert code == 130, err
    assert "interrupted: snapshot" in err
    assert 6 <= stopped < SMOKE.stage1.max_iter
    assert not (run / "stage1_final.caffemodel").exists()

    proc = train("--stage", 1, "--data", tiny_set, "--run", run, "--from-scratch")
    assert f"at iteration {stopped}" in proc.stderr
    rows = read_log(run / "stage1_log.csv")
    assert [int(r["iter"]) for r in rows] == list(range(1, SMOKE.stage1.max_iter + 1))
    same_log(run / "stage1_log.csv", clean_run / "stage1_log.csv")


@pytest.mark.parametrize("sig, repeat", [(signal.SIGUSR1, 2), (signal.SIGTERM, 1)], ids=["SIGUSR1 twice", "SIGTERM"])
def test_preemption_signal_snapshots_exits_75_and_the_rerun_ends_with_the_same_weights(
    tmp_path, tiny_set, clean_run, sig, repeat
):
    """SLURM's --signal=B:USR1@T (forwarded, perhaps twice) or its SIGTERM: the driver finishes the
    iteration, snapshots, logs one line and exits 75; the requeued run resumes from that snapshot
    and its final .caffemodel is byte for byte the uninterrupted run's."""
    from redseg.training.train import EXIT_PREEMPTED

    assert EXIT_PREEMPTED == 75
    run = tmp_path / "preempted"
    code, err, stopped = start_and_signal(run, tiny_set, sig, rows=3, repeat=repeat)
    assert code == EXIT_PREEMPTED, err
    lines = [ln for ln in err.splitlines() if "preempted, resumable" in ln]
    assert len(lines) == 1 and sig.name in lines[0] and f"stage1_iter_{stopped}.solverstate" in lines[0], err
    assert 3 <= stopped < SMOKE.stage1.max_iter
    assert not (run / "stage1_final.caffemodel").exists()
    assert [int(r["iter"]) for r in read_log(run / "stage1_log.csv")] == list(range(1, stopped + 1))

    proc = train("--stage", 1, "--data", tiny_set, "--run", run, "--from-scratch")
    assert f"resumed stage 1 from {run / f'stage1_iter_{stopped}.solverstate'} at iteration {stopped}" in proc.stderr
    assert (run / "stage1_final.caffemodel").read_bytes() == (clean_run / "stage1_final.caffemodel").read_bytes()
    same_log(run / "stage1_log.csv", clean_run / "stage1_log.csv")
    # the schedule's snapshots, and the one of the stop
    names = {p.name for p in run.glob("stage1_iter_*")}
    assert names == {p.name for p in clean_run.glob("stage1_iter_*")} | {f"stage1_iter_{stopped}.{x}" for x in SUFFIXES}


def test_snapshots_are_written_whole_under_their_final_names(clean_run):
    """Caffe snapshots into the staging folder (the run's solver: snapshot 0, the driver snapshots),
    and each .solverstate names the weights beside it, where Caffe restores them from."""
    from caffe.proto import caffe_pb2

    solver = (clean_run / "stage1_solver.prototxt").read_text()
    assert "snapshot: 0\n" in solver and ".stage1-snapshot/stage1" in solver
    assert not (clean_run / ".stage1-snapshot").exists()  # emptied and removed after each snapshot
    for it in (5, 10):
        state = caffe_pb2.SolverState()
        state.ParseFromString((clean_run / f"stage1_iter_{it}.solverstate").read_bytes())
        assert state.iter == it
        assert state.learned_net == str(clean_run / f"stage1_iter_{it}.caffemodel")


def _cut(path: Path, size: int | None = None) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2 if size is None else size])


@pytest.mark.parametrize(
    "damage, why",
    [
        ("solverstate cut to 100 bytes", "not a whole Caffe solver state"),
        ("caffemodel cut in half", "is not a whole Caffe model"),
        ("caffemodel missing", "its weights file is missing"),
    ],
)
def test_resume_skips_a_snapshot_cut_short_and_takes_the_older_whole_one(tmp_path, tiny_set, clean_run, damage, why):
    """A SIGKILL while a snapshot was written in place (an older driver, Caffe itself) left the
    newest one cut short: the rerun says so, resumes from the one before, and still ends with the
    uninterrupted run's weights."""
    import shutil

    run = tmp_path / "run"
    shutil.copytree(clean_run, run)
    (run / "stage1_final.caffemodel").unlink()
    newest = run / "stage1_iter_10.solverstate"
    if damage.startswith("solverstate"):
        _cut(newest, 100)
    elif damage == "caffemodel cut in half":
        _cut(newest.with_suffix(".caffemodel"))
    else:
        newest.with_suffix(".caffemodel").unlink()
    bad = train("--stage", 1, "--data", tiny_set, "--run", run, "--from-scratch", "--resume", newest, check=False)
    assert bad.returncode == 1 and str(newest) in bad.stderr and why in bad.stderr, bad.stderr

    proc = train("--stage", 1, "--data", tiny_set, "--run", run, "--from-scratch")
    assert f"not resuming from {newest}: " in proc.stderr and why in proc.stderr, proc.stderr
    assert f"resumed stage 1 from {run / 'stage1_iter_5.solverstate'} at iteration 5" in proc.stderr
    # a copied run folder: its states name the original's weights; it resumes with its own
    assert f"names the weights {clean_run / 'stage1_iter_5.caffemodel'}; resuming with" in proc.stderr
    assert (run / "stage1_final.caffemodel").read_bytes() == (clean_run / "stage1_final.caffemodel").read_bytes()
    assert not list(run.glob("previous-stage1-*"))
    same_log(run / "stage1_log.csv", clean_run / "stage1_log.csv")


def test_a_kill_between_the_two_renames_of_a_snapshot_leaves_the_older_one_to_resume(caffe, tmp_path, tiny_set):
    """The solver state is the commit point: killed after the weights were moved in but before the
    state was, the snapshot does not exist for the resume, which takes the one before and ends
    with the uninterrupted run's weights; nothing half-written is ever in the run folder."""
    import os

    from redseg.training import train as T

    def stage(run_dir: Path):
        return T.StageRun(stage=1, data=tiny_set, run_dir=run_dir, schedule=SMOKE, from_scratch=True,
                          progress=False, test_loss=False)  # fmt: skip

    T.train_stage(stage(tmp_path / "clean"))
    real_replace = os.replace

    def killed_at_the_last_state(src, dst):
        if str(dst).endswith("stage1_iter_10.solverstate"):
            raise SystemExit("killed")  # as a SIGKILL would stop it: nothing after this runs
        real_replace(src, dst)

    run = stage(tmp_path / "killed")
    T.os.replace = killed_at_the_last_state
    try:
        with pytest.raises(SystemExit):
            T.train_stage(run)
    finally:
        T.os.replace = real_replace
    assert (run.run_dir / "stage1_iter_10.caffemodel").is_file()
    assert not (run.run_dir / "stage1_iter_10.solverstate").exists()
    assert T.resumable_snapshot(run, _net(caffe, run)) == run.run_dir / "stage1_iter_5.solverstate"
    T.train_stage(run)
    assert run.final.read_bytes() == (tmp_path / "clean" / "stage1_final.caffemodel").read_bytes()
    assert not (run.run_dir / ".stage1-snapshot").exists()


def _net(caffe, run):
    return caffe.get_solver(str(run.run_dir / "stage1_solver.prototxt")).net


def test_bad_init_weights_are_reported_not_aborted(caffe, tmp_path, tiny_set):
    """A caffemodel whose conv1_1 has the wrong shape, or without VGG16 layers: a clear error, exit 1."""
    from caffe import layers as L

    n = caffe.NetSpec()
    n.data = L.Input(shape=dict(dim=[1, 1, 8, 8]))  # 1 input channel: conv1_1 weights are 64x1x3x3
    n.conv1_1 = L.Convolution(n.data, num_output=64, kernel_size=3, pad=1)
    p = tmp_path / "wrong.prototxt"
    p.write_text(str(n.to_proto()))
    wrong = tmp_path / "wrong.caffemodel"
    caffe.Net(str(p), caffe.TEST).save(str(wrong))
    proc = train("--stage", 1, "--data", tiny_set, "--run", tmp_path / "r1", "--weights", wrong, check=False)
    assert proc.returncode == 1
    assert "conv1_1" in proc.stderr and "does not belong to this net" in proc.stderr

    junk = tmp_path / "junk.caffemodel"
    junk.write_bytes(b"\x00not a model" * 10)
    proc = train("--stage", 1, "--data", tiny_set, "--run", tmp_path / "r2", "--weights", junk, check=False)
    assert proc.returncode == 1 and "junk.caffemodel" in proc.stderr

    proc = train(
        "--stage",
        1,
        "--data",
        tiny_set,
        "--run",
        tmp_path / "r3",
        "--weights",
        tmp_path / "none",
        check=False,
    )
    assert proc.returncode == 1 and "make vgg16" in proc.stderr

    proc = train("--stage", 2, "--data", tiny_set, "--run", tmp_path / "r4", check=False)
    assert proc.returncode == 1 and "run stage 1 first" in proc.stderr


def test_vgg16_init_copies_encoder(caffe, tmp_path, tiny_set):
    """A VGG16-shaped model (13 convs by name, plus an fc layer Caffe ignores) initialises stage 1."""
    from caffe import layers as L

    from redseg.model.net import conv_relu, max_pool

    n = caffe.NetSpec()
    n.data = L.Input(shape=dict(dim=[1, 3, 32, 32]))
    bottom = n.data
    for s, (stage, nout, nconv) in enumerate(C.VGG16_CONVS, start=1):
        if s > 1:
            n[f"pool{s}"] = max_pool(bottom)
            bottom = n[f"pool{s}"]
        for i in range(1, nconv + 1):
            n[f"{stage}_{i}"], n[f"relu{s}_{i}"] = conv_relu(bottom, nout, (1, 2))
            bottom = n[f"{stage}_{i}"]
    n.fc6 = L.InnerProduct(bottom, num_output=4)
    p = tmp_path / "vgg.prototxt"
    p.write_text(str(n.to_proto()))
    vgg = caffe.Net(str(p), caffe.TEST)
    vgg.params["conv1_1"][0].data[...] = 0.125
    model = tmp_path / "vgg.caffemodel"
    vgg.save(str(model))
    run = tmp_path / "run"
    proc = train("--stage", 1, "--data", tiny_set, "--run", run, "--weights", model)
    assert "13 layers initialised" in proc.stderr
    assert "FROM SCRATCH" not in proc.stderr


def test_table5_ablation_net_trains_through_the_driver(tmp_path, tiny_set):
    """--net swaps in an ablation train net (MA fused from conv2-5): its extra loss is logged."""
    net = REPO / "prototxt" / "ablations" / "train_stage1_ma_conv2-5.prototxt"
    run = tmp_path / "abl"
    train("--stage", 1, "--data", tiny_set, "--run", run, "--from-scratch", "--net", net)
    header = (run / "stage1_log.csv").read_text().splitlines()[0].split(",")
    assert "loss_ma_conv5" in header and "loss_ma_conv2" in header
    assert "TopKBalancedCELoss" in (run / "stage1_train.prototxt").read_text()


@pytest.mark.parametrize("damage", ["truncated image", "mask of another size"])
def test_bad_training_file_stops_with_its_name(tmp_path, tiny_set, damage):
    """A file the data layer cannot use stops training with a Python error naming it, not an abort."""
    import shutil

    import cv2

    data = tmp_path / "set"
    shutil.copytree(tiny_set, data)
    if damage == "truncated image":
        bad = data / "train" / "images" / "IDRiD_03.png"
        bad.write_bytes(bad.read_bytes()[:100])
    else:
        bad = data / "train" / "masks" / "IDRiD_02_HE.png"
        cv2.imwrite(str(bad), np.zeros((10, 10), np.uint8))
    proc = train("--stage", 1, "--data", data, "--run", tmp_path / "run", "--from-scratch", check=False)
    assert proc.returncode == 1, proc.stderr
    assert str(bad) in proc.stderr
    assert "Traceback" not in proc.stderr


def test_nan_loss_stops_with_a_clear_error(caffe, tmp_path, tiny_set):
    """A diverging run (absurd lr) stops at the first non-finite loss and names the last snapshot."""
    from redseg.training.train import StageRun, TrainingError, train_stage

    wild = C.TrainingSchedule(
        "wild", C.StageSchedule(10.0, 20, 2), C.StageSchedule(1.0, 2, 2), 4, "diverges on purpose"
    )
    run = StageRun(stage=1, data=tiny_set, run_dir=tmp_path / "run", schedule=wild, from_scratch=True, progress=False)
    with pytest.raises(TrainingError, match=r"(nan|inf).*training stopped"):
        train_stage(run)
    assert not (tmp_path / "run" / "stage1_final.caffemodel").exists()


def test_force_retrain_archives_old_outputs_and_snapshots_its_own_final(caffe, tmp_path, tiny_set, one_image):
    """Retraining a stage never reuses the previous run's files: they move aside, stage 2's too.

    The schedule's max_iter (5) is not a multiple of its snapshot interval (2), as in the paper
    (97,200 vs 10,000): the final weights must come from this run's own last iteration.
    """
    from redseg.training.train import StageRun, train_stage

    odd = C.TrainingSchedule(
        "odd", C.StageSchedule(1e-6, 5, 2), C.StageSchedule(1e-7, 2, 2), 4, "max_iter not a multiple"
    )
    run_dir = tmp_path / "run"
    first = StageRun(stage=1, data=one_image, run_dir=run_dir, schedule=odd, from_scratch=True, progress=False)
    train_stage(first)
    train_stage(StageRun(stage=2, data=one_image, run_dir=run_dir, schedule=odd, weights=first.final, progress=False))
    old_final = first.final.read_bytes()
    again = StageRun(
        stage=1, data=tiny_set, run_dir=run_dir, schedule=odd, from_scratch=True, progress=False, force=True
    )
    train_stage(again)
    archived = list(run_dir.glob("previous-stage1-*"))
    assert len(archived) == 1
    moved = {p.name for p in archived[0].iterdir()}
    assert {"stage1_final.caffemodel", "stage1_iter_5.caffemodel", "stage2_final.caffemodel"} <= moved
    assert not (run_dir / "stage2_final.caffemodel").exists()  # derived from the old stage 1
    assert (archived[0] / "stage1_final.caffemodel").read_bytes() == old_final
    assert again.final.read_bytes() == (run_dir / "stage1_iter_5.caffemodel").read_bytes() != old_final


def test_from_scratch_wins_over_a_weights_file(tmp_path, tiny_set):
    """make stage1 FROM_SCRATCH=1 passes --weights too: the flag must still mean from scratch."""
    junk = tmp_path / "junk.caffemodel"
    junk.write_bytes(b"not a model")
    proc = train("--stage", 1, "--data", tiny_set, "--run", tmp_path / "r", "--from-scratch", "--weights", junk)
    assert "FROM SCRATCH" in proc.stderr


def test_solver_with_iter_size_is_refused(tmp_path, tiny_set):
    solver = tmp_path / "solver.prototxt"
    text = (REPO / "prototxt" / "solver_stage1.prototxt").read_text().replace("iter_size: 1", "iter_size: 2")
    solver.write_text(text.replace('net: "prototxt/', f'net: "{REPO}/prototxt/'))
    proc = train("--stage", 1, "--data", tiny_set, "--run", tmp_path / "r", "--from-scratch", "--solver", solver,
                 check=False)  # fmt: skip
    assert proc.returncode == 1 and "iter_size 2" in proc.stderr


def test_budgets_replace_the_schedule_and_are_recorded(tmp_path, tiny_set):
    """--max-iter / --base-lr: the solver runs that many iterations at that lr, and the run says
    it is not at the schedule's (nor the paper's) settings."""
    import json

    run = tmp_path / "budget"
    train("--stage", 1, "--data", tiny_set, "--run", run, "--from-scratch", "--max-iter", 3, "--base-lr", 2e-7)
    rows = read_log(run / "stage1_log.csv")
    assert [r["iter"] for r in rows] == [1, 2, 3]
    solver = (run / "stage1_solver.prototxt").read_text()
    assert "base_lr: 2e-07" in solver and "max_iter: 3" in solver
    rec = json.loads((run / "stage1_run.json").read_text())
    assert rec["overrides"] == {"base_lr": 2e-7, "max_iter": 3}
    assert rec["paper_settings"] is False and rec["schedule"] == "smoke"
    # lambda keeps the schedule's staircase: the first iterations of the full stage 1
    assert rows[-1]["lambda"] == pytest.approx(topk_lambda(3, C.LAMBDA0, SMOKE.lambda_period, SMOKE.stage1.max_iter))
    bad = train(
        "--stage", 1, "--data", tiny_set, "--run", tmp_path / "bad", "--from-scratch", "--base-lr", -1, check=False
    )
    assert bad.returncode == 1 and "--base-lr" in bad.stderr


def test_test_loss_curve_is_the_train_nets_loss_on_the_test_list(caffe, two_stage_run, one_image):
    """Fig. 6: every test_interval iterations (and at 0 and the end) the mean over the test images of
    the train net's losses; the last row equals the losses of the final weights recomputed here."""
    from redseg.data.prepared_set import list_path, read_list
    from redseg.toolchain.caffe_utils import import_caffe

    rows = read_log(two_stage_run / "stage1_test_log.csv")
    assert [r["iter"] for r in rows] == [0, 5, 10]
    assert all(np.isfinite(r["loss_ma"]) and np.isfinite(r["loss_he"]) for r in rows)
    rows2 = read_log(two_stage_run / "stage2_test_log.csv")
    assert [r["iter"] for r in rows2] == [0, 2, 4]
    import_caffe()
    net = caffe.Net(str(two_stage_run / "stage2_testloss.prototxt"), caffe.TEST)
    net.copy_from(str(two_stage_run / "stage2_final.caffemodel"))
    n = len(read_list(list_path(one_image, "test")))
    names = [b for b in net.outputs if b.startswith("loss_")]
    sums = dict.fromkeys(names, 0.0)
    for _ in range(n):
        net.forward()
        for b in names:
            sums[b] += net.blobs[b].data.item()
    last = rows2[-1]
    for b in names:
        assert last[b] == pytest.approx(sums[b] / n, rel=1e-5)
    assert last["loss_ma"] == pytest.approx(sum(v for b, v in sums.items() if b.startswith("loss_ma")) / n, rel=1e-5)
