"""Segmenting photographs from any fundus camera, and a screening summary (docs/segment.md).

Research tool, not a diagnosis: the counts and areas are what a research model sees in a
photograph, not a clinical finding.

Per photograph (:func:`segment_photo`):

1. read it (a missing, truncated or undecodable file is skipped with its reason);
2. find its circular field of view (redseg.data.fov; a file without one is skipped);
3. crop to the FOV's bounding square, black out what lies outside the FOV (the training images'
   surround is black) and rescale so that the FOV's diameter equals the training images' (the
   net learnt lesion sizes at that scale);
4. run the net (any callable image -> {"MA": probabilities, "HE": ...}: redseg.deploy.inference's
   Segmenter or OnnxSegmenter);
5. count lesions at the network's scale: connected components (8-connected) of the map at or
   above the lesion's threshold (8-bit rule of redseg.evaluation.metrics.u8_threshold, as the evaluation
   reads the maps) of at least ``min_size`` pixels, each assigned to the quadrant of the FOV its
   centroid lies in;
6. bring the maps back to the photograph's own pixels (zero outside the FOV) and measure the
   haemorrhage area there.

Quadrants are image-oriented, as the photograph is displayed: superior = above the FOV centre,
inferior = below; left / right as displayed (the eye's laterality is unknown, so nasal/temporal
cannot be told). A centroid exactly on an axis goes to inferior / right.

:func:`screen` runs a batch, writes each photograph's maps, overlay and thumbnail, and
:func:`write_summary` the summary (``summary.csv``, ``summary.json``, ``index.html``). Nothing here
imports Caffe or ONNX Runtime: the caller passes the segmenter.

At scale (docs/segment.md#many-photographs-parts-and-merging): a batch splits into parts
(:func:`part_indices`, photograph i goes to part i mod N), each run anywhere (a SLURM array task
each) into the same output folder. Output names are fixed by the whole input list
(:func:`output_stems`), so a part writes exactly the files a single run would. Each finished
photograph leaves a record (``records/<name>.json``, written after its images: the commit point),
and a rerun with the same model and settings does no work for a photograph whose record matches
it (same path, size and modification time; its files present). A part writes its summary rows to
``parts/part-<I>-of-<N>.json``; :func:`merge_parts` checks that every part is there and that all
agree on inputs, model and settings, and writes the one summary, identical to a single run's.
"""

from __future__ import annotations

import csv
import hashlib
import html
import io
import json
import logging
import math
import os
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import quote

import cv2
import numpy as np

from redseg import config as C
from redseg.cli import EXIT_PREEMPTED, Preempted
from redseg.config import LESIONS
from redseg.data.fov import FieldOfView, FovError, find_fov
from redseg.evaluation.metrics import u8_threshold
from redseg.fileio import read_json_object, write_image, write_json, write_text

log = logging.getLogger(__name__)

DISCLAIMER = (
    "Research tool, not a diagnosis: the maps, counts and areas come from a research model and are "
    "no clinical finding. Do not use them to diagnose, screen or treat anyone."
)
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".tif", ".tiff", ".bmp", ".webp", ".jp2")
QUADRANTS = ("superior_left", "superior_right", "inferior_left", "inferior_right")
QUADRANT_RULE = (
    "image-oriented around the FOV centre, as the photograph is displayed: superior = above, inferior = "
    "below, left/right as displayed (laterality unknown, so not nasal/temporal); a lesion's centroid decides; "
    "on an axis: inferior / right"
)
DEFAULT_THRESHOLD = 0.5
THUMB_WIDTH = 320
Segment = Callable[[np.ndarray], dict]


class ScreeningError(ValueError):
    """A batch cannot run as asked (e.g. --out inside an input folder); the message says what to do."""


