"""Synthetic copies of DDR, FGADR, e-ophtha MA and DiaretDB1 (redseg/data/synthetic_layouts.py).

They stand in for data sets that cannot be downloaded here, so each must put its files exactly where
the published layout does (../shared/datasets.md, docs/data_format.md), encode its masks as the
data set does, count its images in synthetic.json, repeat itself from a seed, never overwrite what
is not its own, and draw lesions of the same size relative to the field of view in every camera.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import cv2
import numpy as np
import pytest

from redseg.config import DIARETDB1_TEST_IDS, DIARETDB1_TRAIN_IDS
from redseg.data.fov import find_fov
from redseg.data.synthetic import SyntheticParams
from redseg.data.synthetic_layouts import (
    CAMERAS,
    eophtha_names,
    generate_layout,
    parse_counts,
    render_camera,
    resolve_counts,
)

REPO = Path(__file__).resolve().parents[2]
TOOL = REPO / "tools" / "make_synthetic.py"
# Spelled out here, not imported: the tests check the layouts against the data sets' own names.
DDR_LESIONS = ("EX", "HE", "MA", "SE")
FGADR_MASKS = ("Microaneurysms_Masks", "Hemohedge_Masks", "HardExudate_Masks", "SoftExudate_Masks")
DDB1_GT = "resources/images/ddb1_groundtruth"
DDB1_DIRS = ("redsmalldots", "hemorrhages", "hardexudates", "softexudates")
SMALL_IDRID = SyntheticParams(width=128, height=96)
SMALL = {
    "ddr": {"train": 2, "valid": 1, "test": 1},
    "fgadr": {"all": 3},
    "eophtha-ma": {"MA": 3, "healthy": 2},
    "diaretdb1": {"train": 2, "test": 2},
}


def _files(root: Path) -> set[str]:
    return {p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file()}


def _digest(root: Path) -> dict[str, str]:
    return {f: hashlib.sha256((root / f).read_bytes()).hexdigest() for f in sorted(_files(root))}


def _read(path: Path) -> np.ndarray:
    img = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    assert img is not None, path
    return img


@pytest.fixture(scope="module")
def trees(tmp_path_factory) -> dict[str, Path]:
    base = tmp_path_factory.mktemp("layouts")
    out = {}
    for layout, n in SMALL.items():
        out[layout] = base / layout
        generate_layout(layout, out[layout], seed=3, n=n, progress=False)
    return out


def _info(root: Path) -> dict:
    return json.loads((root / "synthetic.json").read_text())


def test_marker_keys_and_counts_match_the_files(trees):
    for layout, root in trees.items():
        info = _info(root)
        assert {"generator", "layout", "counts", "settings", "images"} <= set(info)
        assert info["generator"] == "redseg.synthetic" and info["layout"] == layout
        assert info["counts"] == SMALL[layout]
        per_split = {}
        for rec in info["images"].values():
            per_split[rec["split"]] = per_split.get(rec["split"], 0) + 1
            assert (root / rec["path"]).is_file()
            assert rec["camera"] in {c.name for c in CAMERAS[layout]}
        assert per_split == {k: v for k, v in SMALL[layout].items() if v}


def test_ddr_layout_and_masks(trees):
    root = trees["ddr"]
    info = _info(root)
    expected = set()
    for stem, rec in info["images"].items():
        assert len(stem) == 12 and stem[3] == stem[8] == "-" and stem.replace("-", "").isdigit()  # 007-2846-100
        split = rec["split"]
        expected.add(f"lesion_segmentation/{split}/image/{stem}.jpg")
        label = "segmentation label" if split == "valid" else "label"
        for lesion in DDR_LESIONS:  # all four, every image
            expected.add(f"lesion_segmentation/{split}/{label}/{lesion}/{stem}.tif")
    assert _files(root) == expected | {"synthetic.json"}
    assert any(f.startswith("lesion_segmentation/valid/segmentation label/") for f in expected)
    sizes = set()
    for stem, rec in info["images"].items():
        split = rec["split"]
        label = "segmentation label" if split == "valid" else "label"
        img = _read(root / rec["path"])
        assert (root / rec["path"]).read_bytes()[:2] == b"\xff\xd8"
        sizes.add(img.shape)
        for lesion in DDR_LESIONS:
            path = root / "lesion_segmentation" / split / label / lesion / f"{stem}.tif"
            assert path.read_bytes()[:4] in (b"II*\x00", b"MM\x00*")
            m = _read(path)
            assert m.dtype == np.uint8 and m.shape == img.shape[:2]  # single channel, the image's size
            assert set(np.unique(m)) <= {0, 255}
            assert int((m == 255).sum()) == rec["pixels"][lesion]
        assert rec["pixels"]["MA"] > 0 and rec["pixels"]["SE"] == 0  # SE: all black
    assert len(sizes) == 2  # two cameras alternate
    assert len({rec["camera"] for rec in info["images"].values()}) == 2


def test_fgadr_layout_and_antialiased_masks(trees):
    root = trees["fgadr"]
    info = _info(root)
    names = sorted(info["images"])
    assert names == ["0001_1", "0001_2", "0002_1"]
    expected = {f"Seg-set/Original_Images/{n}.png" for n in names}
    expected |= {f"Seg-set/{d}/{n}.png" for d in FGADR_MASKS for n in names}
    assert _files(root) == expected | {"synthetic.json", "Seg-set/DR_Seg_Grading_Label.csv"}
    rows = (root / "Seg-set/DR_Seg_Grading_Label.csv").read_text().splitlines()
    assert [r.split(",")[0] for r in rows] == [f"{n}.png" for n in names]
    assert all(0 <= int(r.split(",")[1]) <= 4 for r in rows)
    channels = set()
    for n in names:
        img = _read(root / f"Seg-set/Original_Images/{n}.png")
        assert img.shape[0] == img.shape[1]  # 1:1
        rec = info["images"][n]
        for folder, lesion in zip(FGADR_MASKS, ("MA", "HE", "EX", "SE"), strict=True):
            m = _read(root / f"Seg-set/{folder}/{n}.png")
            assert m.dtype == np.uint8 and m.shape[:2] == img.shape[:2]
            channels.add(m.ndim)
            if m.ndim == 3:
                assert (m[..., 0] == m[..., 1]).all() and (m[..., 1] == m[..., 2]).all()
                m = m[..., 0]
            lesion_px = m >= 128
            assert int(lesion_px.sum()) == rec["pixels"][lesion]
            if lesion_px.any():  # anti-aliased edges: grey values on both sides of the rim
                ring = (cv2.dilate(lesion_px.astype(np.uint8), np.ones((3, 3), np.uint8)) > 0) & ~lesion_px
                assert ((m[ring] > 0) & (m[ring] < 128)).mean() > 0.5
                rim = lesion_px & ~(cv2.erode(lesion_px.astype(np.uint8), np.ones((3, 3), np.uint8)) > 0)
                assert ((m[rim] >= 128) & (m[rim] < 255)).mean() > 0.5
        assert rec["pixels"]["MA"] > 0
    assert channels == {2, 3}  # some masks are RGB with equal channels


def test_eophtha_layout_no_he_truth_and_healthy_without_annotation(trees, tmp_path):
    root = trees["eophtha-ma"]
    info = _info(root)
    expected = {"synthetic.json"}
    for name, rec in info["images"].items():
        patient = rec["patient"]
        assert patient[0] == "E" and len(patient) == 8 and name[0] == "C" and len(name) == 8
        expected.add(f"e_optha_MA/{rec['split']}/{patient}/{name}.jpg")
        if rec["split"] == "MA":
            expected.add(f"e_optha_MA/Annotation_MA/{patient}/{name}.png")
            m = _read(root / f"e_optha_MA/Annotation_MA/{patient}/{name}.png")
            img = _read(root / rec["path"])
            assert m.shape[:2] == img.shape[:2] and set(np.unique(m)) <= {0, 255}
            grey = m if m.ndim == 2 else m[..., 0]
            assert int((grey == 255).sum()) == rec["pixels"]["MA"] > 0
            assert set(rec["pixels"]) == {"MA"}  # no HE ground truth even where HE is drawn
        else:
            assert rec["pixels"] == {} and rec["lesions"] == {}
    assert _files(root) == expected
    assert not any("HE" in f or "Annotation_HE" in f for f in expected)
    patients = [p for split, p, _ in eophtha_names(8, 4, seed=0) if split == "MA"]
    assert len(set(patients)) < len(patients)  # several images per patient
    # the variant spelling of the top folder
    other = tmp_path / "e2"
    generate_layout("eophtha-ma", other, seed=3, n={"MA": 1, "healthy": 0}, top="e_ophtha_MA", progress=False)
    assert {f.split("/")[0] for f in _files(other)} == {"e_ophtha_MA", "synthetic.json"}


def test_diaretdb1_layout_and_confidence_levels(trees):
    root = trees["diaretdb1"]
    info = _info(root)
    ids = list(DIARETDB1_TRAIN_IDS[:2]) + list(DIARETDB1_TEST_IDS[:2])
    assert sorted(info["images"]) == [f"image{i:03d}" for i in sorted(ids)]
    assert {n: r["split"] for n, r in info["images"].items()} == {
        **{f"image{i:03d}": "train" for i in DIARETDB1_TRAIN_IDS[:2]},
        **{f"image{i:03d}": "test" for i in DIARETDB1_TEST_IDS[:2]},
    }
    expected = {"synthetic.json"} | {f"resources/images/ddb1_fundusimages/image{i:03d}.png" for i in ids}
    expected |= {f"{DDB1_GT}/{d}/image{i:03d}.png" for d in DDB1_DIRS for i in ids}
    assert _files(root) == expected
    seen = set()
    partial_px = 0
    for name, rec in info["images"].items():
        for d, lesion in zip(DDB1_DIRS, ("MA", "HE", "EX", "SE"), strict=True):
            m = _read(root / f"{DDB1_GT}/{d}/{name}.png")
            assert m.ndim == 2 and m.dtype == np.uint8
            values = set(np.unique(m).tolist())
            assert values <= {0, 64, 128, 192, 255}  # ceil(255 c), c in {0, .25, .5, .75, 1}
            seen |= values
            consensus = m >= 192
            assert int(consensus.sum()) == rec["pixels"][lesion]
            partial_px += int(((m > 0) & (m < 192)).sum())
            if consensus.any():  # a halo of partial agreement around the agreed lesions, wider than them
                halo = (cv2.dilate(consensus.astype(np.uint8), np.ones((5, 5), np.uint8)) > 0) & ~consensus
                assert ((m[halo] > 0) & (m[halo] < 192)).mean() > 0.9
        assert rec["experts"]["MA"]["consensus"] >= 1
    assert seen == {0, 64, 128, 192, 255}
    assert sum(r["experts"][k]["partial"] for r in info["images"].values() for k in ("MA", "HE")) >= 1
    assert partial_px > 0


def test_same_seed_same_bytes_and_refusals(trees, tmp_path):
    again = tmp_path / "ddr"
    generate_layout("ddr", again, seed=3, n=SMALL["ddr"], progress=False)
    assert _digest(again) == _digest(trees["ddr"])
    before = _digest(again)
    info = generate_layout("ddr", again, seed=3, n=SMALL["ddr"], progress=False)  # already generated
    assert info["counts"] == SMALL["ddr"] and _digest(again) == before
    with pytest.raises(FileExistsError, match="force"):
        generate_layout("ddr", again, seed=4, n=SMALL["ddr"], progress=False)
    with pytest.raises(FileExistsError, match="force"):
        generate_layout("fgadr", again, seed=3, n={"all": 1}, progress=False)
    assert _digest(again) == before
    generate_layout("fgadr", again, seed=3, n={"all": 1}, force=True, progress=False)  # ours: replaced
    assert _info(again)["layout"] == "fgadr"
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="not a synthetic set"):
        generate_layout("diaretdb1", mine, n={"train": 1, "test": 0}, force=True, progress=False)
    assert (mine / "notes.txt").read_text() == "keep me" and _files(mine) == {"notes.txt"}
    # a foreign generator's marker is not ours either
    (mine / "synthetic.json").write_text(json.dumps({"generator": "someone else"}))
    with pytest.raises(FileExistsError, match="not a synthetic set"):
        generate_layout("diaretdb1", mine, n={"train": 1, "test": 0}, force=True, progress=False)
    assert (mine / "notes.txt").is_file()


def test_lesion_size_relative_to_fov_is_the_same_in_every_camera(trees):
    """MA radius x (IDRiD's FOV / the photograph's measured FOV) agrees within 10 % across cameras,
    so a reader that rescales every FOV to IDRiD's sees lesions of one size."""
    fov_error = []
    for layout, root in trees.items():  # the written photographs have their camera's FOV
        for name, rec in _info(root)["images"].items():
            fov = find_fov(_read(root / rec["path"]), name)
            cam = next(c for c in CAMERAS[layout] if c.name == rec["camera"])
            fov_error.append(abs(fov.diameter / cam.fov_diameter - 1))
    assert max(fov_error) < 0.03
    means = {}
    for cams in CAMERAS.values():
        for cam in cams:
            # the drawn radius range, scaled to IDRiD's FOV (888.1 px): IDRiD's default 6-9 px
            lo, hi = cam.params().resolved_ma_radius()
            assert lo * 888.1 / cam.fov_diameter == pytest.approx(6.0, rel=0.01)
            assert hi * 888.1 / cam.fov_diameter == pytest.approx(9.0, rel=0.01)
            # and as measured: many dots per photograph, equivalent radius from the mask's area
            radii = []
            for seed in (0, 1):
                syn = render_camera(replace(cam, ma_count=(40, 40)), np.random.default_rng(seed), with_he=False)
                fov = find_fov(syn.image, cam.name)
                _, _, stats, _ = cv2.connectedComponentsWithStats(syn.masks["MA"].astype(np.uint8))
                radii += (np.sqrt(stats[1:, cv2.CC_STAT_AREA] / np.pi) * 888.1 / fov.diameter).tolist()
            assert len(radii) > 40 and 5.4 < min(radii) and max(radii) < 9.9, (cam.name, min(radii), max(radii))
            means[cam.name] = float(np.mean(radii))
    assert max(means.values()) / min(means.values()) < 1.10, means
    assert all(7.5 * 0.92 < v < 7.5 * 1.08 for v in means.values()), means


