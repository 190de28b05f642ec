"""redseg/deploy/screening.py: counting lesions on maps, one photograph through FOV crop / rescale / net /
back, and a batch with bad files, with its summary files.

The net here is a stand-in that marks pure blue pixels as MA and pure green ones as HE (the real
nets are exercised by tests/deploy/test_segment_tool.py), so every count and area is known.
"""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import cv2
import numpy as np
import pytest

from redseg import config as C
from redseg.data.fov import FieldOfView, find_fov
from redseg.deploy import screening as S

BLUE, GREEN = (255, 0, 0), (0, 255, 0)


def settings(fov_d: float = 100.0, t: float = 0.5, min_size: int = 2) -> S.Settings:
    return S.Settings(fov_d, "test", {"MA": t, "HE": t}, {"MA": "test", "HE": "test"}, min_size, "stand-in")


class ColourNet:
    """MA where a pixel is blue, HE where it is green (probability 1), else 0.1 everywhere (below
    any threshold used here, but not zero: the maps must be zeroed outside the FOV); records its inputs."""

    def __init__(self):
        self.shapes = []
        self.last = None

    def __call__(self, img):
        self.shapes.append(img.shape[:2])
        self.last = img.copy()
        b, g, r = (img[..., i].astype(int) for i in range(3))
        return {
            "MA": np.maximum((b > 200) & (g < 60) & (r < 60), 0.1).astype(np.float32),
            "HE": np.maximum((g > 200) & (b < 60) & (r < 60), 0.1).astype(np.float32),
        }


def photo(w: int = 300, h: int = 200, r: float = 120.0, cx: float = 150.0, cy: float = 100.0) -> np.ndarray:
    """A shaded orange disc cut at top and bottom, on black, with lesion-coloured spots placed in
    FOV-relative units: MA (blue) 3 superior-left, 1 inferior-right; HE (green) 1 superior-right,
    2 inferior-left. Sizes scale with ``r`` (so the counts must not depend on the photo's scale)."""
    yy, xx = np.mgrid[0:h, 0:w]
    d = np.hypot(xx - cx, yy - cy)
    img = np.zeros((h, w, 3), np.uint8)
    inside = d <= r
    img[inside] = np.stack([30 + 0 * d, 80 - 0.2 * d, 190 - 0.4 * d], -1)[inside].astype(np.uint8)
    k = r / 120.0

    def dot(u, v, rad, colour):
        cv2.circle(img, (round(cx + u * r), round(cy + v * r)), max(1, round(rad * k)), colour, -1)

    for u, v in [(-0.5, -0.3), (-0.3, -0.5), (-0.2, -0.2)]:
        dot(u, v, 3, BLUE)
    dot(0.4, 0.3, 3, BLUE)
    dot(0.3, -0.35, 8, GREEN)
    dot(-0.4, 0.3, 7, GREEN)
    dot(-0.2, 0.45, 6, GREEN)
    return img


# --- counting -----------------------------------------------------------------------------------


def test_quadrants_are_image_oriented():
    assert S.quadrant(10, 10, 50, 50) == "superior_left"  # above and left as displayed
    assert S.quadrant(90, 10, 50, 50) == "superior_right"
    assert S.quadrant(10, 90, 50, 50) == "inferior_left"
    assert S.quadrant(90, 90, 50, 50) == "inferior_right"
    assert S.quadrant(50, 50, 50, 50) == "inferior_right"  # on both axes: inferior, right


