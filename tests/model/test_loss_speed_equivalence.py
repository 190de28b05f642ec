"""The fast Python layers (docs/performance.md) compute exactly what they computed before, faster.

python_layers/losses.py selects the Top-k negatives from a subsampled threshold guess plus an exact
partition of a candidate set, and evaluates the FN+FP loss with cancellation-free in-place
arithmetic. Both are checked here against redseg/model/reference_losses.py (full stable sort, float64,
written straight from paper section 2.2) through real Caffe nets: random inputs at several sizes
(including the paper's 1072x712, where the subsampling path runs) and batch sizes, and the edge
cases: no positives, all positives, k = 0, ties in logits, huge logits, NaN, the end of the lambda
schedule, and a subsample that guesses the threshold wrong. Also: the data layer's channel-first
cache gives the same blob as redseg.data.prepared_set.image_blob, and tools/benchmark.py runs end to end.
"""

from __future__ import annotations

import json
import logging
import math

import numpy as np
import pytest
from loss_nets import make_net, run

from redseg import config as C
from redseg.model.reference_losses import reference_fnfp, reference_lambda, reference_topk
from redseg.model.topk_schedule import kept_negatives

S, M = C.LAMBDA_PERIOD, C.SCHEDULES["paper"].stage1.max_iter
PAPER = {"lambda0": C.LAMBDA0, "period": S, "max_iter": M}


@pytest.fixture(scope="module")
def losses(caffe):
    import losses as mod  # python_layers/ is on sys.path once caffe is imported through redseg

    return mod


def stable_top_k(x: np.ndarray, is_pos: np.ndarray, k: int) -> np.ndarray:
    """The k negatives with the largest logits, ties to the lowest index (what a stable sort gives)."""
    neg = np.flatnonzero(~is_pos)
    return np.sort(neg[np.argsort(-x[neg].astype(np.float64), kind="stable")[:k]])


def check_topk(net, layer, x, y, lam, loss_rtol=1e-5):
    """Layer vs reference: loss, gradient, and per image exactly the reference's k negatives."""
    loss, grad = run(net, x, y)
    ref_loss, ref_grad = reference_topk(x, y, lam)
    assert layer.last["lambda_"] == pytest.approx(lam)
    assert math.isfinite(loss)
    assert loss == pytest.approx(ref_loss, rel=loss_rtol, abs=1e-30)
    np.testing.assert_allclose(grad, ref_grad, rtol=1e-4, atol=1e-6)
    for i in range(x.shape[0]):
        xi, pos = x[i].ravel(), y[i].ravel() > 0.5
        k = kept_negatives(lam, int((~pos).sum()))
        sel = layer._saved[i][1]
        assert sel.size == k
        np.testing.assert_array_equal(np.sort(sel), stable_top_k(xi, pos, k))
    return loss, grad


# --- the selection itself -------------------------------------------------------------------------


