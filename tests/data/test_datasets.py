"""The readers of DDR, FGADR, e-ophtha MA and DiaretDB1 (redseg.data.ddr, .fgadr, .eophtha,
.diaretdb1, on redseg.data.sources), IDRiD's count check, the registry (redseg.data.datasets) and
the one builder (redseg.data.prepare, tools/prepare_data.py).

Small trees written here with cv2.imwrite where the pixels must be known exactly (mask encodings,
a lesion of known size relative to the field of view), and small synthetic copies
(redseg.data.synthetic_layouts) where a whole tree as published helps. The layouts checked are
those of ../shared/datasets.md, spelled out here rather than taken from the readers.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import subprocess
import zipfile
from pathlib import Path

import cv2
import numpy as np
import pytest

from redseg.config import DIARETDB1_TRAIN_IDS
from redseg.data import fgadr
from redseg.data.archive import SourceError
from redseg.data.datasets import READERS, detect, open_source
from redseg.data.fov import find_fov
from redseg.data.prepare import PrepareOptions, prepare_source
from redseg.data.synthetic import SyntheticParams
from redseg.data.synthetic_layouts import CAMERAS, generate_layout

REPO = Path(__file__).resolve().parents[2]
TOOL = REPO / "tools" / "prepare_data.py"
MARKER = "synthetic.json"

DDR = "lesion_segmentation"
DDR_LESIONS = ("EX", "HE", "MA", "SE")
FG = "Seg-set"
FG_DIRS = {"MA": "Microaneurysms_Masks", "HE": "Hemohedge_Masks"}  # sic
DDB1_IMG = "resources/images/ddb1_fundusimages"
DDB1_GT = "resources/images/ddb1_groundtruth"
DDB1_DIRS = {"MA": "redsmalldots", "HE": "hemorrhages"}
SEG = "A. Segmentation"
IDRID_IMG = f"{SEG}/1. Original Images/a. Training Set"
IDRID_GT = f"{SEG}/2. All Segmentation Groundtruths/a. Training Set"

W, H, D = 96, 80, 84  # the small frame of the mask-rule trees: FOV 84 px, cut at the top and bottom


# --------------------------------------------------------------------------------------------------
# helpers


def _write(path: Path, arr: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    assert cv2.imwrite(str(path), arr), path


def _read(path: Path) -> np.ndarray:
    a = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    assert a is not None, path
    return a


def _fundus(w: int, h: int, d: float) -> np.ndarray:
    """A fundus-like photograph: an orange disc of diameter ``d`` at the frame's centre (cut by the
    frame when ``d`` > ``h``), darker towards its rim, with a gentle texture, on black."""
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float64)
    r = np.hypot(xx - (w - 1) / 2, yy - (h - 1) / 2) / (d / 2)
    img = np.zeros((h, w, 3), np.float64)
    for c, v in enumerate((40, 85, 175)):
        img[..., c] = v * (1 - 0.35 * r**2) + 6 * np.sin(xx / 7.0)
    img[r > 1] = 0
    return np.clip(img, 0, 255).astype(np.uint8)


def _disc(w: int, h: int, cx: float, cy: float, r: float) -> np.ndarray:
    yy, xx = np.mgrid[0:h, 0:w]
    return np.hypot(xx - cx, yy - cy) <= r


def _marker(root: Path, layout: str, counts: dict[str, int]) -> None:
    """What tools/make_synthetic.py writes at a tree's root: its own counts stand in for the published."""
    root.mkdir(parents=True, exist_ok=True)
    info = {"generator": "redseg.synthetic", "layout": layout, "counts": counts}
    (root / MARKER).write_text(json.dumps(info))


def _ddr_tree(
    root: Path,
    groups: dict[str, list[str]],
    masks: dict[tuple[str, str], np.ndarray] | None = None,
    frames: dict[str, tuple[int, int, float]] | None = None,
    marker: bool = True,
) -> Path:
    """DDR as published: all four masks per image (all black unless in ``masks``); ``frames``: a
    stem's (width, height, FOV diameter), default (W, H, D)."""
    masks, frames = masks or {}, frames or {}
    for group, stems in groups.items():
        label = "segmentation label" if group == "valid" else "label"
        for stem in stems:
            w, h, d = frames.get(stem, (W, H, D))
            _write(root / DDR / group / "image" / f"{stem}.jpg", _fundus(w, h, d))
            for lesion in DDR_LESIONS:
                m = masks.get((stem, lesion), np.zeros((h, w), np.uint8))
                _write(root / DDR / group / label / lesion / f"{stem}.tif", m)
    if marker:
        _marker(root, "ddr", {g: len(s) for g, s in groups.items()})
    return root


def _fgadr_tree(root: Path, ids: list[str], masks: dict | None = None, marker: bool = True) -> Path:
    masks = masks or {}
    for i in ids:
        _write(root / FG / "Original_Images" / f"{i}.png", _fundus(W, H, D))
        for lesion, folder in FG_DIRS.items():
            _write(root / FG / folder / f"{i}.png", masks.get((i, lesion), np.zeros((H, W), np.uint8)))
    if marker:
        _marker(root, "fgadr", {"all": len(ids)})
    return root