@dataclass
class Settings:
    """How a batch is segmented and counted, with where each value comes from."""

    fov_diameter_px: float  # the training images' FOV diameter: a photograph's FOV is rescaled to it
    fov_source: str
    thresholds: dict[str, float]  # per lesion, a probability in [0, 1]
    threshold_sources: dict[str, str]
    min_size: int = C.MIN_COMPONENT_PX  # pixels at the network's scale
    model: str = ""

    def as_dict(self) -> dict:
        return {
            "model": self.model,
            "fov_diameter_px": self.fov_diameter_px,
            "fov_source": self.fov_source,
            "thresholds": self.thresholds,
            "threshold_sources": self.threshold_sources,
            "threshold_rule": "pixel is lesion where round(probability x 255) / 255 >= threshold",
            "min_component_px": self.min_size,
            "min_component_rule": "8-connected components of at least this many pixels at the network's scale "
            "(the photograph rescaled so that its FOV diameter is fov_diameter_px)",
            "quadrants": QUADRANT_RULE,
            "disclaimer": DISCLAIMER,
        }

    @classmethod
    def from_dict(cls, d: dict) -> Settings:
        """The settings :meth:`as_dict` wrote (a part's summary)."""
        return cls(
            float(d["fov_diameter_px"]),
            d["fov_source"],
            {k: float(v) for k, v in d["thresholds"].items()},
            dict(d["threshold_sources"]),
            int(d["min_component_px"]),
            d["model"],
        )


def resolve_settings(
    model: str,
    model_fov: float | None,
    model_thresholds: dict[str, float] | None,
    model_source: str,
    data_fov: tuple[float | None, str] | None = None,
    fov_diameter: float | None = None,
    threshold: dict[str, float] | None = None,
    min_size: int = C.MIN_COMPONENT_PX,
) -> Settings:
    """Settings from what was given, first found wins.

    FOV diameter: ``fov_diameter`` (the user's), ``data_fov`` (a prepared set's, --data), the model's
    (``model_fov``: its sidecar or ONNX metadata), the IDRiD default (config). Thresholds, per lesion:
    ``threshold`` (the user's), the model's (break-even on its test set), 0.5.
    """
    if fov_diameter is not None:
        fov, fov_src = float(fov_diameter), "--fov-diameter"
    elif data_fov is not None and data_fov[0] is not None:
        fov, fov_src = float(data_fov[0]), data_fov[1]
    elif model_fov is not None:
        fov, fov_src = float(model_fov), f"model: {model_source}"
    else:
        fov = C.IDRID_QUARTER_FOV_DIAMETER_PX
        fov_src = "default: config.IDRID_QUARTER_FOV_DIAMETER_PX (IDRiD at a quarter size, measured; docs/segment.md)"
    if not (math.isfinite(fov) and fov > 0):
        raise ScreeningError(f"the training FOV diameter must be positive, got {fov} ({fov_src})")
    thresholds, sources = {}, {}
    for lesion in LESIONS:
        if threshold and lesion in threshold:
            thresholds[lesion], sources[lesion] = float(threshold[lesion]), "--threshold"
        elif model_thresholds and model_thresholds.get(lesion) is not None:
            thresholds[lesion] = float(model_thresholds[lesion])
            sources[lesion] = f"break-even on the model's test set: {model_source}"
        else:
            thresholds[lesion], sources[lesion] = DEFAULT_THRESHOLD, "default 0.5 (the model records no threshold)"
    if min_size < 0:
        raise ScreeningError(f"--min-size must be >= 0, got {min_size}")
    return Settings(fov, fov_src, thresholds, sources, int(min_size), model)


# --- inputs -------------------------------------------------------------------------------------


def list_inputs(paths: Iterable[os.PathLike | str]) -> list[Path]:
    """Files as given; a folder gives its image files (by suffix, not recursive), sorted by name.

    A path that does not exist is kept (it is reported as skipped with its reason).
    """
    out: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            files = sorted(f for f in p.iterdir() if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES)
            if not files:
                log.warning("%s: no image files (%s)", p, ", ".join(IMAGE_SUFFIXES))
            out += files
        else:
            out.append(p)
    return out


def check_out(out: Path, paths: Iterable[os.PathLike | str]) -> None:
    """Refuse an --out that is an input folder or holds inputs: the outputs would mix with the
    user's photographs (and be read as inputs next time)."""
    o = out.resolve()
    for p in map(Path, paths):
        folder = p.resolve() if p.is_dir() else p.resolve().parent
        if folder == o or o in folder.parents:
            raise ScreeningError(
                f"--out {out} is, or holds, the input folder {folder}; choose an --out of its own "
                "(this tool writes only under --out and never next to your photographs)"
            )


