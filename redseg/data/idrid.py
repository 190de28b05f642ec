"""From the official IDRiD segmentation archive to a prepared set (docs/data_format.md).

Paper section 3.1 (docs/method.md#task-and-data): the 81 IDRiD segmentation images (54 training, 27
test, 4288x2848 JPEG, one colour TIFF mask per lesion type) are downsampled 4x to 1072x712 and the
training set is expanded 6x by rotation and mirroring (324 samples). The paper leaves open how the
masks are downsampled and which six transforms are used; the choices made here are stated and
switchable (docs/method.md#open-points-and-our-choices):

* images: ``cv2.INTER_AREA`` (pixel-area average) to ``round(W / factor) x round(H / factor)``,
  halves rounded up; a size not divisible by the factor is thus rounded to the nearest integer
  and INTER_AREA averages over the fractional pixel footprints;
* masks (``mask_rule``): ``any`` (default) - a low-resolution pixel is lesion if any full-resolution
  pixel it covers is, which keeps microaneurysms, only a few pixels wide at full size; ``area`` -
  if at least half of the covered area is lesion; ``nearest`` - the full-resolution pixel nearest
  to the low-resolution pixel's centre (``cv2.INTER_NEAREST_EXACT``);
* augmentations (config.AUGMENTATIONS), applied to the downsampled image and its masks alike:
  ``id``; ``rot90`` = ``np.rot90(a, 1)``, 90 degrees counter-clockwise as displayed (the top row
  becomes the left column); ``rot180``; ``rot270`` = ``np.rot90(a, 3)``, 90 degrees clockwise;
  ``fliph`` = left-right mirror ``a[:, ::-1]``; ``flipv`` = upside-down mirror ``a[::-1]``.
  rot90/rot270 samples are portrait (712x1072); the data layer takes each image at its own size;
* the field of view's diameter (``fov_diameter_px`` in meta.json): the median over the training
  images, downsampled, of redseg.data.fov's circle (tools/segment.py rescales a new photograph so that
  its field of view has this diameter);
* the input mean (docs/method.md#input-mean: BGR minus a per-channel training mean) is the mean of
  the downsampled training images before augmentation (rotations and mirrors do not change it) over
  all pixels, the black surround included - as the authors' L-Seg mean (16.3, 56.4, 116.5) evidently
  is.

The source is read as it comes from the IDRiD site: a folder holding ``A. Segmentation``, that
folder itself, or a .zip of either (members are read directly, nothing is extracted). Masks are
colour TIFFs, lesion where any colour channel is non-zero; a missing mask means "no lesion of that
kind" and becomes an all-zero mask, listed in the summary. JPEG EXIF orientation is ignored, so
images stay aligned with their masks. ``IdridSource`` is the project's one reader of this layout:
scoring against the official labels (redseg.evaluation.scoring) lists its test set with it too.

The output is written into ``<out>.partial-<pid>`` and renamed to ``<out>`` when done, with
``.complete`` written last; a complete set prepared from the same source with the same options
(a fingerprint in meta.json) is kept as it is, anything else is refused unless ``force``, and a
folder that is not a prepared set is never deleted.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import os
import re
import shutil
import time
import zipfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

import cv2
import numpy as np

from redseg.config import (
    ALL_IDRID_LESIONS,
    AUGMENTATIONS,
    DOWNSAMPLE,
    IDRID_GT_DIR,
    IDRID_IMAGES_DIR,
    IDRID_LESION_DIRS,
    IDRID_SEG_DIR,
    IDRID_SPLIT_DIRS,
    LESIONS,
    LSEG_MEAN_BGR,
)
from redseg.data.fov import FovError, find_fov, fov_summary
from redseg.data.prepared_set import MASK_RULES, downsample_mask, list_path, mask_from_pixels, write_list
from redseg.fileio import (
    COMPLETE,
    building_dir,
    is_complete,
    mark_complete,
    read_json_object,
    write_image,
    write_json,
    write_text,
)

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
GENERATOR = "redseg.idrid.prepare"
DEFAULT_LESIONS = ("MA", "HE", "EX", "SE")
PARTIAL = ".partial"  # marker inside a work folder: ours, unfinished

_IMAGE_RE = re.compile(r"^(IDRiD_\d+)\.(jpe?g|png|tiff?|bmp)$", re.IGNORECASE)
_MASK_RE = re.compile(r"^(IDRiD_\d+)_([A-Z]{2})\.(tiff?|png|bmp|gif|jpe?g)$", re.IGNORECASE)
_MAX_DEPTH = 8  # folders below --src searched for "A. Segmentation/..."


class IdridError(ValueError):
    """Bad input or an output folder we must not touch; the message names the file and the fix."""


# --------------------------------------------------------------------------------------------------
# the transforms (section 3.1)

AUGMENT_FUNCS: dict[str, Callable[[np.ndarray], np.ndarray]] = {
    "id": lambda a: a,
    "rot90": lambda a: np.rot90(a, 1),  # counter-clockwise as displayed: top row -> left column
    "rot180": lambda a: np.rot90(a, 2),
    "rot270": lambda a: np.rot90(a, 3),  # clockwise
    "fliph": lambda a: a[:, ::-1],  # mirror left-right
    "flipv": lambda a: a[::-1],  # mirror upside down
}
assert tuple(AUGMENT_FUNCS) == tuple(AUGMENTATIONS), "config.AUGMENTATIONS and AUGMENT_FUNCS disagree"


def augment(a: np.ndarray, name: str) -> np.ndarray:
    """Apply one of config.AUGMENTATIONS to an HxW or HxWxC array (contiguous copy)."""
    return np.ascontiguousarray(AUGMENT_FUNCS[name](a))


def augment_point(y: int, x: int, h: int, w: int, name: str) -> tuple[int, int]:
    """Where pixel (y, x) of an h x w image lands under ``augment(., name)`` (for docs and tests)."""
    return {
        "id": (y, x),
        "rot90": (w - 1 - x, y),
        "rot180": (h - 1 - y, w - 1 - x),
        "rot270": (x, h - 1 - y),
        "fliph": (y, w - 1 - x),
        "flipv": (h - 1 - y, x),
    }[name]


def prepared_size(w: int, h: int, factor: int) -> tuple[int, int]:
    """(width, height) after downsampling by ``factor``: rounded to the nearest integer, halves up."""
    return max(1, math.floor(w / factor + 0.5)), max(1, math.floor(h / factor + 0.5))


def downsample_image(img: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """BGR image -> ``shape`` (height, width) by pixel-area averaging (cv2.INTER_AREA)."""
    if img.shape[:2] == tuple(shape):
        return img.copy()
    return cv2.resize(img, shape[::-1], interpolation=cv2.INTER_AREA)


# --------------------------------------------------------------------------------------------------
# reading the official tree from a folder or a zip


@contextlib.contextmanager
def _quiet_opencv() -> Iterator[None]:
    """Silence OpenCV's own error lines (libtiff/libjpeg) while we report errors ourselves."""
    logging_mod = getattr(getattr(cv2, "utils", None), "logging", None)
    if logging_mod is None:
        yield
        return
    old = logging_mod.getLogLevel()
    logging_mod.setLogLevel(logging_mod.LOG_LEVEL_SILENT)
    try:
        yield
    finally:
        logging_mod.setLogLevel(old)


