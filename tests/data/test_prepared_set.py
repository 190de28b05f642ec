"""redseg.data.prepared_set: the list files, the completion stamp, the one mask rule and the downsizing rules.

The mask rule is checked where it matters: an RGBA mask whose background is opaque (alpha 255
everywhere) and whose lesion pixels are red must give only the red pixels, in the training reader,
in the preparation of the official layout and in the scoring against it.
"""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest

from redseg.config import IDRID_GT_DIR, IDRID_IMAGES_DIR, IDRID_LESION_DIRS, IDRID_SEG_DIR, IDRID_SPLIT_DIRS
from redseg.data.idrid import prepare
from redseg.data.prepared_set import (
    DataError,
    downsample_mask,
    list_path,
    load_sample,
    mask_from_pixels,
    read_list,
    read_mask,
    read_meta,
    write_list,
)
from redseg.evaluation.scoring import evaluate
from redseg.fileio import COMPLETE, mark_complete

H, W = 12, 16


def lesion_map() -> np.ndarray:
    m = np.zeros((H, W), bool)
    m[2:5, 3:7] = True
    m[9, 12] = True
    return m


def opaque_rgba(m: np.ndarray) -> np.ndarray:
    """BGRA: lesion red, background black, alpha 255 everywhere (an opaque mask)."""
    a = np.zeros((*m.shape, 4), np.uint8)
    a[..., 3] = 255
    a[m] = (0, 0, 255, 255)
    return a


def test_mask_rule_any_colour_channel_alpha_ignored():
    m = lesion_map()
    grey = m.astype(np.uint8) * 255
    bgr = np.zeros((H, W, 3), np.uint8)
    bgr[m] = (0, 7, 0)  # any channel counts, however faint
    grey_alpha = np.stack([grey, np.full((H, W), 255, np.uint8)], axis=-1)
    for pixels in (grey, bgr, opaque_rgba(m), grey_alpha):
        assert np.array_equal(mask_from_pixels(pixels), m), pixels.shape
    transparent_lesion = opaque_rgba(m)
    transparent_lesion[..., 3] = 0  # alpha says nothing about the class either way
    assert np.array_equal(mask_from_pixels(transparent_lesion), m)


def test_rgba_mask_with_opaque_background_in_training_reading(tmp_path):
    m = lesion_map()
    cv2.imwrite(str(tmp_path / "img.png"), np.full((H, W, 3), 90, np.uint8))
    assert cv2.imwrite(str(tmp_path / "ma.png"), opaque_rgba(m))
    assert cv2.imread(str(tmp_path / "ma.png"), cv2.IMREAD_UNCHANGED).shape == (H, W, 4)
    cv2.imwrite(str(tmp_path / "he.png"), np.zeros((H, W), np.uint8))
    write_list(tmp_path / "train.txt", [["img.png", "ma.png", "he.png"]], header="image, MA, HE")
    (sample,) = read_list(tmp_path / "train.txt")
    _, ma, he = load_sample(sample)
    assert ma.dtype == np.uint8 and np.array_equal(ma, m.astype(np.uint8))
    assert ma.sum() == m.sum() < H * W and he.sum() == 0


def _official_rgba_tree(root: Path, split: str, m: np.ndarray) -> Path:
    seg = root / IDRID_SEG_DIR
    img_dir = seg / IDRID_IMAGES_DIR / IDRID_SPLIT_DIRS[split]
    img_dir.mkdir(parents=True)
    cv2.imwrite(str(img_dir / "IDRiD_01.png"), np.full((H, W, 3), 90, np.uint8))
    for lesion in ("MA", "HE"):
        folder = seg / IDRID_GT_DIR / IDRID_SPLIT_DIRS[split] / IDRID_LESION_DIRS[lesion]
        folder.mkdir(parents=True)
        assert cv2.imwrite(str(folder / f"IDRiD_01_{lesion}.tif"), opaque_rgba(m))
    return root


