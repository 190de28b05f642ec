"""redseg/data/fov.py: the circular field of view (FOV) of a fundus photograph, and the training data's
FOV diameter in a prepared set (redseg.data.idrid's preparation, redseg.data.prepared_set.fov_diameter).

Photographs are rendered by redseg.data.synthetic (whose disc geometry is reproduced here from its seed
and checked on the image itself) or drawn, then given margins, cuts, other scales and aspect
ratios, JPEG compression, or no border at all.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import cv2
import numpy as np
import pytest

from redseg.data.fov import FieldOfView, FovError, find_fov, fov_mask, fov_summary
from redseg.data.synthetic import SyntheticParams, render_fundus


def fundus(seed: int, w: int, h: int) -> tuple[np.ndarray, tuple[float, float, float]]:
    """A synthetic photograph and its true disc (cx, cy, r): render_fundus's first three draws."""
    g = np.random.default_rng(seed)
    cx = w / 2 + g.normal(0, 0.008 * w)
    cy = h / 2 + g.normal(0, 0.008 * h)
    r = w * g.uniform(0.405, 0.425)
    img = render_fundus(np.random.default_rng(seed), SyntheticParams(width=w, height=h)).image
    # the geometry above must be the image's: dark just outside the circle, lit just inside
    for a in np.linspace(0, 2 * math.pi, 16, endpoint=False):
        xo, yo = round(cx + (r + 3) * math.cos(a)), round(cy + (r + 3) * math.sin(a))
        xi, yi = round(cx + (r - 4) * math.cos(a)), round(cy + (r - 4) * math.sin(a))
        if 0 <= xo < w and 0 <= yo < h:
            assert img[yo, xo].max() < 15, "redseg.data.synthetic's geometry changed: update fundus()"
        if 0 <= xi < w and 0 <= yi < h:
            assert img[yi, xi].max() > 30, "redseg.data.synthetic's geometry changed: update fundus()"
    return img, (cx, cy, r)


def assert_close(fov: FieldOfView, cx: float, cy: float, r: float, rel: float = 0.02) -> None:
    assert fov.border
    assert abs(fov.radius - r) <= rel * r, (fov, r)
    assert abs(fov.cx - cx) <= max(1.0, rel * r) and abs(fov.cy - cy) <= max(1.0, rel * r), (fov, cx, cy)
    assert fov.diameter == pytest.approx(2 * fov.radius)


@pytest.mark.parametrize("size", [(268, 178), (400, 300), (200, 300), (120, 80), (96, 96)])
def test_synthetic_photographs_of_any_size_and_aspect(size):
    w, h = size
    img, (cx, cy, r) = fundus(3, w, h)
    fov = find_fov(img)
    assert_close(fov, cx, cy, r)
    assert (fov.height, fov.width) == (h, w)


def test_cut_at_top_and_bottom_is_fitted_not_boxed():
    """IDRiD's frames cut the disc: its height in the frame is not its diameter."""
    img, (cx, cy, r) = fundus(5, 300, 200)
    y0 = round(cy - 0.55 * r)
    cut = img[y0 : round(cy + 0.55 * r)]  # 1.1 r high: the disc is far wider than the frame is high
    fov = find_fov(cut)
    assert_close(fov, cx, cy - y0, r)
    rows = np.flatnonzero(cut.max(axis=2).max(axis=1) > 20)
    assert rows[-1] - rows[0] + 1 < 0.6 * 2 * r  # a bounding box would be ~45 % too small


