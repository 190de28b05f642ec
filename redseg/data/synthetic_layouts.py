"""Synthetic copies of the public fundus lesion data sets, each in its own published layout.

Why: DDR, FGADR, e-ophtha MA and DiaretDB1 cannot be downloaded on the project's machines, yet
their readers, the preparation, training and the cross-dataset scoring must run here. This module
draws photographs with :func:`redseg.data.synthetic.render_fundus` and writes them exactly where
and how each data set's archive puts its files (``../shared/datasets.md``; docs/data_format.md),
each with its own "camera": frame size, field-of-view (FOV) diameter, colour cast, lesion density,
image format and mask encoding (:data:`CAMERAS`, :data:`LAYOUTS`).

:func:`generate_layout` writes one tree::

    idrid       A. Segmentation/...   (redseg.data.synthetic.generate_idrid_tree, unchanged)
    ddr         lesion_segmentation/{train,valid,test}/image/<stem>.jpg
                lesion_segmentation/{train,test}/label/{EX,HE,MA,SE}/<stem>.tif
                lesion_segmentation/valid/segmentation label/{EX,HE,MA,SE}/<stem>.tif
                    single-channel 0/255 TIFF, all four for every image (all black: no lesion);
                    stems like 007-2846-100; two cameras alternate within the set
    fgadr       Seg-set/Original_Images/<id>.png, Seg-set/DR_Seg_Grading_Label.csv
                Seg-set/{Microaneurysms_Masks,Hemohedge_Masks,HardExudate_Masks,SoftExudate_Masks}/<id>.png
                    anti-aliased grey PNG, lesion where value >= 128; every third image's masks
                    are 3-channel with equal channels; ids like 0001_1; no split
    eophtha-ma  e_optha_MA/MA/<patient>/<img>.jpg, e_optha_MA/Annotation_MA/<patient>/<img>.png
                e_optha_MA/healthy/<patient>/<img>.jpg   (no annotation; no MA drawn)
                    binary 0/255 PNG, every other one 3-channel; patients like E0000404, images
                    like C0001273; haemorrhages are drawn but there is no HE ground truth;
                    top folder spelled ``top`` (e_optha_MA, or e_ophtha_MA as seen in the wild)
    diaretdb1   resources/images/ddb1_fundusimages/imageNNN.png
                resources/images/ddb1_groundtruth/{redsmalldots,hemorrhages,hardexudates,softexudates}/imageNNN.png
                    merged confidence of four experts, single-channel 8 bit, value =
                    ceil(255 x c) for c in {0, .25, .5, .75, 1}: 0, 64, 128, 192, 255; the
                    consensus (c >= 0.75, value >= 192) is exactly the drawn lesion for most
                    lesions; each has a wider halo of partial agreement (<= 0.5), and about a
                    quarter are marked by only one or two experts (<= 0.5 everywhere);
                    numbers from the official split (config.DIARETDB1_TRAIN_IDS / _TEST_IDS)

Lesion sizes scale with the FOV diameter (SyntheticParams.fov_radius / size_scale): a camera
whose FOV is 600 px draws an MA of 600/889.8 of the IDRiD default radius, so once a reader
rescales each photograph to IDRiD's FOV diameter, lesions have the same size in every set.

Every tree gets ``synthetic.json`` at its root, written last: ``generator`` ("redseg.synthetic"),
``layout``, ``counts`` (images per split: ddr train/valid/test, fgadr all, eophtha-ma
MA/healthy, diaretdb1 train/test, idrid train/test), ``settings`` (what was asked: a tree with the
same settings is kept, "already generated") and ``images``: per image ``split``, ``camera``,
``path`` (the image, relative to the root), ``lesions`` (lesions drawn per type), ``pixels``
(positive pixels of each written mask under the layout's own rule, keyed MA/HE/EX/SE), and for
diaretdb1 ``experts`` ({lesion: {"consensus": n, "partial": n}} connected lesions). Same seed ->
byte-identical files. Anything else at ``out`` is refused unless ``force``, and only a tree of
ours (with synthetic.json) or an empty folder is ever replaced.
"""

