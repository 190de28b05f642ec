"""redseg.evaluation.metrics against hand-computed cases, sklearn, and brute force over the pixels."""

from __future__ import annotations

import math
import warnings
from fractions import Fraction

import numpy as np
import pytest
from sklearn.metrics import average_precision_score

from redseg.config import PROTOCOL_THRESHOLDS
from redseg.evaluation import metrics


def hists_from_values(pos_values, neg_values):
    """Histograms built by hand from the lists of prediction values of lesion / background pixels."""
    pos = np.zeros(256, np.int64)
    neg = np.zeros(256, np.int64)
    for v in pos_values:
        pos[v] += 1
    for v in neg_values:
        neg[v] += 1
    return pos, neg


def random_case(seed: int, shape=(40, 50), prevalence=0.15):
    rng = np.random.default_rng(seed)
    gt = rng.random(shape) < prevalence
    pred = np.clip(rng.normal(90 + 70 * gt, 45), 0, 255).astype(np.uint8)
    return pred, gt


@pytest.fixture
def no_warnings():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        yield


# --- histograms and the threshold rule ----------------------------------------------------------


def test_histograms_count_each_value():
    pred, gt = random_case(0)
    pos, neg = metrics.histograms(pred, gt)
    assert pos.dtype == np.int64 and pos.shape == (256,) and neg.shape == (256,)
    for v in (0, 17, 90, 128, 255):
        assert pos[v] == np.count_nonzero((pred == v) & gt)
        assert neg[v] == np.count_nonzero((pred == v) & ~gt)
    assert pos.sum() == gt.sum() and neg.sum() == gt.size - gt.sum()
    # gt given as 0/255 uint8 or 0/1 int gives the same
    pos2, neg2 = metrics.histograms(pred, gt.astype(np.uint8) * 255)
    pos3, neg3 = metrics.histograms(pred, gt.astype(np.int32))
    assert np.array_equal(pos, pos2) and np.array_equal(neg, neg2)
    assert np.array_equal(pos, pos3) and np.array_equal(neg, neg3)


def test_histograms_reject_bad_input():
    with pytest.raises(TypeError):
        metrics.histograms(np.zeros((4, 4), np.float32), np.zeros((4, 4), bool))
    with pytest.raises(ValueError):
        metrics.histograms(np.zeros((4, 4), np.uint8), np.zeros((4, 5), bool))


def test_threshold_rule_matches_exact_rational_and_float_comparison():
    values = np.arange(256)
    for i in range(PROTOCOL_THRESHOLDS):
        t = i / 30
        v = metrics.u8_threshold(t)
        exact = math.ceil(Fraction(255 * i, 30))  # smallest v with v/255 >= i/30, in rationals
        assert v == exact
        assert v == int(np.argmax(values / 255.0 >= t))
    assert metrics.u8_threshold(0.5) == 128
    assert metrics.u8_threshold(0.0) == 0
    assert metrics.u8_threshold(1.0) == 255
    assert metrics.u8_threshold(1.5) == 256
    assert len(metrics.protocol_thresholds()) == 31


@pytest.mark.parametrize("t", [0.0, 2 / 30, 0.5, 0.51, 29 / 30, 1.0])
def test_at_threshold_counts_pixels_directly(t):
    pred, gt = random_case(3)
    pos, neg = metrics.histograms(pred, gt)
    r = metrics.at_threshold(pos, neg, t)
    hit = pred.astype(np.float64) / 255.0 >= t
    tp = np.count_nonzero(hit & gt)
    fp = np.count_nonzero(hit & ~gt)
    fn = np.count_nonzero(~hit & gt)
    assert (r["tp"], r["fp"], r["fn"]) == (tp, fp, fn)
    if tp + fp:
        assert r["precision"] == pytest.approx(tp / (tp + fp))
    assert r["recall"] == pytest.approx(tp / (tp + fn))
    assert r["f1"] == pytest.approx(2 * tp / (2 * tp + fp + fn))
    assert r["iou"] == pytest.approx(tp / (tp + fp + fn))


# --- hand-computed cases ------------------------------------------------------------------------


def test_perfect_prediction(no_warnings):
    gt = np.zeros((10, 10), bool)
    gt[2:5, 3:7] = True
    pred = (gt * 255).astype(np.uint8)
    m = metrics.lesion_metrics(*metrics.histograms(pred, gt))
    assert m["auc_pr"] == pytest.approx(1.0)
    assert m["ap"] == pytest.approx(1.0)
    assert m["at_0.5"]["precision"] == 1.0 and m["at_0.5"]["recall"] == 1.0
    assert m["at_0.5"]["f1"] == 1.0 and m["at_0.5"]["iou"] == 1.0
    assert m["break_even"]["precision"] == 1.0 and m["break_even"]["recall"] == 1.0
    assert m["break_even"]["threshold_u8"] == 255  # tie rule: the highest of v = 1..255
    assert (m["n_pos"], m["n_neg"]) == (12, 88)