def test_black_margins_and_a_letterboxed_cut_disc():
    img, (cx, cy, r) = fundus(7, 240, 160)
    canvas = np.zeros((400, 330, 3), np.uint8)
    canvas[90 : 90 + 160, 50 : 50 + 240] = img  # the cut disc's flat top and bottom now inside the frame
    assert_close(find_fov(canvas), cx + 50, cy + 90, r)
    big = np.zeros((500, 500, 3), np.uint8)
    big[170:330, 130:370] = img
    assert_close(find_fov(big), cx + 130, cy + 170, r)
    # cut deep (1.1 r high), then letterboxed: long straight edges that are no part of the circle
    y0 = round(cy - 0.55 * r)
    cut = img[y0 : round(cy + 0.55 * r)]
    box = np.zeros((cut.shape[0] + 80, 280, 3), np.uint8)
    box[40 : 40 + cut.shape[0], 20:260] = cut
    assert_close(find_fov(box), cx + 20, cy - y0 + 40, r, rel=0.01)


@pytest.mark.parametrize("scale", [0.4, 2.5, 7.0])  # 7x: 1400 px wide, found on a smaller copy
def test_rescaled_photograph_scales_the_diameter(scale):
    img, (cx, cy, r) = fundus(9, 200, 140)
    w, h = round(200 * scale), round(140 * scale)
    resized = cv2.resize(img, (w, h), interpolation=cv2.INTER_AREA if scale < 1 else cv2.INTER_LINEAR)
    fov = find_fov(resized)
    assert abs(fov.diameter - 2 * r * w / 200) <= 0.03 * 2 * r * w / 200, (fov, r * w / 200)


def test_jpeg_compression_and_a_drawn_disc_with_a_notch():
    img, (cx, cy, r) = fundus(11, 268, 178)
    ok, buf = cv2.imencode(".jpg", img, [cv2.IMWRITE_JPEG_QUALITY, 60])
    assert_close(find_fov(cv2.imdecode(buf, cv2.IMREAD_COLOR)), cx, cy, r)
    # a drawn disc (shaded, not synthetic) with a camera's notch at its rim, on dark grey
    h, w = 300, 420
    yy, xx = np.mgrid[0:h, 0:w]
    d = np.hypot(xx - 205.3, yy - 148.6)
    img = np.full((h, w, 3), 8, np.uint8)
    inside = d <= 131.0
    img[inside] = np.stack([20 + 0 * d, 90 - 0.3 * d, 200 - 0.6 * d], -1)[inside].astype(np.uint8)
    cv2.rectangle(img, (203, 10), (208, 24), (8, 8, 8), -1)  # notch at the top
    assert_close(find_fov(img), 205.3, 148.6, 131.0, rel=0.015)


def test_mask_is_the_disc_inside_the_frame():
    img, (cx, cy, r) = fundus(13, 160, 110)
    m = fov_mask(img)
    assert m.shape == (110, 160) and m.dtype == bool
    yy, xx = np.mgrid[0:110, 0:160]
    truth = np.hypot(xx - cx, yy - cy) <= r
    assert (m != truth).sum() <= 0.02 * truth.sum()
    assert not m[0, 0] and m[round(cy), round(cx)]
    x0, y0, x1, y1 = find_fov(img).crop_box()
    assert x0 >= 0 and y0 == 0 and x1 <= 160 and y1 == 110  # cut at top/bottom: the crop is the frame's height
    assert abs((x1 - x0) - 2 * r) <= 3


def test_no_border_the_frame_is_the_fov():
    img, (cx, cy, r) = fundus(15, 400, 270)
    inner = img[round(cy - 60) : round(cy + 60), round(cx - 90) : round(cx + 90)]  # well inside the disc
    fov = find_fov(inner)
    assert not fov.border
    assert (fov.cx, fov.cy) == (89.5, 59.5)
    assert fov.diameter == pytest.approx(math.hypot(180, 120))  # the frame inscribed in the FOV
    assert fov.mask().all() and fov.crop_box() == (0, 0, 180, 120)
    large = cv2.resize(inner, (1800, 1200), interpolation=cv2.INTER_LINEAR)  # found on a smaller copy
    fov = find_fov(large)
    assert not fov.border and (fov.cx, fov.cy, fov.diameter) == (899.5, 599.5, math.hypot(1800, 1200))


