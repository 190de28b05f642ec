"""The synthetic fundus generator (redseg/data/synthetic.py, tools/make_synthetic.py).

It stands in for IDRiD (paper section 3.1), so it must write the official layout exactly, be
reproducible from a seed, and its masks must mark exactly the dark-red lesions it drew.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest

from redseg.config import IDRID_LESION_DIRS, TEST_IDS, TRAIN_IDS
from redseg.data.synthetic import SyntheticParams, generate_idrid_tree, image_ids, render_fundus

REPO = Path(__file__).resolve().parents[2]
TOOL = REPO / "tools" / "make_synthetic.py"
# Spelled out here, not imported from redseg.config: the tests check the layout against IDRiD's own names.
SEG = "A. Segmentation"
IMG = f"{SEG}/1. Original Images"
GT = f"{SEG}/2. All Segmentation Groundtruths"
SPLIT = {"train": "a. Training Set", "test": "b. Testing Set"}
SMALL = SyntheticParams(width=128, height=96)


def _tree_digest(root: Path) -> dict[str, str]:
    return {
        p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


@pytest.fixture(scope="module")
def tree(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("syn") / "idrid"
    generate_idrid_tree(out, n_train=3, n_test=2, seed=5, params=SMALL, progress=False)
    return out


def test_same_seed_same_bytes_other_seed_differs(tree, tmp_path):
    again = tmp_path / "again"
    generate_idrid_tree(again, n_train=3, n_test=2, seed=5, params=SMALL, progress=False)
    assert _tree_digest(again) == _tree_digest(tree)
    other = tmp_path / "other"
    generate_idrid_tree(other, n_train=3, n_test=2, seed=6, params=SMALL, progress=False)
    a, b = _tree_digest(tree), _tree_digest(other)
    assert a[f"{IMG}/a. Training Set/IDRiD_01.jpg"] != b[f"{IMG}/a. Training Set/IDRiD_01.jpg"]


def test_official_layout_jpeg_and_colour_tiff(tree):
    info = json.loads((tree / "synthetic.json").read_text())
    assert sorted(info["images"]) == [f"IDRiD_0{i}" for i in range(1, 6)]
    files = {p.relative_to(tree).as_posix() for p in tree.rglob("*") if p.is_file()}
    expected_images = {f"{IMG}/{SPLIT['train']}/IDRiD_0{i}.jpg" for i in (1, 2, 3)}
    expected_images |= {f"{IMG}/{SPLIT['test']}/IDRiD_0{i}.jpg" for i in (4, 5)}
    assert {f for f in files if f.startswith(IMG)} == expected_images
    without_he = []
    for name, rec in info["images"].items():
        split = SPLIT[rec["split"]]
        img = cv2.imread(str(tree / IMG / split / f"{name}.jpg"), cv2.IMREAD_UNCHANGED)
        assert img.shape == (96, 128, 3) and img.dtype == np.uint8
        assert (tree / IMG / split / f"{name}.jpg").read_bytes()[:2] == b"\xff\xd8"  # a real JPEG
        for lesion in ("MA", "HE", "EX", "SE", "OD"):
            path = tree / GT / split / IDRID_LESION_DIRS[lesion] / f"{name}_{lesion}.tif"
            assert path.is_file() == (lesion in rec["pixels"]), (name, lesion)
            if not path.is_file():
                continue
            assert path.read_bytes()[:4] in (b"II*\x00", b"MM\x00*")  # TIFF
            m = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
            assert m.shape == (96, 128, 3) and m.dtype == np.uint8  # colour TIFF, image size
            on = m.any(axis=2)
            assert on.sum() == rec["pixels"][lesion] > 0
            assert (m[on] == (0, 0, 255)).all() and (m[~on] == 0).all()  # red (BGR) lesions
        assert "MA" in rec["pixels"] and "OD" in rec["pixels"] and "SE" not in rec["pixels"]
        if "HE" not in rec["pixels"]:
            without_he.append(name)
    # about 20 %: at least one image per split of >= 2 images lacks HE, and no _HE.tif is written
    assert any(info["images"][n]["split"] == "train" for n in without_he)
    assert any(info["images"][n]["split"] == "test" for n in without_he)
    assert len(without_he) < 5


def test_ids_like_idrid():
    assert image_ids(54, 27) == (list(TRAIN_IDS), list(TEST_IDS))
    assert image_ids(3, 2) == ([1, 2, 3], [4, 5])
    with pytest.raises(ValueError):
        image_ids(0, 0)


def test_ma_radius_scales_with_width():
    assert SyntheticParams(width=1072).resolved_ma_radius() == (6.0, 9.0)
    assert SyntheticParams(width=268).resolved_ma_radius() == pytest.approx((1.5, 2.25))
    assert SyntheticParams(width=128).resolved_ma_radius()[0] == 1.0  # never below one pixel
    assert SyntheticParams(width=500, ma_radius=(3, 4)).resolved_ma_radius() == (3.0, 4.0)


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_lesions_darker_redder_and_masks_exact(seed):
    """MA and HE pixels are darker and redder than the fundus right around them; MA dots have
    exactly the requested radius (mask = the pixels within it) and one component per dot."""
    params = SyntheticParams(width=320, height=212, ma_radius=(3.0, 3.0), no_he_fraction=0.0)
    syn = render_fundus(np.random.default_rng(seed), params, with_he=True)
    img = syn.image.astype(np.float64)
    assert {"MA", "HE", "OD"} <= set(syn.masks)
    n, labels = cv2.connectedComponents(syn.masks["MA"].astype(np.uint8))
    assert n - 1 == syn.counts["MA"] >= 1
    areas = np.bincount(labels.ravel())[1:]
    assert areas.min() >= 25 and areas.max() <= 33  # pixel centres within 3 px of a dot centre
    for lesion in ("MA", "HE"):
        m = syn.masks[lesion]
        others = np.zeros_like(m)
        for k, v in syn.masks.items():
            if k != lesion:
                others |= v
        ring = (cv2.dilate(m.astype(np.uint8), np.ones((7, 7), np.uint8)) > 0) & ~m & ~others
        inside_g, ring_g = img[m, 1].mean(), img[ring, 1].mean()
        inside_r, ring_r = img[m, 2].mean(), img[ring, 2].mean()
        assert inside_g < 0.75 * ring_g, (lesion, inside_g, ring_g)  # darker
        assert inside_r / inside_g > 1.1 * ring_r / ring_g, lesion  # redder (red over green)
    # every MA dot on its own is darker than its surroundings
    for k in range(1, n):
        dot = labels == k
        ring = (cv2.dilate(dot.astype(np.uint8), np.ones((7, 7), np.uint8)) > 0) & ~dot
        assert img[dot, 1].mean() < img[ring, 1].mean() - 5


def test_written_jpeg_keeps_the_lesions(tree):
    """After JPEG compression the masked pixels are still darker than the fundus around them."""
    info = json.loads((tree / "synthetic.json").read_text())
    for name, rec in info["images"].items():
        split = SPLIT[rec["split"]]
        img = cv2.imread(str(tree / IMG / split / f"{name}.jpg")).astype(np.float64)
        m = cv2.imread(str(tree / GT / split / IDRID_LESION_DIRS["MA"] / f"{name}_MA.tif")).any(axis=2)
        ring = (cv2.dilate(m.astype(np.uint8), np.ones((5, 5), np.uint8)) > 0) & ~m
        assert img[m, 1].mean() < img[ring, 1].mean()


def test_looks_like_a_fundus():
    """Round bright disc on black, brighter centre, bright optic disc; mean near IDRiD's."""
    syn = render_fundus(np.random.default_rng(0), SyntheticParams(width=268, height=178))
    img = syn.image.astype(np.float64)
    assert img[:, :5].max() < 10 and img[:, -5:].max() < 10  # black surround left and right
    centre = img[70:110, 114:154].mean(axis=(0, 1))
    assert centre[2] > centre[1] > centre[0]  # orange-red: R > G > B
    od = syn.masks["OD"]
    assert img[od].mean() > img[~od & (img.sum(axis=2) > 30)].mean() + 30  # bright optic disc
    b, g, r = img.reshape(-1, 3).mean(axis=0)
    assert 5 < b < 35 and 30 < g < 85 and 80 < r < 160  # IDRiD/L-Seg mean is 16, 56, 117