def _eophtha_tree(
    root: Path, top: str, ma: dict[tuple[str, str], np.ndarray], healthy: list[tuple[str, str]], marker: bool = True
) -> Path:
    """``ma``: (patient, image) -> annotation as written; ``healthy``: (patient, image), no annotation."""
    for (patient, name), m in ma.items():
        _write(root / top / "MA" / patient / f"{name}.jpg", _fundus(W, H, D))
        _write(root / top / "Annotation_MA" / patient / f"{name}.png", m)
    for patient, name in healthy:
        _write(root / top / "healthy" / patient / f"{name}.jpg", _fundus(W, H, D))
    if marker:
        _marker(root, "eophtha-ma", {"MA": len(ma), "healthy": len(healthy)})
    return root


def _ddb1_tree(root: Path, numbers: list[int], masks: dict | None = None, marker: bool = True) -> Path:
    masks = masks or {}
    for n in numbers:
        name = f"image{n:03d}"
        _write(root / DDB1_IMG / f"{name}.png", _fundus(W, H, D))
        for lesion, folder in DDB1_DIRS.items():
            _write(root / DDB1_GT / folder / f"{name}.png", masks.get((n, lesion), np.zeros((H, W), np.uint8)))
    if marker:
        train = sum(n in DIARETDB1_TRAIN_IDS for n in numbers)
        _marker(root, "diaretdb1", {"train": train, "test": len(numbers) - train})
    return root


def _zip(folder: Path, dest: Path, top: str = "") -> Path:
    """A .zip of everything below ``folder``, members under ``top`` (or at the zip's root)."""
    with zipfile.ZipFile(dest, "w", zipfile.ZIP_STORED) as z:
        for p in sorted(folder.rglob("*")):
            if p.is_file():
                z.write(p, top + p.relative_to(folder).as_posix())
    return dest


def _lines(path: Path) -> list[list[str]]:
    return [ln.split("\t") for ln in path.read_text().splitlines() if ln and not ln.startswith("#")]


def _meta(out: Path) -> dict:
    return json.loads((out / "meta.json").read_text())


def _cli(python: str, *args: str) -> subprocess.CompletedProcess:
    cmd = [python, str(TOOL), "--no-progress", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd=REPO)


def _one_line_error(proc: subprocess.CompletedProcess) -> str:
    assert proc.returncode == 1, (proc.returncode, proc.stdout, proc.stderr)
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip() and not ln.startswith("WARNING")]
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("prepare_data.py: error: "), lines[0]
    assert "Traceback" not in proc.stderr
    return lines[0]


def _nothing_written(out: Path) -> None:
    assert not out.exists()
    assert not [p for p in out.parent.iterdir() if p.name.startswith(out.name + ".")], list(out.parent.iterdir())


def _mask_file(out: Path, split: str, name: str, lesion: str) -> Path:
    """A prepared mask: training samples carry their augmentation (``_id`` is the image as is)."""
    return out / split / "masks" / (f"{name}_id_{lesion}.png" if split == "train" else f"{name}_{lesion}.png")


FACTOR_1 = PrepareOptions(factor=1)  # the masks as read, at their full size


@pytest.fixture(scope="module")
def generated(tmp_path_factory) -> dict[str, Path]:
    """Small synthetic copies of the four layouts as published (about 2 s)."""
    base = tmp_path_factory.mktemp("generated")
    n = {
        "ddr": {"train": 1, "valid": 2, "test": 1},
        "fgadr": {"all": 4},
        "eophtha-ma": {"MA": 2, "healthy": 1},
        "diaretdb1": {"train": 1, "test": 1},
    }
    out = {}
    for layout, counts in n.items():
        out[layout] = base / layout
        generate_layout(layout, out[layout], seed=7, n=counts, progress=False)
    return out


@pytest.fixture(scope="module")
def prepared(generated, tmp_path_factory) -> dict[str, Path]:
    """Each synthetic copy prepared with the FOV brought to 160 px (the CLI's lesion choice)."""
    base = tmp_path_factory.mktemp("prepared")
    out = {}
    for layout, src in generated.items():
        with open_source(src) as source:
            lesions = tuple(x for x in ("MA", "HE", "EX", "SE") if x in source.lesions or x in ("MA", "HE"))
            prepare_source(source, base / layout, PrepareOptions(lesions=lesions, fov_diameter=160.0), progress=False)
        out[layout] = base / layout
    return out


# --------------------------------------------------------------------------------------------------
# 1. the layouts as published