from __future__ import annotations

import csv
import io
import logging
import math
from collections.abc import Iterator
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import cv2
import numpy as np

from redseg.config import DIARETDB1_TEST_IDS, DIARETDB1_TRAIN_IDS
from redseg.data.synthetic import (
    GENERATOR_STAMP,
    MARKER,
    SyntheticImage,
    SyntheticParams,
    _no_he_ids,
    existing_tree,
    generate_idrid_tree,
    render_fundus,
)
from redseg.fileio import building_dir, write_bytes, write_image, write_json

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
GENERATOR = GENERATOR_STAMP


@dataclass(frozen=True)
class Camera:
    """How one data set's photographs look. Sizes are pixels of the written image."""

    name: str
    width: int
    height: int
    fov_radius: tuple[float, float]  # fundus radius as a share of the width (min, max per image)
    gain_bgr: tuple[float, float, float]  # colour cast: out = 255 x gain x (in / 255) ** gamma
    gamma: float
    ma_count: tuple[int, int]  # lesion density: MA per image (inclusive)
    he_count: tuple[int, int]  # HE per image that has haemorrhages
    no_he_fraction: float  # share of each split without haemorrhage
    ex_fraction: float  # share of images with hard exudates
    image_format: str  # "jpg" or "png"
    jpeg_quality: int = 92

    @property
    def fov_diameter(self) -> float:
        """Mean FOV diameter in pixels (the renderer draws it within +-fov_radius's spread)."""
        return self.width * (self.fov_radius[0] + self.fov_radius[1])

    def params(self) -> SyntheticParams:
        return SyntheticParams(
            width=self.width,
            height=self.height,
            ma_count=self.ma_count,
            he_count=self.he_count,
            no_he_fraction=self.no_he_fraction,
            ex_fraction=self.ex_fraction,
            jpeg_quality=self.jpeg_quality,
            fov_radius=self.fov_radius,
        )


# The cameras, per layout. Frames are about half the real ones (600-800 px wide) so a whole
# cross-dataset demo trains in minutes; the FOV (diameter = width x (sum of fov_radius)) is what
# the readers rescale to IDRiD's, and every lesion size follows it.
CAMERAS: dict[str, tuple[Camera, ...]] = {
    # DDR: images from several cameras; here two alternate: a wide frame cutting the disc at the
    # top and bottom (FOV 699 px in 640 rows), and a square one (like DDR's 1468x1469) holding it.
    "ddr": (
        Camera("ddr-a", 760, 640, (0.455, 0.465), (1.0, 1.05, 1.1), 0.95, (3, 15), (1, 6), 0.3, 0.4, "jpg", 90),
        Camera("ddr-b", 640, 640, (0.445, 0.455), (0.85, 0.92, 1.0), 1.08, (3, 15), (1, 6), 0.3, 0.4, "jpg", 90),
    ),
    # FGADR: 1280x1280 halved, the whole disc inside a 1:1 frame, paler; many lesions (severe DR).
    "fgadr": (Camera("fgadr", 640, 640, (0.445, 0.455), (1.1, 1.0, 0.95), 0.9, (5, 20), (2, 10), 0.15, 0.5, "png"),),
    # e-ophtha: 1440x960 halved (3:2), the disc slightly cut at the top and bottom; darker, warmer;
    # few MA per image.
    "eophtha-ma": (
        Camera("eophtha", 720, 480, (0.345, 0.355), (0.8, 0.95, 1.05), 1.1, (2, 8), (1, 3), 0.5, 0.2, "jpg"),
    ),
    # DiaretDB1: 1500x1152 halved, the disc cut at the top and bottom; greenish and dark.
    "diaretdb1": (
        Camera("diaretdb1", 750, 576, (0.435, 0.445), (0.7, 1.1, 0.95), 1.05, (3, 12), (1, 6), 0.3, 0.4, "png"),
    ),
}


@dataclass(frozen=True)
class Layout:
    """One data set's published layout: its splits, default counts and mask encoding."""

    name: str
    splits: tuple[str, ...]
    default_counts: tuple[int, ...]  # per split, in the order of splits
    masks: str  # the mask encoding, in words (docs/data_format.md)