def test_inverted_prediction_is_low(no_warnings):
    # lesion pixels get 10, background 200: at every t > 10/255 nothing right is found (skipped),
    # so the protocol curve is (0,1) -> (1, prevalence): AUC = (1 + prevalence) / 2 by hand,
    # while the exact AP is the prevalence.
    pos, neg = hists_from_values([10] * 5, [200] * 45)
    prevalence = 5 / 50
    auc, curve = metrics.protocol_auc_pr(pos, neg)
    assert auc == pytest.approx((1 + prevalence) / 2)
    assert metrics.average_precision(pos, neg) == pytest.approx(prevalence)
    assert metrics.at_threshold(pos, neg, 0.5)["recall"] == 0.0
    assert len(curve["skipped"]) == 31 - 2  # only t = 0 and t = 1/30 (v >= 9) keep lesion pixels


def test_protocol_with_ties_and_skipped_thresholds_by_hand(no_warnings):
    # lesion pixels: 200, 200, 100; background: 200, 100, 100, 0
    pos, neg = hists_from_values([200, 200, 100], [200, 100, 100, 0])
    # Protocol thresholds (8-bit cut ceil(8.5 i)):
    #  i = 0 (v >= 0):            TP 3, FP 4 -> R 1,   P 3/7
    #  i = 1..11 (v >= 9..94):    TP 3, FP 3 -> R 1,   P 1/2
    #  i = 12..23 (v >= 102..196): TP 2, FP 1 -> R 2/3, P 2/3
    #  i = 24..30 (v >= 204..255): TP + FP = 0 -> skipped
    # sorted by recall, ties by falling threshold: (0,1) (2/3,2/3) ... (1,1/2) ... (1,3/7)
    expected = Fraction(2, 3) * (1 + Fraction(2, 3)) / 2 + Fraction(1, 3) * (Fraction(2, 3) + Fraction(1, 2)) / 2
    assert expected == Fraction(3, 4)
    auc, curve = metrics.protocol_auc_pr(pos, neg)
    assert auc == pytest.approx(float(expected))
    assert curve["skipped"] == pytest.approx([i / 30 for i in range(24, 31)])
    assert curve["recall"][0] == 0.0 and curve["precision"][0] == 1.0
    assert len(curve["recall"]) == 1 + 24
    assert np.all(np.diff(curve["recall"]) >= 0)
    # exact AP, by hand: thresholds 200 (P 2/3, R 2/3), 100 (P 1/2, R 1), 0 (P 3/7, R 1)
    ap = metrics.average_precision(pos, neg)
    assert ap == pytest.approx(2 / 3 * 2 / 3 + 1 / 3 * 1 / 2)
    y = [1, 1, 1, 0, 0, 0, 0]
    s = [200, 200, 100, 200, 100, 100, 0]
    assert ap == pytest.approx(average_precision_score(y, s))


def test_protocol_skips_zero_precision_and_recall(no_warnings):
    # lesion pixel: 50; background: 250, 50, 0.
    #  i = 0 (v >= 0):          TP 1, FP 3 -> (R 1, P 1/4)
    #  i = 1..5 (v >= 9..43):   TP 1, FP 2 -> (R 1, P 1/3)
    #  i = 6..29 (v >= 51..247): TP 0, FP 1 -> P = R = 0, skipped
    #  i = 30 (v >= 255):       TP + FP = 0, skipped
    pos, neg = hists_from_values([50], [250, 50, 0])
    auc, curve = metrics.protocol_auc_pr(pos, neg)
    assert auc == pytest.approx((1 + 1 / 3) / 2)  # (0,1) -> (1,1/3), then a zero-width step
    assert curve["skipped"] == pytest.approx([i / 30 for i in range(6, 31)])
    assert curve["precision"][1:] == pytest.approx([1 / 3] * 5 + [1 / 4])


def test_all_empty_ground_truth_is_nan(no_warnings):
    pred, _ = random_case(1)
    gt = np.zeros(pred.shape, bool)
    m = metrics.lesion_metrics(*metrics.histograms(pred, gt))
    assert math.isnan(m["auc_pr"]) and math.isnan(m["ap"])
    assert m["n_pos"] == 0
    assert math.isnan(m["at_0.5"]["recall"])
    assert m["at_0.5"]["precision"] == 0.0  # something predicted, nothing right
    assert math.isnan(m["break_even"]["precision"]) and m["break_even"]["threshold_u8"] is None
    assert len(m["curves"]["protocol"]["skipped"]) == 31


