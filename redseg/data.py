"""Reading a prepared data set (docs/data_format.md): list files, meta.json, samples.

Used by the Caffe data layer, the training driver's pre-flight check and tools/test_net.py, so a
bad file gives the same clear message everywhere.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from redseg import config as C

log = logging.getLogger(__name__)


class DataError(ValueError):
    """A data file is missing, unreadable or inconsistent; the message names it."""


@dataclass(frozen=True)
class Sample:
    name: str
    image: Path
    ma: Path
    he: Path


def read_list(list_path: str | Path) -> list[Sample]:
    """Parse a list file: ``image<TAB>MA mask<TAB>HE mask`` per line, relative to the file's folder."""
    list_path = Path(list_path)
    if not list_path.is_file():
        raise DataError(
            f"list file not found: {list_path}. Prepare a data set first "
            "(make data IDRID=/path/to/IDRiD, or make demo for a synthetic one)."
        )
    root = list_path.parent
    samples = []
    for lineno, line in enumerate(list_path.read_text().splitlines(), start=1):
        if not line.strip() or line.startswith("#"):
            continue
        parts = line.split("\t")
        if len(parts) != 3:
            raise DataError(f"{list_path}:{lineno}: expected 3 tab-separated paths (image, MA, HE), got {line!r}")
        paths = [root / p for p in parts]
        for p in paths:
            if not p.is_file():
                raise DataError(f"{list_path}:{lineno}: file not found: {p}")
        samples.append(Sample(paths[0].stem, *paths))
    if not samples:
        raise DataError(f"{list_path}: holds no samples")
    return samples


def read_meta(prepared: str | Path) -> dict:
    """meta.json of a finished prepared set (its ``.complete`` stamp must exist)."""
    prepared = Path(prepared)
    meta_path = prepared / "meta.json"
    if not (prepared / ".complete").is_file():
        raise DataError(
            f"{prepared} is not a finished prepared data set (no .complete stamp); run tools/prepare_idrid.py again"
        )
    try:
        meta = json.loads(meta_path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise DataError(f"cannot read {meta_path}: {e}") from e
    return meta


def mean_bgr(prepared: str | Path) -> np.ndarray:
    """Per-channel BGR mean of the prepared training images (SPEC: computed on the training set)."""
    meta = read_meta(prepared)
    if "mean_bgr" not in meta:
        log.warning("%s/meta.json has no mean_bgr; using the L-Seg IDRiD mean %s", prepared, C.LSEG_MEAN_BGR)
        return np.asarray(C.LSEG_MEAN_BGR, dtype=np.float32)
    return np.asarray(meta["mean_bgr"], dtype=np.float32)


def read_image(path: Path) -> np.ndarray:
    img = cv2.imread(str(path), cv2.IMREAD_COLOR)
    if img is None:
        raise DataError(f"cannot read image {path} (missing, truncated or not an image)")
    return img


def read_mask(path: Path, shape: tuple[int, int]) -> np.ndarray:
    """0/1 uint8 mask; any non-zero channel is lesion. Must match the image's ``shape`` (H, W)."""
    m = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    if m is None:
        raise DataError(f"cannot read mask {path} (missing, truncated or not an image)")
    if m.ndim == 3:
        m = m.max(axis=2)
    if m.shape != shape:
        raise DataError(f"mask {path} is {m.shape[1]}x{m.shape[0]}, its image is {shape[1]}x{shape[0]}")
    return (m > 0).astype(np.uint8)


def load_sample(s: Sample) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    img = read_image(s.image)
    return img, read_mask(s.ma, img.shape[:2]), read_mask(s.he, img.shape[:2])


def image_blob(img: np.ndarray, mean: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """BGR uint8 HxWx3 -> float32 1x3xHxW minus the per-channel mean (SPEC "Data")."""
    chw = img.transpose(2, 0, 1)
    if out is None:
        out = np.empty((1, *chw.shape), dtype=np.float32)
    np.subtract(chw, mean.reshape(3, 1, 1), out=out[0], dtype=np.float32)
    return out
