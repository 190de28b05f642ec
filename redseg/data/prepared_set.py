"""A prepared set (docs/data_format.md): the one module that reads one, and the rules it is made by.

A prepared set is a folder of PNG images and 0/255 masks with a list file per split
(``train.txt``, ``test.txt``: ``image<TAB>MA mask<TAB>HE mask``, paths relative to the list file),
``meta.json`` and the completion stamp ``.complete`` (redseg.fileio), written last by
``tools/prepare_idrid.py`` (redseg.data.idrid). This module owns what every reader of such a set needs,
so that the Caffe data layer, the training driver, tools/test_net.py and the scoring
(redseg.evaluation.scoring) read it the same way and give the same clear message for a bad file:

* the list files (:func:`read_list`, :func:`write_list`, :func:`list_path`), ``meta.json`` and the
  completion stamp (:func:`read_meta`, :func:`require_complete`);
* the mask rule (:func:`mask_from_pixels`, :func:`read_mask`), for the official IDRiD colour TIFFs
  as much as for the prepared 0/255 PNGs: **a pixel is lesion where any colour channel is
  non-zero; an alpha channel is ignored; a grey mask is lesion where it is non-zero.** IDRiD's
  masks mark lesions in colour (red) on black, so any colour channel counts; an alpha channel
  carries opacity, not class: a mask saved with an opaque alpha channel (255 everywhere) would
  otherwise make every pixel a lesion, in training and in scoring alike;
* how a mask is brought to a smaller size (:func:`downsample_mask`): ``any`` (a low-resolution
  pixel is lesion if any full-resolution pixel it covers is; keeps microaneurysms), ``area`` or
  ``nearest`` - the rule of the preparation and of scoring at the prediction size.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from redseg import config as C
from redseg.fileio import COMPLETE, is_complete, write_text

log = logging.getLogger(__name__)

MASK_RULES = ("any", "area", "nearest")


class DataError(ValueError):
    """A data file is missing, unreadable or inconsistent; the message names it."""


@dataclass(frozen=True)
class Sample:
    """One line of a list file: an image and its MA and HE masks."""

    name: str
    image: Path
    ma: Path
    he: Path

    @property
    def masks(self) -> dict[str, Path]:
        """The mask paths by lesion, in the order of config.LESIONS."""
        return {"MA": self.ma, "HE": self.he}


# --- list files, meta.json, the completion stamp ---------------------------------------------


def list_path(prepared: str | os.PathLike, split: str) -> Path:
    """The list file of ``split`` ("train" or "test") in a prepared set."""
    return Path(prepared) / f"{split}.txt"


def read_list(list_file: str | os.PathLike) -> list[Sample]:
    """Parse a list file: ``image<TAB>MA mask<TAB>HE mask`` per line, relative to the file's folder.

    Blank lines and lines starting with ``#`` are skipped; every file named must exist.
    """
    list_file = Path(list_file)
    if not list_file.is_file():
        raise DataError(
            f"list file not found: {list_file}. Prepare a data set first "
            "(make data IDRID=/path/to/IDRiD, or make demo for a synthetic one)."
        )
    root = list_file.parent
    columns = 1 + len(C.LESIONS)
    samples = []
    for lineno, raw in enumerate(list_file.read_text().splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        parts = line.split("\t")
        if len(parts) != columns:
            raise DataError(
                f"{list_file}:{lineno}: expected {columns} tab-separated paths (image, "
                f"{', '.join(C.LESIONS)} masks), got {len(parts)}: {line!r}"
            )
        paths = [root / p for p in parts]
        for p in paths:
            if not p.is_file():
                raise DataError(f"{list_file}:{lineno}: file not found: {p}")
        samples.append(Sample(paths[0].stem, *paths))
    if not samples:
        raise DataError(f"{list_file}: holds no samples")
    return samples


def write_list(path: Path, rows: Iterable[Sequence[str]], header: str | None = None) -> None:
    """Write a list file (atomically): one ``image<TAB>MA<TAB>HE`` row per sample, ``# header`` first."""
    lines = [f"# {header}"] if header else []
    lines += ["\t".join(row) for row in rows]
    write_text(path, "".join(line + "\n" for line in lines))


def require_complete(prepared: str | os.PathLike) -> None:
    """Raise DataError unless ``prepared`` carries its completion stamp (was finished)."""
    if not is_complete(Path(prepared)):
        raise DataError(
            f"{prepared} is an incomplete prepared set (no {COMPLETE} stamp: an interrupted run?); "
            "run tools/prepare_idrid.py again"
        )