def test_cli_runs_skips_and_refuses(tmp_path):
    out = tmp_path / "s"
    cmd = [sys.executable, str(TOOL), "--out", str(out), "--size", "64x96", "--n-train", "2", "--n-test", "1"]
    r = subprocess.run(cmd + ["-q", "--sample", str(tmp_path / "p.jpg")], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert (out / IMG / SPLIT["test"] / "IDRiD_03.jpg").is_file()
    assert cv2.imread(str(tmp_path / "p.jpg")).shape == (32, 48, 3)
    before = _tree_digest(out)
    r = subprocess.run(cmd, capture_output=True, text=True)
    assert r.returncode == 0 and "already generated" in r.stderr
    r = subprocess.run(cmd + ["--seed", "9"], capture_output=True, text=True)
    assert r.returncode == 1 and "--force" in r.stderr and "Traceback" not in r.stderr
    assert _tree_digest(out) == before
    r = subprocess.run(cmd + ["--seed", "9", "--force", "-q"], capture_output=True, text=True)
    assert r.returncode == 0 and _tree_digest(out) != before
    # a folder that is not ours is never replaced
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    r = subprocess.run([*cmd[:2], "--out", str(mine), "--size", "48x64", "--force"], capture_output=True, text=True)
    assert r.returncode == 1 and "not a synthetic set" in r.stderr
    assert (mine / "notes.txt").read_text() == "keep me"
    r = subprocess.run(cmd + ["--size", "big"], capture_output=True, text=True)
    assert r.returncode == 2 and "HEIGHTxWIDTH" in r.stderr  # a usage error
    r = subprocess.run(cmd + ["--size", "8x8"], capture_output=True, text=True)
    assert r.returncode == 2 and "at least 16x16" in r.stderr