def test_ddr_read_from_its_parent_from_lesion_segmentation_and_from_a_zip(tmp_path):
    ma = np.zeros((H, W), np.uint8)
    ma[30:34, 50:53] = 255
    root = _ddr_tree(
        tmp_path / "DDR-dataset",
        {"train": ["007-2846-100", "007-2847-100"], "valid": ["013-1001-101"], "test": ["020-3000-100"]},
        masks={("013-1001-101", "MA"): ma},
    )
    zdir = tmp_path / "zips"
    zdir.mkdir()
    z = _zip(root, zdir / "DDR-dataset.zip", top="DDR-dataset/")
    for src in (root, root / DDR, z):
        assert detect(src) == "ddr"
        with open_source(src) as s:
            assert s.is_zip == (src == z)
            assert s.synthetic and s.partial == []
            assert s.summary() == {"train": 2, "valid": 1, "test": 1}
            assert [it.name for it in s.items("train")] == ["007-2846-100", "007-2847-100"]
            assert [it.name for it in s.items("test")] == ["020-3000-100"]
            (val,) = s.items("val")  # DDR's 'valid' is the prepared set's val split
            assert val.name == "013-1001-101"
            assert set(val.masks) == {"MA", "HE", "EX", "SE"} and all(val.masks.values())
            assert val.masks["MA"].key == "valid/segmentation label/MA/013-1001-101.tif"
            assert s.items("train")[0].masks["HE"].key == "train/label/HE/007-2846-100.tif"
            got = s.read_mask(val.masks["MA"])
            assert got.dtype == bool and got.sum() == 12 and got[30:34, 50:53].all()
            assert not s.read_mask(val.masks["HE"]).any()
    assert [p.name for p in zdir.iterdir()] == ["DDR-dataset.zip"]  # read in place, nothing extracted


@pytest.mark.parametrize("top", ["e_optha_MA", "e_ophtha_MA"])
def test_eophtha_both_spellings_and_healthy_images_without_annotation(tmp_path, top):
    ann = np.zeros((H, W, 3), np.uint8)
    ann[40:43, 30:33] = 255
    root = _eophtha_tree(
        tmp_path / "e-ophtha",
        top,
        {("E0001404", "C0001273"): ann, ("E0001404", "C0001280"): np.zeros((H, W, 3), np.uint8)},
        healthy=[("E0001500", "C0002000")],
    )
    assert detect(root) == "eophtha-ma"
    with open_source(root) as s:
        assert s.splits == ("test",)
        assert s.summary() == {"MA": 2, "healthy": 1}
        items = {it.name: it for it in s.items("test")}
        assert sorted(items) == ["C0001273", "C0001280", "C0002000"]
        assert items["C0002000"].masks == {"MA": None}  # healthy: no annotation, no lesion
        assert items["C0001273"].masks["MA"].key == "Annotation_MA/E0001404/C0001273.png"
        assert s.read_mask(items["C0001273"].masks["MA"]).sum() == 9
        assert s.items("train") == []


def _hash_test(name: str) -> bool:  # the split as docs/datasets.md states it, computed here
    return int(hashlib.sha256(name.encode()).hexdigest()[:8], 16) % 5 == 0


def test_fgadr_hemohedge_masks_and_a_split_that_does_not_depend_on_the_others(tmp_path):
    ids = [f"{i // 2 + 1:04d}_{i % 2 + 1}" for i in range(12)]
    assert any(map(_hash_test, ids)) and not all(map(_hash_test, ids))  # both splits get images
    he = np.zeros((H, W), np.uint8)
    he[20:30, 20:30] = 255
    root = _fgadr_tree(tmp_path / "FGADR", ids, {(ids[0], "HE"): he})
    assert detect(root) == "fgadr"
    with open_source(root) as s:
        test = [it.name for it in s.items("test")]
        train = [it.name for it in s.items("train")]
        assert test == sorted(i for i in ids if _hash_test(i))
        assert train == sorted(i for i in ids if not _hash_test(i))
        first = next(it for it in s.items("test") + s.items("train") if it.name == ids[0])
        assert first.masks["HE"].key == f"Hemohedge_Masks/{ids[0]}.png"
        assert s.read_mask(first.masks["HE"]).sum() == 100
    subset = ids[1::3]  # other ids present: the same split for these
    root2 = _fgadr_tree(tmp_path / "FGADR-some", subset)
    with open_source(root2) as s:
        assert [it.name for it in s.items("test")] == sorted(i for i in subset if _hash_test(i))
        assert [it.name for it in s.items("train")] == sorted(i for i in subset if not _hash_test(i))
    many = [f"{i // 2 + 1:04d}_{i % 2 + 1}" for i in range(2000)]
    share = sum(map(fgadr.test_by_hash, many)) / len(many)
    assert 0.17 < share < 0.23, share
    assert [fgadr.test_by_hash(i) for i in many] == [_hash_test(i) for i in many]


def test_diaretdb1_official_split(tmp_path):
    assert 1 in DIARETDB1_TRAIN_IDS and 2 not in DIARETDB1_TRAIN_IDS and 3 in DIARETDB1_TRAIN_IDS
    root = _ddb1_tree(tmp_path / "diaretdb1_v_1_1", [1, 2, 3, 5])
    assert detect(root) == "diaretdb1"
    for src in (root, root / "resources", root / "resources" / "images"):
        with open_source(src) as s:
            assert s.synthetic, src
            assert [it.name for it in s.items("train")] == ["image001", "image003"]
            assert [it.name for it in s.items("test")] == ["image002", "image005"]
            assert s.items("test")[0].masks["MA"].key == "ddb1_groundtruth/redsmalldots/image002.png"
            assert s.items("test")[0].masks["HE"].key == "ddb1_groundtruth/hemorrhages/image002.png"