def read_meta(prepared: str | os.PathLike) -> dict:
    """meta.json of a finished prepared set (its completion stamp must exist)."""
    prepared = Path(prepared)
    require_complete(prepared)
    meta_path = prepared / "meta.json"
    try:
        meta = json.loads(meta_path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise DataError(f"cannot read {meta_path}: {e}") from e
    return meta


def mean_bgr(prepared: str | os.PathLike) -> np.ndarray:
    """Per-channel BGR mean of the prepared training images (docs/method.md#input-mean)."""
    meta = read_meta(prepared)
    if "mean_bgr" not in meta:
        log.warning("%s/meta.json has no mean_bgr; using the L-Seg IDRiD mean %s", prepared, C.LSEG_MEAN_BGR)
        return np.asarray(C.LSEG_MEAN_BGR, dtype=np.float32)
    return np.asarray(meta["mean_bgr"], dtype=np.float32)


def fov_diameter(prepared: str | os.PathLike) -> float | None:
    """The training images' field-of-view diameter in pixels at prepared size (redseg.data.fov).

    meta.json's ``fov_diameter_px`` when the set has one; for a set prepared before it was measured,
    computed now the same way, over the ``_id`` (unaugmented) training images, or over all when
    none is named so. None when no training image shows a field of view.
    """
    from redseg.data.fov import FovError, find_fov, fov_summary

    meta = read_meta(prepared)
    if "fov_diameter_px" in meta:
        d = meta["fov_diameter_px"]
        return None if d is None else float(d)
    samples = read_list(list_path(prepared, "train"))
    plain = [s for s in samples if s.name.endswith("_id")] or samples
    found: list[float | None] = []
    for s in plain:
        try:
            found.append(find_fov(read_image(s.image), str(s.image)).diameter)
        except FovError as e:
            log.warning("no field of view measured: %s", e)
            found.append(None)
    d, how = fov_summary(found)
    log.info("%s/meta.json has no fov_diameter_px; measured now: %s (%s)", prepared, d, how)
    return d


# --- images and masks ---------------------------------------------------------------------------


def read_image(path: Path) -> np.ndarray:
    """BGR uint8; DataError naming the file when it is missing or not an image."""
    img = cv2.imread(str(path), cv2.IMREAD_COLOR)
    if img is None:
        raise DataError(f"cannot read image {path} (missing, truncated or not an image)")
    return img


def mask_from_pixels(m: np.ndarray) -> np.ndarray:
    """The mask rule: bool map, lesion where any colour channel is non-zero, alpha ignored.

    ``m`` as OpenCV decodes a file unchanged: HxW grey, HxWx2 grey + alpha, HxWx3 BGR or HxWx4
    BGRA. The channels are OR-ed bitwise (about 15x faster than ``m.max(axis=2)``).
    """
    if m.ndim == 3:
        chans = cv2.split(m)
        colour = chans[:1] if len(chans) == 2 else chans[:3]
        acc = colour[0]
        for c in colour[1:]:
            acc = cv2.bitwise_or(acc, c)
        m = acc
    return m != 0


def read_mask(path: Path) -> np.ndarray:
    """A mask file (a colour TIFF of IDRiD, a 0/255 PNG) as a bool map by :func:`mask_from_pixels`."""
    m = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    if m is None:
        raise DataError(f"cannot read mask {path} (missing, truncated or not an image)")
    return mask_from_pixels(m)


def load_sample(s: Sample) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(BGR image, MA, HE) with the masks 0/1 uint8; each mask must have its image's size."""
    img = read_image(s.image)
    h, w = img.shape[:2]
    masks = []
    for path in (s.ma, s.he):
        m = read_mask(path)
        if m.shape != (h, w):
            raise DataError(f"mask {path} is {m.shape[1]}x{m.shape[0]}, its image is {w}x{h}")
        masks.append(m.view(np.uint8))
    return img, masks[0], masks[1]


def downsample_mask(mask: np.ndarray, shape: tuple[int, int], rule: str = "any") -> np.ndarray:
    """Bool mask -> bool mask of ``shape`` (height, width) by ``rule``.

    ``any``: lesion if any covered pixel is (pixel-area average of the 0/1 map > 0, so tiny
    microaneurysms survive, which nearest neighbour would drop); ``area``: if at least half of the
    covered area is; ``nearest``: the pixel nearest to the low-resolution pixel's centre
    (cv2.INTER_NEAREST_EXACT). Enlarging (unusual: a prediction larger than its label) uses
    nearest neighbour whatever the rule.
    """
    if rule not in MASK_RULES:
        raise ValueError(f"unknown mask rule {rule!r}; choose one of {', '.join(MASK_RULES)}")
    h, w = shape
    if mask.shape == (h, w):
        return mask.astype(bool, copy=True)
    if h > mask.shape[0] or w > mask.shape[1]:
        return cv2.resize(mask.astype(np.uint8), (w, h), interpolation=cv2.INTER_NEAREST) > 0
    if rule == "nearest":
        return cv2.resize(mask.astype(np.uint8), (w, h), interpolation=cv2.INTER_NEAREST_EXACT) > 0
    frac = cv2.resize(mask.astype(np.float32), (w, h), interpolation=cv2.INTER_AREA)
    return frac > 0 if rule == "any" else frac >= 0.5 - 1e-6


def image_blob(img: np.ndarray, mean: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """BGR uint8 HxWx3 -> float32 1x3xHxW minus the per-channel mean (docs/method.md#input-mean)."""
    chw = img.transpose(2, 0, 1)
    if out is None:
        out = np.empty((1, *chw.shape), dtype=np.float32)
    np.subtract(chw, mean.reshape(3, 1, 1), out=out[0], dtype=np.float32)
    return out
