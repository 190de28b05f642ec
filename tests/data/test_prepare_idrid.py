"""Preparing the official IDRiD layout (redseg/data/idrid.py, tools/prepare_idrid.py).

Paper section 3.1: downsample 4x, expand the training set 6x; the choices of docs/method.md (mask
rule, augmentations, input mean) are checked against independent computations here, on small
synthetic and hand-made trees in the official layout.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import cv2
import numpy as np
import pytest

from redseg.config import AUGMENTATIONS, IDRID_LESION_DIRS
from redseg.data.idrid import IdridError, prepare
from redseg.data.prepare import augment, augment_point, prepared_size
from redseg.data.prepared_set import downsample_mask
from redseg.data.synthetic import SyntheticParams, generate_idrid_tree

REPO = Path(__file__).resolve().parents[2]
TOOL = REPO / "tools" / "prepare_idrid.py"
# Spelled out here, not imported from redseg.config: the tests check the layout against IDRiD's own names.
SEG = "A. Segmentation"
IMG = f"{SEG}/1. Original Images"
GT = f"{SEG}/2. All Segmentation Groundtruths"
SPLIT = {"train": "a. Training Set", "test": "b. Testing Set"}


def _img_path(root: Path, split: str, stem: str, ext: str = "jpg") -> Path:
    return root / IMG / SPLIT[split] / f"{stem}.{ext}"


def _mask_path(root: Path, split: str, stem: str, lesion: str) -> Path:
    return root / GT / SPLIT[split] / IDRID_LESION_DIRS[lesion] / f"{stem}_{lesion}.tif"


def _write(path: Path, arr: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    assert cv2.imwrite(str(path), arr)


def _hand_tree(root: Path, image: np.ndarray, masks: dict[str, np.ndarray], stem: str = "IDRiD_01") -> Path:
    """One training image (PNG: lossless, so pixels can be followed exactly) and its masks."""
    _write(_img_path(root, "train", stem, "png"), image)
    for lesion, m in masks.items():
        colour = np.zeros(m.shape + (3,), np.uint8)
        colour[m > 0] = (0, 0, 255)
        _write(_mask_path(root, "train", stem, lesion), colour)
    return root


def _lines(path: Path) -> list[list[str]]:
    return [ln.split("\t") for ln in path.read_text().splitlines() if ln and not ln.startswith("#")]


def _read(path: Path) -> np.ndarray:
    a = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    assert a is not None, path
    return a


@pytest.fixture(scope="module")
def src(tmp_path_factory) -> Path:
    """3 training + 2 test synthetic images at 128x96 in the official layout (some lack HE)."""
    root = tmp_path_factory.mktemp("src") / "IDRiD"
    generate_idrid_tree(root, n_train=3, n_test=2, seed=11, params=SyntheticParams(128, 96), progress=False)
    return root


@pytest.fixture(scope="module")
def prepared(src, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("prep") / "idrid"
    prepare(src, out, factor=4, progress=False)
    return out


def test_counts_sizes_lists(prepared):
    meta = json.loads((prepared / "meta.json").read_text())
    assert (prepared / ".complete").is_file()
    assert meta["factor"] == 4 and meta["size"] == [32, 24] and meta["mask_rule"] == "any"
    assert meta["counts"] == {"train_images": 3, "train_samples": 18, "test_images": 2}
    train, test = _lines(prepared / "train.txt"), _lines(prepared / "test.txt")
    assert len(train) == 6 * 3 and len(test) == 2
    assert [Path(r[0]).stem for r in test] == ["IDRiD_04", "IDRiD_05"]
    assert [Path(r[0]).stem for r in train[:6]] == [f"IDRiD_01_{a}" for a in AUGMENTATIONS]
    for row in train + test:
        assert len(row) == 3 and row[1].endswith("_MA.png") and row[2].endswith("_HE.png")
        img = _read(prepared / row[0])
        assert img.dtype == np.uint8 and img.ndim == 3
        portrait = "_rot90" in row[0] or "_rot270" in row[0]
        assert img.shape[:2] == ((32, 24) if portrait else (24, 32)), row[0]
        for p in row[1:]:
            m = _read(prepared / p)
            assert m.shape == img.shape[:2] and set(np.unique(m)) <= {0, 255}
    for split, stems in (("train", ["IDRiD_01_id"]), ("test", ["IDRiD_04", "IDRiD_05"])):
        for stem in stems:
            for lesion in ("EX", "SE"):
                assert (prepared / split / "masks" / f"{stem}_{lesion}.png").is_file()


def test_mean_masks_and_summary_match_the_source(src, prepared):
    meta = json.loads((prepared / "meta.json").read_text())
    pixels = []
    for i in (1, 2, 3):
        full = cv2.imread(str(_img_path(src, "train", f"IDRiD_0{i}")))
        pixels.append(cv2.resize(full, (32, 24), interpolation=cv2.INTER_AREA).reshape(-1, 3))
    ref = np.concatenate(pixels).astype(np.float64).mean(axis=0)
    assert np.allclose(meta["mean_bgr"], ref, atol=1e-9), (meta["mean_bgr"], ref)

    summary = json.loads((prepared / "summary.json").read_text())
    for split, stems in (("train", ["IDRiD_01", "IDRiD_02", "IDRiD_03"]), ("test", ["IDRiD_04", "IDRiD_05"])):
        s = summary["splits"][split]
        for lesion in ("MA", "HE", "EX", "SE"):
            full_sum, missing = 0, []
            for stem in stems:
                p = _mask_path(src, split, stem, lesion)
                low = (
                    prepared
                    / split
                    / "masks"
                    / (f"{stem}_id_{lesion}.png" if split == "train" else f"{stem}_{lesion}.png")
                )
                got = _read(low) > 0
                if not p.is_file():
                    missing.append(stem)
                    assert not got.any()  # a missing mask -> all-zero mask
                    continue
                m = cv2.imread(str(p), cv2.IMREAD_UNCHANGED).any(axis=2)
                full_sum += int(m.sum())
                # rule "any", computed independently: a 4x4 block is lesion if any pixel is
                assert np.array_equal(got, m.reshape(24, 4, 32, 4).any(axis=(1, 3))), (stem, lesion)
            assert s["missing_masks"][lesion] == missing
            assert s["lesion_pixels_full"][lesion] == full_sum
    # the synthetic source has an image without haemorrhage in each split: reported
    assert summary["splits"]["train"]["missing_masks"]["HE"]
    assert summary["splits"]["test"]["missing_masks"]["HE"]
    assert "IDRiD_" in (prepared / "summary.md").read_text()


def test_mask_rules_on_a_one_pixel_microaneurysm(tmp_path):
    image = np.full((16, 16, 3), 80, np.uint8)
    ma = np.zeros((16, 16), np.uint8)
    ma[5, 9] = 1  # one full-resolution pixel in low-res pixel (1, 2), not its centre pixel
    he = np.zeros((16, 16), np.uint8)
    he[8:12, 0:2] = 1  # half of low-res pixel (2, 0)
    he[6, 10] = 1  # the pixel nearest to the centre of low-res pixel (1, 2): (4*1+2, 4*2+2)
    src = _hand_tree(tmp_path / "src", image, {"MA": ma, "HE": he})
    expected = {  # rule -> (MA low-res pixels, HE low-res pixels)
        "any": ({(1, 2)}, {(2, 0), (1, 2)}),
        "area": (set(), {(2, 0)}),
        "nearest": (set(), {(1, 2)}),
    }
    for rule, (want_ma, want_he) in expected.items():
        out = tmp_path / rule
        prepare(src, out, factor=4, mask_rule=rule, progress=False)
        for lesion, want in (("MA", want_ma), ("HE", want_he)):
            m = _read(out / "train" / "masks" / f"IDRiD_01_id_{lesion}.png")
            assert m.shape == (4, 4)
            assert {tuple(p) for p in np.argwhere(m > 0)} == want, (rule, lesion)
        assert json.loads((out / "meta.json").read_text())["mask_rule"] == rule
    with pytest.raises(IdridError, match="mask-rule"):
        prepare(src, tmp_path / "bad", mask_rule="max", progress=False)


def test_downsample_mask_rounds_odd_sizes():
    assert prepared_size(4288, 2848, 4) == (1072, 712)
    assert prepared_size(18, 10, 4) == (5, 3)  # 4.5 -> 5, 2.5 -> 3: halves round up
    assert prepared_size(17, 9, 4) == (4, 2)
    m = np.zeros((10, 18), bool)
    m[9, 17] = True  # the last pixel survives "any" at a non-integer scale
    assert downsample_mask(m, (3, 5), "any")[2, 4]
    assert downsample_mask(m, (3, 5), "any").sum() == 1


def test_six_augmentations_move_image_and_mask_together(tmp_path):
    h, w, y, x = 6, 8, 1, 2
    image = np.full((h, w, 3), 60, np.uint8)
    image[y, x] = (0, 0, 255)
    ma = np.zeros((h, w), np.uint8)
    ma[y, x] = 1
    out = tmp_path / "out"
    prepare(_hand_tree(tmp_path / "src", image, {"MA": ma}), out, factor=1, progress=False)
    # np.rot90 turns counter-clockwise: the top-left pixel goes to the bottom-left, etc.
    expected = {
        "id": ((6, 8), (1, 2)),
        "rot90": ((8, 6), (5, 1)),
        "rot180": ((6, 8), (4, 5)),
        "rot270": ((8, 6), (2, 4)),
        "fliph": ((6, 8), (1, 5)),
        "flipv": ((6, 8), (4, 2)),
    }
    assert tuple(expected) == AUGMENTATIONS
    for aug, (shape, pos) in expected.items():
        img = _read(out / "train" / "images" / f"IDRiD_01_{aug}.png")
        m = _read(out / "train" / "masks" / f"IDRiD_01_{aug}_MA.png")
        assert img.shape[:2] == shape and m.shape == shape, aug
        red = np.argwhere((img == (0, 0, 255)).all(axis=2))
        assert [tuple(p) for p in red] == [pos], aug
        assert [tuple(p) for p in np.argwhere(m > 0)] == [pos], aug
        assert augment_point(y, x, h, w, aug) == pos
        assert np.array_equal(augment(image, aug), img)


def test_zip_and_segmentation_folder_inputs_give_the_same_set(src, prepared, tmp_path):
    archive = tmp_path / "A. Segmentation.zip"
    with zipfile.ZipFile(archive, "w") as z:
        for p in sorted((src / SEG).rglob("*")):
            if p.is_file():
                z.write(p, p.relative_to(src).as_posix())
    for source, name in ((archive, "from_zip"), (src / SEG, "from_seg")):
        out = tmp_path / name
        meta = prepare(source, out, factor=4, progress=False)
        assert (out / ".complete").is_file()
        assert (out / "train.txt").read_text() == (prepared / "train.txt").read_text()
        assert meta["mean_bgr"] == json.loads((prepared / "meta.json").read_text())["mean_bgr"]
        for row in _lines(out / "train.txt") + _lines(out / "test.txt"):
            for p in row:
                assert np.array_equal(_read(out / p), _read(prepared / p)), p


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _run_tool(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(TOOL), *args, "-q"], capture_output=True, text=True)


def test_truncated_jpeg_is_named(src, tmp_path):
    bad = _copy(src, tmp_path / "bad")
    jpg = _img_path(bad, "train", "IDRiD_02")
    data = jpg.read_bytes()
    jpg.write_bytes(data[: len(data) // 2])
    with pytest.raises(IdridError, match="IDRiD_02.jpg"):
        prepare(bad, tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob("out.partial-*"))
    r = _run_tool("--src", str(bad), "--out", str(tmp_path / "out"))
    assert r.returncode == 1 and "IDRiD_02.jpg" in r.stderr
    assert "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1


def test_mask_of_the_wrong_size_is_named(src, tmp_path):
    bad = _copy(src, tmp_path / "bad")
    _write(_mask_path(bad, "test", "IDRiD_04", "MA"), np.zeros((48, 64, 3), np.uint8))
    with pytest.raises(IdridError, match=r"IDRiD_04_MA\.tif is 64x48 .* 128x96"):
        prepare(bad, tmp_path / "out", progress=False)
    r = _run_tool("--src", str(bad), "--out", str(tmp_path / "out"))
    assert r.returncode == 1 and "IDRiD_04_MA.tif" in r.stderr and "Traceback" not in r.stderr


def test_wrong_folder_says_what_was_expected(tmp_path):
    (tmp_path / "photos").mkdir()
    _write(tmp_path / "photos" / "IDRiD_01.jpg", np.zeros((8, 8, 3), np.uint8))
    with pytest.raises(IdridError, match="A. Segmentation"):
        prepare(tmp_path / "photos", tmp_path / "out", progress=False)
    r = _run_tool("--src", str(tmp_path / "photos"), "--out", str(tmp_path / "out"))
    assert r.returncode == 1 and "A. Segmentation" in r.stderr and "Traceback" not in r.stderr
    r = _run_tool("--src", str(tmp_path / "nowhere"), "--out", str(tmp_path / "out"))
    assert r.returncode == 1 and "does not exist" in r.stderr
    (tmp_path / "fake.zip").write_bytes(b"not a zip")
    r = _run_tool("--src", str(tmp_path / "fake.zip"), "--out", str(tmp_path / "out"))
    assert r.returncode == 1 and "not a .zip" in r.stderr
    assert not (tmp_path / "out").exists()


def test_masks_without_images(tmp_path):
    """Preparation needs images: masks alone are refused, a mask without its image is ignored with a warning."""
    m = np.zeros((8, 8), np.uint8)
    m[2:4, 2:4] = 255
    _write(_mask_path(tmp_path / "masks_only", "train", "IDRiD_01", "MA"), m)
    with pytest.raises(IdridError, match="no images IDRiD_NN.jpg"):
        prepare(tmp_path / "masks_only", tmp_path / "out", progress=False)
    tree = _hand_tree(tmp_path / "tree", np.full((8, 8, 3), 90, np.uint8), {"MA": m})
    _write(_mask_path(tree, "test", "IDRiD_60", "HE"), m)
    prepare(tree, tmp_path / "out", factor=1, progress=False)
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["splits"]["test"]["n_images"] == 0
    assert any("IDRiD_60" in w and "no image (ignored)" in w for w in summary["warnings"])


def test_rerun_is_a_quick_no_op_and_other_options_need_force(src, tmp_path):
    out = tmp_path / "out"
    prepare(src, out, progress=False)
    stamp = {p: p.stat().st_mtime_ns for p in out.rglob("*")}
    t0 = time.perf_counter()
    again = prepare(src, out, progress=False)
    assert again["skipped"] and time.perf_counter() - t0 < 2.0
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*")} == stamp
    r = _run_tool("--src", str(src), "--out", str(out))
    assert r.returncode == 0
    with pytest.raises(IdridError, match="mask_rule 'any' -> 'area'.*--force"):
        prepare(src, out, mask_rule="area", progress=False)
    assert json.loads((out / "meta.json").read_text())["mask_rule"] == "any"
    prepare(src, out, mask_rule="area", force=True, progress=False)
    assert json.loads((out / "meta.json").read_text())["mask_rule"] == "area"
    assert (out / ".complete").is_file() and not list(tmp_path.glob("out.*"))


def test_interrupted_runs_are_not_trusted(src, tmp_path):
    out = tmp_path / "out"
    prepare(src, out, progress=False)
    (out / ".complete").unlink()  # as if the run had stopped before finishing
    with pytest.raises(IdridError, match="unfinished"):
        prepare(src, out, progress=False)
    prepare(src, out, force=True, progress=False)
    assert (out / ".complete").is_file()

    # a work folder left by a run that died is removed, never used
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    pid = int(dead.stdout)
    stale = tmp_path / f"fresh.partial-{pid}"
    stale.mkdir()
    (stale / ".partial").write_text("{}")
    (stale / "meta.json").write_text("{}")
    meta = prepare(src, tmp_path / "fresh", progress=False)
    assert not meta.get("skipped") and (tmp_path / "fresh" / ".complete").is_file()
    if not _alive(pid):
        assert not stale.exists()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_a_folder_that_is_not_a_prepared_set_is_never_deleted(src, tmp_path):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "thesis.tex").write_text("precious")
    for force in (False, True):
        with pytest.raises(IdridError, match="not a prepared set"):
            prepare(src, out, force=force, progress=False)
    assert (out / "thesis.tex").read_text() == "precious"
    empty = tmp_path / "empty"
    empty.mkdir()
    prepare(src, empty, progress=False)  # an empty folder is fine
    assert (empty / ".complete").is_file()


def test_lesion_selection(src, tmp_path):
    out = tmp_path / "out"
    prepare(src, out, lesions=["MA", "HE", "OD"], progress=False)
    assert (out / "test" / "masks" / "IDRiD_04_OD.png").is_file()
    assert not (out / "test" / "masks" / "IDRiD_04_EX.png").exists()
    with pytest.raises(IdridError, match="must include MA,HE"):
        prepare(src, tmp_path / "x", lesions=["MA"], progress=False)
    with pytest.raises(IdridError, match="unknown lesion"):
        prepare(src, tmp_path / "x", lesions=["MA", "HE", "XX"], progress=False)