def test_detect_each_layout_and_refuse_others_by_name(generated, tmp_path):
    for layout, root in generated.items():
        assert detect(root) == layout
    _write(tmp_path / "idrid" / IDRID_IMG / "IDRiD_01.jpg", _fundus(W, H, D))
    assert detect(tmp_path / "idrid") == "idrid"

    other = tmp_path / "photos"
    _write(other / "holiday" / "img_0001.jpg", _fundus(W, H, D))
    with pytest.raises(SourceError) as e:
        detect(other)
    for name in ("no known data set layout", "A. Segmentation", "lesion_segmentation/", "Seg-set/", "e_optha_MA/"):
        assert name in str(e.value)
    assert "ddb1_fundusimages" in str(e.value)

    # DDR re-packaged for another hub: no lesion_segmentation
    hub = tmp_path / "ddr-hub"
    _write(hub / "annotations" / "train" / "image" / "007-2846-100.jpg", _fundus(W, H, D))
    _write(hub / "annotations" / "train" / "label" / "MA" / "007-2846-100.tif", np.zeros((H, W), np.uint8))
    with pytest.raises(SourceError, match="no known data set layout"):
        detect(hub)
    with pytest.raises(SourceError) as e:
        open_source(hub, "ddr")
    msg = str(e.value)
    assert "no DDR layout" in msg and "lesion_segmentation/{train,valid,test}/image" in msg
    assert "segmentation label" in msg and "re-packaged" in msg

    # a split zip joined incompletely: the members lost their lesion_segmentation/ folder
    broken = _ddr_tree(tmp_path / "ddr-full", {"train": ["a"], "valid": ["b"], "test": ["c"]})
    z = _zip(broken / DDR, tmp_path / "ddr-broken.zip")
    with pytest.raises(SourceError, match=r"no DDR layout in .*ddr-broken\.zip: expected lesion_segmentation/"):
        open_source(z, "ddr")
    # a synthetic copy of one layout read as another is refused naming the right --dataset
    _ddr_tree(tmp_path / "mixed", {"train": ["a"]}, marker=False)
    _marker(tmp_path / "mixed", "fgadr", {"all": 1})
    with pytest.raises(SourceError, match="not of DDR; pass --dataset fgadr"):
        open_source(tmp_path / "mixed", "ddr")


# --------------------------------------------------------------------------------------------------
# 2. each set's mask rule, on masks in its own encoding: as read and as prepared (scale 1)


def test_ddr_mask_rule_single_channel_tiff_nonzero_is_lesion(tmp_path):
    ma = np.zeros((H, W), np.uint8)
    ma[_disc(W, H, 60, 40, 3)] = 255
    ma[20, 30] = 1  # any non-zero value is lesion
    he = np.zeros((H, W), np.uint8)
    he[50:56, 20:28] = 255
    root = _ddr_tree(tmp_path / "ddr", {"train": ["a"], "test": ["b"]}, masks={("a", "MA"): ma, ("b", "HE"): he})
    assert _read(root / DDR / "train/label/MA/a.tif").shape == (H, W)  # single channel, as published
    with open_source(root, "ddr") as s:
        (a,) = s.items("train")
        (b,) = s.items("test")
        np.testing.assert_array_equal(s.read_mask(a.masks["MA"]), ma > 0)
        np.testing.assert_array_equal(s.read_mask(b.masks["HE"]), he > 0)
        assert not s.read_mask(a.masks["HE"]).any()  # all black: no lesion
        bgra = np.zeros((H, W, 4), np.uint8)
        bgra[..., 3] = 255
        bgra[ma > 0, 2] = 255
        np.testing.assert_array_equal(s.binarise(bgra), ma > 0)  # alpha ignored
        out = tmp_path / "out"
        prepare_source(s, out, FACTOR_1, progress=False)
    np.testing.assert_array_equal(_read(_mask_file(out, "train", "a", "MA")), (ma > 0) * 255)
    np.testing.assert_array_equal(_read(_mask_file(out, "test", "b", "HE")), (he > 0) * 255)
    assert not _read(_mask_file(out, "test", "b", "MA")).any()
    summary = json.loads((out / "summary.json").read_text())
    assert summary["splits"]["train"]["lesion_pixels_full"]["MA"] == int((ma > 0).sum())


def _antialiased() -> np.ndarray:
    """A grey lesion with a soft edge: 255 inside, then rings at 128 (lesion), 127 and 64 (not)."""
    yy, xx = np.mgrid[0:H, 0:W]
    r = np.hypot(xx - 48, yy - 40)
    m = np.zeros((H, W), np.uint8)
    m[r <= 7] = 64
    m[r <= 6] = 127
    m[r <= 5] = 128
    m[r <= 4] = 255
    return m