@pytest.mark.parametrize(
    "kind",
    ["black", "grey", "white", "noise", "colour noise", "square", "tiny", "empty"],
)
def test_non_fundus_images_are_refused_by_name(kind):
    rng = np.random.default_rng(0)
    img = {
        "black": np.zeros((120, 160, 3), np.uint8),
        "grey": np.full((120, 160, 3), 128, np.uint8),
        "white": np.full((120, 160, 3), 255, np.uint8),
        "noise": np.repeat(rng.integers(0, 256, (120, 160, 1), dtype=np.uint8), 3, axis=2),
        "colour noise": rng.integers(0, 256, (120, 160, 3), dtype=np.uint8),
        "square": cv2.rectangle(np.zeros((120, 160, 3), np.uint8), (40, 20), (120, 100), (40, 90, 200), -1),
        "tiny": fundus(1, 64, 44)[0][:12, :12],
        "empty": np.zeros((0, 0, 3), np.uint8),
    }[kind]
    with pytest.raises(FovError, match="photo_7.jpg"):
        find_fov(img, "photo_7.jpg")
    assert issubclass(FovError, ValueError)


def test_fov_summary():
    assert fov_summary([100.0, None, 104.0, 300.0])[0] == 104.0  # the median of those measured
    d, how = fov_summary([None, None])
    assert d is None and "no field of view" in how


def _write_set(root: Path, images: dict[str, np.ndarray], meta: dict) -> Path:
    (root / "train" / "images").mkdir(parents=True)
    lines = []
    for name, img in images.items():
        cv2.imwrite(str(root / "train" / "images" / f"{name}.png"), img)
        m = root / "train" / "images" / f"{name}_m.png"
        cv2.imwrite(str(m), np.zeros(img.shape[:2], np.uint8))
        lines.append(f"train/images/{name}.png\ttrain/images/{name}_m.png\ttrain/images/{name}_m.png")
    (root / "train.txt").write_text("\n".join(lines) + "\n")
    (root / "meta.json").write_text(json.dumps(meta))
    (root / ".complete").write_text("")
    return root


def test_prepared_set_fov_diameter_from_meta_or_measured(tmp_path):
    from redseg.data.prepared_set import fov_diameter

    a, (_, _, ra) = fundus(21, 160, 106)
    b, (_, _, rb) = fundus(22, 160, 106)
    odd = np.rot90(a).copy()  # an augmented copy is left out when "_id" images exist
    old = _write_set(tmp_path / "old", {"x_id": a, "y_id": b, "x_rot90": odd}, {"mean_bgr": [1, 2, 3]})
    d = fov_diameter(old)
    assert d == pytest.approx(ra + rb, rel=0.02)  # the median of two diameters: their mean
    new = _write_set(tmp_path / "new", {"x_id": a}, {"fov_diameter_px": 123.5})
    assert fov_diameter(new) == 123.5  # meta.json wins, nothing measured


def test_preparation_records_the_training_fov_diameter(tmp_path):
    """redseg.data.idrid.prepare measures it at prepared size; the images themselves are as before."""
    from redseg.data.idrid import prepare
    from redseg.data.synthetic import generate_idrid_tree

    src = tmp_path / "IDRiD"
    generate_idrid_tree(src, n_train=3, n_test=1, seed=4, params=SyntheticParams(240, 160), progress=False)
    meta = prepare(src, tmp_path / "prep", factor=2, progress=False)
    photos = sorted((src / "A. Segmentation" / "1. Original Images" / "a. Training Set").glob("*.jpg"))
    full = [find_fov(cv2.imread(str(p))).diameter for p in photos]
    assert meta["fov_diameter_px"] == pytest.approx(float(np.median(full)) / 2, rel=0.02)
    assert "median over 3 of 3" in meta["fov_diameter_source"]
    assert json.loads((tmp_path / "prep" / "meta.json").read_text())["fov_diameter_px"] == meta["fov_diameter_px"]