def _jpeg_truncated(data: bytes) -> bool:
    """A JPEG whose last scan (SOS, FFDA) is not followed by an end-of-image marker (FFD9).

    Some OpenCV builds decode a truncated JPEG with a grey tail instead of failing, so this is
    checked explicitly. Marker bytes cannot occur inside entropy-coded data (0xFF is stuffed).
    """
    if data[:2] != b"\xff\xd8":
        return False
    sos, eoi = data.rfind(b"\xff\xda"), data.rfind(b"\xff\xd9")
    return sos < 0 or eoi < sos


@dataclass(frozen=True)
class _File:
    key: str  # path below "A. Segmentation", posix, as found (used in the fingerprint)
    member: str  # folder: absolute path; zip: member name
    size: int
    stamp: int  # folder: mtime_ns; zip: CRC-32


@dataclass
class IdridIndex:
    """What the source holds: images per split and masks per (image, lesion)."""

    root: str  # the "A. Segmentation" folder as a user finds it (a path, or 'archive.zip:member')
    images: dict[str, dict[str, _File]] = field(default_factory=lambda: {"train": {}, "test": {}})
    masks: dict[tuple[str, str], _File] = field(default_factory=dict)
    # per split: the ids with a mask filed under it (an id may have masks but no photo)
    mask_ids: dict[str, set[str]] = field(default_factory=lambda: {"train": set(), "test": set()})
    ignored: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class IdridImage:
    """One image id of a split: its photo and its masks per lesion (None: no such file)."""

    name: str
    image: _File | None
    masks: dict[str, _File | None]