def test_empty_prediction(no_warnings):
    gt = np.zeros((20, 20), bool)
    gt[:4] = True  # prevalence 0.2
    pred = np.zeros(gt.shape, np.uint8)
    m = metrics.lesion_metrics(*metrics.histograms(pred, gt))
    # only t = 0 survives (everything positive: R 1, P 0.2); curve (0,1) -> (1,0.2)
    assert m["auc_pr"] == pytest.approx((1 + 0.2) / 2)
    assert m["ap"] == pytest.approx(0.2)
    assert math.isnan(m["at_0.5"]["precision"]) and m["at_0.5"]["recall"] == 0.0
    assert m["at_0.5"]["f1"] == 0.0 and m["at_0.5"]["iou"] == 0.0
    assert m["break_even"]["threshold_u8"] == 0


# --- against sklearn and brute force ------------------------------------------------------------


@pytest.mark.parametrize("seed", range(6))
def test_ap_equals_sklearn(seed):
    pred, gt = random_case(seed, prevalence=[0.02, 0.1, 0.3, 0.5, 0.05, 0.2][seed])
    if seed == 4:
        pred = (pred // 32 * 32).astype(np.uint8)  # few distinct values: many ties
    pos, neg = metrics.histograms(pred, gt)
    assert metrics.average_precision(pos, neg) == pytest.approx(
        average_precision_score(gt.ravel(), pred.ravel()), abs=1e-12
    )


def naive_protocol_auc(pred: np.ndarray, gt: np.ndarray) -> float:
    """The protocol written out over pixels with float thresholds, independently of the histograms."""
    p = pred.astype(np.float64) / 255.0
    pts = []
    for i in range(31):
        t = i / 30
        hit = p >= t
        tp = np.sum(hit & gt)
        fp = np.sum(hit & ~gt)
        fn = np.sum(~hit & gt)
        if tp + fp == 0 or tp + fn == 0 or tp == 0:
            continue
        pts.append((tp / (tp + fn), -t, tp / (tp + fp)))
    pts.sort()  # rising recall, equal recalls by falling threshold
    r = [0.0] + [a for a, _, _ in pts]
    pr = [1.0] + [b for _, _, b in pts]
    return sum((r[k] - r[k - 1]) * (pr[k] + pr[k - 1]) / 2 for k in range(1, len(r)))


@pytest.mark.parametrize("seed", range(3))
def test_protocol_equals_naive_pixel_loop(seed):
    pred, gt = random_case(10 + seed)
    auc, _ = metrics.protocol_auc_pr(*metrics.histograms(pred, gt))
    assert auc == pytest.approx(naive_protocol_auc(pred, gt), abs=1e-12)


@pytest.mark.parametrize("seed", range(3))
def test_break_even_is_brute_force_minimum(seed):
    pred, gt = random_case(20 + seed)
    be = metrics.break_even(*metrics.histograms(pred, gt))
    best_gap, best_v = None, None
    for v in range(256):
        hit = pred >= v
        tp, fp = np.sum(hit & gt), np.sum(hit & ~gt)
        if tp == 0:  # finds no lesion pixel: P = R = 0 is no break-even point
            continue
        gap = abs(tp / (tp + fp) - tp / gt.sum())
        if best_gap is None or gap <= best_gap:  # later (higher) v wins ties
            best_gap, best_v = gap, v
    assert be["threshold_u8"] == best_v
    assert be["threshold"] == pytest.approx(best_v / 255)
    assert abs(be["precision"] - be["recall"]) == pytest.approx(best_gap)


def test_break_even_ignores_thresholds_that_find_nothing():
    """High thresholds reached only by false positives give P = R = 0 (gap 0): not a break-even."""
    gt = np.array([1, 1, 0, 0, 0, 0], bool)
    pred = np.array([100, 90, 200, 10, 10, 10], np.uint8)  # the top value is a false positive
    be = metrics.break_even(*metrics.histograms(pred, gt))
    # v in 101..200: TP = 0 (skipped); v in 91..100: P = 1/2, R = 1/2 -> gap 0 at the highest, v = 100
    assert be["threshold_u8"] == 100 and be["precision"] == be["recall"] == 0.5


def test_pooling_is_sum_of_histograms():
    a = random_case(30)
    b = random_case(31, shape=(25, 35))
    ha, hb = metrics.histograms(*a), metrics.histograms(*b)
    pooled = metrics.average_precision(ha[0] + hb[0], ha[1] + hb[1])
    y = np.concatenate([a[1].ravel(), b[1].ravel()])
    s = np.concatenate([a[0].ravel(), b[0].ravel()])
    assert pooled == pytest.approx(average_precision_score(y, s))