def test_fgadr_mask_rule_antialiased_grey_and_rgb_at_128(tmp_path):
    grey = _antialiased()
    assert (grey == 127).sum() > 0 and (grey == 128).sum() > 0
    ids = ["0001_1", "0001_2"]
    root = _fgadr_tree(tmp_path / "fgadr", ids, {(ids[0], "MA"): grey, (ids[1], "MA"): np.dstack([grey] * 3)})
    assert _read(root / FG / "Microaneurysms_Masks" / f"{ids[1]}.png").shape == (H, W, 3)
    expected = grey >= 128
    with open_source(root, "fgadr") as s:
        items = {it.name: it for split in s.splits for it in s.items(split)}
        for i in ids:
            got = s.read_mask(items[i].masks["MA"])
            np.testing.assert_array_equal(got, expected)
            assert not got[grey == 127].any() and got[grey == 128].all()
        out = tmp_path / "out"
        prepare_source(s, out, FACTOR_1, progress=False)
    for i in ids:
        split = "test" if _hash_test(i) else "train"
        np.testing.assert_array_equal(_read(_mask_file(out, split, i, "MA")), expected * 255)


def test_idrid_colour_tiff_with_opaque_alpha_only_colour_is_lesion(tmp_path):
    root = tmp_path / "IDRiD"
    _write(root / IDRID_IMG / "IDRiD_01.png", _fundus(W, H, D))
    lesion = _disc(W, H, 40, 38, 4)
    bgra = np.zeros((H, W, 4), np.uint8)
    bgra[..., 3] = 255  # opaque everywhere
    bgra[lesion] = (0, 0, 255, 255)
    _write(root / IDRID_GT / "1. Microaneurysms" / "IDRiD_01_MA.tif", bgra)
    assert _read(root / IDRID_GT / "1. Microaneurysms" / "IDRiD_01_MA.tif").shape == (H, W, 4)
    with open_source(root, "idrid", allow_partial=True) as s:
        (it,) = s.items("train")
        np.testing.assert_array_equal(s.read_mask(it.masks["MA"]), lesion)
        out = tmp_path / "out"
        prepare_source(s, out, FACTOR_1, progress=False)
    np.testing.assert_array_equal(_read(_mask_file(out, "train", "IDRiD_01", "MA")), lesion * 255)
    assert not _read(_mask_file(out, "train", "IDRiD_01", "HE")).any()  # no file: no lesion


def test_diaretdb1_mask_rule_confidence_at_least_0_75(tmp_path):
    conf = np.zeros((H, W), np.uint8)
    conf[10:20, 40:60] = 64  # one expert
    conf[30:34, 30:35] = 191  # just under 0.75 (191 / 255 = 0.749)
    conf[30:34, 50:55] = 192  # 0.75: consensus
    conf[31:33, 51:54] = 255
    conf[50:52, 60:70] = 128
    expected = conf >= 192
    assert expected.sum() == 20
    root = _ddb1_tree(tmp_path / "ddb1", [1, 2], {(1, "MA"): conf, (2, "HE"): conf})
    with open_source(root, "diaretdb1") as s:
        (one,) = s.items("train")
        (two,) = s.items("test")
        np.testing.assert_array_equal(s.read_mask(one.masks["MA"]), expected)
        np.testing.assert_array_equal(s.read_mask(two.masks["HE"]), expected)
        out = tmp_path / "out"
        prepare_source(s, out, FACTOR_1, progress=False)
    np.testing.assert_array_equal(_read(_mask_file(out, "train", "image001", "MA")), expected * 255)
    np.testing.assert_array_equal(_read(_mask_file(out, "test", "image002", "HE")), expected * 255)


def test_eophtha_mask_rule_binary_three_channel_png(tmp_path):
    lesion = _disc(W, H, 30, 45, 2.5)
    ann = np.zeros((H, W, 3), np.uint8)
    ann[lesion] = 255
    root = _eophtha_tree(tmp_path / "eo", "e_optha_MA", {("E1", "C1"): ann}, [("E2", "C2")])
    with open_source(root, "eophtha-ma") as s:
        items = {it.name: it for it in s.items("test")}
        np.testing.assert_array_equal(s.read_mask(items["C1"].masks["MA"]), lesion)
        out = tmp_path / "out"
        prepare_source(s, out, PrepareOptions(factor=1, lesions=("MA", "HE")), progress=False)
    np.testing.assert_array_equal(_read(_mask_file(out, "test", "C1", "MA")), lesion * 255)
    for name, lesion_ in (("C2", "MA"), ("C1", "HE"), ("C2", "HE")):  # healthy; HE not scored
        assert not _read(_mask_file(out, "test", name, lesion_)).any()


# --------------------------------------------------------------------------------------------------
# 3. a partial download is refused by name; nothing is written; --allow-partial goes on


def _ddr_small(root: Path) -> Path:
    return _ddr_tree(root, {"train": ["t1", "t2"], "valid": ["v1"], "test": ["s1"]})