def test_counts_parsing_and_defaults():
    assert resolve_counts("ddr") == {"train": 10, "valid": 4, "test": 6}
    assert resolve_counts("eophtha-ma", {"healthy": 0}) == {"MA": 8, "healthy": 0}
    assert parse_counts("train=4, valid=2,test=3") == {"train": 4, "valid": 2, "test": 3}
    with pytest.raises(ValueError):
        resolve_counts("fgadr", {"train": 1})
    with pytest.raises(ValueError):
        resolve_counts("diaretdb1", {"train": 29})  # only 28 official training images
    with pytest.raises(ValueError):
        parse_counts("train4")


def test_cli_layout(tmp_path):
    out = tmp_path / "d"
    cmd = [sys.executable, str(TOOL), "--layout", "diaretdb1", "--out", str(out), "--n", "train=1,test=1"]
    r = subprocess.run(cmd + ["-q", "--sample", str(tmp_path / "p.jpg")], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert (out / "resources/images/ddb1_fundusimages/image001.png").is_file()
    assert (out / "resources/images/ddb1_fundusimages/image002.png").is_file()  # the first test image
    assert cv2.imread(str(tmp_path / "p.jpg")).shape == (288, 375, 3)
    r = subprocess.run(cmd, capture_output=True, text=True)
    assert r.returncode == 0 and "already generated" in r.stderr
    r = subprocess.run(cmd + ["--seed", "9"], capture_output=True, text=True)
    assert r.returncode == 1 and "--force" in r.stderr and "Traceback" not in r.stderr
    r = subprocess.run(cmd + ["--size", "64x64"], capture_output=True, text=True)
    assert r.returncode == 2 and "idrid only" in r.stderr
    r = subprocess.run(cmd[:-1] + ["valid=1"], capture_output=True, text=True)
    assert r.returncode == 2 and "valid" in r.stderr


def test_idrid_layout_delegates_and_its_marker_counts(tmp_path):
    out = tmp_path / "idrid"
    info = generate_layout("idrid", out, seed=5, n={"train": 1, "test": 1}, params=SMALL_IDRID, progress=False)
    on_disk = _info(out)
    assert on_disk["layout"] == info["layout"] == "idrid" and on_disk["counts"] == {"train": 1, "test": 1}
    assert _files(out) >= {"A. Segmentation/1. Original Images/a. Training Set/IDRiD_01.jpg"}
    with pytest.raises(ValueError, match="idrid layout only"):
        generate_layout("ddr", tmp_path / "x", params=SMALL_IDRID)