def _jpeg_problem(data: bytes) -> str | None:
    """Why a JPEG cannot be a whole photograph: no scan (SOS) at all, or no end-of-image marker
    after its last scan (truncated: some OpenCV builds decode one with a grey tail instead of
    failing); None for a whole JPEG or another format."""
    if data[:2] != b"\xff\xd8":
        return None
    sos, eoi = data.rfind(b"\xff\xda"), data.rfind(b"\xff\xd9")
    if sos < 0:
        return "corrupt JPEG (no image data)"
    if eoi < sos:
        return "truncated JPEG (no end marker): copy the file again"
    return None


def read_photo(path: Path) -> np.ndarray:
    """BGR uint8; ScreeningError with the reason when missing, truncated or not an image."""
    if not path.is_file():
        raise ScreeningError("file not found" if not path.exists() else "not a file")
    try:
        data = path.read_bytes()
    except OSError as e:
        raise ScreeningError(f"cannot read: {e.strerror or e}") from e
    if not data:
        raise ScreeningError("empty file")
    problem = _jpeg_problem(data)
    if problem:
        raise ScreeningError(problem)
    img = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
    if img is None or img.size == 0:
        raise ScreeningError("not an image OpenCV can decode (corrupt, or another kind of file)")
    return img


# --- counting -----------------------------------------------------------------------------------


def quadrant(x: float, y: float, cx: float, cy: float) -> str:
    """The image-oriented quadrant of (x, y) around (cx, cy) (:data:`QUADRANT_RULE`)."""
    vertical = "superior" if y < cy else "inferior"
    return f"{vertical}_{'left' if x < cx else 'right'}"


def components(u8: np.ndarray, threshold: float, min_size: int, inside: np.ndarray | None = None) -> list[dict]:
    """Connected components (8-connected) of ``u8 >= u8_threshold(threshold)`` (within ``inside``)
    of at least ``min_size`` pixels: ``{"area": px, "x": centroid x, "y": centroid y}``."""
    pos = u8 >= u8_threshold(threshold)
    if inside is not None:
        pos &= inside
    n, _, stats, cents = cv2.connectedComponentsWithStats(pos.astype(np.uint8), connectivity=8)
    return [
        {"area": int(stats[i, cv2.CC_STAT_AREA]), "x": float(cents[i, 0]), "y": float(cents[i, 1])}
        for i in range(1, n)
        if stats[i, cv2.CC_STAT_AREA] >= max(1, min_size)
    ]


def count_lesions(maps_u8: dict, fov: FieldOfView, thresholds: dict, min_size: int) -> dict:
    """Per lesion: ``count`` and ``quadrants`` (count per :data:`QUADRANTS`) of the components of
    its 8-bit map inside ``fov`` (all at one scale)."""
    inside = fov.mask()
    out = {}
    for lesion in LESIONS:
        comps = components(maps_u8[lesion], thresholds[lesion], min_size, inside)
        quads = dict.fromkeys(QUADRANTS, 0)
        for c in comps:
            quads[quadrant(c["x"], c["y"], fov.cx, fov.cy)] += 1
        out[lesion] = {"count": len(comps), "quadrants": quads, "areas": [c["area"] for c in comps]}
    return out


# --- one photograph -----------------------------------------------------------------------------


@dataclass
class PhotoResult:
    """One photograph's maps (8-bit, at its own size), FOV and numbers."""

    image: np.ndarray
    fov: FieldOfView
    scale: float  # network pixels per photograph pixel
    net_size: tuple[int, int]  # (height, width) of the network's input
    maps: dict[str, np.ndarray]  # 8-bit, photograph size, 0 outside the FOV
    counts: dict = field(default_factory=dict)
    he_area_px: int = 0
    fov_area_px: int = 0