def test_components_minimum_size_and_threshold():
    u8 = np.zeros((60, 80), np.uint8)
    u8[5, 5] = 255  # 1 px: below the minimum of 2
    u8[10, 10:12] = 200  # 2 px: counted
    u8[30:34, 40:44] = 128  # 16 px exactly at t = 0.5 (128 / 255 >= 0.5): counted
    u8[50:53, 60:63] = 127  # 9 px just below 0.5: not lesion
    u8[20, 70] = u8[21, 71] = 255  # diagonal neighbours: one 8-connected component of 2 px
    comps = S.components(u8, 0.5, 2)
    assert sorted(c["area"] for c in comps) == [2, 2, 16]
    big = next(c for c in comps if c["area"] == 16)
    assert (big["x"], big["y"]) == (41.5, 31.5)
    assert len(S.components(u8, 0.5, 1)) == 4  # min size 1: the single pixel counts too
    assert len(S.components(u8, 0.5, 0)) == 4  # 0 means no minimum as well
    assert len(S.components(u8, 0.49, 2)) == 4  # at 0.49 the 127s are lesion (125 is the cut)
    assert [c["area"] for c in S.components(u8, 0.9, 2)] == [2]  # only the 255s


def test_count_lesions_per_quadrant_inside_the_fov():
    fov = FieldOfView(50.0, 40.0, 30.0, 80, 100, True)
    ma = np.zeros((80, 100), np.uint8)
    he = np.zeros((80, 100), np.uint8)
    for x, y in [(35, 25), (40, 30), (62, 50), (30, 55)]:
        ma[y : y + 2, x : x + 2] = 255
    ma[2:5, 2:5] = 255  # outside the FOV: not counted
    ma[60, 60] = 255  # 1 px: below the minimum
    he[20:30, 55:66] = 255
    counts = S.count_lesions({"MA": ma, "HE": he}, fov, {"MA": 0.5, "HE": 0.5}, 2)
    assert counts["MA"]["count"] == 4
    assert counts["MA"]["quadrants"] == {
        "superior_left": 2,
        "superior_right": 0,
        "inferior_left": 1,
        "inferior_right": 1,
    }
    assert counts["HE"]["count"] == 1 and counts["HE"]["quadrants"]["superior_right"] == 1
    assert counts["HE"]["areas"] == [110]


# --- one photograph -----------------------------------------------------------------------------


def test_segment_photo_counts_quadrants_and_maps_at_the_photos_size():
    img = photo()
    net = ColourNet()
    res = S.segment_photo(img, net, settings(fov_d=120.0), "p.png")
    assert res.counts["MA"]["count"] == 4 and res.counts["HE"]["count"] == 3
    assert res.counts["MA"]["quadrants"] == {
        "superior_left": 3,
        "superior_right": 0,
        "inferior_left": 0,
        "inferior_right": 1,
    }
    assert res.counts["HE"]["quadrants"] == {
        "superior_left": 0,
        "superior_right": 1,
        "inferior_left": 2,
        "inferior_right": 0,
    }
    # the net saw the FOV crop at the training FOV diameter: 240 px across -> 120
    assert len(net.shapes) == 1 and net.shapes[0][0] == 100 and abs(net.shapes[0][1] - 120) <= 1
    assert res.scale == pytest.approx(120.0 / res.fov.diameter)
    for m in res.maps.values():
        assert m.shape == (200, 300) and m.dtype == np.uint8
        assert not m[~res.fov.mask()].any()  # zero outside the FOV
    he_truth = ((img[..., 1] > 200) & (img[..., 0] < 60)).sum()
    assert abs(res.he_area_px - he_truth) <= 0.2 * he_truth  # back at the photo's pixels
    assert res.fov_area_px == res.fov.mask().sum()
    assert (res.maps["MA"][res.fov.mask()] >= 25).mean() > 0.99  # the 0.1 floor (26) inside