def test_partial_ddr_without_its_valid_he_folder(tmp_path, venv_python):
    root = _ddr_small(tmp_path / "DDR")
    shutil.rmtree(root / DDR / "valid" / "segmentation label" / "HE")
    with pytest.raises(SourceError) as e:
        open_source(root, "ddr")
    msg = str(e.value)
    assert "partial DDR download" in msg and "the 'valid' HE masks (none of 1)" in msg and "--allow-partial" in msg

    out = tmp_path / "out"
    line = _one_line_error(_cli(venv_python, "--dataset", "ddr", "--src", str(root), "--out", str(out)))
    assert "'valid' HE masks" in line
    _nothing_written(out)

    with open_source(root, "ddr", allow_partial=True) as s:
        assert s.partial == ["the 'valid' HE masks (none of 1)"]
        meta = prepare_source(s, out, PrepareOptions(fov_diameter=64.0), progress=False)
    assert _meta(out)["partial"] == meta["partial"] == ["the 'valid' HE masks (none of 1)"]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["splits"]["val"]["missing_masks"]["HE"] == ["v1"]
    assert not _read(out / "val" / "masks" / "v1_HE.png").any()


def test_partial_fewer_images_than_counted(tmp_path, venv_python, caplog):
    root = _ddr_small(tmp_path / "DDR")
    (root / DDR / "train" / "image" / "t2.jpg").unlink()
    with pytest.raises(SourceError, match=r"missing 1 of 2 'train' images"):
        open_source(root, "ddr")

    out = tmp_path / "out"
    line = _one_line_error(_cli(venv_python, "--src", str(root), "--out", str(out)))  # layout detected
    assert "1 of 2 'train' images" in line and "--allow-partial" in line
    _nothing_written(out)

    with caplog.at_level(logging.WARNING, logger="redseg.data.sources"):
        source = open_source(root, "ddr", allow_partial=True)
    assert any("1 of 2 'train' images" in r.getMessage() for r in caplog.records)
    with source:
        assert any("mask of t2, which has no image" in w for w in source.all_warnings())
        meta = prepare_source(source, out, PrepareOptions(fov_diameter=64.0), progress=False)
    assert meta["partial"] == ["1 of 2 'train' images"] and meta["counts"]["train_images"] == 1

    out2 = tmp_path / "out2"
    proc = _cli(venv_python, "--dataset", "ddr", "--src", str(root), "--out", str(out2), "--allow-partial")
    assert proc.returncode == 0, proc.stderr
    assert "1 of 2 'train' images" in proc.stderr  # the warning
    assert _meta(out2)["partial"] == ["1 of 2 'train' images"]


BARE = {  # one small tree per set without synthetic.json: the published counts apply
    "ddr": (
        lambda r: _ddr_tree(r, {"train": ["a"], "valid": ["b"], "test": ["c"]}, marker=False),
        ["382 of 383 'train' images", "148 of 149 'valid' images", "224 of 225 'test' images"],
    ),
    "fgadr": (lambda r: _fgadr_tree(r, ["0001_1"], marker=False), ["1841 of 1842 'all' images"]),
    "eophtha-ma": (
        lambda r: _eophtha_tree(r, "e_optha_MA", {("E1", "C1"): np.zeros((H, W), np.uint8)}, [], marker=False),
        ["147 of 148 'MA' images", "'healthy' images (none of 233)"],
    ),
    "diaretdb1": (lambda r: _ddb1_tree(r, [1, 2], marker=False), ["27 of 28 'train' images", "60 of 61 'test' images"]),
}


@pytest.mark.parametrize("dataset", sorted(BARE))
def test_published_counts_without_a_synthetic_marker(tmp_path, dataset):
    make, expected = BARE[dataset]
    root = make(tmp_path / dataset)
    with pytest.raises(SourceError) as e:
        open_source(root, dataset)
    for part in expected:
        assert part in str(e.value)
    with open_source(root, dataset, allow_partial=True) as s:
        assert s.partial == expected