LAYOUTS: dict[str, Layout] = {
    "idrid": Layout("idrid", ("train", "test"), (54, 27), "3-channel TIFF, lesion (0,0,255) BGR; no file: no lesion"),
    "ddr": Layout("ddr", ("train", "valid", "test"), (10, 4, 6), "single-channel 0/255 TIFF, all four per image"),
    "fgadr": Layout("fgadr", ("all",), (16,), "anti-aliased grey PNG (some RGB, equal channels); lesion >= 128"),
    "eophtha-ma": Layout("eophtha-ma", ("MA", "healthy"), (8, 4), "binary 0/255 PNG (some 3-channel); MA only"),
    "diaretdb1": Layout("diaretdb1", ("train", "test"), (8, 10), "confidence ceil(255 c), c = k/4; lesion >= 192"),
}
LAYOUT_CODES = {"ddr": 1, "fgadr": 2, "eophtha-ma": 3, "diaretdb1": 4}  # seed streams, never reused

DDR_ROOT = "lesion_segmentation"
DDR_LESIONS = ("EX", "HE", "MA", "SE")
FGADR_ROOT = "Seg-set"
FGADR_MASK_DIRS = {
    "MA": "Microaneurysms_Masks",
    "HE": "Hemohedge_Masks",  # sic, as published
    "EX": "HardExudate_Masks",
    "SE": "SoftExudate_Masks",
}
FGADR_GRADES_CSV = "DR_Seg_Grading_Label.csv"
EOPHTHA_TOPS = ("e_optha_MA", "e_ophtha_MA")
DDB1_IMAGES = "resources/images/ddb1_fundusimages"
DDB1_GT = "resources/images/ddb1_groundtruth"
DDB1_LESION_DIRS = {"MA": "redsmalldots", "HE": "hemorrhages", "EX": "hardexudates", "SE": "softexudates"}
DDB1_PARTIAL_FRACTION = 0.25  # share of lesions marked by one or two experts only
DDB1_CONSENSUS = 192  # value >= this: confidence >= 0.75 (the usual consensus)


def confidence_value(c: float) -> int:
    """The 8-bit value of a merged confidence ``c``: ceil(255 c), so 0.75 -> 192 and the rules
    ``value >= 192``, ``value / 255 >= 0.75`` and ``round(4 value / 255) >= 3`` agree."""
    return int(math.ceil(255 * c - 1e-9))


# --------------------------------------------------------------------------------------------------
# rendering


def _colour_cast(img: np.ndarray, camera: Camera) -> np.ndarray:
    """Per-channel gain and gamma through a lookup table (black stays black)."""
    v = np.arange(256, dtype=np.float64) / 255.0
    lut = np.stack([np.clip(np.round(255 * g * v**camera.gamma), 0, 255) for g in camera.gain_bgr], axis=-1)
    return cv2.LUT(img, lut.astype(np.uint8).reshape(256, 1, 3))


def render_camera(
    camera: Camera, rng: np.random.Generator, with_he: bool = True, healthy: bool = False
) -> SyntheticImage:
    """One photograph as ``camera`` takes it: rendered at its FOV, then its colour cast. ``healthy``:
    no lesion at all (no MA, HE or EX drawn)."""
    params = camera.params()
    if healthy:
        params = replace(params, ma_count=(0, 0), ex_fraction=0.0)
        with_he = False
    syn = render_fundus(rng, params, with_he=with_he)
    syn.image = _colour_cast(syn.image, camera)
    return syn


def _rng(seed: int, layout: str, index: int, attempt: int = 0) -> np.random.Generator:
    key = [seed, 1000 + LAYOUT_CODES[layout], index] + ([attempt] if attempt else [])
    return np.random.default_rng(np.random.SeedSequence(key))


# --------------------------------------------------------------------------------------------------
# mask encodings


def _binary(mask: np.ndarray, channels: int = 1) -> np.ndarray:
    m = np.where(mask, 255, 0).astype(np.uint8)
    return m if channels == 1 else np.repeat(m[..., None], channels, axis=2)