class IdridSource:
    """The official IDRiD segmentation tree in a folder or a .zip, read in place."""

    def __init__(self, src: str | Path):
        self.src = Path(src).expanduser().resolve()
        self._zip: zipfile.ZipFile | None = None
        if not self.src.exists():
            raise IdridError(f"--src {self.src} does not exist")
        if self.src.is_file():
            if not zipfile.is_zipfile(self.src):
                raise IdridError(
                    f"--src {self.src} is a file but not a .zip; expected the IDRiD folder holding "
                    f"'{IDRID_SEG_DIR}', that folder itself, or a .zip of either"
                )
            try:
                self._zip = zipfile.ZipFile(self.src)
                raw = [(i.filename, i.file_size, i.CRC) for i in self._zip.infolist() if not i.is_dir()]
            except (zipfile.BadZipFile, OSError) as e:
                raise IdridError(f"cannot read the zip {self.src}: {e}") from e
            self._files = [(n.replace("\\", "/"), n, s, c) for n, s, c in raw]
        else:
            self._files = list(self._walk())
        try:
            self.index = self._build_index()
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        if self._zip is not None:
            self._zip.close()

    def __enter__(self) -> IdridSource:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _walk(self) -> Iterator[tuple[str, str, int, int]]:
        """(posix name relative to src's parent, absolute path, size, mtime_ns) of files below src."""
        base = self.src.parent
        for dirpath, dirnames, filenames in os.walk(self.src):
            rel = Path(dirpath).relative_to(base)
            if len(rel.parts) > _MAX_DEPTH:
                dirnames[:] = []
                continue
            dirnames[:] = sorted(d for d in dirnames if not d.startswith(".") and d != "__MACOSX")
            for f in sorted(filenames):
                p = Path(dirpath) / f
                try:
                    st = p.stat()
                except OSError:
                    continue
                yield (rel / f).as_posix(), str(p), st.st_size, st.st_mtime_ns

    def describe(self, f: _File) -> str:
        """The file as a user finds it: a path, or 'archive.zip:member'."""
        return f"{self.src}:{f.member}" if self._zip is not None else f.member

    def _build_index(self) -> IdridIndex:
        seg_l, img_l, gt_l = IDRID_SEG_DIR.lower(), IDRID_IMAGES_DIR.lower(), IDRID_GT_DIR.lower()
        split_of = {v.lower(): k for k, v in IDRID_SPLIT_DIRS.items()}
        roots: set[tuple[str, ...]] = set()
        found: list[tuple[tuple[str, ...], list[str], _File]] = []
        for name, member, size, stamp in self._files:
            parts = PurePosixPath(name).parts
            if "__MACOSX" in parts or parts[-1].startswith("._"):
                continue
            low = [p.strip().lower() for p in parts]
            for i in range(len(low) - 1):
                if low[i] == seg_l and low[i + 1] in (img_l, gt_l):
                    roots.add(parts[: i + 1])
                    rest = list(parts[i + 1 :])
                    found.append((parts[: i + 1], rest, _File("/".join(rest), member, size, stamp)))
                    break
        if not roots:
            raise IdridError(
                f"no '{IDRID_SEG_DIR}/{IDRID_IMAGES_DIR}/...' in {self.src}: expected the IDRiD segmentation data "
                f"(the folder holding '{IDRID_SEG_DIR}', that folder itself, or a .zip of either) as "
                "downloaded from the IDRiD challenge site"
            )
        if len(roots) > 1:
            shown = ", ".join(sorted("/".join(r) for r in roots))
            raise IdridError(f"several '{IDRID_SEG_DIR}' folders in {self.src} ({shown}); point --src at one")
        (root,) = roots
        if self._zip is not None:
            index = IdridIndex(root=f"{self.src}:{'/'.join(root)}")
        else:
            index = IdridIndex(root=str(self.src.parent.joinpath(*root)))
        for _, rest, f in found:
            low = [p.strip().lower() for p in rest]
            split = split_of.get(low[1]) if len(low) > 2 else None
            if low[0] == img_l and len(low) == 3 and split and (m := _IMAGE_RE.match(rest[2])):
                stem = m.group(1)
                other = "test" if split == "train" else "train"
                if stem in index.images[split] or stem in index.images[other]:
                    raise IdridError(f"{stem} appears twice ({self.describe(f)}); keep one image per id")
                index.images[split][stem] = f
            elif low[0] == gt_l and len(low) == 4 and split and (m := _MASK_RE.match(rest[3])):
                stem, lesion = m.group(1), m.group(2).upper()
                if lesion not in IDRID_LESION_DIRS:
                    index.ignored.append(f.key)
                    continue
                if low[2] != IDRID_LESION_DIRS[lesion].lower():
                    index.warnings.append(
                        f"{f.key}: a {lesion} mask outside '{IDRID_LESION_DIRS[lesion]}' (used as {lesion})"
                    )
                if (stem, lesion) in index.masks:
                    raise IdridError(f"two {lesion} masks for {stem} ({self.describe(f)}); keep one")
                index.masks[(stem, lesion)] = f
                index.mask_ids[split].add(stem)
            else:
                index.ignored.append(f.key)
        return index

    def split_images(self, split: str, lesions: Sequence[str] = ALL_IDRID_LESIONS) -> list[IdridImage]:
        """The image ids of ``split`` in name order, each with its photo and its ``lesions`` masks.

        An id is listed when it has a photo in the split or a mask filed under it (and no photo in
        the other split), so an image without any lesion is listed too; a mask missing from the
        source is None, meaning no lesion of that kind.
        """
        idx = self.index
        other = {s for sp, images in idx.images.items() if sp != split for s in images}
        names = set(idx.images[split]) | (idx.mask_ids[split] - other)
        return [
            IdridImage(name, idx.images[split].get(name), {x: idx.masks.get((name, x)) for x in lesions})
            for name in sorted(names)
        ]

    def local_path(self, f: _File) -> Path:
        """The file on disk; only for a source that is a folder (a zip member has no path)."""
        if self._zip is not None:
            raise IdridError(f"{self.describe(f)} is inside a zip; extract it or point at the folder")
        return Path(f.member)

    def read(self, f: _File) -> bytes:
        try:
            if self._zip is not None:
                return self._zip.read(f.member)
            return Path(f.member).read_bytes()
        except (OSError, zipfile.BadZipFile, EOFError) as e:
            raise IdridError(f"cannot read {self.describe(f)}: {e}") from e

    def _decode(self, f: _File, flags: int) -> np.ndarray:
        """Decoded pixels; a corrupt or truncated file raises IdridError naming it."""
        data = self.read(f)
        if _jpeg_truncated(data):
            raise IdridError(f"{self.describe(f)} is truncated (no JPEG end marker): re-download it")
        with _quiet_opencv():
            arr = cv2.imdecode(np.frombuffer(data, np.uint8), flags | cv2.IMREAD_IGNORE_ORIENTATION)
        if arr is None or arr.size == 0:
            raise IdridError(f"cannot decode {self.describe(f)}: the file is corrupt or not an image")
        return arr

    def read_image(self, f: _File) -> np.ndarray:
        """BGR uint8; a corrupt or truncated file raises IdridError naming it."""
        return self._decode(f, cv2.IMREAD_COLOR)

    def read_mask(self, f: _File) -> np.ndarray:
        """Boolean mask by the project's one mask rule (redseg.data.prepared_set.mask_from_pixels)."""
        return mask_from_pixels(self._decode(f, cv2.IMREAD_UNCHANGED))

    def fingerprint_files(self) -> list[list]:
        """What identifies the source's content: every image and mask with size and mtime/CRC."""
        idx = self.index
        files = [f for split in idx.images.values() for f in split.values()] + list(idx.masks.values())
        return sorted([f.key, f.size, f.stamp] for f in files)


