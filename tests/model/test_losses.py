"""The two Red-Seg losses inside real Caffe nets: values, gradients, schedule, edge cases."""

from __future__ import annotations

import math

import numpy as np
import pytest
from loss_nets import NET, make_net, run

from redseg import config as C
from redseg.model.reference_losses import reference_fnfp, reference_lambda, reference_topk


def spaced_logits(rng, shape, scale=3.0):
    """Distinct logits at least ~0.05 apart, so a small finite-difference step never reorders them."""
    n = int(np.prod(shape))
    vals = np.linspace(-scale, scale, n) + rng.uniform(-0.005, 0.005, n)
    return rng.permutation(vals).reshape(shape).astype(np.float32)


def labels(rng, shape, frac=0.1):
    return (rng.random(shape) < frac).astype(np.float32)


def numeric_grad(net, x, y, idx, eps=2e-3):
    out = []
    for j in idx:
        xp, xm = x.copy(), x.copy()
        xp.flat[j] += eps
        xm.flat[j] -= eps
        net.blobs["y"].data[...] = y
        net.blobs["x"].data[...] = xp
        lp = net.forward()["loss"].item()
        net.blobs["x"].data[...] = xm
        lm = net.forward()["loss"].item()
        out.append((lp - lm) / (2 * eps))
    return np.array(out)


@pytest.mark.parametrize("layer", ["TopKBalancedCELoss", "FNFPLoss"])
def test_gradient_matches_finite_differences(caffe, tmp_path, layer):
    rng = np.random.default_rng(1)
    shape = (2, 1, 12, 16)
    # TEST phase: the Top-k iteration counter does not advance during the many forward passes.
    net, _ = make_net(caffe, tmp_path, layer, shape=(2, 12, 16), lw=1.5, phase="TEST")
    x, y = spaced_logits(rng, shape), labels(rng, shape)
    _, analytic = run(net, x, y)
    idx = rng.choice(x.size, 60, replace=False)
    # The loss comes back as float32: a larger step for the smooth FN+FP loss; Top-k needs a step
    # below the logit spacing so the selection stays fixed.
    eps = 2e-3 if layer == "TopKBalancedCELoss" else 2e-2
    num = numeric_grad(net, x, y, idx, eps) * 1.5  # the layer's top is unweighted; Caffe applies loss_weight
    np.testing.assert_allclose(analytic.flat[idx], num, rtol=2e-2, atol=2e-3)
    assert np.abs(analytic).max() > 0.01  # the check compared real gradients


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_topk_equals_reference(caffe, tmp_path, seed):
    rng = np.random.default_rng(seed)
    shape = (2, 1, 20, 30)
    net, layer = make_net(caffe, tmp_path, "TopKBalancedCELoss", shape=(2, 20, 30), lw=1.0)
    x = (rng.normal(size=shape) * 4).astype(np.float32)
    y = labels(rng, shape, 0.05)
    loss, grad = run(net, x, y)  # first TRAIN forward: r = 1, lambda = lambda0
    ref_loss, ref_grad = reference_topk(x, y, C.LAMBDA0)
    assert loss == pytest.approx(ref_loss, rel=1e-5)
    np.testing.assert_allclose(grad, ref_grad, rtol=1e-4, atol=1e-6)


def test_fnfp_equals_reference_and_is_fn_plus_fp(caffe, tmp_path):
    rng = np.random.default_rng(3)
    shape = (1, 1, 20, 30)
    net, _ = make_net(caffe, tmp_path, "FNFPLoss", shape=(1, 20, 30))
    x = (rng.normal(size=shape) * 3).astype(np.float32)
    y = labels(rng, shape, 0.2)
    loss, grad = run(net, x, y)
    ref_loss, ref_grad = reference_fnfp(x, y)
    assert loss == pytest.approx(ref_loss, rel=1e-5)
    np.testing.assert_allclose(grad, ref_grad, rtol=1e-4, atol=1e-7)
    # A hand case: p = 0.5 everywhere -> every pixel costs 0.25 whatever its label.
    loss0, _ = run(net, np.zeros(shape, np.float32), y)
    assert loss0 == pytest.approx(0.25 * x.size)