def _antialiased(mask: np.ndarray, channels: int = 1) -> np.ndarray:
    """FGADR-like grey mask: the edge blurred (sigma 0.8 px), the lesion exactly the pixels >= 128
    (inside pixels are at least 128, outside ones at most 127)."""
    soft = cv2.GaussianBlur(mask.astype(np.float32), (0, 0), 0.8) * 255
    v = np.round(soft)
    v = np.where(mask, np.maximum(v, 128), np.minimum(v, 127)).astype(np.uint8)
    return v if channels == 1 else np.repeat(v[..., None], channels, axis=2)


def _confidence_map(mask: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, dict[str, int]]:
    """DiaretDB1-like merged confidence of four experts for the lesions of ``mask``.

    Each connected lesion is either agreed (its pixels >= 0.75: 1.0 inside, 0.75 on its rim,
    exactly the lesion) or marked by one or two experts only (0.25 or 0.5, never >= 0.75); both get
    a wider halo of partial agreement (0.5 then 0.25 for agreed lesions, 0.25 for the others).
    At least one lesion per map is agreed. Returns the uint8 map, the consensus (>= 0.75) and
    {"consensus": n, "partial": n}.
    """
    h, w = mask.shape
    n, labels, stats, _ = cv2.connectedComponentsWithStats(mask.astype(np.uint8), connectivity=8)
    conf = np.zeros((h, w), np.float32)
    partial = [bool(rng.random() < DDB1_PARTIAL_FRACTION) for _ in range(n - 1)]
    if partial and all(partial):
        partial[0] = False
    for k in range(1, n):
        x, y, bw, bh, area = stats[k]
        r_eq = math.sqrt(area / math.pi)
        h1 = max(2.0, 0.4 * r_eq)
        h2 = 2.2 * h1
        pad = int(math.ceil(h2)) + 2
        x0, x1, y0, y1 = max(0, x - pad), min(w, x + bw + pad), max(0, y - pad), min(h, y + bh + pad)
        comp = labels[y0:y1, x0:x1] == k
        dist = cv2.distanceTransform((~comp).astype(np.uint8), cv2.DIST_L2, 5)
        local = np.zeros(comp.shape, np.float32)
        if partial[k - 1]:
            level = 0.5 if rng.random() < 0.5 else 0.25
            local[dist <= h1] = 0.25
            local[comp] = level
        else:
            local[dist <= h2] = 0.25
            local[dist <= h1] = 0.5
            core = cv2.erode(comp.astype(np.uint8), np.ones((3, 3), np.uint8)) > 0
            local[comp] = 0.75
            local[core] = 1.0
        conf[y0:y1, x0:x1] = np.maximum(conf[y0:y1, x0:x1], local)
    levels = {0.0: 0, 0.25: 0, 0.5: 0, 0.75: 0, 1.0: 0}
    out = np.zeros((h, w), np.uint8)
    for c in levels:
        out[conf == np.float32(c)] = confidence_value(c)
    consensus = out >= DDB1_CONSENSUS
    return out, consensus, {"consensus": partial.count(False), "partial": partial.count(True)}


# --------------------------------------------------------------------------------------------------
# names


def ddr_stems(n: int, seed: int) -> list[str]:
    """``n`` distinct DDR-like stems ``SSS-PPPP-NNN`` (site, patient, image number), seeded."""
    rng = np.random.default_rng(np.random.SeedSequence([seed, 2000 + LAYOUT_CODES["ddr"]]))
    stems: list[str] = []
    while len(stems) < n:
        s = f"{int(rng.integers(1, 60)):03d}-{int(rng.integers(1000, 10000)):04d}-{int(rng.integers(100, 103)):03d}"
        if s not in stems:
            stems.append(s)
    return stems


def fgadr_ids(n: int) -> list[str]:
    """``0001_1, 0001_2, 0002_1, ...``: patient and image (two per patient)."""
    return [f"{i // 2 + 1:04d}_{i % 2 + 1}" for i in range(n)]