def test_idrid_count_check_via_prepare_data(tmp_path, venv_python):
    root = tmp_path / "IDRiD"
    generate_layout("idrid", root, seed=2, n={"train": 2, "test": 1}, params=SyntheticParams(128, 96), progress=False)
    out = tmp_path / "out"
    proc = _cli(venv_python, "--dataset", "idrid", "--src", str(root), "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    meta = _meta(out)
    assert meta["counts"]["train_images"] == 2 and meta["counts"]["test_images"] == 1 and meta["partial"] == []
    assert meta["factor"] == 4 and meta["fov"]["scale"] == "factor"  # IDRiD keeps the paper's factor

    (test_image,) = (root / SEG / "1. Original Images" / "b. Testing Set").iterdir()
    test_image.unlink()
    out2 = tmp_path / "out2"
    line = _one_line_error(_cli(venv_python, "--dataset", "idrid", "--src", str(root), "--out", str(out2)))
    assert "partial IDRiD download" in line and "1 of 1 test images" in line
    _nothing_written(out2)
    proc = _cli(venv_python, "--dataset", "idrid", "--src", str(root), "--out", str(out2), "--allow-partial")
    assert proc.returncode == 0, proc.stderr
    assert _meta(out2)["partial"] == ["1 of 1 test images"] and _meta(out2)["counts"]["test_images"] == 0

    bare = tmp_path / "bare"  # no synthetic.json: IDRiD's published 54 / 27
    _write(bare / IDRID_IMG / "IDRiD_01.jpg", _fundus(W, H, D))
    with pytest.raises(SourceError, match="53 of 54 train images; 27 of 27 test images"):
        open_source(bare, "idrid")


# --------------------------------------------------------------------------------------------------
# 4. the FOV normalisation: the same lesion, relative to the FOV, has the same size in pixels


CAMERA_A = (320, 260, 300.0)  # a wide frame cutting the disc at the top and bottom
CAMERA_B = (640, 600, 560.0)  # a larger one holding it


def _lesions(w: int, h: int, d: float) -> dict[str, np.ndarray]:
    """An MA 3 % and an HE 8 % of the FOV diameter across (radius), at fixed places relative to the FOV."""
    cx, cy = (w - 1) / 2, (h - 1) / 2
    return {"MA": _disc(w, h, cx + 0.2 * d, cy, 0.03 * d), "HE": _disc(w, h, cx - 0.25 * d, cy + 0.05 * d, 0.08 * d)}


def test_fov_normalisation_makes_lesions_the_same_size_across_cameras(tmp_path):
    frames = {"a1": CAMERA_A, "b1": CAMERA_B, "a2": CAMERA_A, "b2": CAMERA_B}
    masks = {}
    for stem, (w, h, d) in frames.items():
        for lesion, m in _lesions(w, h, d).items():
            masks[(stem, lesion)] = m.astype(np.uint8) * 255
    root = _ddr_tree(tmp_path / "DDR", {"train": ["a1", "b1"], "test": ["a2", "b2"]}, masks, frames)
    full = {x: [int((masks[(s, x)] > 0).sum()) for s in ("a2", "b2")] for x in ("MA", "HE")}
    assert full["MA"][1] > 3 * full["MA"][0]  # at full size, camera B's lesion is 3.5x larger

    target = 200.0
    with open_source(root, "ddr") as s:
        outs = {rule: tmp_path / rule for rule in ("any", "area")}
        for rule, out in outs.items():
            meta = prepare_source(s, out, PrepareOptions(mask_rule=rule, fov_diameter=target), progress=False)
    for rule, out in outs.items():
        for lesion, r_rel in (("MA", 0.03), ("HE", 0.08)):
            areas = {
                stem: int((_read(_mask_file(out, split, stem, lesion)) > 0).sum())
                for split, stems in (("train", ("a1", "b1")), ("test", ("a2", "b2")))
                for stem in stems
            }
            assert abs(areas["a2"] - areas["b2"]) <= 0.10 * max(areas["a2"], areas["b2"]), (rule, lesion, areas)
            assert abs(areas["a1"] - areas["b1"]) <= 0.10 * max(areas["a1"], areas["b1"]), (rule, lesion, areas)
            if rule == "area":  # unbiased: the disc's own area at the target scale
                ideal = np.pi * (r_rel * target) ** 2
                assert all(abs(a - ideal) <= 0.10 * ideal for a in areas.values()), (lesion, areas, ideal)
        for split, stem in (("train", "a1_id"), ("train", "b1_id"), ("test", "a2"), ("test", "b2")):
            img = _read(out / split / "images" / f"{stem}.png")
            assert abs(find_fov(img, stem).diameter - target) <= 0.02 * target, stem

    fov = meta["fov"]  # the last preparation's (area); both have the same scale
    assert fov["scale"] == "fov_diameter" and fov["target_px"] == target
    assert fov["full_size_px"]["n"] == 4
    assert fov["full_size_px"]["min"] == pytest.approx(CAMERA_A[2], rel=0.01)
    assert fov["full_size_px"]["max"] == pytest.approx(CAMERA_B[2], rel=0.01)
    assert fov["prepared_px"]["median"] == pytest.approx(target, rel=0.01)
    assert fov["prepared_px"]["min"] == pytest.approx(target, rel=0.01)
    assert fov["prepared_px"]["max"] == pytest.approx(target, rel=0.01)
    assert fov["scale_factors"]["min"] == pytest.approx(target / CAMERA_B[2], rel=0.01)
    assert fov["scale_factors"]["max"] == pytest.approx(target / CAMERA_A[2], rel=0.01)
    assert fov["not_found"] == []
    images = json.loads((outs["area"] / "summary.json").read_text())["images"]
    assert images["a2"]["size"] == [round(320 * target / 300), round(260 * target / 300)]
    assert images["b2"]["size_full"] == [640, 600]


def test_fov_block_of_a_synthetic_ddr_with_its_two_cameras(generated, prepared):
    info = json.loads((generated["ddr"] / MARKER).read_text())
    assert {im["camera"] for im in info["images"].values()} == {"ddr-a", "ddr-b"}
    fov = _meta(prepared["ddr"])["fov"]
    a, b = (c.fov_diameter for c in CAMERAS["ddr"])
    assert fov["target_px"] == 160.0 and fov["full_size_px"]["n"] == len(info["images"])
    assert fov["full_size_px"]["min"] == pytest.approx(min(a, b), rel=0.03)
    assert fov["full_size_px"]["max"] == pytest.approx(max(a, b), rel=0.03)
    assert fov["prepared_px"]["median"] == pytest.approx(160.0, rel=0.01)
    assert fov["scale_factors"]["max"] / fov["scale_factors"]["min"] == pytest.approx(max(a, b) / min(a, b), rel=0.03)


# --------------------------------------------------------------------------------------------------
# 5. the prepared sets: splits, what is not scored, the rules in meta.json


def _listed(out: Path, split: str) -> list[str]:
    return [Path(row[0]).stem for row in _lines(out / f"{split}.txt")]


def test_prepared_eophtha_has_no_training_split_and_does_not_score_he(generated, prepared):
    out = prepared["eophtha-ma"]
    meta = _meta(out)
    info = json.loads((generated["eophtha-ma"] / MARKER).read_text())
    assert "HE" in meta["not_scored"] and "MA" not in meta["not_scored"]
    assert meta["splits"] == ["test"]
    assert meta["counts"]["train_images"] == 0 and meta["counts"]["train_samples"] == 0
    assert meta["counts"]["test_images"] == 3
    assert sorted(_listed(out, "test")) == sorted(info["images"])  # the MA and the healthy images
    assert not (out / "train.txt").exists() and not (out / "train").exists()
    for row in _lines(out / "test.txt"):
        assert not _read(out / row[2]).any()  # HE: all zero, never scored
    with_ma = [n for n, im in info["images"].items() if im["split"] == "MA"]
    assert all(_read(out / "test" / "masks" / f"{n}_MA.png").any() for n in with_ma)


def test_prepared_ddr_has_its_validation_split(generated, prepared):
    out = prepared["ddr"]
    info = json.loads((generated["ddr"] / MARKER).read_text())
    by_split = {
        split: sorted(n for n, im in info["images"].items() if im["split"] == split)
        for split in ("train", "valid", "test")
    }
    assert sorted(_listed(out, "val")) == by_split["valid"] and len(by_split["valid"]) == 2
    assert sorted(_listed(out, "test")) == by_split["test"]
    assert len(_lines(out / "train.txt")) == 6 * len(by_split["train"])
    meta = _meta(out)
    assert meta["splits"] == ["train", "val", "test"] and meta["counts"]["val_images"] == 2
    assert meta["not_scored"] == {}


RULE_WORDS = {  # what each set's rules must say (docs/datasets.md)
    "ddr": ("> 0", "valid -> val"),
    "fgadr": (">= 128", "sha256"),
    "eophtha-ma": (">= 128", "every image"),
    "diaretdb1": ("192", "28 / 61"),
}


def test_meta_records_each_sets_mask_and_split_rules(generated, prepared):
    for layout, out in prepared.items():
        meta = _meta(out)
        assert meta["dataset"] == layout and meta["synthetic"] is True and meta["partial"] == []
        assert meta["mask_binarisation"] == READERS[layout].mask_rule_text
        assert meta["split_rule"] == READERS[layout].split_rule
        mask_word, split_word = RULE_WORDS[layout]
        assert mask_word in meta["mask_binarisation"], (layout, meta["mask_binarisation"])
        assert split_word in meta["split_rule"], (layout, meta["split_rule"])
    names = json.loads((generated["fgadr"] / MARKER).read_text())["images"]
    assert sorted(_listed(prepared["fgadr"], "test")) == sorted(n for n in names if _hash_test(n))
    ddb1 = json.loads((generated["diaretdb1"] / MARKER).read_text())["images"]
    train = {Path(p).stem.rsplit("_", 1)[0] for p in _listed(prepared["diaretdb1"], "train")}
    assert train == {n for n, im in ddb1.items() if im["split"] == "train"}
    assert all(int(n[5:]) in DIARETDB1_TRAIN_IDS for n in train)


# --------------------------------------------------------------------------------------------------
# 6. a rerun is a no-op; other options are refused without --force


def test_rerun_is_a_no_op_and_another_fov_diameter_needs_force(tmp_path, venv_python):
    root = _ddr_small(tmp_path / "DDR")
    out = tmp_path / "out"
    args = ("--dataset", "ddr", "--src", str(root), "--out", str(out))
    proc = _cli(venv_python, *args, "--fov-diameter", "64")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("prepared ddr -> ") and "FOV 64 px" in proc.stdout
    stamp = (out / "meta.json").stat().st_mtime_ns

    with open_source(root, "ddr") as s:
        again = prepare_source(s, out, PrepareOptions(fov_diameter=64.0), progress=False)
    assert again["skipped"] is True and again["fov"]["target_px"] == 64.0
    proc = _cli(venv_python, *args, "--fov-diameter", "64")
    assert proc.returncode == 0 and "prepared" not in proc.stdout, (proc.stdout, proc.stderr)
    assert (out / "meta.json").stat().st_mtime_ns == stamp and "skipped" not in _meta(out)

    line = _one_line_error(_cli(venv_python, *args, "--fov-diameter", "48"))
    assert "fov_diameter 64.0 -> 48.0" in line and "--force" in line
    assert _meta(out)["fov"]["target_px"] == 64.0

    proc = _cli(venv_python, *args, "--fov-diameter", "48", "--force")
    assert proc.returncode == 0, proc.stderr
    assert _meta(out)["fov"]["target_px"] == 48.0