# --------------------------------------------------------------------------------------------------
# the prepared set


@dataclass(frozen=True)
class PrepareOptions:
    factor: int = DOWNSAMPLE
    mask_rule: str = "any"
    lesions: tuple[str, ...] = DEFAULT_LESIONS

    def validate(self) -> None:
        if not isinstance(self.factor, int) or self.factor < 1:
            raise IdridError(f"--factor must be a whole number >= 1, got {self.factor!r}")
        if self.mask_rule not in MASK_RULES:
            raise IdridError(f"--mask-rule must be one of {', '.join(MASK_RULES)}, got {self.mask_rule!r}")
        bad = [x for x in self.lesions if x not in ALL_IDRID_LESIONS]
        if bad:
            raise IdridError(f"unknown lesion(s) {', '.join(bad)}; choose from {','.join(ALL_IDRID_LESIONS)}")
        missing = [x for x in LESIONS if x not in self.lesions]
        if missing:
            raise IdridError(f"--lesions must include {','.join(LESIONS)} (the list files need them)")
        if len(set(self.lesions)) != len(self.lesions):
            raise IdridError(f"--lesions lists a lesion twice: {','.join(self.lesions)}")

    def as_dict(self) -> dict:
        return {
            "format": FORMAT_VERSION,
            "factor": self.factor,
            "mask_rule": self.mask_rule,
            "lesions": list(self.lesions),
            "augmentations": list(AUGMENTATIONS),
        }