def eophtha_names(n_ma: int, n_healthy: int, seed: int) -> list[tuple[str, str, str]]:
    """(split, patient, image) for the MA images then the healthy ones: patients ``E0000404``-like
    with 1-3 images each, images ``C0001273``-like, all distinct, seeded."""
    rng = np.random.default_rng(np.random.SeedSequence([seed, 2000 + LAYOUT_CODES["eophtha-ma"]]))
    patient = int(rng.integers(1000, 2000))
    image = int(rng.integers(1000, 2000))
    out = []
    for split, n in (("MA", n_ma), ("healthy", n_healthy)):
        left = 0
        for _ in range(n):
            if left == 0:
                patient += int(rng.integers(1, 40))
                left = int(rng.integers(1, 4))
            image += int(rng.integers(1, 25))
            out.append((split, f"E{patient:07d}", f"C{image:07d}"))
            left -= 1
    return out


def diaretdb1_ids(n_train: int, n_test: int) -> tuple[list[int], list[int]]:
    """The first ``n_train`` / ``n_test`` numbers of the official split (real numbering)."""
    if not 0 <= n_train <= len(DIARETDB1_TRAIN_IDS) or not 0 <= n_test <= len(DIARETDB1_TEST_IDS):
        raise ValueError(f"diaretdb1 has {len(DIARETDB1_TRAIN_IDS)} train / {len(DIARETDB1_TEST_IDS)} test images")
    return list(DIARETDB1_TRAIN_IDS[:n_train]), list(DIARETDB1_TEST_IDS[:n_test])


# --------------------------------------------------------------------------------------------------
# the trees