def segment_photo(img: np.ndarray, segment: Segment, settings: Settings, name: str = "image") -> PhotoResult:
    """Find the FOV, crop and rescale, run ``segment``, count, and bring the maps back (module doc).
    FovError when the photograph shows no field of view."""
    from redseg.deploy.inference import to_u8

    fov = find_fov(img, name)
    h, w = img.shape[:2]
    x0, y0, x1, y1 = fov.crop_box()
    crop = img[y0:y1, x0:x1].copy()
    inside = fov.mask()
    crop[~inside[y0:y1, x0:x1]] = 0
    scale = settings.fov_diameter_px / fov.diameter
    cw, ch = x1 - x0, y1 - y0
    nw, nh = max(1, round(cw * scale)), max(1, round(ch * scale))
    interp = cv2.INTER_AREA if scale < 1 else cv2.INTER_LINEAR
    small = cv2.resize(crop, (nw, nh), interpolation=interp) if (nw, nh) != (cw, ch) else crop
    probs = segment(small)
    # the FOV at the network's scale: the crop's pixel grid maps by x' = (x - x0 + 0.5) * sx - 0.5
    sx, sy = nw / cw, nh / ch
    net_fov = FieldOfView(
        (fov.cx - x0 + 0.5) * sx - 0.5,
        (fov.cy - y0 + 0.5) * sy - 0.5,
        fov.radius * (sx + sy) / 2.0,
        nh,
        nw,
        fov.border,
    )
    net_u8 = {les: to_u8(probs[les]) for les in LESIONS}
    counts = count_lesions(net_u8, net_fov, settings.thresholds, settings.min_size)
    maps = {}
    for les in LESIONS:
        full = np.zeros((h, w), np.uint8)
        m = net_u8[les]
        full[y0:y1, x0:x1] = cv2.resize(m, (cw, ch), interpolation=cv2.INTER_LINEAR) if m.shape != (ch, cw) else m
        full[~inside] = 0
        maps[les] = full
    he_area = int((maps["HE"] >= u8_threshold(settings.thresholds["HE"])).sum())
    return PhotoResult(img, fov, scale, (nh, nw), maps, counts, he_area, int(inside.sum()))


# --- a batch ------------------------------------------------------------------------------------

COLUMNS = (
    "image",
    "status",
    "width",
    "height",
    "fov_found_from",
    "fov_cx",
    "fov_cy",
    "fov_diameter_px",
    "scale_to_net",
    "ma_count",
    "he_count",
    "he_area_px",
    "he_area_fraction_of_fov",
    *(f"ma_{q}" for q in QUADRANTS),
    *(f"he_{q}" for q in QUADRANTS),
    "ma_threshold",
    "ma_threshold_source",
    "he_threshold",
    "he_threshold_source",
    "min_component_px",
    "ma_map",
    "he_map",
    "overlay",
    "thumbnail",
)


def output_stems(paths: Sequence[Path]) -> list[str]:
    """Each input's output name (``<stem>_ma.png``, ...): its file name's stem, ``<stem>_2``, ``_3``
    ... for later inputs of the same name (any case: two folders may hold ``eye.jpg``).

    Decided by the whole input list, whichever photographs turn out unreadable, so that a part of
    a split batch names every file exactly as a single run of the whole batch does.
    """
    used: set[str] = set()
    out = []
    for path in paths:
        stem, i = path.stem, 2
        while stem.lower() in used:
            stem, i = f"{path.stem}_{i}", i + 1
        used.add(stem.lower())
        out.append(stem)
    return out


def part_indices(n_inputs: int, num_parts: int, part_id: int) -> list[int]:
    """The inputs of part ``part_id`` of ``num_parts``: every ``num_parts``-th from ``part_id``
    (round robin over the input list, so that one folder of large photographs spreads over all
    parts). ScreeningError names the value when the part does not exist."""
    if num_parts < 1:
        raise ScreeningError(f"--num-parts must be at least 1, got {num_parts}")
    if not 0 <= part_id < num_parts:
        raise ScreeningError(f"--part-id must be in 0..{num_parts - 1} for --num-parts {num_parts}, got {part_id}")
    return list(range(part_id, n_inputs, num_parts))


def inputs_digest(paths: Sequence[Path]) -> str:
    """SHA-256 of the input list as given: parts of one batch must agree on it."""
    return hashlib.sha256("\n".join(map(str, paths)).encode()).hexdigest()