def test_extreme_logits_are_finite(caffe, tmp_path):
    shape = (1, 1, 4, 5)
    x = np.array([[-1e4, 1e4, -80, 80, 0] * 4], np.float32).reshape(shape)
    y = np.zeros(shape, np.float32)
    y.flat[::3] = 1
    for layer in ("TopKBalancedCELoss", "FNFPLoss"):
        net, _ = make_net(caffe, tmp_path, layer, shape=(1, 4, 5))
        loss, grad = run(net, x, y)
        assert math.isfinite(loss) and np.isfinite(grad).all()
        ref = reference_topk(x, y, C.LAMBDA0)[0] if layer == "TopKBalancedCELoss" else reference_fnfp(x, y)[0]
        assert loss == pytest.approx(ref, rel=1e-5)


S, M = C.LAMBDA_PERIOD, C.SCHEDULES["paper"].stage1.max_iter


@pytest.mark.parametrize(
    "r, expected",
    [
        (1, 0.14),
        (S - 1, 0.14),
        (S, 0.14 * (1 - S / M)),
        (2 * S, 0.14 * (1 - 2 * S / M)),
        (M, 0.14 * (1 - 9 * S / M)),  # floor(97200 / 10000) = 9
    ],
)
def test_lambda_staircase_and_kept_negatives(caffe, tmp_path, r, expected):
    net, layer = make_net(
        caffe,
        tmp_path,
        "TopKBalancedCELoss",
        param={"lambda0": 0.14, "period": S, "max_iter": M},
        shape=(1, 40, 50),
    )
    assert reference_lambda(r, 0.14, S, M) == pytest.approx(expected)
    rng = np.random.default_rng(r)
    shape = (1, 1, 40, 50)
    x, y = spaced_logits(rng, shape), labels(rng, shape, 0.05)
    layer.iteration = r - 1  # as the driver does on resume: r - 1 iterations already done
    _, grad = run(net, x, y)
    assert layer.iteration == r
    assert layer.last["lambda_"] == pytest.approx(expected)
    n_neg = int((y == 0).sum())
    k = math.ceil(round(expected * n_neg, 9))
    assert layer.last["k"] == k
    # Exactly k negatives carry a gradient, and they are the k with the largest logits.
    neg = y.ravel() == 0
    got = np.flatnonzero((grad.ravel() != 0) & neg)
    want = np.flatnonzero(neg)[np.argsort(-x.ravel()[neg])[:k]]
    assert set(got) == set(want)
    n_pos = int((~neg).sum())
    assert layer.last["beta"] == pytest.approx(k / (k + n_pos))


def test_counter_advances_per_training_forward(caffe, tmp_path):
    net, layer = make_net(caffe, tmp_path, "TopKBalancedCELoss", param={"lambda0": 0.5, "period": 2, "max_iter": 4})
    rng = np.random.default_rng(0)
    x, y = spaced_logits(rng, (1, 1, 12, 16)), labels(rng, (1, 1, 12, 16))
    lams = []
    for _ in range(4):
        run(net, x, y)
        lams.append(layer.last["lambda_"])
    assert lams == pytest.approx([0.5, 0.25, 0.25, 0.0])  # r = 1, 2, 3, 4 with S = 2, M = 4


def test_image_without_positives(caffe, tmp_path):
    """N+ = 0 gives beta = k / k = 1: the formula then weights the negatives by 1 - beta = 0."""
    net, layer = make_net(caffe, tmp_path, "TopKBalancedCELoss", shape=(2, 12, 16))
    rng = np.random.default_rng(5)
    x = spaced_logits(rng, (2, 1, 12, 16))
    y = np.zeros_like(x)
    y[1] = labels(rng, (1, 1, 12, 16), 0.1)  # image 0 has no lesion, image 1 has some
    loss, grad = run(net, x, y)
    assert np.all(grad[0] == 0)
    assert np.any(grad[1] != 0)
    assert loss == pytest.approx(reference_topk(x, y, C.LAMBDA0)[0], rel=1e-5)


def test_bad_param_str_and_shapes_are_python_errors(caffe, tmp_path):
    with pytest.raises(Exception, match="unknown param_str keys"):
        make_net(caffe, tmp_path, "TopKBalancedCELoss", param={"lamda0": 0.1})
    bad = tmp_path / "bad.prototxt"
    text = NET.format(n=1, h=4, w=4, lw=1, layer="FNFPLoss", param="{}")
    bad.write_text(text.replace("dim: 4 dim: 4", "dim: 4 dim: 5", 1))
    with pytest.raises(Exception, match="differ in shape"):
        caffe.Net(str(bad), caffe.TRAIN)


