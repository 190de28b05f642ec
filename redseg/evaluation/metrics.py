"""Pixel-level precision/recall metrics for lesion segmentation, from 8-bit histograms.

Why histograms: the predictions are 8-bit maps (probability x 255, docs/data_format.md), so every
threshold-based quantity of the paper's evaluation (paper §3.3;
docs/method.md#the-released-protocol) is a function of two 256-bin histograms, one over lesion
pixels and one over background pixels. An image is reduced to these two histograms with one
``np.bincount`` pass; pooling over the test set (the authors' protocol sums TP/FP/FN over ALL
images, it does not average per image) is then a sum of histograms, and every curve costs O(256).

Conventions used throughout (stated once here, repeated in docs/evaluation.md):

* A pixel of 8-bit value ``v`` is predicted positive at threshold ``t`` (a float in [0, 1]) when
  ``v / 255 >= t`` evaluated in float64, exactly as the authors' MATLAB code compares
  ``double(pred) / 255 >= t``. For the protocol's thresholds ``t = i / 30`` this equals the exact
  rational rule ``v >= ceil(8.5 * i)`` (checked for all 31 x 256 cases in the tests); e.g.
  ``t = 0.5`` means ``v >= 128`` and ``t = 0`` means every pixel.
* An undefined ratio (0/0) is ``nan``, never a warning: a threshold at which nothing is predicted
  has no precision; a set without lesion pixels has no recall and no AUC.
"""

from __future__ import annotations

import math

import numpy as np

from redseg.config import PROTOCOL_THRESHOLDS

NBINS = 256  # 8-bit predictions

__all__ = [
    "NBINS",
    "histograms",
    "u8_threshold",
    "protocol_thresholds",
    "protocol_auc_pr",
    "average_precision",
    "exact_curve",
    "at_threshold",
    "break_even",
    "lesion_metrics",
]