def fingerprint_digest(settings: Settings, fingerprint: dict) -> str:
    """SHA-256 of everything that decides a photograph's outputs besides the photograph: the
    settings, and ``fingerprint`` (the caller's: the model file's digest, the input mean...)."""
    both = {"settings": settings.as_dict(), "model": fingerprint}
    return hashlib.sha256(json.dumps(both, sort_keys=True).encode()).hexdigest()


def _identity(path: Path) -> list[int] | None:
    """Size and modification time of an input (None when it is missing): a record made from other
    bytes is not reused."""
    try:
        st = path.stat()
    except OSError:
        return None
    return [st.st_size, st.st_mtime_ns]


RECORDS = "records"
FILE_COLUMNS = ("ma_map", "he_map", "overlay", "thumbnail")


def _record_path(out: Path, stem: str) -> Path:
    return out / RECORDS / f"{stem}.json"


def _reusable(out: Path, stem: str, path: Path, fp: str) -> dict | None:
    """The summary row a finished photograph left (:func:`screen`), or None when there is none or it
    does not match: another input, other bytes, other settings or model, or a file missing."""
    rec = read_json_object(_record_path(out, stem))
    if not rec or rec.get("input") != str(path) or rec.get("fingerprint") != fp:
        return None
    if rec.get("identity") != _identity(path) or not isinstance(rec.get("row"), dict):
        return None
    row = rec["row"]
    if row.get("status") == "ok" and not all(row.get(k) and (out / row[k]).is_file() for k in FILE_COLUMNS):
        return None
    return row


def _blank_row(path: Path, settings: Settings) -> dict:
    row = dict.fromkeys(COLUMNS)
    row["image"] = str(path)
    for les in LESIONS:
        row[f"{les.lower()}_threshold"] = round(settings.thresholds[les], 6)
        row[f"{les.lower()}_threshold_source"] = settings.threshold_sources[les]
    row["min_component_px"] = settings.min_size
    return row


def screen(
    paths: Sequence[Path],
    segment: Segment,
    settings: Settings,
    out: Path,
    progress: bool = True,
    indices: Sequence[int] | None = None,
    fingerprint: dict | None = None,
    stop: Callable[[], str | None] | None = None,
) -> list[dict]:
    """Segment the photographs in ``paths`` into ``out`` (maps, overlay, thumbnail); one summary row
    each (:data:`COLUMNS`). A photograph that cannot be read or shows no FOV is skipped with its
    reason in ``status``; the batch goes on.

    ``indices``: only these of ``paths`` (a part; default all), rows in that order. ``fingerprint``
    (what else decides the outputs: the model file's digest, the input mean...): each photograph
    done leaves its record, and one whose record matches is not segmented again (module doc).
    ``stop``: asked between photographs; when it names a signal, the batch stops there and raises
    :class:`redseg.cli.Preempted` (the photographs done keep their records).
    """
    from tqdm import tqdm

    from redseg.evaluation.report import draw_overlay

    out.mkdir(parents=True, exist_ok=True)
    (out / "thumbs").mkdir(exist_ok=True)
    stems = output_stems(paths)
    todo = range(len(paths)) if indices is None else indices
    fp = fingerprint_digest(settings, fingerprint) if fingerprint is not None else None
    if fp is not None:
        (out / RECORDS).mkdir(exist_ok=True)
    rows, reused = [], 0
    for n_done, i in enumerate(tqdm(todo, desc="segment", unit="photo", disable=not progress)):
        signal_name = stop() if stop is not None else None
        if signal_name:
            log.warning(
                "%s: stopped after %d of %d photographs; exit %d (preempted, resumable): run the same command "
                "again, the photographs done are not redone",
                signal_name, n_done, len(todo), EXIT_PREEMPTED,
            )  # fmt: skip
            raise Preempted(f"stopped after {n_done} of {len(todo)} photographs")
        path, stem = paths[i], stems[i]
        if fp is not None and (row := _reusable(out, stem, path, fp)) is not None:
            rows.append(row)
            reused += 1
            continue
        identity = _identity(path)
        row = _segment_one(path, stem, segment, settings, out, draw_overlay)
        rows.append(row)
        if fp is not None:  # last: the photograph's files are all in place
            rec = {"input": str(path), "identity": identity, "fingerprint": fp, "row": row}
            write_json(_record_path(out, stem), rec)
    if reused:
        log.info(
            "%d of %d photographs done before (records in %s): not segmented again",
            reused,
            len(todo),
            out / RECORDS,
        )
    return rows