def test_rgba_mask_with_opaque_background_in_preparation(tmp_path):
    m = lesion_map()
    src = _official_rgba_tree(tmp_path / "src", "test", m)
    out = tmp_path / "prepared"
    prepare(src, out, factor=1, lesions=("MA", "HE"), progress=False)
    (sample,) = read_list(list_path(out, "test"))
    for path in sample.masks.values():
        assert np.array_equal(read_mask(path), m)


def test_rgba_mask_with_opaque_background_in_scoring(tmp_path):
    m = lesion_map()
    gt = _official_rgba_tree(tmp_path / "gt", "test", m)
    pred = tmp_path / "pred"
    pred.mkdir()
    for lesion in ("ma", "he"):
        cv2.imwrite(str(pred / f"IDRiD_01_{lesion}.png"), m.astype(np.uint8) * 255)
    result = evaluate(pred, gt, tmp_path / "eval", overlays=0, progress=False)
    for lesion in ("MA", "HE"):
        assert result[lesion]["n_pos"] == m.sum()
        assert result[lesion]["n_neg"] == H * W - m.sum()
        assert result[lesion]["auc_pr"] == pytest.approx(1.0)


def test_read_list_skips_comments_and_names_bad_lines(tmp_path):
    for name in ("a.png", "a_ma.png", "a_he.png"):
        cv2.imwrite(str(tmp_path / name), np.zeros((4, 4), np.uint8))
    write_list(tmp_path / "ok.txt", [["a.png", "a_ma.png", "a_he.png"]], header="a comment")
    text = (tmp_path / "ok.txt").read_text()
    assert text == "# a comment\na.png\ta_ma.png\ta_he.png\n"
    (sample,) = read_list(tmp_path / "ok.txt")
    assert sample.name == "a" and sample.masks == {"MA": tmp_path / "a_ma.png", "HE": tmp_path / "a_he.png"}
    (tmp_path / "two.txt").write_text("\n# x\na.png\ta_ma.png\n")
    with pytest.raises(DataError, match=r"two.txt:3: expected 3 tab-separated"):
        read_list(tmp_path / "two.txt")
    (tmp_path / "gone.txt").write_text("a.png\ta_ma.png\tb_he.png\n")
    with pytest.raises(DataError, match=r"gone.txt:1: file not found: .*b_he.png"):
        read_list(tmp_path / "gone.txt")
    (tmp_path / "empty.txt").write_text("# nothing\n")
    with pytest.raises(DataError, match="holds no samples"):
        read_list(tmp_path / "empty.txt")
    with pytest.raises(DataError, match="make data"):
        read_list(tmp_path / "missing.txt")


def test_meta_needs_the_completion_stamp(tmp_path):
    (tmp_path / "meta.json").write_text(json.dumps({"mean_bgr": [1, 2, 3]}))
    with pytest.raises(DataError, match=f"incomplete prepared set \\(no {COMPLETE} stamp"):
        read_meta(tmp_path)
    mark_complete(tmp_path)
    assert (tmp_path / ".complete").is_file()  # the name on disk: older sets still count as finished
    assert read_meta(tmp_path) == {"mean_bgr": [1, 2, 3]}


def test_downsample_mask_rules_take_height_then_width():
    m = np.zeros((4, 6), bool)
    m[0, 0] = True  # a quarter of the first 2x2 block
    m[2:4, 4:6] = True  # all of the last block
    m[2, 2] = m[3, 3] = True  # half of the middle block of the bottom row
    assert np.array_equal(downsample_mask(m, (2, 3), "any"), [[1, 0, 0], [0, 1, 1]])
    assert np.array_equal(downsample_mask(m, (2, 3), "area"), [[0, 0, 0], [0, 1, 1]])
    assert downsample_mask(m, (2, 3), "nearest").shape == (2, 3)
    up = downsample_mask(m, (8, 12))  # enlarging: nearest neighbour whatever the rule
    assert np.array_equal(up[::2, ::2], m)
    same = downsample_mask(m, (4, 6))
    assert np.array_equal(same, m) and same is not m
    with pytest.raises(ValueError, match="mask rule"):
        downsample_mask(m, (2, 3), "max")