def test_the_net_sees_the_fov_on_black():
    """A grey-ish surround (camera text, a dark-grey margin) is blacked out before the net, as the
    training images' surround is black."""
    img = photo()
    surround = img.max(axis=2) == 0
    img[surround] = 25
    cv2.putText(img, "CAM", (2, 195), cv2.FONT_HERSHEY_SIMPLEX, 0.5, (200, 200, 200), 1)
    net = ColourNet()
    res = S.segment_photo(img, net, settings(fov_d=120.0))
    assert res.fov.border
    h, w = net.last.shape[:2]
    assert not net.last[[0, 0, h - 1, h - 1], [0, w - 1, 0, w - 1]].any()
    assert net.last[h // 2, w // 2].any()


def test_counts_do_not_depend_on_the_cameras_scale_or_margins():
    """The same fundus at 1/2 size, at 2x with wide margins, and without a border at all: the FOV
    rescaling gives the net the same picture, so the same counts."""
    net = ColourNet()
    s = settings(fov_d=120.0)
    base = S.segment_photo(photo(), net, s)
    small = S.segment_photo(photo(150, 100, 60.0, 75.0, 50.0), net, s)
    big = np.zeros((560, 800, 3), np.uint8)
    big[80:480, 100:700] = photo(600, 400, 240.0, 300.0, 200.0)
    large = S.segment_photo(big, net, s)
    for res in (small, large):
        for les in C.LESIONS:
            assert res.counts[les]["quadrants"] == base.counts[les]["quadrants"], les
    assert large.maps["HE"].shape == (560, 800)
    assert large.he_area_px == pytest.approx(4 * base.he_area_px, rel=0.15)
    assert large.he_area_px / large.fov_area_px == pytest.approx(base.he_area_px / base.fov_area_px, rel=0.15)


def test_min_size_drops_specks():
    """At the training FOV diameter of the photo itself (scale 1), a 1-px MA is dropped by the
    default minimum and counted without one; a 2-px one is counted."""
    img = photo()
    img[150, 200] = BLUE
    img[60, 200:202] = BLUE
    net = ColourNet()
    fov = find_fov(img)
    s = settings(fov_d=fov.diameter, min_size=C.MIN_COMPONENT_PX)
    res = S.segment_photo(img, net, s)
    assert res.scale == 1.0 and net.shapes[-1] == (200, 241)  # the FOV crop, not resized
    n_default = res.counts["MA"]["count"]
    s.min_size = 0
    n0 = S.segment_photo(img, net, s).counts["MA"]["count"]
    s.min_size = 3
    n3 = S.segment_photo(img, net, s).counts["MA"]["count"]
    assert (n0, n_default, n3) == (6, 5, 4)


# --- a batch and its summary --------------------------------------------------------------------


@pytest.fixture
def batch(tmp_path) -> Path:
    d = tmp_path / "photos"
    d.mkdir()
    cv2.imwrite(str(d / "b_good.jpg"), photo(), [cv2.IMWRITE_JPEG_QUALITY, 98])
    cv2.imwrite(str(d / "a_good.png"), photo(150, 100, 60.0, 75.0, 50.0))
    ok, buf = cv2.imencode(".jpg", photo())
    (d / "c_truncated.jpg").write_bytes(buf.tobytes()[: len(buf) // 2])
    (d / "d_corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0" + bytes(range(256)) * 8)  # JPEG header, garbage
    (d / "e_text.png").write_text("not an image\n")
    cv2.imwrite(str(d / "f_noise.png"), np.random.default_rng(0).integers(0, 256, (90, 120, 3), dtype=np.uint8))
    (d / "notes.txt").write_text("a folder's other files are not photographs\n")
    return d


def test_batch_skips_bad_files_with_reasons_and_finishes_the_others(batch, tmp_path):
    paths = S.list_inputs([batch, tmp_path / "missing.jpg"])
    assert [p.name for p in paths] == [
        "a_good.png",
        "b_good.jpg",
        "c_truncated.jpg",
        "d_corrupt.jpg",
        "e_text.png",
        "f_noise.png",
        "missing.jpg",
    ]  # a folder: its image files, sorted; notes.txt left out
    out = tmp_path / "out"
    rows = S.screen(paths, ColourNet(), settings(fov_d=120.0), out, progress=False)
    status = {Path(r["image"]).name: r["status"] for r in rows}
    assert status["a_good.png"] == status["b_good.jpg"] == "ok"
    assert "truncated" in status["c_truncated.jpg"]
    assert "corrupt JPEG" in status["d_corrupt.jpg"] and "decode" in status["e_text.png"]
    assert "noise" in status["f_noise.png"]
    assert "not found" in status["missing.jpg"]
    assert all(s == "ok" or s.startswith("skipped: ") for s in status.values())
    good = {Path(r["image"]).name: r for r in rows if r["status"] == "ok"}
    assert good["a_good.png"]["ma_count"] == good["b_good.jpg"]["ma_count"] == 4
    assert good["b_good.jpg"]["he_count"] == 3
    ma = cv2.imread(str(out / "b_good_ma.png"), cv2.IMREAD_UNCHANGED)
    assert ma.shape == (200, 300) and ma.dtype == np.uint8
    assert cv2.imread(str(out / "a_good_he.png"), cv2.IMREAD_UNCHANGED).shape == (100, 150)
    assert cv2.imread(str(out / "b_good_overlay.png")).shape == (200, 2 * 300 + 4, 3)
    assert cv2.imread(str(out / "thumbs" / "b_good.jpg")) is not None


def test_summary_files(batch, tmp_path):
    out = tmp_path / "out"
    s = settings(fov_d=120.0)
    rows = S.screen(S.list_inputs([batch]), ColourNet(), s, out, progress=False)
    paths = S.write_summary(out, rows, s)
    with open(paths["csv"], newline="") as f:
        table = list(csv.DictReader(f))
    assert list(table[0]) == list(S.COLUMNS)
    for col in ("image", "status", "fov_diameter_px", "ma_count", "he_count", "he_area_px",
                "he_area_fraction_of_fov", "ma_superior_left", "he_inferior_right", "ma_threshold",
                "ma_threshold_source", "he_threshold", "he_threshold_source", "min_component_px"):  # fmt: skip
        assert col in table[0]
    assert len(table) == 6
    b = next(r for r in table if r["image"].endswith("b_good.jpg"))
    assert int(b["ma_superior_left"]) == 3 and int(b["he_inferior_left"]) == 2
    assert 0 < float(b["he_area_fraction_of_fov"]) < 0.05
    assert float(b["fov_diameter_px"]) == pytest.approx(240, rel=0.02)
    doc = json.loads(paths["json"].read_text())
    assert doc["n_ok"] == 2 and doc["n_skipped"] == 4 and len(doc["photos"]) == 6
    assert doc["settings"]["thresholds"] == {"MA": 0.5, "HE": 0.5}
    assert "not a diagnosis" in doc["settings"]["disclaimer"]
    page = paths["html"].read_text()
    assert "not a diagnosis" in page and "f_noise.png" in page
    for ref in ("b_good_overlay.png", "thumbs/b_good.jpg"):
        assert f'src="{ref}"' in page and (out / ref).is_file()  # relative links to files beside the page
    assert "http" not in page  # self-contained


def test_page_links_names_with_odd_characters(tmp_path):
    d = tmp_path / "in"
    d.mkdir()
    cv2.imwrite(str(d / "eye #1 <a>.png"), photo(150, 100, 60.0, 75.0, 50.0))
    s = settings()
    rows = S.screen(S.list_inputs([d]), ColourNet(), s, tmp_path / "o", progress=False)
    page = S.write_summary(tmp_path / "o", rows, s)["html"].read_text()
    assert 'src="eye%20%231%20%3Ca%3E_overlay.png"' in page and (tmp_path / "o" / "eye #1 <a>_overlay.png").is_file()
    assert "<a>" not in page.replace("<a href", "")  # the name is escaped in the text


def test_same_names_from_two_folders_do_not_overwrite(tmp_path):
    for sub in ("x", "y"):
        (tmp_path / sub).mkdir()
        cv2.imwrite(str(tmp_path / sub / "eye.png"), photo(150, 100, 60.0, 75.0, 50.0))
    rows = S.screen(S.list_inputs([tmp_path / "x", tmp_path / "y"]), ColourNet(), settings(), tmp_path / "o", False)
    assert [r["ma_map"] for r in rows] == ["eye_ma.png", "eye_2_ma.png"]


def test_out_must_not_be_an_input_folder(batch):
    with pytest.raises(S.ScreeningError, match="--out"):
        S.check_out(batch, [batch])
    with pytest.raises(S.ScreeningError, match="--out"):
        S.check_out(batch, [batch / "b_good.jpg"])
    S.check_out(batch.parent / "out", [batch])


def test_settings_precedence():
    s = S.resolve_settings("m", None, None, "no sidecar")
    assert s.fov_diameter_px == C.IDRID_QUARTER_FOV_DIAMETER_PX and "default" in s.fov_source
    assert s.thresholds == {"MA": 0.5, "HE": 0.5} and "default 0.5" in s.threshold_sources["HE"]
    s = S.resolve_settings("m", 222.2, {"MA": 0.52, "HE": None}, "sidecar m.json")
    assert s.fov_diameter_px == 222.2 and s.thresholds == {"MA": 0.52, "HE": 0.5}
    assert "break-even" in s.threshold_sources["MA"] and "sidecar m.json" in s.threshold_sources["MA"]
    s = S.resolve_settings("m", 222.2, {"MA": 0.52}, "x", data_fov=(300.0, "--data d"), threshold={"MA": 0.3})
    assert (s.fov_diameter_px, s.fov_source) == (300.0, "--data d")
    assert s.thresholds["MA"] == 0.3 and s.threshold_sources["MA"] == "--threshold"
    assert S.resolve_settings("m", 222.2, None, "x", fov_diameter=50).fov_diameter_px == 50
    with pytest.raises(S.ScreeningError):
        S.resolve_settings("m", None, None, "x", min_size=-1)
    assert math.isclose(S.resolve_settings("m", None, None, "x", data_fov=(None, "d")).fov_diameter_px, 853.0)


# --- parts and merging ----------------------------------------------------------------------------


def test_output_names_and_parts_follow_the_whole_input_list():
    paths = [Path("a/eye.jpg"), Path("b/EYE.png"), Path("b/x.jpg"), Path("c/eye.tif")]
    assert S.output_stems(paths) == ["eye", "EYE_2", "x", "eye_3"]  # an unreadable first eye still holds "eye"
    assert [S.part_indices(7, 3, i) for i in range(3)] == [[0, 3, 6], [1, 4], [2, 5]]
    assert S.part_indices(2, 4, 3) == []  # more parts than photographs: an empty part
    for n, i in ((2, 2), (2, -1), (0, 0)):
        with pytest.raises(S.ScreeningError, match="--part-id|--num-parts"):
            S.part_indices(5, n, i)


def test_merge_refuses_stale_or_broken_parts(batch, tmp_path):
    """Parts of two splits, a part file that is not one, parts of other inputs: refused, naming them."""
    out = tmp_path / "out"
    s = settings(fov_d=120.0)
    paths = S.list_inputs([batch])
    fp = {"model_sha256": "0" * 64}
    for i in range(2):
        idx = S.part_indices(len(paths), 2, i)
        rows = S.screen(paths, ColourNet(), s, out, progress=False, indices=idx, fingerprint=fp)
        S.write_part(out, rows, idx, s, i, 2, paths, fp)
    merged, s2 = S.merge_parts(out)
    whole = S.screen(paths, ColourNet(), s, tmp_path / "one", progress=False)
    assert merged == whole and s2 == s
    S.write_part(out, [], [], s, 0, 3, paths, fp)
    with pytest.raises(S.ScreeningError, match="different splits \\(of 2, of 3\\)"):
        S.merge_parts(out)
    (out / "parts" / "part-0-of-3.json").unlink()
    (out / "parts" / "part-1-of-2.json").write_text('{"part": 1')  # not a whole part
    with pytest.raises(S.ScreeningError, match="part-1-of-2.json: not a part summary"):
        S.merge_parts(out)
    idx = S.part_indices(len(paths) - 1, 2, 1)
    S.write_part(out, [{}] * len(idx), idx, s, 1, 2, paths[:-1], fp)
    with pytest.raises(S.ScreeningError, match="different input lists"):
        S.merge_parts(out)