def _segment_one(path: Path, stem: str, segment: Segment, settings: Settings, out: Path, draw_overlay) -> dict:
    """One photograph: its files in ``out`` and its summary row."""
    row = _blank_row(path, settings)
    try:
        img = read_photo(path)
        res = segment_photo(img, segment, settings, str(path))
    except (ScreeningError, FovError) as e:
        msg = str(e)
        prefix = f"{path}: "
        row["status"] = "skipped: " + (msg[len(prefix) :] if msg.startswith(prefix) else msg)
        log.warning("%s skipped: %s", path, row["status"][len("skipped: ") :])
        return row
    files = {
        "ma_map": f"{stem}_ma.png",
        "he_map": f"{stem}_he.png",
        "overlay": f"{stem}_overlay.png",
        "thumbnail": f"thumbs/{stem}.jpg",
    }
    write_image(out / files["ma_map"], res.maps["MA"])
    write_image(out / files["he_map"], res.maps["HE"])
    write_image(out / files["overlay"], draw_overlay(stem, img, res.maps))
    h, w = img.shape[:2]
    tw = min(THUMB_WIDTH, w)
    thumb = cv2.resize(img, (tw, max(1, round(h * tw / w))), interpolation=cv2.INTER_AREA)
    write_image(out / files["thumbnail"], thumb, [cv2.IMWRITE_JPEG_QUALITY, 85])
    row.update(files)
    row.update(
        {
            "status": "ok",
            "width": w,
            "height": h,
            "fov_found_from": "border" if res.fov.border else "no border: the frame taken as the FOV",
            "fov_cx": round(res.fov.cx, 2),
            "fov_cy": round(res.fov.cy, 2),
            "fov_diameter_px": round(res.fov.diameter, 2),
            "scale_to_net": round(res.scale, 6),
            "ma_count": res.counts["MA"]["count"],
            "he_count": res.counts["HE"]["count"],
            "he_area_px": res.he_area_px,
            "he_area_fraction_of_fov": round(res.he_area_px / max(1, res.fov_area_px), 8),
        }
    )
    for les in LESIONS:
        for q, n in res.counts[les]["quadrants"].items():
            row[f"{les.lower()}_{q}"] = n
    log.info("%s: MA %d, HE %d", path, row["ma_count"], row["he_count"])
    return row


def write_summary(out: Path, rows: list[dict], settings: Settings) -> dict[str, Path]:
    """``summary.csv``, ``summary.json`` and ``index.html`` in ``out`` (atomically)."""
    buf = io.StringIO()
    wr = csv.DictWriter(buf, fieldnames=list(COLUMNS), lineterminator="\n")
    wr.writeheader()
    for r in rows:
        wr.writerow({k: "" if r.get(k) is None else r[k] for k in COLUMNS})
    paths = {"csv": out / "summary.csv", "json": out / "summary.json", "html": out / "index.html"}
    write_text(paths["csv"], buf.getvalue())
    n_ok = sum(r["status"] == "ok" for r in rows)
    write_json(
        paths["json"],
        {
            "settings": settings.as_dict(),
            "n_photos": len(rows),
            "n_ok": n_ok,
            "n_skipped": len(rows) - n_ok,
            "photos": rows,
        },
    )
    write_text(paths["html"], render_html(rows, settings))
    return paths


PARTS = "parts"
_PART_NAME = re.compile(r"^part-(\d+)-of-(\d+)\.json$")


def part_path(out: Path, part_id: int, num_parts: int) -> Path:
    return out / PARTS / f"part-{part_id}-of-{num_parts}.json"


