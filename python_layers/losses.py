"""Red-Seg's two training losses as Caffe ``Python`` layers (paper §2.2; docs/method.md#losses).

Both take ``bottom[0]``: logits x (N x 1 x H x W) and ``bottom[1]``: labels y in {0, 1} of the same
shape, and output one scalar. p = sigmoid(x). Sums run over the pixels of each image and over the
images of the batch ([assumption, docs/method.md#loss-reduction]: sums, not means, as in HED; this
is what makes the paper's learning rates 1e-8 / 1e-9 sensible). ``param_str`` is JSON.

* :class:`TopKBalancedCELoss`, stage 1:
  ``L1 = -beta * sum_{y=1} log p - (1 - beta) * sum_{top-k negatives} log(1 - p)``,
  ``beta = k / (k + N+)``, where the top-k negatives are the k = ceil(lambda(r) * N-) negatives
  with the largest loss -log(1 - p) and lambda(r) follows the paper's staircase schedule
  (:func:`redseg.model.topk_schedule.topk_lambda`). beta is a constant in the gradient.
* :class:`FNFPLoss`, stage 2: ``L2 = sum y (1-p)^2 + sum (1-y) p^2 = sum (y - p)^2``.

Numerically stable for any logit: -log p = softplus(-x), -log(1-p) = softplus(x), computed as
max(x, 0) + log1p(exp(-|x|)); no per-pixel Python loops; float32 element-wise; the Top-k sums in
float64, the FN+FP sum by numpy's float32 pairwise summation (~1e-7 relative).

Why the implementation looks the way it does (docs/performance.md): on a GPU the net takes a
fraction of a second per iteration at 1072x712, while these 8 layers run on the CPU every iteration.
So the Top-k layer finds its k hardest negatives by *selection* (an exact threshold found on a small
candidate set, see :func:`hardest_negatives`) instead of sorting or partitioning all ~763k pixels,
evaluates softplus and sigmoid only on the pixels that carry a loss (positives and the selected
negatives, ~15 % of the image), and scatters its gradient into a zeroed diff. The FN+FP layer
works in place in preallocated float32 buffers. What is computed is exactly the formula above;
tests/model/test_loss_speed_equivalence.py checks it against the float64 oracle redseg/model/reference_losses.py.
"""

from __future__ import annotations

import json
import logging
import math

import caffe
import numpy as np

from redseg import config as C
from redseg.model.topk_schedule import kept_negatives, topk_lambda

log = logging.getLogger(__name__)

# Stride subsample used to guess the Top-k threshold: about this many pixels (see hardest_negatives).
SAMPLE_TARGET = 32_768
# Margin of the guess, in binomial standard deviations (plus a constant): the guessed lower bound
# leaves fewer than k negatives above it only if the subsample is far off, and then the exact
# fallback runs. Larger = safer guess, larger candidate set.
SAMPLE_SIGMAS = 4.0
SAMPLE_SLACK = 16

# Which negatives lambda counts (docs/method.md#counting-negatives): the default first.
NEGATIVES = ("image", "fov")

_TINY = np.finfo(np.float32).tiny  # the smallest normal float32
_F1 = np.float32(1)
_F0 = np.float32(0)
_F2 = np.float32(2)


def _parse_params(param_str: str, defaults: dict, layer: str) -> dict:
    try:
        given = json.loads(param_str) if param_str.strip() else {}
    except json.JSONDecodeError as e:
        raise ValueError(f"{layer}: param_str must be JSON, got {param_str!r} ({e})") from e
    unknown = set(given) - set(defaults)
    if unknown:
        raise ValueError(f"{layer}: unknown param_str keys {sorted(unknown)}; known: {sorted(defaults)}")
    return {**defaults, **given}


class NonFiniteLossError(FloatingPointError):
    """The loss is NaN or infinite: the net has diverged.

    Raised in the forward pass, so the solver step stops before Caffe's backward pass, which is not
    safe on NaN activations (a max-pooling window of NaNs keeps mask index -1, and its backward
    then writes outside the blob: "double free or corruption"). tools/train.py reports it.
    """


def _finite(loss: float, layer: str, iteration: int | None = None) -> float:
    if not math.isfinite(loss):
        at = f" at stage iteration {iteration}" if iteration is not None else ""
        raise NonFiniteLossError(f"{layer}: the loss is {loss}{at}; the net has diverged (NaN or infinite logits)")
    return loss


def _check_bottoms(layer: str, bottom) -> None:
    if len(bottom) != 2:
        raise ValueError(f"{layer}: needs 2 bottoms (logits, labels), got {len(bottom)}")
    if bottom[0].data.shape != bottom[1].data.shape:
        raise ValueError(f"{layer}: logits {bottom[0].data.shape} and labels {bottom[1].data.shape} differ in shape")


