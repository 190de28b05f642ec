"""Red-Seg's two training losses as Caffe ``Python`` layers (paper section 2.2; SPEC "Losses").

Both take ``bottom[0]``: logits x (N x 1 x H x W) and ``bottom[1]``: labels y in {0, 1} of the same
shape, and output one scalar. p = sigmoid(x). Sums run over the pixels of each image and over the
images of the batch ([assumption, SPEC]: sums, not means, as in HED; this is what makes the paper's
learning rates 1e-8 / 1e-9 sensible). ``param_str`` is JSON.

* :class:`TopKBalancedCELoss`, stage 1:
  ``L1 = -beta * sum_{y=1} log p - (1 - beta) * sum_{top-k negatives} log(1 - p)``,
  ``beta = k / (k + N+)``, where the top-k negatives are the k = ceil(lambda(r) * N-) negatives
  with the largest loss -log(1 - p) and lambda(r) follows the paper's staircase schedule
  (:func:`redseg.schedule.topk_lambda`). beta is a constant in the gradient.
* :class:`FNFPLoss`, stage 2: ``L2 = sum y (1-p)^2 + sum (1-y) p^2 = sum (y - p)^2``.

Numerically stable for any logit: -log p = softplus(-x), -log(1-p) = softplus(x), computed as
max(x, 0) + log1p(exp(-|x|)); no per-pixel Python loops; float32 throughout.
"""

from __future__ import annotations

import json

import caffe
import numpy as np

from redseg import config as C
from redseg.schedule import kept_negatives, topk_lambda


def _parse_params(param_str: str, defaults: dict, layer: str) -> dict:
    try:
        given = json.loads(param_str) if param_str.strip() else {}
    except json.JSONDecodeError as e:
        raise ValueError(f"{layer}: param_str must be JSON, got {param_str!r} ({e})") from e
    unknown = set(given) - set(defaults)
    if unknown:
        raise ValueError(f"{layer}: unknown param_str keys {sorted(unknown)}; known: {sorted(defaults)}")
    return {**defaults, **given}


def _check_bottoms(layer: str, bottom) -> None:
    if len(bottom) != 2:
        raise ValueError(f"{layer}: needs 2 bottoms (logits, labels), got {len(bottom)}")
    if bottom[0].data.shape != bottom[1].data.shape:
        raise ValueError(
            f"{layer}: logits {bottom[0].data.shape} and labels {bottom[1].data.shape} differ in shape"
        )


def sigmoid(x: np.ndarray) -> np.ndarray:
    """Stable logistic function, same dtype as ``x``."""
    e = np.exp(-np.abs(x))
    return np.where(x >= 0, 1, e) / (1 + e)


def softplus(x: np.ndarray) -> np.ndarray:
    """log(1 + exp(x)) without overflow: -log(1 - sigmoid(x))."""
    return np.maximum(x, 0) + np.log1p(np.exp(-np.abs(x)))


def select_top_k(x: np.ndarray, is_pos: np.ndarray, k: int) -> np.ndarray:
    """Indices of the k negatives with the largest logit (= the largest loss -log(1-p)).

    -log(1 - sigmoid(x)) is increasing in x, so selecting by x selects by loss. O(N) selection
    (introselect), not a full sort.
    """
    if k <= 0:
        return np.empty(0, dtype=np.intp)
    masked = np.where(is_pos, np.float32(-np.inf), x)
    return np.argpartition(masked, masked.size - k)[masked.size - k :]