def fingerprint(source: IdridSource, options: PrepareOptions) -> str:
    blob = json.dumps({"options": options.as_dict(), "files": source.fingerprint_files()}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()


def _is_ours(folder: Path) -> bool:
    """A prepared set (finished or not) or one of our work folders - the only folders we delete."""
    meta = read_json_object(folder / "meta.json")
    return (meta is not None and meta.get("generator") == GENERATOR) or (folder / PARTIAL).is_file()


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True
    return True


def _remove_stale_partials(out: Path) -> None:
    """Delete ``<out>.partial-<pid>`` work folders of runs that died (interrupted runs)."""
    for p in out.parent.iterdir():
        m = re.fullmatch(re.escape(out.name) + r"\.partial-(\d+)", p.name)
        if not (m and p.is_dir() and _is_ours(p)):
            continue
        pid = int(m.group(1))
        if pid != os.getpid() and _pid_alive(pid):
            log.warning("%s belongs to a running process (%d); leaving it", p, pid)
            continue
        log.info("removing %s left by an interrupted run", p)
        shutil.rmtree(p, ignore_errors=True)


def check_output(out: Path, fp: str, options: PrepareOptions, force: bool) -> dict | None:
    """Decide what to do with an existing ``out``: the meta of a set to keep, or None to (re)build.

    Raises IdridError when ``out`` must not be touched.
    """
    if not out.exists():
        return None
    if not out.is_dir():
        raise IdridError(f"--out {out} is a file; expected a folder for the prepared set")
    meta = read_json_object(out / "meta.json")
    ours = _is_ours(out)
    if not ours:
        if any(out.iterdir()):
            raise IdridError(
                f"--out {out} exists and is not a prepared set (no meta.json of ours); refusing to touch it "
                "- choose another --out or remove it yourself"
            )
        return None  # an empty folder: used
    complete = is_complete(out) and meta is not None
    if complete and meta.get("fingerprint") == fp and not force:
        return meta
    if force:
        return None
    if not complete:
        raise IdridError(
            f"--out {out} is an unfinished prepared set (no {COMPLETE} stamp: an interrupted run?); "
            "rerun with --force to rebuild it"
        )
    old = meta.get("options", {})
    diff = [f"{k} {old.get(k)!r} -> {v!r}" for k, v in options.as_dict().items() if old.get(k) != v]
    why = "; ".join(diff) if diff else f"the source differs (was {meta.get('source')})"
    raise IdridError(f"--out {out} was prepared differently ({why}); rerun with --force to replace it")


def _summary_md(summary: dict) -> str:
    lines = [
        "# Prepared IDRiD set",
        "",
        f"- source: `{summary['source']}`",
        f"- downsampling factor {summary['factor']} (images cv2.INTER_AREA), mask rule `{summary['mask_rule']}`",
        f"- training augmentations: {', '.join(summary['augmentations'])} (rot90 = np.rot90, counter-clockwise)",
        f"- mean BGR of the training images: {', '.join(f'{v:.4f}' for v in summary['mean_bgr'])}"
        f" ({summary['mean_source']})",
        "",
        "| split | images | samples | " + " | ".join(f"{x} px full / prepared" for x in summary["lesions"]) + " |",
        "|---|---|---|" + "---|" * len(summary["lesions"]),
    ]
    for split, s in summary["splits"].items():
        cells = [f"{s['lesion_pixels_full'][x]} / {s['lesion_pixels_prepared'][x]}" for x in summary["lesions"]]
        lines.append(f"| {split} | {s['n_images']} | {s['n_samples']} | " + " | ".join(cells) + " |")
    lines += ["", "Images without a mask of a kind (an all-zero mask was written):", ""]
    for split, s in summary["splits"].items():
        for x in summary["lesions"]:
            miss = s["missing_masks"][x]
            if miss:
                lines.append(f"- {split} {x} ({len(miss)}): {', '.join(miss)}")
    if not any(s["missing_masks"][x] for s in summary["splits"].values() for x in summary["lesions"]):
        lines.append("- none")
    if summary["warnings"]:
        lines += ["", "Warnings:", ""] + [f"- {w}" for w in summary["warnings"]]
    return "\n".join(lines) + "\n"


def prepare(
    src: str | Path,
    out: str | Path,
    factor: int = DOWNSAMPLE,
    mask_rule: str = "any",
    lesions: Sequence[str] = DEFAULT_LESIONS,
    force: bool = False,
    progress: bool = True,
) -> dict:
    """Prepare the IDRiD segmentation data at ``src`` into ``out`` (docs/data_format.md).

    Returns meta.json's content, with ``"skipped": True`` added when ``out`` was already prepared
    from the same source with the same options.
    """
    from tqdm import tqdm

    options = PrepareOptions(int(factor), mask_rule, tuple(x.strip().upper() for x in lesions))
    options.validate()
    out = Path(out).expanduser().absolute()
    with IdridSource(src) as source:
        if not any(source.index.images.values()):
            raise IdridError(
                f"no images IDRiD_NN.jpg under '{source.index.root}/{IDRID_IMAGES_DIR}/"
                f"{{{IDRID_SPLIT_DIRS['train']},{IDRID_SPLIT_DIRS['test']}}}'"
            )
        fp = fingerprint(source, options)
        if out.parent.is_dir():
            _remove_stale_partials(out)
        kept = check_output(out, fp, options, force)
        if kept is not None:
            log.info("already prepared: %s (same source and options)", out)
            return {**kept, "skipped": True}
        with building_dir(out) as work:
            write_json(work / PARTIAL, {"pid": os.getpid(), "source": str(source.src)}, indent=None)
            meta = _build(source, work, options, fp, tqdm, progress)
            mark_complete(work, time.strftime("%Y-%m-%dT%H:%M:%S%z") + "\n")  # last
            (work / PARTIAL).unlink()
    log.debug("prepared %s", out)
    return meta


def _fov_diameter(small: np.ndarray, name: str) -> float | None:
    """The field-of-view diameter of a prepared training image (redseg.data.fov), None with a warning if none."""
    try:
        return find_fov(small, name).diameter
    except FovError as e:
        log.warning("no field of view measured: %s", e)
        return None


def _build(source: IdridSource, work: Path, options: PrepareOptions, fp: str, tqdm, progress: bool) -> dict:
    idx = source.index
    for split in IDRID_SPLIT_DIRS:
        (work / split / "images").mkdir(parents=True)
        (work / split / "masks").mkdir(parents=True)
    jobs = [(split, stem) for split in IDRID_SPLIT_DIRS for stem in sorted(idx.images[split])]
    bgr_sum = np.zeros(3, np.float64)
    n_pix = 0
    fov_diameters: list[float | None] = []
    sizes: set[tuple[int, int]] = set()
    lists: dict[str, list[list[str]]] = {"train": [], "test": []}
    splits = {
        split: {
            "images": sorted(idx.images[split]),
            "n_images": len(idx.images[split]),
            "n_samples": len(idx.images[split]) * (len(AUGMENTATIONS) if split == "train" else 1),
            "lesion_pixels_full": dict.fromkeys(options.lesions, 0),
            "lesion_pixels_prepared": dict.fromkeys(options.lesions, 0),
            "images_with_lesion": dict.fromkeys(options.lesions, 0),
            "missing_masks": {x: [] for x in options.lesions},
        }
        for split in IDRID_SPLIT_DIRS
    }
    for split, stem in tqdm(jobs, desc="prepare", unit="img", disable=not progress):
        f = idx.images[split][stem]
        img = source.read_image(f)
        h, w = img.shape[:2]
        size = prepared_size(w, h, options.factor)
        sizes.add(size)
        shape = size[::-1]
        small = downsample_image(img, shape)
        masks = {}
        s = splits[split]
        for lesion in options.lesions:
            mf = idx.masks.get((stem, lesion))
            if mf is None:
                s["missing_masks"][lesion].append(stem)
                masks[lesion] = np.zeros(small.shape[:2], bool)
                continue
            m = source.read_mask(mf)
            if m.shape != (h, w):
                raise IdridError(
                    f"{source.describe(mf)} is {m.shape[1]}x{m.shape[0]} but its image {source.describe(f)} "
                    f"is {w}x{h}; every mask must have its image's size"
                )
            s["lesion_pixels_full"][lesion] += int(m.sum())
            masks[lesion] = downsample_mask(m, shape, options.mask_rule)
            s["lesion_pixels_prepared"][lesion] += int(masks[lesion].sum())
            s["images_with_lesion"][lesion] += int(bool(m.any()))
        if split == "train":
            bgr_sum += small.reshape(-1, 3).sum(axis=0, dtype=np.float64)
            n_pix += small.shape[0] * small.shape[1]
            fov_diameters.append(_fov_diameter(small, source.describe(f)))
            names = [f"{stem}_{a}" for a in AUGMENTATIONS]
        else:
            names = [stem]
        for name, aug in zip(names, AUGMENTATIONS if split == "train" else ("id",), strict=True):
            rel_img = f"{split}/images/{name}.png"
            write_image(work / rel_img, augment(small, aug))
            for lesion in options.lesions:
                write_image(
                    work / f"{split}/masks/{name}_{lesion}.png",
                    augment(masks[lesion], aug).astype(np.uint8) * 255,
                )
            lists[split].append([rel_img] + [f"{split}/masks/{name}_{x}.png" for x in LESIONS])

    for split, rows in lists.items():
        header = (
            f"{split} samples of a prepared Red-Seg set: image<TAB>MA mask<TAB>HE mask, "
            "paths relative to this file (docs/data_format.md)"
        )
        write_list(list_path(work, split), rows, header)

    if n_pix:
        mean = [float(v) for v in bgr_sum / n_pix]
        mean_source = "training images, downsampled, before augmentation, all pixels incl. the black surround"
    else:
        mean = list(LSEG_MEAN_BGR)
        mean_source = "no training images: the authors' L-Seg IDRiD mean (config.LSEG_MEAN_BGR)"
        log.warning("no training images in %s: meta.json carries the L-Seg mean", source.src)
    fov_diameter, fov_source = fov_summary(fov_diameters)
    if len(sizes) > 1:
        log.warning("images of different sizes: %s", sorted(sizes))
    stems = {s for split in idx.images.values() for s in split}
    warnings = idx.warnings + [
        f"{f.key}: {lesion} mask of {stem}, which has no image (ignored)"
        for (stem, lesion), f in sorted(idx.masks.items())
        if stem not in stems
    ]
    size = list(next(iter(sizes))) if len(sizes) == 1 else None
    counts = {
        "train_images": splits["train"]["n_images"],
        "train_samples": len(lists["train"]),
        "test_images": splits["test"]["n_images"],
    }
    opts = options.as_dict()
    meta = {
        "generator": GENERATOR,
        "format": FORMAT_VERSION,
        "mean_bgr": mean,
        "mean_source": mean_source,
        "fov_diameter_px": fov_diameter,
        "fov_diameter_source": fov_source,
        "factor": options.factor,
        "size": size,
        "mask_rule": options.mask_rule,
        "lesions": list(options.lesions),
        "augmentations": list(AUGMENTATIONS),
        "rot90": "np.rot90(image, 1): 90 degrees counter-clockwise as displayed; rot270 clockwise",
        "source": str(source.src),
        "counts": counts,
        "options": opts,
        "fingerprint": fp,
    }
    summary = {
        "source": str(source.src),
        "factor": options.factor,
        "mask_rule": options.mask_rule,
        "lesions": list(options.lesions),
        "augmentations": list(AUGMENTATIONS),
        "mean_bgr": mean,
        "mean_source": mean_source,
        "size": size,
        "counts": counts,
        "splits": splits,
        "ignored_files": idx.ignored,
        "warnings": warnings,
    }
    for wmsg in warnings:
        log.warning("%s", wmsg)
    write_json(work / "summary.json", summary)
    write_text(work / "summary.md", _summary_md(summary))
    write_json(work / "meta.json", meta)
    return meta