def softplus_sigmoid(v: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(softplus(v), sigmoid(v))`` for a float32 array, stable for any v, sharing exp(-|v|).

    softplus(v) = log(1 + e^v) = -log(1 - sigmoid(v)) = max(v, 0) + log1p(exp(-|v|)); sigmoid(v) =
    1 / (1 + e) for v >= 0 and e / (1 + e) for v < 0, with e = exp(-|v|) in (0, 1]: nothing
    overflows, and small probabilities keep their relative precision.
    """
    e = np.abs(v)
    np.negative(e, out=e)
    np.exp(e, out=e)
    sp = np.log1p(e)
    sp += np.maximum(v, _F0)
    sig = np.where(v >= 0, _F1, e)
    e += _F1
    sig /= e
    return sp, sig


def kth_largest(vals: np.ndarray, k: int, lo: float, hi: float) -> np.float32:
    """The k-th largest of ``vals`` (1 <= k <= vals.size), exactly, helped by a guess lo <= t <= hi.

    Counting against the two guesses settles most cases without partitioning anything: the answer
    is ``hi`` or ``lo`` themselves when they sit on a run of equal values (a plateau of identical
    logits, e.g. a photograph's uniform black surround, which makes ``np.partition`` ten times
    slower), else ``np.partition`` runs on the values strictly between them only. A wrong guess
    only moves the work to a larger subset; the answer does not depend on it.
    """
    n_gt_hi = int(np.count_nonzero(vals > hi))
    if n_gt_hi >= k:  # t > hi
        sub = vals[vals > hi]
        return np.partition(sub, sub.size - k)[sub.size - k]
    n_ge_hi = int(np.count_nonzero(vals >= hi))
    if n_ge_hi >= k:
        return np.float32(hi)
    n_gt_lo = int(np.count_nonzero(vals > lo))
    if n_gt_lo < k:  # t <= lo
        n_ge_lo = int(np.count_nonzero(vals >= lo))
        if n_ge_lo >= k:
            return np.float32(lo)
        sub = vals[vals < lo]
        need = k - n_ge_lo
        return np.partition(sub, sub.size - need)[sub.size - need]
    sub = vals[(vals > lo) & (vals < hi)]
    need = k - n_ge_hi
    return np.partition(sub, sub.size - need)[sub.size - need]


def hardest_negatives(x: np.ndarray, is_pos: np.ndarray, k: int, n_neg: int) -> np.ndarray:
    """Indices of the k negatives (``~is_pos``) with the largest logits, i.e. the largest loss.

    -log(1 - sigmoid(x)) is increasing in x, so selecting by x selects by loss. Exact, with ties
    at the threshold broken towards the lowest index (as a stable sort would). ``x`` is 1-D float32
    without NaN.

    Instead of partitioning all pixels: the k-th largest negative logit t is bracketed from a
    stride subsample (~32k pixels): a lower bound a few binomial standard deviations below the
    subsample's estimate keeps the candidates ``x >= bound`` a little more than k, and an upper
    bound as far above it leaves the exact search (:func:`kth_largest`) a thin band of values.
    When the lower bound turns out too high (fewer than k negative candidates: an unlucky or
    adversarial subsample) it falls back to all negatives, so the result never depends on the
    guess, only the time does.
    """
    if k <= 0:
        return np.empty(0, dtype=np.intp)
    if k >= n_neg:
        return np.flatnonzero(~is_pos)
    n_pos = x.size - n_neg
    cand = None
    lo, hi = -np.inf, np.inf
    step = x.size // SAMPLE_TARGET
    if step >= 4:  # large image: the guess pays for itself
        xs, ps = x[::step], is_pos[::step]
        if n_pos:
            xs = xs[~ps]
        m = xs.size
        q = k / n_neg
        margin = SAMPLE_SIGMAS * math.sqrt(q * (1 - q) * m) + SAMPLE_SLACK
        above_lo = math.ceil(q * m + margin)  # subsample values >= lo: more than its share of k
        above_hi = math.floor(q * m - margin)  # subsample values >= hi: fewer
        if above_lo < m:
            ranks = [m - above_lo] + ([m - above_hi] if above_hi >= 1 else [])
            part = np.partition(xs, ranks)
            lo = part[ranks[0]]
            hi = part[ranks[1]] if len(ranks) > 1 else np.inf
            cand = np.flatnonzero(x >= lo)
            if n_pos:
                cand = cand[~is_pos[cand]]
            if cand.size < k:
                log.debug("top-k guess too high (%d candidates < k = %d): exact fallback", cand.size, k)
                cand, lo, hi = None, -np.inf, np.inf
    if cand is None:
        cand = np.flatnonzero(~is_pos)
    if cand.size == k:
        return cand
    vals = x[cand]
    t = kth_largest(vals, k, lo, hi)  # the k-th largest negative logit
    above_t = vals > t
    n_above = int(np.count_nonzero(above_t))
    if n_above == k:
        return cand[above_t]
    ties = cand[vals == t][: k - n_above]
    return np.concatenate((cand[above_t], ties))


def topk_image(x: np.ndarray, y: np.ndarray, lam: float, fov: np.ndarray | None = None):
    """One image of the stage-1 loss: ``(loss, pos, sel, g_pos, g_sel, k, beta, n_pos)``.

    ``x``, ``y``: 1-D float32 logits and labels. ``pos``/``sel``: indices of the positives and of
    the k selected negatives; ``g_pos``/``g_sel``: dL/dx there (float32; zero elsewhere):
    -beta * (1 - p) and (1 - beta) * p. A NaN logit makes the loss NaN (and ``pos`` None) even when
    it lies outside the selection; the layer then raises :class:`NonFiniteLossError`.

    ``fov`` (optional, 1-D, non-zero inside the field of view): the negatives are only those inside
    it, so N- and the k hardest are counted there and the black surround carries no loss
    (docs/method.md#counting-negatives; the default counts every pixel).
    """
    is_pos = y > 0.5
    pos = np.flatnonzero(is_pos)
    n_pos = int(pos.size)
    # Pixels that can never be selected as negatives: the positives, and outside the FOV if given.
    excluded = is_pos if fov is None else is_pos | (fov <= 0.5)
    n_neg = x.size - int(np.count_nonzero(excluded))
    k = kept_negatives(lam, n_neg)
    beta = k / (k + n_pos) if k + n_pos else 0.0
    if np.isnan(x.max()):
        return math.nan, None, None, None, None, k, beta, n_pos
    sel = hardest_negatives(x, excluded, k, n_neg)
    sp_pos, q_pos = softplus_sigmoid(np.negative(x[pos]))  # -log p = softplus(-x); 1 - p = sigmoid(-x)
    sp_sel, p_sel = softplus_sigmoid(x[sel])  # -log(1 - p) = softplus(x)
    loss = beta * float(sp_pos.sum(dtype=np.float64)) + (1 - beta) * float(sp_sel.sum(dtype=np.float64))
    q_pos *= np.float32(-beta)
    p_sel *= np.float32(1 - beta)
    return loss, pos, sel, q_pos, p_sel, k, beta, n_pos


class TopKBalancedCELoss(caffe.Layer):
    """Stage-1 loss with the scheduled Top-k hard-negative selection (section 2.2, eq. L1).

    param_str keys: ``lambda0`` (0.14), ``period`` S (10,000), ``max_iter`` M (97,200),
    ``negatives``: ``"image"`` (default: every negative pixel of the image) or ``"fov"`` (only those
    inside the field of view, given as a third bottom: 1 inside, 0 outside; the data layer's
    ``fov`` top).
    In the TRAIN phase each forward pass is one iteration: a new layer starts at r = 1. The
    training driver sets :attr:`iteration` to the solver's iteration on resume so the staircase
    continues where it stopped.
    """

    def setup(self, bottom, top):
        p = _parse_params(
            self.param_str,
            dict(
                lambda0=C.LAMBDA0,
                period=C.LAMBDA_PERIOD,
                max_iter=C.SCHEDULES["paper"].stage1.max_iter,
                negatives=NEGATIVES[0],
            ),
            "TopKBalancedCELoss",
        )
        if p["negatives"] not in NEGATIVES:
            raise ValueError(f"TopKBalancedCELoss: negatives must be one of {NEGATIVES}, got {p['negatives']!r}")
        self.use_fov = p["negatives"] == "fov"
        if len(bottom) != (3 if self.use_fov else 2):
            raise ValueError(
                f"TopKBalancedCELoss: negatives {p['negatives']!r} needs {3 if self.use_fov else 2} bottoms "
                f"(logits, labels{', field of view' if self.use_fov else ''}), got {len(bottom)}"
            )
        self.lambda0, self.period, self.max_iter = float(p["lambda0"]), int(p["period"]), int(p["max_iter"])
        if not 0 < self.lambda0 <= 1 or self.period < 1 or self.max_iter < 1:
            raise ValueError(f"TopKBalancedCELoss: bad param_str {p}: need 0 < lambda0 <= 1, period, max_iter >= 1")
        self.train = self.phase == caffe.TRAIN
        self.iteration = 0  # forward passes done in TRAIN (= completed solver iterations)
        self.last = {}  # lambda, k, beta, n_pos of the last forward (for logs and tests)
        self._saved = []

    def reshape(self, bottom, top):
        _check_bottoms("TopKBalancedCELoss", [bottom[0], bottom[1]])  # pycaffe's vector does not slice
        if self.use_fov and bottom[2].data.shape != bottom[1].data.shape:
            raise ValueError(f"TopKBalancedCELoss: field of view {bottom[2].data.shape} and labels differ in shape")
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
        fov = bottom[2].data.reshape(n, -1) if self.use_fov else [None] * n
        self._saved = []
        total = 0.0
        for i in range(n):
            loss, pos, sel, g_pos, g_sel, k, beta, n_pos = topk_image(x[i], y[i], lam, fov[i])
            total += loss
            self._saved.append((pos, sel, g_pos, g_sel))
            self.last = dict(lambda_=lam, k=k, beta=beta, n_pos=n_pos)
        top[0].data[0] = _finite(total, "TopKBalancedCELoss", self.iteration)

    def backward(self, top, propagate_down, bottom):
        if not propagate_down[0]:
            return
        scale = np.float32(top[0].diff[0])
        n = bottom[0].data.shape[0]
        diff = bottom[0].diff.reshape(n, -1)
        diff.fill(0)
        for i, (pos, sel, g_pos, g_sel) in enumerate(self._saved):
            if scale != 1:
                g_pos, g_sel = g_pos * scale, g_sel * scale
            diff[i, pos] = g_pos
            diff[i, sel] = g_sel


class FNFPLoss(caffe.Layer):
    """Stage-2 loss: false negatives + false positives (section 2.2, eq. L2).

    FN = sum y (1-p)^2, FP = sum (1-y) p^2; for y in {0,1}, FN + FP = sum (y - p)^2, whose
    gradient w.r.t. the logit is 2 (p - y) p (1 - p). param_str: ``{}``.

    Computed with s = sigmoid(-|x|) and r = sigmoid(|x|) = 1 - s: p (1 - p) = s r whatever the sign
    of x, and p - y = (h - y) - (2h - 1) s with h = [x >= 0] in {0, 1} (exact), so neither p - y
    nor the gradient loses precision to cancellation where p is close to 0 or 1. Arithmetic only
    (np.where, np.sign and np.maximum cost several element-wise passes each), in place in float32
    buffers kept between iterations; s r (p - y) is made in the forward pass, which has s and r at
    hand, and the backward pass scales it.
    """

    def setup(self, bottom, top):
        _parse_params(self.param_str, {}, "FNFPLoss")
        self._buf_shape = None

    def reshape(self, bottom, top):
        _check_bottoms("FNFPLoss", bottom)
        top[0].reshape(1)
        shape = bottom[0].data.shape
        if shape != self._buf_shape:
            self._s, self._r, self._d, self._grad = (np.empty(shape, np.float32) for _ in range(4))
            self._h = np.empty(shape, bool)
            self._buf_shape = shape

    def forward(self, bottom, top):
        x, y = bottom[0].data, bottom[1].data
        s, r, d, g, h = self._s, self._r, self._d, self._grad, self._h
        np.abs(x, out=s)
        np.negative(s, out=s)
        np.exp(s, out=s)  # e = exp(-|x|)
        np.add(s, _F1, out=r)
        np.divide(_F1, r, out=r)  # r = 1 / (1 + e) = sigmoid(|x|)
        s *= r  # s = e / (1 + e) = sigmoid(-|x|)
        np.greater_equal(x, _F0, out=h)
        np.copyto(g, h)  # h as 0.0 / 1.0
        np.subtract(g, y, out=d)  # h - y
        g *= _F2
        g -= _F1
        g *= s
        d -= g  # d = p - y: (1 - y) - s for x >= 0, s - y for x < 0
        np.multiply(d, d, out=g)
        top[0].data[0] = _finite(float(g.sum()), "FNFPLoss")  # float32 pairwise summation: ~1e-7 relative
        np.multiply(s, r, out=g)  # p (1 - p)
        g *= d  # dL/dx = 2 g
        # Flush subnormal gradients to zero: once |x| > ~44, p (1 - p) |p - y| falls below float32's
        # smallest normal number (1.2e-38). Such a value is zero to float32 precision, but every
        # multiply with it in Caffe's backward pass runs many times slower on x86: a net whose
        # maps had collapsed (FN + FP from scratch, make reproduce's stage-2-only row) trained
        # 2.2x slower per iteration (docs/performance.md).
        np.abs(g, out=s)
        np.less(s, _TINY, out=h)
        g[h] = _F0

    def backward(self, top, propagate_down, bottom):
        if propagate_down[0]:
            np.multiply(self._grad, np.float32(2 * top[0].diff[0]), out=bottom[0].diff)