def histograms(pred_u8: np.ndarray, gt: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Counts of each 8-bit prediction value over lesion and over background pixels.

    ``pred_u8``: uint8 map; ``gt``: same shape, lesion where non-zero (bool or any integer type).
    Returns ``(pos_hist, neg_hist)``, int64 arrays of length 256. One ``np.bincount`` over
    ``pred + 256 * gt`` does both at once.
    """
    pred_u8 = np.asarray(pred_u8)
    gt = np.asarray(gt)
    if pred_u8.dtype != np.uint8:
        raise TypeError(f"predictions must be uint8 (probability x 255), got {pred_u8.dtype}")
    if pred_u8.shape != gt.shape:
        raise ValueError(f"prediction shape {pred_u8.shape} != ground-truth shape {gt.shape}")
    if gt.dtype == np.bool_:
        lesion = gt.view(np.uint8)
    elif gt.dtype == np.uint8 and gt.size and int(gt.max()) <= 1:
        lesion = gt
    else:
        lesion = (gt != 0).view(np.uint8)
    idx = pred_u8.ravel() + NBINS * lesion.ravel().astype(np.intp)
    counts = np.bincount(idx, minlength=2 * NBINS).astype(np.int64, copy=False)
    return counts[NBINS:].copy(), counts[:NBINS].copy()


def u8_threshold(t: float) -> int:
    """Smallest 8-bit value ``v`` with ``v / 255 >= t`` (float64); 256 when there is none.

    This is the single place where a float threshold meets the 8-bit maps, so the 0.5 of
    ``at_threshold`` and the i/30 of the protocol are rounded the same way (0.5 -> 128).
    """
    values = np.arange(NBINS, dtype=np.float64) / 255.0
    hit = np.flatnonzero(values >= float(t))
    return int(hit[0]) if hit.size else NBINS


def protocol_thresholds() -> np.ndarray:
    """The protocol's 31 thresholds t = i / 30, i = 0..30 (docs/method.md#the-released-protocol)."""
    n = PROTOCOL_THRESHOLDS - 1
    return np.array([i / n for i in range(PROTOCOL_THRESHOLDS)], dtype=np.float64)


def _check_hists(pos_hist: np.ndarray, neg_hist: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    pos = np.asarray(pos_hist, dtype=np.int64)
    neg = np.asarray(neg_hist, dtype=np.int64)
    if pos.shape != (NBINS,) or neg.shape != (NBINS,):
        raise ValueError(f"histograms must have {NBINS} bins, got {pos.shape} and {neg.shape}")
    return pos, neg


def _cum_at_or_above(hist: np.ndarray) -> np.ndarray:
    """``out[v] = sum(hist[v:])`` for v = 0..256 (out[256] = 0): counts predicted positive at v."""
    out = np.zeros(NBINS + 1, dtype=np.int64)
    out[:NBINS] = np.cumsum(hist[::-1])[::-1]
    return out


def _ratio(num: float, den: float) -> float:
    return float(num) / float(den) if den else math.nan


def _counts_at(pos: np.ndarray, neg: np.ndarray, v: int) -> tuple[int, int, int]:
    tp = int(pos[v:].sum())
    fp = int(neg[v:].sum())
    return tp, fp, int(pos.sum()) - tp


def _scores(tp: int, fp: int, fn: int, t: float, v: int) -> dict:
    return {
        "threshold": float(t),
        "threshold_u8": int(v),
        "precision": _ratio(tp, tp + fp),
        "recall": _ratio(tp, tp + fn),
        "f1": _ratio(2 * tp, 2 * tp + fp + fn),
        "iou": _ratio(tp, tp + fp + fn),
        "tp": tp,
        "fp": fp,
        "fn": fn,
    }


def protocol_auc_pr(pos_hist: np.ndarray, neg_hist: np.ndarray) -> tuple[float, dict]:
    """AUC_PR by the authors' released IDRiD protocol (docs/method.md#the-released-protocol).

    31 thresholds t = i/30; TP/FP/FN pooled over all images (the histograms are already pooled);
    a threshold is skipped when TP+FP = 0 (no precision), TP+FN = 0 (no lesion pixel at all) or
    P = R = 0 (TP = 0); the kept (R, P) points are sorted by rising recall, (R=0, P=1) is put in
    front, and the area is the trapezoid rule over recall.

    Ties in recall (two thresholds with the same TP) are ordered by falling threshold, i.e. the
    curve is traced as the threshold comes down (the higher-precision point first). The released
    script reverses its list of points collected by rising threshold, which gives this order
    (docs/method.md#equal-recalls); it matters only when no lesion pixel falls between two
    protocol thresholds.

    Returns ``(auc, curve)``; ``auc`` is nan when there is no lesion pixel. ``curve`` has numpy
    arrays ``recall``, ``precision``, ``threshold`` (the points integrated, the prepended point
    with threshold nan) and the list ``skipped`` of thresholds left out.
    """
    pos, neg = _check_hists(pos_hist, neg_hist)
    tp_at = _cum_at_or_above(pos)
    fp_at = _cum_at_or_above(neg)
    n_pos = int(tp_at[0])
    kept: list[tuple[float, float, float]] = []  # (recall, precision, t)
    skipped: list[float] = []
    for t in protocol_thresholds():
        v = u8_threshold(t)
        tp, fp = int(tp_at[v]), int(fp_at[v])
        fn = n_pos - tp
        if tp + fp == 0 or tp + fn == 0 or tp == 0:  # tp == 0 <=> P = R = 0 once both defined
            skipped.append(float(t))
            continue
        kept.append((tp / (tp + fn), tp / (tp + fp), float(t)))
    kept.sort(key=lambda p: (p[0], -p[2]))
    recall = np.array([0.0] + [p[0] for p in kept])
    precision = np.array([1.0] + [p[1] for p in kept])
    threshold = np.array([math.nan] + [p[2] for p in kept])
    curve = {"recall": recall, "precision": precision, "threshold": threshold, "skipped": skipped}
    if n_pos == 0:
        return math.nan, curve
    auc = float(np.sum(np.diff(recall) * (precision[1:] + precision[:-1]) / 2.0))
    return auc, curve


def exact_curve(pos_hist: np.ndarray, neg_hist: np.ndarray) -> dict:
    """P-R points at every 8-bit threshold v = 255..0 at which something is predicted.

    Thresholds between two values present in the maps give the same point; they are dropped, so
    each point is one distinct prediction value, as in sklearn's ``precision_recall_curve``.
    Returns numpy arrays ``recall``, ``precision``, ``threshold_u8`` in falling threshold order
    (rising recall).
    """
    pos, neg = _check_hists(pos_hist, neg_hist)
    tp_at = _cum_at_or_above(pos)[:NBINS]
    fp_at = _cum_at_or_above(neg)[:NBINS]
    present = np.flatnonzero(pos + neg > 0)[::-1]  # distinct values, falling
    n_pos = int(tp_at[0])
    tp = tp_at[present].astype(np.float64)
    fp = fp_at[present].astype(np.float64)
    precision = tp / (tp + fp)  # tp + fp >= 1 at a value present in the maps
    recall = tp / n_pos if n_pos else np.full(present.shape, math.nan)
    return {"recall": recall, "precision": precision, "threshold_u8": present.astype(np.int64)}


def average_precision(pos_hist: np.ndarray, neg_hist: np.ndarray) -> float:
    """Exact step-wise average precision over all distinct 8-bit thresholds.

    AP = sum_n (R_n - R_{n-1}) P_n over the thresholds in falling order with R_0 = 0 -- the
    definition of ``sklearn.metrics.average_precision_score`` (no interpolation), so it equals
    that function on the pooled pixels. Unlike the 31-point protocol it does not depend on where
    the thresholds fall; reported beside the protocol AUC as a check. nan without lesion pixels.
    """
    curve = exact_curve(pos_hist, neg_hist)
    recall, precision = curve["recall"], curve["precision"]
    if recall.size == 0 or np.isnan(recall[0]):
        return math.nan
    steps = np.diff(np.concatenate([[0.0], recall]))
    return float(np.sum(steps * precision))


def at_threshold(pos_hist: np.ndarray, neg_hist: np.ndarray, t: float) -> dict:
    """Precision, recall, F1 and IoU of the pooled pixels predicted positive at ``t``.

    ``t`` in [0, 1]; the 8-bit cut is ``u8_threshold(t)`` (0.5 -> 128). The protocol reads F1 and
    IoU at t = 0.5 (docs/method.md#the-released-protocol). Undefined ratios are nan. Also returns
    tp/fp/fn and the 8-bit cut ``threshold_u8``.
    """
    pos, neg = _check_hists(pos_hist, neg_hist)
    v = u8_threshold(t)
    tp, fp, fn = _counts_at(pos, neg, v)
    return _scores(tp, fp, fn, t, v)


def break_even(pos_hist: np.ndarray, neg_hist: np.ndarray) -> dict:
    """Scores at the 8-bit threshold where |P - R| is smallest (the P-R break-even point).

    Why: every P in the paper's Table 2 is within 0.01 of its R, which suggests the paper reports
    P and R at break-even rather than at t = 0.5; our reading, not the paper's statement
    (docs/method.md#p-and-r-at-break-even). Candidates are v = 0..255 at
    which some lesion pixel is found (TP > 0; like the protocol's skip rule for P = R = 0, a
    threshold that finds nothing is no break-even point, though its |P - R| = 0). Tie rule: among
    thresholds with the same smallest |P - R| the highest v wins (identical counts for a run of v
    happen when no prediction value lies between them; the highest is then the prediction value
    itself). ``threshold`` is v / 255. All nan (threshold too) when there is no lesion pixel.
    """
    pos, neg = _check_hists(pos_hist, neg_hist)
    tp_at = _cum_at_or_above(pos)[:NBINS]
    fp_at = _cum_at_or_above(neg)[:NBINS]
    n_pos = int(tp_at[0])
    defined = np.flatnonzero(tp_at > 0)
    if n_pos == 0:
        out = _scores(0, 0, 0, math.nan, -1)  # 0/0 everywhere: all nan
        out["threshold_u8"] = None
        return out
    tp = tp_at[defined].astype(np.float64)
    gap = np.abs(tp / (tp + fp_at[defined]) - tp / n_pos)
    best = np.flatnonzero(gap == gap.min())
    v = int(defined[best[-1]])
    tp_v, fp_v = int(tp_at[v]), int(fp_at[v])
    return _scores(tp_v, fp_v, n_pos - tp_v, v / 255.0, v)


def lesion_metrics(pos_hist: np.ndarray, neg_hist: np.ndarray) -> dict:
    """Everything reported for one lesion kind, from its pooled histograms.

    Keys: ``auc_pr`` (the authors' 31-threshold protocol: the number to compare with the paper's
    AUC_PR in Tables 2-4), ``ap`` (exact step-wise AP), ``at_0.5`` and ``break_even`` (dicts of
    ``at_threshold``), ``n_pos``/``n_neg`` (pixel counts) and ``curves`` (``protocol`` and
    ``exact``, numpy arrays, for plotting). ``auc_pr``/``ap`` are nan when ``n_pos == 0``.
    """
    pos, neg = _check_hists(pos_hist, neg_hist)
    auc, proto = protocol_auc_pr(pos, neg)
    return {
        "auc_pr": auc,
        "ap": average_precision(pos, neg),
        "at_0.5": at_threshold(pos, neg, 0.5),
        "break_even": break_even(pos, neg),
        "n_pos": int(pos.sum()),
        "n_neg": int(neg.sum()),
        "curves": {"protocol": proto, "exact": exact_curve(pos, neg)},
    }