def write_part(
    out: Path,
    rows: list[dict],
    indices: Sequence[int],
    settings: Settings,
    part_id: int,
    num_parts: int,
    paths: Sequence[Path],
    fingerprint: dict,
) -> Path:
    """A finished part's summary rows, ``parts/part-<I>-of-<N>.json``, with what :func:`merge_parts`
    checks: the whole input list's digest, the model and the settings. Written (atomically) only
    when the part has finished: its presence means done."""
    doc = {
        "part": part_id,
        "parts": num_parts,
        "n_inputs": len(paths),
        "inputs_sha256": inputs_digest(paths),
        "fingerprint": fingerprint_digest(settings, fingerprint),
        "model": fingerprint,
        "settings": settings.as_dict(),
        "photos": [{"index": i, "row": row} for i, row in zip(indices, rows, strict=True)],
    }
    path = part_path(out, part_id, num_parts)
    path.parent.mkdir(parents=True, exist_ok=True)
    return write_json(path, doc)


def _disagreement(a: dict, b: dict) -> str:
    """What differs between two parts' model and settings, for the message that refuses a merge."""
    fa, fb = {**a.get("settings", {}), **a.get("model", {})}, {**b.get("settings", {}), **b.get("model", {})}
    keys = [k for k in sorted(set(fa) | set(fb)) if fa.get(k) != fb.get(k)]
    return "; ".join(f"{k}: {fa.get(k)!r} vs {fb.get(k)!r}" for k in keys[:4]) or "their fingerprints differ"


def merge_parts(out: Path) -> tuple[list[dict], Settings]:
    """The rows of a split batch in input order and its settings, from ``out/parts/``; the caller
    writes them with :func:`write_summary`, which then gives a single run's summary, byte for byte.

    Refused (ScreeningError naming the files) when no part is there, when parts of different
    splits are there, when a part is missing or unfinished, or when parts disagree on the inputs,
    the model or the settings: a merged summary must be one batch's.
    """
    folder = out / PARTS
    found = {}
    if folder.is_dir():
        for p in folder.iterdir():
            if m := _PART_NAME.match(p.name):
                found[int(m.group(1)), int(m.group(2))] = p
    if not found:
        raise ScreeningError(
            f"no part summaries in {folder}: run tools/segment.py --num-parts N --part-id I ... --out {out} first"
        )
    splits = sorted({n for _, n in found})
    if len(splits) > 1:
        raise ScreeningError(
            f"{folder} holds parts of different splits ({', '.join(f'of {n}' for n in splits)}); "
            "remove the part files of the split you do not want, then merge again"
        )
    n = splits[0]
    missing = [i for i in range(n) if (i, n) not in found]
    if missing:
        names = ", ".join(part_path(out, i, n).name for i in missing[:5]) + (", ..." if len(missing) > 5 else "")
        raise ScreeningError(
            f"{len(missing)} of {n} parts missing in {folder} (not run, or not finished): {names}; "
            "run them (the same command with --part-id I), then merge again"
        )
    docs = []
    for i in range(n):
        p = found[i, n]
        d = read_json_object(p)
        if d is None or d.get("part") != i or d.get("parts") != n or not isinstance(d.get("photos"), list):
            raise ScreeningError(f"{p}: not a part summary written by tools/segment.py")
        docs.append((p, d))
    (p0, d0) = docs[0]
    for p, d in docs[1:]:
        if (d.get("n_inputs"), d.get("inputs_sha256")) != (d0.get("n_inputs"), d0.get("inputs_sha256")):
            raise ScreeningError(
                f"{p.name} and {p0.name} in {folder} split different input lists ({d.get('n_inputs')} and "
                f"{d0.get('n_inputs')} inputs): every part must be given the same inputs"
            )
        if d.get("fingerprint") != d0.get("fingerprint"):
            raise ScreeningError(
                f"{p.name} and {p0.name} in {folder} disagree on the model or settings ({_disagreement(d0, d)}): "
                "run every part with the same model and options"
            )
    rows: dict[int, dict] = {}
    for _, d in docs:
        for ph in d["photos"]:
            rows[int(ph["index"])] = ph["row"]
    n_inputs = int(d0["n_inputs"])
    if sorted(rows) != list(range(n_inputs)):
        raise ScreeningError(f"the parts in {folder} do not cover the {n_inputs} inputs exactly once")
    ordered = [rows[i] for i in range(n_inputs)]
    lost = [r[k] for r in ordered if r.get("status") == "ok" for k in FILE_COLUMNS if not (out / r[k]).is_file()]
    if lost:
        raise ScreeningError(
            f"{len(lost)} files the parts wrote are gone from {out}, e.g. {lost[0]}: run the parts again"
        )
    return ordered, Settings.from_dict(d0["settings"])