def _write(path: Path, arr: np.ndarray, params: list[int] | None = None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    write_image(path, arr, params or ())


def _write_photo(path: Path, img: np.ndarray, camera: Camera) -> None:
    params = [cv2.IMWRITE_JPEG_QUALITY, camera.jpeg_quality] if path.suffix.lower() == ".jpg" else None
    _write(path, img, params)


def _record(split: str, camera: Camera, path: str, syn: SyntheticImage, pixels: dict[str, int]) -> dict:
    lesions = {k: v for k, v in syn.counts.items() if k != "OD" and v}
    return {"split": split, "camera": camera.name, "path": path, "lesions": lesions, "pixels": pixels}


def _no_he(layout: str, jobs: list[tuple[str, int]], camera_of, seed: int) -> set[int]:
    """Indices without haemorrhage: per split, the camera's no_he_fraction of them."""
    out: set[int] = set()
    splits = sorted({s for s, _ in jobs})
    for code, split in enumerate(splits):
        idx = [i for s, i in jobs if s == split]
        frac = camera_of(idx[0]).no_he_fraction if idx else 0.0
        out |= _no_he_ids(idx, frac, seed, 100 * LAYOUT_CODES[layout] + code)
    return out


def _ddr(tmp: Path, counts: dict[str, int], seed: int, progress) -> dict:
    cams = CAMERAS["ddr"]
    jobs = [(split, None) for split in ("train", "valid", "test") for _ in range(counts[split])]
    jobs = [(s, i) for i, (s, _) in enumerate(jobs)]
    stems = ddr_stems(len(jobs), seed)
    no_he = _no_he("ddr", jobs, lambda i: cams[i % len(cams)], seed)
    images = {}
    for split, i in progress(jobs):
        cam = cams[i % len(cams)]  # the cameras alternate within the set
        syn = render_camera(cam, _rng(seed, "ddr", i), with_he=i not in no_he)
        stem = stems[i]
        rel = f"{DDR_ROOT}/{split}/image/{stem}.jpg"
        _write_photo(tmp / rel, syn.image, cam)
        label = "segmentation label" if split == "valid" else "label"
        pixels = {}
        for lesion in DDR_LESIONS:
            m = syn.masks.get(lesion, np.zeros(syn.image.shape[:2], bool))
            _write(tmp / DDR_ROOT / split / label / lesion / f"{stem}.tif", _binary(m))
            pixels[lesion] = int(m.sum())
        images[stem] = _record(split, cam, rel, syn, pixels)
    return images


def _grade(syn: SyntheticImage) -> int:
    """A plausible DR grade from what was drawn (1: MA only, 2: few HE, 3: many, +1 with EX)."""
    n_he = syn.counts.get("HE", 0)
    g = 1 if n_he == 0 else 2 if n_he <= 4 else 3
    return min(4, g + (1 if "EX" in syn.counts and g >= 2 else 0))


def _fgadr(tmp: Path, counts: dict[str, int], seed: int, progress) -> dict:
    (cam,) = CAMERAS["fgadr"]
    ids = fgadr_ids(counts["all"])
    jobs = [("all", i) for i in range(len(ids))]
    no_he = _no_he("fgadr", jobs, lambda i: cam, seed)
    images = {}
    grades = io.StringIO()
    writer = csv.writer(grades, lineterminator="\n")
    for split, i in progress(jobs):
        syn = render_camera(cam, _rng(seed, "fgadr", i), with_he=i not in no_he)
        name = ids[i]
        rel = f"{FGADR_ROOT}/Original_Images/{name}.png"
        _write_photo(tmp / rel, syn.image, cam)
        channels = 3 if i % 3 == 2 else 1  # some masks RGB with equal channels
        pixels = {}
        for lesion, folder in FGADR_MASK_DIRS.items():
            m = syn.masks.get(lesion, np.zeros(syn.image.shape[:2], bool))
            _write(tmp / FGADR_ROOT / folder / f"{name}.png", _antialiased(m, channels))
            pixels[lesion] = int(m.sum())
        writer.writerow([f"{name}.png", _grade(syn)])
        images[name] = _record(split, cam, rel, syn, pixels)
    write_bytes(tmp / FGADR_ROOT / FGADR_GRADES_CSV, grades.getvalue().encode())
    return images


def _eophtha(tmp: Path, counts: dict[str, int], seed: int, progress, top: str) -> dict:
    (cam,) = CAMERAS["eophtha-ma"]
    names = eophtha_names(counts["MA"], counts["healthy"], seed)
    jobs = [(split, i) for i, (split, _, _) in enumerate(names)]
    no_he = _no_he("eophtha-ma", [j for j in jobs if j[0] == "MA"], lambda i: cam, seed)
    images = {}
    for split, i in progress(jobs):
        _, patient, name = names[i]
        healthy = split == "healthy"
        attempt = 0
        while True:  # an MA image must show at least one MA (a crowded render can place none)
            syn = render_camera(cam, _rng(seed, "eophtha-ma", i, attempt), i not in no_he, healthy=healthy)
            if healthy or syn.masks["MA"].any() or attempt >= 20:
                break
            attempt += 1
        rel = f"{top}/{split}/{patient}/{name}.jpg"
        _write_photo(tmp / rel, syn.image, cam)
        pixels = {}
        if not healthy:
            m = syn.masks["MA"]
            _write(tmp / top / "Annotation_MA" / patient / f"{name}.png", _binary(m, 3 if i % 2 else 1))
            pixels["MA"] = int(m.sum())
        rec = _record(split, cam, rel, syn, pixels)
        rec["patient"] = patient
        images[name] = rec
    return images


def _diaretdb1(tmp: Path, counts: dict[str, int], seed: int, progress) -> dict:
    (cam,) = CAMERAS["diaretdb1"]
    train, test = diaretdb1_ids(counts["train"], counts["test"])
    jobs = [("train", i) for i in train] + [("test", i) for i in test]
    no_he = _no_he("diaretdb1", jobs, lambda i: cam, seed)
    images = {}
    for split, i in progress(jobs):
        rng = _rng(seed, "diaretdb1", i)
        syn = render_camera(cam, rng, with_he=i not in no_he)
        name = f"image{i:03d}"
        rel = f"{DDB1_IMAGES}/{name}.png"
        _write_photo(tmp / rel, syn.image, cam)
        pixels, experts = {}, {}
        for lesion, folder in DDB1_LESION_DIRS.items():
            m = syn.masks.get(lesion, np.zeros(syn.image.shape[:2], bool))
            conf, consensus, marks = _confidence_map(m, rng)
            _write(tmp / DDB1_GT / folder / f"{name}.png", conf)
            pixels[lesion] = int(consensus.sum())
            experts[lesion] = marks
        rec = _record(split, cam, rel, syn, pixels)
        rec["experts"] = experts
        images[name] = rec
    return images


# --------------------------------------------------------------------------------------------------
# the entry point


def resolve_counts(layout: str, n: dict[str, int] | None = None) -> dict[str, int]:
    """Per-split image counts: the layout's defaults, overridden by ``n`` ({split: count})."""
    spec = LAYOUTS[layout]
    counts = dict(zip(spec.splits, spec.default_counts, strict=True))
    for split, k in (n or {}).items():
        if split not in counts:
            raise ValueError(f"{layout} has splits {', '.join(spec.splits)}; got {split!r}")
        if int(k) < 0:
            raise ValueError(f"count of {split} must be >= 0, got {k}")
        counts[split] = int(k)
    if sum(counts.values()) < 1:
        raise ValueError(f"need at least one image ({counts})")
    if layout == "diaretdb1":
        diaretdb1_ids(counts["train"], counts["test"])
    if layout == "eophtha-ma" and counts["MA"] < 1:
        raise ValueError("eophtha-ma needs at least one MA image")
    return counts


def parse_counts(text: str) -> dict[str, int]:
    """``"train=4,valid=2,test=3"`` -> {"train": 4, "valid": 2, "test": 3}."""
    out = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        key, sep, value = part.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"expected SPLIT=N[,SPLIT=N...], got {text!r}")
        out[key.strip()] = int(value)
    return out