class TopKBalancedCELoss(caffe.Layer):
    """Stage-1 loss with the scheduled Top-k hard-negative selection (section 2.2, eq. L1).

    param_str keys: ``lambda0`` (0.14), ``period`` S (10,000), ``max_iter`` M (97,200).
    In the TRAIN phase each forward pass is one iteration: a new layer starts at r = 1. The
    training driver sets :attr:`iteration` to the solver's iteration on resume so the staircase
    continues where it stopped.
    """

    def setup(self, bottom, top):
        p = _parse_params(
            self.param_str,
            dict(lambda0=C.LAMBDA0, period=C.LAMBDA_PERIOD, max_iter=C.SCHEDULES["paper"].stage1.max_iter),
            "TopKBalancedCELoss",
        )
        self.lambda0, self.period, self.max_iter = float(p["lambda0"]), int(p["period"]), int(p["max_iter"])
        if not 0 < self.lambda0 <= 1 or self.period < 1 or self.max_iter < 1:
            raise ValueError(
                f"TopKBalancedCELoss: bad param_str {p}: need 0 < lambda0 <= 1, period, max_iter >= 1"
            )
        self.train = self.phase == caffe.TRAIN
        self.iteration = 0  # forward passes done in TRAIN (= completed solver iterations)
        self.last = {}  # lambda, k, beta, n_pos of the last forward (for logs and tests)

    def reshape(self, bottom, top):
        _check_bottoms("TopKBalancedCELoss", bottom)
        top[0].reshape(1)

    def current_lambda(self) -> float:
        return topk_lambda(max(self.iteration, 1), self.lambda0, self.period, self.max_iter)

    def forward(self, bottom, top):
        if self.train:
            self.iteration += 1
        lam = self.current_lambda()
        n = bottom[0].data.shape[0]
        x = bottom[0].data.reshape(n, -1)
        y = bottom[1].data.reshape(n, -1)
        self._saved = []
        total = 0.0
        for i in range(n):
            is_pos = y[i] > 0.5
            pos = np.flatnonzero(is_pos)
            k = kept_negatives(lam, is_pos.size - pos.size)
            sel = select_top_k(x[i], is_pos, k)
            beta = k / (k + pos.size) if k + pos.size else 0.0
            xp, xs = x[i, pos], x[i, sel]
            total += beta * float(softplus(-xp).sum(dtype=np.float64))
            total += (1 - beta) * float(softplus(xs).sum(dtype=np.float64))
            self._saved.append((pos, sel, beta))
            self.last = dict(lambda_=lam, k=k, beta=beta, n_pos=int(pos.size))
        top[0].data[0] = total

    def backward(self, top, propagate_down, bottom):
        if not propagate_down[0]:
            return
        scale = np.float32(top[0].diff[0])
        n = bottom[0].data.shape[0]
        x = bottom[0].data.reshape(n, -1)
        diff = bottom[0].diff.reshape(n, -1)
        diff[...] = 0
        for i, (pos, sel, beta) in enumerate(self._saved):
            # d/dx of -beta log p = beta (p - 1); of -(1-beta) log(1-p) = (1-beta) p.
            diff[i, pos] = np.float32(beta) * scale * (sigmoid(x[i, pos]) - 1)
            diff[i, sel] = np.float32(1 - beta) * scale * sigmoid(x[i, sel])


class FNFPLoss(caffe.Layer):
    """Stage-2 loss: false negatives + false positives (section 2.2, eq. L2).

    FN = sum y (1-p)^2, FP = sum (1-y) p^2; for y in {0,1}, FN + FP = sum (y - p)^2, whose
    gradient w.r.t. the logit is 2 (p - y) p (1 - p). param_str: ``{}``.
    """

    def setup(self, bottom, top):
        _parse_params(self.param_str, {}, "FNFPLoss")

    def reshape(self, bottom, top):
        _check_bottoms("FNFPLoss", bottom)
        top[0].reshape(1)

    def forward(self, bottom, top):
        p = sigmoid(bottom[0].data)
        d = p - bottom[1].data
        top[0].data[0] = float(np.square(d).sum(dtype=np.float64))
        self._grad = 2 * d * p * (1 - p)

    def backward(self, top, propagate_down, bottom):
        if propagate_down[0]:
            np.multiply(self._grad, np.float32(top[0].diff[0]), out=bottom[0].diff)