_CSS = """body{font-family:sans-serif;margin:1.5em;color:#222}
.warn{background:#fff3cd;border:1px solid #c9a227;padding:.6em 1em;font-weight:bold}
table{border-collapse:collapse;margin:.5em 0}td,th{border:1px solid #ccc;padding:.25em .5em;text-align:left;
vertical-align:top}.photo{margin:1.5em 0;border-top:2px solid #888;padding-top:.8em}
img.thumb{width:240px}img.overlay{max-width:100%;width:900px}.skipped{color:#a00}.small{font-size:90%;color:#555}"""


def render_html(rows: list[dict], settings: Settings) -> str:
    """A self-contained page: the disclaimer, the settings, then per photograph its thumbnail,
    overlay and numbers (images as relative files beside the page)."""
    e = html.escape
    s = settings.as_dict()
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8"><title>Red-Seg screening summary</title>',
        f"<style>{_CSS}</style></head><body>",
        "<h1>Red-Seg screening summary</h1>",
        f'<p class="warn">{e(DISCLAIMER)}</p>',
        "<table>",
    ]
    settings_rows = [
        ("model", s["model"]),
        ("training FOV diameter", f"{settings.fov_diameter_px:.1f} px ({settings.fov_source})"),
        *(
            (f"{les} threshold", f"{settings.thresholds[les]:.4f} ({settings.threshold_sources[les]})")
            for les in LESIONS
        ),
        ("threshold rule", s["threshold_rule"]),
        ("minimum lesion size", f"{settings.min_size} px ({s['min_component_rule']})"),
        ("quadrants", QUADRANT_RULE),
        (
            "overlay",
            "magenta to white where the probability is above 0.5 (the project's overlay), whatever the threshold",
        ),
    ]
    parts += [f"<tr><th>{e(k)}</th><td>{e(str(v))}</td></tr>" for k, v in settings_rows]
    parts.append("</table>")
    n_ok = sum(r["status"] == "ok" for r in rows)
    parts.append(f"<p>{n_ok} of {len(rows)} photographs segmented.</p>")
    for r in rows:
        parts.append('<div class="photo">')
        parts.append(f"<h2>{e(Path(r['image']).name)}</h2><p class='small'>{e(r['image'])}</p>")
        if r["status"] != "ok":
            parts.append(f'<p class="skipped">{e(r["status"])}</p></div>')
            continue
        thumb, overlay = (e(quote(r[k])) for k in ("thumbnail", "overlay"))  # a name may hold ' ', '#', '?'
        parts.append(
            f'<a href="{thumb}"><img class="thumb" src="{thumb}" alt="photograph"></a> '
            f'<a href="{overlay}"><img class="overlay" src="{overlay}" alt="overlay"></a>'
        )
        nums = [
            ("size", f"{r['width']}x{r['height']} px"),
            (
                "field of view",
                f"diameter {r['fov_diameter_px']} px, centre ({r['fov_cx']}, {r['fov_cy']}), {r['fov_found_from']}",
            ),
            ("MA count", r["ma_count"]),
            ("HE count", r["he_count"]),
            ("HE area", f"{r['he_area_px']} px = {100 * r['he_area_fraction_of_fov']:.3f} % of the FOV"),
        ]
        for les in LESIONS:
            q = ", ".join(f"{k.replace('_', ' ')} {r[f'{les.lower()}_{k}']}" for k in QUADRANTS)
            nums.append((f"{les} per quadrant", q))
        nums.append(("maps", f"{r['ma_map']}, {r['he_map']}"))
        parts.append("<table>" + "".join(f"<tr><th>{e(k)}</th><td>{e(str(v))}</td></tr>" for k, v in nums))
        parts.append("</table></div>")
    parts += [f'<p class="warn">{e(DISCLAIMER)}</p>', "</body></html>", ""]
    return "\n".join(parts)
