"""redseg.evaluation.report's overlay: one picture for the evaluation report and tools/segment.py."""

from __future__ import annotations

import numpy as np

from redseg.evaluation.report import GT_OUTLINE_BGR, OVERLAY_MAX_WIDTH, draw_overlay, shrink_for_overlay


def maps(h: int, w: int) -> tuple[dict, dict]:
    pred = np.zeros((h, w), np.uint8)
    pred[h // 4 : h // 2, w // 4 : w // 2] = 255
    gt = pred > 0
    return {"MA": pred, "HE": pred.copy()}, {"MA": gt, "HE": gt.copy()}


def test_overlay_panels_side_by_side_with_and_without_ground_truth():
    preds, gts = maps(40, 60)
    photo = np.full((40, 60, 3), (30, 60, 150), np.uint8)
    with_gt = draw_overlay("IDRiD_55", photo, preds, gts)
    without = draw_overlay("IDRiD_55", photo, preds)
    assert with_gt.shape == without.shape == (40, 2 * 60 + 4, 3)
    ma_panel = with_gt[:, :60]
    assert (ma_panel == GT_OUTLINE_BGR["MA"]).all(axis=2).any()  # the MA outline is drawn...
    assert not (without[:, :60] == GT_OUTLINE_BGR["MA"]).all(axis=2).any()  # ...only with ground truth
    assert (without[15, 20] == (255, 255, 255)).all() or without[15, 20, 1] > 200  # p = 1: white
    assert (without[35, 55] == photo[35, 55]).all()  # p = 0: the photo as it is


def test_overlay_of_a_large_photo_is_shrunk_to_the_report_width():
    preds, gts = maps(300, 2 * OVERLAY_MAX_WIDTH)
    small_p, small_g = shrink_for_overlay(preds, gts)
    assert small_p["MA"].shape == small_g["HE"].shape == (150, OVERLAY_MAX_WIDTH)
    again, _ = shrink_for_overlay(small_p)
    assert again["MA"] is small_p["MA"]  # already small: kept as it is
    out = draw_overlay("photo", None, preds)  # no photo: grey background
    assert out.shape == (150, 2 * OVERLAY_MAX_WIDTH + 4, 3)
    assert (out[-1, 0] == 128).all()