def generate_layout(
    layout: str,
    out: str | Path,
    seed: int = 0,
    n: dict[str, int] | None = None,
    force: bool = False,
    progress: bool = True,
    top: str = EOPHTHA_TOPS[0],
    params: SyntheticParams | None = None,
) -> dict:
    """Write a synthetic data set in ``layout``'s published layout under ``out``; returns the
    contents of its synthetic.json. ``n`` overrides per-split counts ({split: count}); ``top`` is
    the e-ophtha top folder; ``params`` only for "idrid" (generate_idrid_tree's, default its own).
    """
    if layout not in LAYOUTS:
        raise ValueError(f"unknown layout {layout!r}; one of {', '.join(LAYOUTS)}")
    counts = resolve_counts(layout, n)
    out = Path(out)
    if layout == "idrid":
        info = generate_idrid_tree(out, counts["train"], counts["test"], seed, params, force=force, progress=progress)
        return {"generator": GENERATOR, "layout": "idrid", "counts": counts, **info}
    if params is not None:
        raise ValueError("params apply to the idrid layout only; other layouts use their cameras (CAMERAS)")
    if layout == "eophtha-ma" and top not in EOPHTHA_TOPS:
        raise ValueError(f"e-ophtha top folder must be one of {', '.join(EOPHTHA_TOPS)}, got {top!r}")
    from tqdm import tqdm

    settings = {
        "format": FORMAT_VERSION,
        "layout": layout,
        "seed": int(seed),
        "counts": counts,
        "cameras": [asdict(c) for c in CAMERAS[layout]],
    }
    if layout == "eophtha-ma":
        settings["top"] = top
    old = existing_tree(out, settings, force)
    if old is not None:
        return old

    def bar(jobs: list) -> Iterator:
        return iter(tqdm(jobs, desc=f"synthetic {layout}", unit="img", disable=not progress))

    with building_dir(out) as tmp:
        if layout == "ddr":
            images = _ddr(tmp, counts, seed, bar)
        elif layout == "fgadr":
            images = _fgadr(tmp, counts, seed, bar)
        elif layout == "eophtha-ma":
            images = _eophtha(tmp, counts, seed, bar, top)
        else:
            images = _diaretdb1(tmp, counts, seed, bar)
        info = {"generator": GENERATOR, "layout": layout, "counts": counts, "settings": settings, "images": images}
        write_json(tmp / MARKER, info)  # last
    log.info("wrote %d synthetic %s images to %s", len(images), layout, out)
    return info
