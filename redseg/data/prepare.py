"""From a data set's reader to a prepared set (docs/data_format.md): the one builder for every set.

A reader (redseg.data.idrid for IDRiD; redseg.data.ddr, .fgadr, .eophtha, .diaretdb1) lists each
split's photographs and masks and binarises a mask by its set's rule; this module brings them to one
scale and writes the prepared set the Caffe data layer, the training driver and the scoring read.

The scale (paper section 3.1 for IDRiD; docs/datasets.md for the others):

* ``factor`` (IDRiD's default, the paper's): every photograph downsampled by the same factor (4:
  4288x2848 -> 1072x712), images by ``cv2.INTER_AREA`` to ``round(W / f) x round(H / f)``, halves up;
* ``fov_diameter`` (every other set's default): each photograph rescaled so that its field of
  view's diameter (redseg.data.fov, measured on the full-size photograph) becomes that many pixels,
  config.IDRID_QUARTER_FOV_DIAMETER_PX (853 px, IDRiD at a quarter size, measured) unless told
  otherwise - so a lesion has the same size in pixels whatever the camera, and tools/segment.py
  sees new photographs at the same scale. Shrinking uses ``cv2.INTER_AREA``, enlarging
  ``cv2.INTER_LINEAR``. The rescale is uniform and nothing is cropped, so a prediction can be
  resized back to the set's own label size for scoring.

Masks follow by ``mask_rule`` (``any``, ``area``, ``nearest``: redseg.data.prepared_set). Training
images are expanded by config.AUGMENTATIONS, the other splits (``val``, ``test``) are not. Each
photograph's field of view is measured and recorded (meta.json ``fov``: the set's statistics;
summary.json: per image), and so are the set's mask and split rules and the lesions it has no
ground truth for (``not_scored``: written as all-zero masks so the list files stay uniform, and
never scored).

The output is written into ``<out>.partial-<pid>`` and renamed to ``<out>`` when done, with
``.complete`` written last; a complete set prepared from the same source with the same options
(a fingerprint in meta.json) is kept as it is, anything else is refused unless ``force``, and a
folder that is not a prepared set is never deleted.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import os
import re
import shutil
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from redseg.config import (
    ALL_IDRID_LESIONS,
    AUGMENTATIONS,
    DOWNSAMPLE,
    IDRID_QUARTER_FOV_DIAMETER_PX,
    LESIONS,
    LSEG_MEAN_BGR,
)
from redseg.data.archive import SourceError
from redseg.data.fov import FovError, find_fov, fov_summary
from redseg.data.prepared_set import MASK_RULES, downsample_mask, list_path, write_list
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
GENERATOR = "redseg.idrid.prepare"  # meta.json's stamp of a prepared set (the name it has always had)
DEFAULT_LESIONS = ("MA", "HE", "EX", "SE")
PARTIAL = ".partial"  # marker inside a work folder: ours, unfinished


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


def scaled_size(w: int, h: int, scale: float) -> tuple[int, int]:
    """(width, height) after rescaling by ``scale``: rounded to the nearest integer, halves up."""
    return max(1, math.floor(w * scale + 0.5)), max(1, math.floor(h * scale + 0.5))


def downsample_image(img: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """BGR image -> ``shape`` (height, width): pixel-area average (cv2.INTER_AREA) when shrinking,
    bilinear (cv2.INTER_LINEAR) when enlarging (INTER_AREA would then repeat pixels)."""
    if img.shape[:2] == tuple(shape):
        return img.copy()
    grow = shape[0] > img.shape[0] or shape[1] > img.shape[1]
    return cv2.resize(img, shape[::-1], interpolation=cv2.INTER_LINEAR if grow else cv2.INTER_AREA)


# --------------------------------------------------------------------------------------------------
# options, the fingerprint, the output folder


@dataclass(frozen=True)
class PrepareOptions:
    factor: int = DOWNSAMPLE
    mask_rule: str = "any"
    lesions: tuple[str, ...] = DEFAULT_LESIONS
    fov_diameter: float | None = None  # None: scale by ``factor``; else rescale each FOV to this

    def validate(self, available: Sequence[str] = ALL_IDRID_LESIONS, error: type[SourceError] = SourceError) -> None:
        if self.fov_diameter is None and (not isinstance(self.factor, int) or self.factor < 1):
            raise error(f"--factor must be a whole number >= 1, got {self.factor!r}")
        if self.fov_diameter is not None and not (math.isfinite(self.fov_diameter) and self.fov_diameter >= 16):
            raise error(f"--fov-diameter must be a number of pixels >= 16, got {self.fov_diameter!r}")
        if self.mask_rule not in MASK_RULES:
            raise error(f"--mask-rule must be one of {', '.join(MASK_RULES)}, got {self.mask_rule!r}")
        known = tuple(dict.fromkeys((*LESIONS, *available)))
        bad = [x for x in self.lesions if x not in known]
        if bad:
            raise error(f"unknown lesion(s) {', '.join(bad)}; choose from {','.join(known)}")
        missing = [x for x in LESIONS if x not in self.lesions]
        if missing:
            raise error(f"--lesions must include {','.join(LESIONS)} (the list files need them)")
        if len(set(self.lesions)) != len(self.lesions):
            raise error(f"--lesions lists a lesion twice: {','.join(self.lesions)}")

    def as_dict(self) -> dict:
        d = {
            "format": FORMAT_VERSION,
            "factor": self.factor,
            "mask_rule": self.mask_rule,
            "lesions": list(self.lesions),
            "augmentations": list(AUGMENTATIONS),
        }
        if self.fov_diameter is not None:  # IDRiD's factor sets keep the fingerprint they always had
            d["factor"] = None
            d["fov_diameter"] = round(float(self.fov_diameter), 3)
        return d


def fingerprint(source, options: PrepareOptions) -> str:
    blob = json.dumps({"options": options.as_dict(), "files": source.fingerprint_files()}, sort_keys=True)
    if getattr(source, "dataset", "idrid") != "idrid":
        blob += source.dataset
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


def check_output(
    out: Path, fp: str, options: PrepareOptions, force: bool, error: type[SourceError] = SourceError
) -> dict | None:
    """Decide what to do with an existing ``out``: the meta of a set to keep, or None to (re)build.

    Raises ``error`` when ``out`` must not be touched.
    """
    if not out.exists():
        return None
    if not out.is_dir():
        raise error(f"--out {out} is a file; expected a folder for the prepared set")
    meta = read_json_object(out / "meta.json")
    ours = _is_ours(out)
    if not ours:
        if any(out.iterdir()):
            raise error(
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
        raise error(
            f"--out {out} is an unfinished prepared set (no {COMPLETE} stamp: an interrupted run?); "
            "rerun with --force to rebuild it"
        )
    old = meta.get("options", {})
    diff = [f"{k} {old.get(k)!r} -> {v!r}" for k, v in options.as_dict().items() if old.get(k) != v]
    why = "; ".join(diff) if diff else f"the source differs (was {meta.get('source')})"
    raise error(f"--out {out} was prepared differently ({why}); rerun with --force to replace it")


def _summary_md(summary: dict) -> str:
    lines = [
        f"# Prepared {summary.get('title', 'IDRiD')} set",
        "",
        f"- source: `{summary['source']}`",
        f"- {_scale_line(summary)}, mask rule `{summary['mask_rule']}`",
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


def _scale_line(summary: dict) -> str:
    if summary.get("fov_diameter") is not None:
        return (
            f"each photograph rescaled so that its field of view is {summary['fov_diameter']:.1f} px across "
            "(cv2.INTER_AREA shrinking, INTER_LINEAR enlarging)"
        )
    return f"downsampling factor {summary['factor']} (images cv2.INTER_AREA)"


def _fov_diameter(small: np.ndarray, name: str) -> float | None:
    """The field-of-view diameter of a prepared training image (redseg.data.fov), None with a warning if none."""
    try:
        return find_fov(small, name).diameter
    except FovError as e:
        log.warning("no field of view measured: %s", e)
        return None


def _stats(values: Sequence[float]) -> dict | None:
    if not values:
        return None
    return {
        "median": round(statistics.median(values), 3),
        "min": round(min(values), 3),
        "max": round(max(values), 3),
        "n": len(values),
    }


def prepare_source(
    source,
    out: str | Path,
    options: PrepareOptions,
    force: bool = False,
    progress: bool = True,
) -> dict:
    """Prepare ``source`` (an open reader) into ``out`` (docs/data_format.md).

    Returns meta.json's content, with ``"skipped": True`` added when ``out`` was already prepared
    from the same source with the same options.
    """
    from tqdm import tqdm

    error = source.Error
    available = tuple(getattr(source, "lesions", ALL_IDRID_LESIONS))
    absent = [x for x in options.lesions if x in ALL_IDRID_LESIONS and x not in available and x not in LESIONS]
    if absent:  # e.g. EX, SE of the default list on e-ophtha MA: the set has no such masks to write
        log.info("%s has no %s masks: not written", source.title, ", ".join(absent))
        options = dataclasses.replace(options, lesions=tuple(x for x in options.lesions if x not in absent))
    options.validate(available, error)
    out = Path(out).expanduser().absolute()
    fp = fingerprint(source, options)
    if out.parent.is_dir():
        _remove_stale_partials(out)
    kept = check_output(out, fp, options, force, error)
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


class _Scaler:
    """The size a photograph is brought to, and its field of view as found (full size)."""

    def __init__(self, options: PrepareOptions):
        self.options = options
        self.scales: list[float] = []

    def __call__(self, img: np.ndarray, name: str) -> tuple[tuple[int, int], dict]:
        h, w = img.shape[:2]
        try:
            fov = find_fov(img, name)
            d, found = fov.diameter, "border" if fov.border else "no border: the frame taken as the FOV"
        except FovError as e:
            d, found = None, None
            log.warning("no field of view measured: %s", e)
        if self.options.fov_diameter is None:
            size = prepared_size(w, h, self.options.factor)
            scale = size[0] / w
        else:
            if d is not None:
                scale = self.options.fov_diameter / d
            else:  # a photograph without a measurable FOV: the set's median scale so far
                scale = statistics.median(self.scales) if self.scales else self.options.fov_diameter / min(w, h)
                log.warning("%s: scaled by %.4f (the set's median so far), its FOV not being found", name, scale)
            size = scaled_size(w, h, scale)
        self.scales.append(scale)
        rec = {
            "size_full": [w, h],
            "fov_full_px": None if d is None else round(d, 2),
            "fov_found_from": found,
            "scale": round(size[0] / w, 6),
            "size": list(size),
        }
        return size, rec


def _build(source, work: Path, options: PrepareOptions, fp: str, tqdm, progress: bool) -> dict:
    error = source.Error
    split_names = tuple(source.splits)
    items = {split: source.items(split, options.lesions) for split in split_names}
    for split in split_names:
        (work / split / "images").mkdir(parents=True)
        (work / split / "masks").mkdir(parents=True)
    jobs = [(split, it) for split in split_names for it in items[split]]
    not_scored = dict(getattr(source, "not_scored", {}))
    bgr_sum = np.zeros(3, np.float64)
    n_pix = 0
    fov_diameters: list[float | None] = []
    sizes: set[tuple[int, int]] = set()
    per_image: dict[str, dict] = {}
    scaler = _Scaler(options)
    lists: dict[str, list[list[str]]] = {split: [] for split in split_names}
    splits = {
        split: {
            "images": [it.name for it in items[split]],
            "n_images": len(items[split]),
            "n_samples": len(items[split]) * (len(AUGMENTATIONS) if split == "train" else 1),
            "lesion_pixels_full": dict.fromkeys(options.lesions, 0),
            "lesion_pixels_prepared": dict.fromkeys(options.lesions, 0),
            "images_with_lesion": dict.fromkeys(options.lesions, 0),
            "missing_masks": {x: [] for x in options.lesions},
        }
        for split in split_names
    }
    for split, it in tqdm(jobs, desc="prepare", unit="img", disable=not progress):
        f, stem = it.image, it.name
        img = source.read_image(f)
        h, w = img.shape[:2]
        size, rec = scaler(img, source.describe(f))
        per_image[stem] = {"split": split, **rec}
        sizes.add(size)
        shape = size[::-1]
        small = downsample_image(img, shape)
        masks = {}
        s = splits[split]
        for lesion in options.lesions:
            mf = it.masks.get(lesion)
            if mf is None:
                if lesion not in not_scored:
                    s["missing_masks"][lesion].append(stem)
                masks[lesion] = np.zeros(small.shape[:2], bool)
                continue
            m = source.read_mask(mf)
            if m.shape != (h, w):
                raise error(
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
        log.info("images of different sizes: %d sizes from %s to %s", len(sizes), min(sizes), max(sizes))
    warnings = source.all_warnings()
    size = list(next(iter(sizes))) if len(sizes) == 1 else None
    counts = {
        "train_images": splits["train"]["n_images"] if "train" in splits else 0,
        "train_samples": len(lists.get("train", [])),
        "test_images": splits["test"]["n_images"] if "test" in splits else 0,
    }
    if "val" in splits:
        counts["val_images"] = splits["val"]["n_images"]
    found = [r["fov_full_px"] for r in per_image.values() if r["fov_full_px"] is not None]
    fov = {
        "scale": "fov_diameter" if options.fov_diameter is not None else "factor",
        "target_px": options.fov_diameter,
        "target_source": (
            "config.IDRID_QUARTER_FOV_DIAMETER_PX: IDRiD at a quarter size, measured (docs/datasets.md)"
            if options.fov_diameter == IDRID_QUARTER_FOV_DIAMETER_PX
            else ("--fov-diameter" if options.fov_diameter is not None else None)
        ),
        "full_size_px": _stats(found),
        "prepared_px": _stats([r["fov_full_px"] * r["scale"] for r in per_image.values() if r["fov_full_px"]]),
        "scale_factors": _stats([r["scale"] for r in per_image.values()]),
        "not_found": sorted(n for n, r in per_image.items() if r["fov_full_px"] is None),
    }
    opts = options.as_dict()
    meta = {
        "generator": GENERATOR,
        "format": FORMAT_VERSION,
        "dataset": source.dataset,
        "mean_bgr": mean,
        "mean_source": mean_source,
        "fov_diameter_px": fov_diameter,
        "fov_diameter_source": fov_source,
        "factor": options.factor if options.fov_diameter is None else None,
        "size": size,
        "mask_rule": options.mask_rule,
        "lesions": list(options.lesions),
        "augmentations": list(AUGMENTATIONS),
        "rot90": "np.rot90(image, 1): 90 degrees counter-clockwise as displayed; rot270 clockwise",
        "source": str(source.src),
        "counts": counts,
        "options": opts,
        "fingerprint": fp,
        "splits": list(split_names),
        "mask_binarisation": source.mask_rule_text,
        "split_rule": source.split_rule,
        "not_scored": not_scored,
        "synthetic": bool(source.synthetic),
        "partial": list(getattr(source, "partial", [])),
        "fov": fov,
    }
    summary = {
        "title": source.title,
        "source": str(source.src),
        "factor": options.factor,
        "fov_diameter": options.fov_diameter,
        "mask_rule": options.mask_rule,
        "lesions": list(options.lesions),
        "augmentations": list(AUGMENTATIONS),
        "mean_bgr": mean,
        "mean_source": mean_source,
        "size": size,
        "counts": counts,
        "splits": splits,
        "ignored_files": source.ignored_files(),
        "warnings": warnings,
        "images": per_image,
    }
    for wmsg in warnings:
        log.warning("%s", wmsg)
    write_json(work / "summary.json", summary)
    write_text(work / "summary.md", _summary_md(summary))
    write_json(work / "meta.json", meta)
    return meta