@pytest.mark.parametrize("n", [50, 4_000, 200_000, 763_264])
@pytest.mark.parametrize("pos_frac", [0.0, 0.03, 0.5])
def test_hardest_negatives_equals_stable_sort(losses, n, pos_frac):
    rng = np.random.default_rng(n + int(pos_frac * 100))
    is_pos = rng.random(n) < pos_frac
    n_neg = int((~is_pos).sum())
    for x in (
        rng.normal(0, 3, n).astype(np.float32),
        np.round(rng.normal(0, 2, n)).astype(np.float32),  # heavy ties at every threshold
    ):
        neg = np.flatnonzero(~is_pos)
        order = neg[np.argsort(-x[neg].astype(np.float64), kind="stable")]  # stable_top_k for every k at once
        for k in sorted({0, 1, 7, n_neg // 50, math.ceil(0.14 * n_neg), n_neg // 2, n_neg - 1, n_neg}):
            sel = losses.hardest_negatives(x, is_pos, k, n_neg)
            assert sel.size == k
            np.testing.assert_array_equal(np.sort(sel), np.sort(order[:k]))


def test_kth_largest_is_exact_whatever_the_guess(losses):
    """Right, wrong, equal and infinite brackets, on values with and without plateaus."""
    rng = np.random.default_rng(12)
    for trial in range(300):
        n = int(rng.integers(1, 3000))
        vals = rng.normal(0, 2, n).astype(np.float32)
        if trial % 2:
            vals = np.round(vals).astype(np.float32)  # plateaus everywhere
        if trial % 5 == 0:
            vals[: n // 2] = vals[0]  # one big plateau
        k = int(rng.integers(1, n + 1))
        want = np.sort(vals)[n - k]
        guesses = [(-np.inf, np.inf), (want, want)]
        guesses += [tuple(sorted(rng.choice(vals, 2))) for _ in range(3)]
        guesses += [tuple(sorted(rng.normal(0, 3, 2).astype(np.float32))) for _ in range(2)]
        for lo, hi in guesses:
            assert losses.kth_largest(vals, k, lo, hi) == want, (n, k, lo, hi)


def test_hardest_negatives_falls_back_when_the_subsample_misleads(losses, caplog):
    """Pixels on the subsample grid are the largest: the guessed bound is too high, the answer stays exact."""
    rng = np.random.default_rng(7)
    n = 712 * 1072
    x = rng.normal(0, 1, n).astype(np.float32)
    step = n // losses.SAMPLE_TARGET
    x[::step] = 50 + rng.random(x[::step].size).astype(np.float32)
    is_pos = np.zeros(n, bool)
    is_pos[1::97] = True
    n_neg = int((~is_pos).sum())
    k = math.ceil(0.14 * n_neg)
    with caplog.at_level(logging.DEBUG, logger="losses"):
        sel = losses.hardest_negatives(x, is_pos, k, n_neg)
    assert "exact fallback" in caplog.text
    np.testing.assert_array_equal(np.sort(sel), stable_top_k(x, is_pos, k))


# --- the Caffe layers against the reference -------------------------------------------------------


@pytest.mark.parametrize(
    "shape, pos_frac",
    [((1, 712, 1072), 0.01), ((2, 356, 536), 0.05), ((3, 48, 64), 0.1), ((2, 7, 5), 0.3)],
)
def test_topk_equals_reference_random(caffe, tmp_path, shape, pos_frac):
    rng = np.random.default_rng(sum(shape))
    net, layer = make_net(caffe, tmp_path, "TopKBalancedCELoss", shape, PAPER)
    x = (rng.normal(size=(shape[0], 1, *shape[1:])) * 4).astype(np.float32)
    y = (rng.random(x.shape) < pos_frac).astype(np.float32)
    check_topk(net, layer, x, y, C.LAMBDA0)


@pytest.mark.parametrize("shape", [(1, 712, 1072), (2, 356, 536), (2, 40, 50)])
def test_fnfp_equals_reference_random(caffe, tmp_path, shape):
    rng = np.random.default_rng(sum(shape))
    net, _ = make_net(caffe, tmp_path, "FNFPLoss", shape, lw=1.0)
    x = (rng.normal(size=(shape[0], 1, *shape[1:])) * 4).astype(np.float32)
    y = (rng.random(x.shape) < 0.05).astype(np.float32)
    loss, grad = run(net, x, y)
    ref_loss, ref_grad = reference_fnfp(x, y)
    assert loss == pytest.approx(ref_loss, rel=1e-5)
    np.testing.assert_allclose(grad, ref_grad, rtol=1e-4, atol=1e-7)


def test_loss_weight_scales_both_gradients(caffe, tmp_path):
    rng = np.random.default_rng(11)
    shape = (1, 30, 40)
    x = (rng.normal(size=(1, 1, 30, 40)) * 3).astype(np.float32)
    y = (rng.random(x.shape) < 0.1).astype(np.float32)
    for layer, ref in (("TopKBalancedCELoss", lambda: reference_topk(x, y, C.LAMBDA0)[1]), ("FNFPLoss", None)):
        net, _ = make_net(caffe, tmp_path, layer, shape, PAPER if ref else None, lw=2.5)
        _, grad = run(net, x, y)
        want = ref() if ref else reference_fnfp(x, y)[1]
        np.testing.assert_allclose(grad, 2.5 * want, rtol=1e-4, atol=1e-6)


# --- edge cases -----------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(2, 712, 1072), (2, 20, 30)])
def test_topk_no_positives_and_all_positives(caffe, tmp_path, shape):
    """Image 0 has no positive (beta = 1: the negatives weigh 1 - beta = 0), image 1 is all positive (k = 0)."""
    rng = np.random.default_rng(3)
    net, layer = make_net(caffe, tmp_path, "TopKBalancedCELoss", shape, PAPER)
    x = (rng.normal(size=(2, 1, *shape[1:])) * 3).astype(np.float32)
    y = np.zeros_like(x)
    y[1] = 1
    loss, grad = check_topk(net, layer, x, y, C.LAMBDA0)
    assert loss == 0.0 and not grad[0].any()
    assert layer.last == dict(lambda_=C.LAMBDA0, k=0, beta=0.0, n_pos=x[1].size)
    assert not grad[1].any()  # beta = 0/(0 + N+) = 0: the positives weigh 0 too, as the formula says


def test_topk_k_zero_at_the_end_of_a_schedule_reaching_zero(caffe, tmp_path):
    """S divides M: lambda(M) = 0, so k = 0 and only positives count (beta = 0 -> weight 0)."""
    shape = (1, 30, 40)
    net, layer = make_net(caffe, tmp_path, "TopKBalancedCELoss", shape, {"lambda0": 0.5, "period": 2, "max_iter": 4})
    rng = np.random.default_rng(4)
    x = (rng.normal(size=(1, 1, 30, 40)) * 3).astype(np.float32)
    y = (rng.random(x.shape) < 0.1).astype(np.float32)
    layer.iteration = 3
    loss, grad = check_topk(net, layer, x, y, 0.0)
    assert layer.last["k"] == 0 and loss == 0.0 and not grad.any()


@pytest.mark.parametrize("shape", [(1, 712, 1072), (2, 30, 40)])
def test_topk_paper_schedule_end(caffe, tmp_path, shape):
    """r = M = 97,200 with S = 10,000: lambda = 0.14 (1 - 9 S / M), the last step of the staircase."""
    net, layer = make_net(caffe, tmp_path, "TopKBalancedCELoss", shape, PAPER)
    rng = np.random.default_rng(5)
    x = (rng.normal(size=(shape[0], 1, *shape[1:])) * 4).astype(np.float32)
    y = (rng.random(x.shape) < 0.02).astype(np.float32)
    layer.iteration = M - 1
    lam = reference_lambda(M, C.LAMBDA0, S, M)
    assert lam == pytest.approx(0.14 * (1 - 9 * S / M))
    check_topk(net, layer, x, y, lam)
    assert layer.iteration == M


@pytest.mark.parametrize("shape", [(1, 712, 1072), (2, 24, 32)])
def test_topk_ties_in_logits(caffe, tmp_path, shape):
    """Logits on a coarse grid (and a constant plateau) tie at the threshold: the loss is the same
    whichever tied pixels are taken, exactly k are taken, and they are the stable sort's."""
    rng = np.random.default_rng(6)
    net, layer = make_net(caffe, tmp_path, "TopKBalancedCELoss", shape, PAPER)
    x = np.round(rng.normal(size=(shape[0], 1, *shape[1:])) * 2).astype(np.float32) / 2
    x[..., : shape[1] // 3, :] = 1.5  # a large plateau (like a fundus photograph's black surround)
    y = (rng.random(x.shape) < 0.05).astype(np.float32)
    loss, grad = check_topk(net, layer, x, y, C.LAMBDA0, loss_rtol=1e-6)
    for i in range(shape[0]):
        neg = y[i].ravel() == 0
        k = kept_negatives(C.LAMBDA0, int(neg.sum()))
        assert np.count_nonzero(grad[i].ravel()[neg]) == k  # every logit is moderate: p > 0


@pytest.mark.parametrize("shape", [(1, 712, 1072), (1, 20, 25)])
def test_huge_logits(caffe, tmp_path, shape):
    """Logits of +-1e4 (and +-80, 0) mixed with ordinary ones: finite, equal to the reference."""
    rng = np.random.default_rng(8)
    x = (rng.normal(size=(1, 1, *shape[1:])) * 3).astype(np.float32)
    flat = x.reshape(-1)
    idx = rng.permutation(flat.size)
    q = flat.size // 8
    flat[idx[:q]], flat[idx[q : 2 * q]] = 1e4, -1e4
    flat[idx[2 * q : 2 * q + 5]] = (80, -80, 0, -0.0, 1e4)
    y = (rng.random(x.shape) < 0.2).astype(np.float32)
    net, layer = make_net(caffe, tmp_path, "TopKBalancedCELoss", shape, PAPER)
    loss, grad = check_topk(net, layer, x, y, C.LAMBDA0)
    assert np.isfinite(grad).all() and loss > 1e4
    net, _ = make_net(caffe, tmp_path, "FNFPLoss", shape)
    loss, grad = run(net, x, y)
    ref_loss, ref_grad = reference_fnfp(x, y)
    assert math.isfinite(loss) and np.isfinite(grad).all()
    assert loss == pytest.approx(ref_loss, rel=1e-6)
    np.testing.assert_allclose(grad, ref_grad, rtol=1e-4, atol=1e-7)


def test_fnfp_keeps_relative_precision_near_saturation(caffe, tmp_path):
    """p close to 1 with y = 1 (and close to 0 with y = 0): (p - y) and the gradient are tiny but
    must not be rounded away; float32 1 - p would lose them."""
    x = np.concatenate([np.linspace(5, 15, 50), np.linspace(-15, -5, 50)]).astype(np.float32).reshape(1, 1, 10, 10)
    y = (x > 0).astype(np.float32)
    net, _ = make_net(caffe, tmp_path, "FNFPLoss", (1, 10, 10))
    loss, grad = run(net, x, y)
    ref_loss, ref_grad = reference_fnfp(x, y)
    assert loss == pytest.approx(ref_loss, rel=1e-5)
    np.testing.assert_allclose(grad, ref_grad, rtol=1e-5, atol=0)
    assert np.all(grad != 0)


def test_nan_logits_stop_the_forward_pass(caffe, tmp_path):
    """A diverged net must not hide, nor reach Caffe's backward pass (unsafe on NaN activations)."""
    x = np.zeros((1, 1, 10, 12), np.float32)
    x[0, 0, 3, 4] = np.nan
    y = np.zeros_like(x)
    y[0, 0, 0, 0] = 1
    for layer in ("TopKBalancedCELoss", "FNFPLoss"):
        net, _ = make_net(caffe, tmp_path, layer, (1, 10, 12))
        with pytest.raises(FloatingPointError, match="the loss is nan"):
            run(net, x, y)


# --- the data layer keeps its output --------------------------------------------------------------


def test_data_layer_output_equals_image_blob(caffe, tmp_path, tiny_set):
    """The channel-first cache and fused subtraction give exactly redseg.data.prepared_set.image_blob's blob."""
    from redseg.data.prepared_set import image_blob, load_sample, mean_bgr, read_list

    path = tmp_path / "data.prototxt"
    param = json.dumps({"list": str(tiny_set / "train.txt"), "shuffle": False})
    path.write_text(
        'layer { name: "d" type: "Python" top: "data" top: "label_ma" top: "label_he" '
        f'python_param {{ module: "data_layer" layer: "RedSegData" param_str: \'{param}\' }} }}\n'
    )
    net = caffe.Net(str(path), caffe.TRAIN)
    samples = read_list(tiny_set / "train.txt")
    mean = mean_bgr(tiny_set)
    for i in range(len(samples) + 2):  # past the end of an epoch: cached samples
        net.forward()
        img, ma, he = load_sample(samples[i % len(samples)])
        np.testing.assert_array_equal(net.blobs["data"].data, image_blob(img, mean))
        np.testing.assert_array_equal(net.blobs["label_ma"].data[0, 0], ma)
        np.testing.assert_array_equal(net.blobs["label_he"].data[0, 0], he)


# --- the benchmark that measures all this (tools/benchmark.py) -----------------------------------


def test_benchmark_tool_runs_and_writes_the_json(tmp_path, venv_python):
    """A tiny run of the benchmark (docs/performance.md): real nets, every measurement, same numbers."""
    import subprocess
    from pathlib import Path

    repo = Path(__file__).resolve().parents[2]
    out = tmp_path / "bench.json"
    cmd = [venv_python, str(repo / "tools" / "benchmark.py"), "--size", "48x64", "--repeats", "1"]
    cmd += ["--fast-repeats", "2", "--warmup", "0", "--json", str(out), "-q"]
    cmd += ["--no-memory"]  # the per-net memory runs: tests/toolchain/test_shared_col.py
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "speed-up over the reference" in proc.stdout and "Where a stage1 iteration goes" in proc.stdout
    r = json.loads(out.read_text())
    for stage in ("stage1", "stage2"):
        assert r["iteration_s"][stage]["median"] > 0
        assert r["loss_layers_ms"][stage]["median"] > 0
        assert r["loss_check"][stage]["ok"], r["loss_check"]
        assert r["loss_speedup"][stage] > 0
        assert r["stages"][stage]["n_loss_layers"] == 8
        names = {row["name"] for row in r["stages"][stage]["layers"]}
        assert {"conv1_1", "loss_ma_fuse", "loss_he_conv5"} <= names
    assert r["data_layer_ms"]["median"] > 0 and r["forward_s"]["median"] > 0 and r["scoring_s"]["median"] > 0
    assert r["peak_rss_mb"] > 0 and "targets" not in r  # the targets are in docs/performance.md
    assert "memory" not in r
    assert r["blas"]["summary"] in proc.stdout and r["blas"]["core"], r["blas"]  # redseg/toolchain/blas.py