FOV_NET = """
force_backward: true
layer {{ name: "x" type: "Input" top: "x" input_param {{ shape {{ dim: 2 dim: 1 dim: {h} dim: {w} }} }} }}
layer {{ name: "y" type: "Input" top: "y" input_param {{ shape {{ dim: 2 dim: 1 dim: {h} dim: {w} }} }} }}
layer {{ name: "fov" type: "Input" top: "fov" input_param {{ shape {{ dim: 2 dim: 1 dim: {h} dim: {w} }} }} }}
layer {{ name: "loss" type: "Python" bottom: "x" bottom: "y" bottom: "fov" top: "loss" loss_weight: 1
  python_param {{ module: "losses" layer: "TopKBalancedCELoss" param_str: '{{"negatives": "fov"}}' }} }}
"""


def test_topk_counting_negatives_in_the_fov_only(caffe, tmp_path):
    """negatives "fov": N- and the k hardest are taken inside the field of view only; the surround
    carries no gradient even where its logits are the largest; equal to the float64 oracle."""
    rng = np.random.default_rng(5)
    h, w = 20, 30
    path = tmp_path / "fov.prototxt"
    path.write_text(FOV_NET.format(h=h, w=w))
    net = caffe.Net(str(path), caffe.TRAIN)
    x = (rng.normal(size=(2, 1, h, w)) * 3).astype(np.float32)
    y = labels(rng, (2, 1, h, w), 0.05)
    yy, xx = np.mgrid[:h, :w]
    fov = np.broadcast_to(((yy - h / 2) ** 2 + (xx - w / 2) ** 2 < (h / 2) ** 2), (2, 1, h, w)).astype(np.float32)
    y *= fov  # lesions lie inside the field of view
    x[fov == 0] += 10  # the surround has the largest logits: the image-wide rule would pick it
    net.blobs["fov"].data[...] = fov
    loss, grad = run(net, x, y)
    ref_loss, ref_grad = reference_topk(x, y, C.LAMBDA0, fov)
    assert loss == pytest.approx(ref_loss, rel=1e-5)
    np.testing.assert_allclose(grad, ref_grad, rtol=1e-4, atol=1e-6)
    assert not grad[fov == 0].any()
    k = net.layers[list(net._layer_names).index("loss")].last["k"]
    assert k == math.ceil(C.LAMBDA0 * int(((fov[1] > 0) & (y[1] == 0)).sum()))
    # the default rule on the same input selects surround pixels: the option changes the loss
    image_loss, image_grad = reference_topk(x, y, C.LAMBDA0)
    assert image_grad[fov == 0].any() and image_loss != pytest.approx(loss, rel=1e-3)


def test_topk_fov_option_needs_its_bottom(caffe, tmp_path):
    path = tmp_path / "nofov.prototxt"
    text = FOV_NET.format(h=4, w=4).replace(' bottom: "fov"', "")
    path.write_text(text)
    with pytest.raises(Exception, match="needs 3 bottoms"):
        caffe.Net(str(path), caffe.TRAIN)


def test_fnfp_gradient_has_no_subnormals(caffe, tmp_path):
    """Logits past about -44 make p^2 (1 - p) underflow below float32's smallest normal number: the
    layer writes zero there (subnormals slow every multiply of Caffe's backward pass on x86), and
    the normal gradients stay those of the float64 oracle."""
    net, _ = make_net(caffe, tmp_path, "FNFPLoss", shape=(1, 4, 8))
    x = np.linspace(-95, 5, 32, dtype=np.float32).reshape(1, 1, 4, 8)
    y = np.zeros_like(x)
    y[0, 0, -1, -1] = 1
    _, grad = run(net, x, y)
    tiny = np.finfo(np.float32).tiny
    assert not np.any((grad != 0) & (np.abs(grad) < tiny))
    _, ref = reference_fnfp(x, y)
    normal = np.abs(ref) >= tiny
    assert normal.sum() > 8 and not normal.all()  # both kinds present
    np.testing.assert_allclose(grad[normal], ref[normal], rtol=1e-4)
    assert np.all(grad[~normal] == 0)
