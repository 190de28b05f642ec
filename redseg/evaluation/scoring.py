"""Scoring prediction maps against IDRiD ground truth: the numbers, nothing drawn.

Used by ``tools/evaluate.py`` (any method's maps) and ``tools/test_net.py`` (right after it writes
a model's maps). It implements the authors' IDRiD evaluation, released later with their SEBNet
paper (evaluation/pr_idrid.m), not stated in the paper (§3.3 defines P, R, AUC_PR only):
docs/method.md#the-released-protocol. Predictions are 8-bit maps (probability x 255), resized to
the label size when they differ, thresholded at t = i/30, and TP/FP/FN are pooled over all test
images before P, R and the trapezoid AUC_PR are computed (``redseg.evaluation.metrics``).

Ground truth comes from either
  * a data set as published (``--gt`` the folder, or for the sets other than IDRiD also its .zip),
    read by the reader preparation uses (redseg.data.datasets): IDRiD's test set (``b. Testing
    Set``, colour TIFF masks, a missing mask file means no lesion of that kind), or the test split
    of DDR, FGADR, e-ophtha MA or DiaretDB1 (each set's own mask rule, docs/datasets.md), at the
    set's own label size; a lesion the set has no ground truth for (HE on e-ophtha MA) is reported
    as not scored, never as 0; or
  * a prepared set (``tools/prepare_data.py``): its ``test.txt`` list and 0/255 PNG masks, with
    meta.json's ``not_scored`` lesions left out likewise.
See docs/data_format.md for both layouts and docs/evaluation.md for the choices made here. The
files of a run (metrics.json, report.md, the curves and overlays) are written by redseg.evaluation.report.
"""

from __future__ import annotations

import logging
import os
import time
import zipfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import cv2
import numpy as np
from tqdm import tqdm

from redseg import config as C
from redseg.config import LESIONS, PROTOCOL_THRESHOLDS
from redseg.data.archive import SourceError
from redseg.data.datasets import detect, open_source
from redseg.data.prepared_set import (
    DataError,
    downsample_mask,
    list_path,
    read_list,
    read_mask,
    read_meta,
    require_complete,
)
from redseg.evaluation import metrics, report

log = logging.getLogger(__name__)

# How a prediction of another size is brought to the label size (the released script resizes to
# the label size with MATLAB imresize, i.e. bicubic; bilinear is our default:
# docs/method.md#resizing-for-scoring).
INTERPOLATIONS = {
    "linear": cv2.INTER_LINEAR,
    "cubic": cv2.INTER_CUBIC,
    "area": cv2.INTER_AREA,
    "nearest": cv2.INTER_NEAREST,
}
INTERPOLATION_NAMES = {
    "linear": "bilinear (cv2.INTER_LINEAR)",
    "cubic": "bicubic (cv2.INTER_CUBIC)",
    "area": "pixel-area (cv2.INTER_AREA)",
    "nearest": "nearest neighbour (cv2.INTER_NEAREST)",
}
THRESHOLD_RULE = (
    "pixel positive where v/255 >= t (float64), v the 8-bit prediction; t = i/30 -> v >= ceil(8.5 i), "
    "t = 0.5 -> v >= 128"
)


class EvaluationError(DataError):
    """Bad input to the evaluation (a path that is not ground truth, a missing prediction...)."""


@dataclass
class GtImage:
    """One test image: its masks (None = no mask file = no lesion) and its fundus photo if found."""

    name: str
    masks: dict[str, Any]  # a path, or a file of the data set's reader (redseg.data.archive.SourceFile)
    photo: Path | None = None


@dataclass
class GroundTruth:
    """A test set's ground truth, whichever layout it came from."""

    kind: str  # "official" or "prepared"
    path: Path  # what the user gave
    images: list[GtImage]
    info: dict = field(default_factory=dict)  # e.g. the prepared set's meta.json
    not_scored: dict[str, str] = field(default_factory=dict)  # lesion -> why it has no ground truth
    read_mask: Callable[[Any], np.ndarray] = read_mask  # a mask of ``images`` as a bool map
    close: Callable[[], None] = lambda: None  # releases the reader (a zip) when scoring is done
    photo_shape: Callable[[str], tuple[int, int] | None] = lambda name: None  # a photograph's size, by name


# --- ground truth -------------------------------------------------------------------------------


def find_ground_truth(gt: str | os.PathLike, dataset: str | None = None) -> GroundTruth:
    """Detect the layout of ``gt`` and list its test images.

    Accepted: a data set as published (redseg.data.datasets: IDRiD's root, the folder holding
    ``A. Segmentation``, or that folder itself; DDR, FGADR, e-ophtha MA, DiaretDB1 as a folder or
    a .zip; ``dataset`` names it, else it is recognised); a prepared set's folder (holding
    ``test.txt``) or its list file. Anything else raises ``EvaluationError`` naming the path.
    """
    path = Path(gt)
    if not path.exists():
        raise EvaluationError(f"ground truth {path} does not exist")
    if path.is_file():
        if path.suffix.lower() == ".txt":
            return _prepared(path)
        if not zipfile.is_zipfile(path):
            raise EvaluationError(f"ground truth {path} is a file but not a prepared set's list file (.txt) or a .zip")
    elif dataset is None and list_path(path, "test").is_file():
        return _prepared(list_path(path, "test"))
    elif dataset is None and ((path / C.IDRID_SEG_DIR).is_dir() or path.name == C.IDRID_SEG_DIR):
        return _published(path, "idrid")
    try:
        name = dataset or detect(path)
        if name == "idrid" and dataset is None:  # IDRiD is taken at its root or 'A. Segmentation' only
            raise SourceError(f"'{C.IDRID_SEG_DIR}' lies deeper; point --gt at the folder holding it")
    except SourceError as e:
        raise EvaluationError(
            f"ground truth {path} is neither a data set as published nor a prepared set (no "
            f"'{list_path(path, 'test').name}' inside): {e}; see docs/datasets.md"
        ) from e
    return _published(path, name)


def _published(path: Path, dataset: str) -> GroundTruth:
    """The test split of a data set as published, listed by its reader (redseg.data.datasets)."""
    try:
        source = open_source(path, dataset, allow_partial=True)
    except SourceError as e:
        raise EvaluationError(f"{dataset} ground truth {path}: {e}") from e
    try:
        items = source.split_images("test", LESIONS) if dataset == "idrid" else source.items("test", LESIONS)
        if not items:
            raise EvaluationError(f"{source.title} ground truth {path}: no test images under {source.index.root}")
        if dataset == "idrid" and not source.index.mask_ids["test"]:
            raise EvaluationError(
                f"official IDRiD ground truth: no test-set masks under "
                f"'{source.index.root}/{C.IDRID_GT_DIR}/{C.IDRID_SPLIT_DIRS['test']}'"
            )
        for warning in source.all_warnings():
            log.warning("%s", warning)
        for missing in (m for m in source.partial if "test" in m or dataset != "idrid"):
            log.warning("%s ground truth %s: missing %s", source.title, path, missing)
        images = [
            GtImage(
                it.name,
                {les: f for les, f in it.masks.items()},
                None if source.is_zip or it.image is None else source.local_path(it.image),
            )
            for it in items
        ]
    except BaseException:
        source.close()
        raise
    root = Path(source.index.root)
    if dataset == "idrid":
        masks = str(root / C.IDRID_GT_DIR / C.IDRID_SPLIT_DIRS["test"])
    else:
        masks = source.index.root
    info = {
        "masks": masks,
        "synthetic": bool(source.synthetic),
        "dataset": dataset,
        "mask_binarisation": source.mask_rule_text,
        "split_rule": source.split_rule,
    }
    if dataset == "idrid":  # metrics.json as it has always been for IDRiD
        info = {"masks": masks, "synthetic": info["synthetic"]}
    files = {it.name: it.image for it in items if it.image is not None}

    def photo_shape(name: str) -> tuple[int, int] | None:
        return source.read_image(files[name]).shape[:2] if source.is_zip and name in files else None

    return GroundTruth(
        "official", path, images, info, dict(source.not_scored), source.read_mask, source.close, photo_shape
    )


def _prepared(list_file: Path) -> GroundTruth:
    folder = list_file.parent
    require_complete(folder)
    images = [GtImage(s.name, s.masks, s.image) for s in read_list(list_file)]
    info: dict = {"list": str(list_file)}
    if (folder / "meta.json").is_file():
        try:
            meta = read_meta(folder)
            info.update({k: meta[k] for k in ("factor", "size", "mask_rule", "source") if k in meta})
            if meta.get("dataset", "idrid") != "idrid":
                info["dataset"] = meta["dataset"]
            if meta.get("synthetic"):
                info["synthetic"] = True
            not_scored = dict(meta.get("not_scored") or {})
        except DataError as e:
            log.warning("%s", e)
            not_scored = {}
    else:
        not_scored = {}
    return GroundTruth("prepared", list_file, images, info, not_scored)


def read_prediction(path: Path) -> np.ndarray:
    """An 8-bit grey prediction map (docs/data_format.md); a colour PNG is converted to grey."""
    if not path.is_file():
        raise EvaluationError(f"missing prediction {path}")
    p = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    if p is None:
        raise EvaluationError(f"cannot read prediction {path}")
    if p.dtype != np.uint8:
        raise EvaluationError(f"prediction {path} is {p.dtype}; expected 8-bit (probability x 255)")
    if p.ndim == 3:
        p = cv2.cvtColor(p, cv2.COLOR_BGRA2GRAY if p.shape[2] == 4 else cv2.COLOR_BGR2GRAY)
    return p


def prediction_path(pred_dir: Path, name: str, lesion: str) -> Path:
    """``<pred>/<image>_ma.png`` / ``_he.png`` (docs/data_format.md)."""
    return Path(pred_dir) / f"{name}_{lesion.lower()}.png"


# --- scoring ------------------------------------------------------------------------------------


def _ref_shape(item: GtImage, masks: dict[str, np.ndarray | None], truth: GroundTruth) -> tuple[int, int] | None:
    """The label size of an image with a missing mask: another mask's size, else the photo's."""
    for m in masks.values():
        if m is not None:
            return m.shape
    shape = truth.photo_shape(item.name)  # a photograph inside a zip
    if shape is not None:
        return shape
    if item.photo is not None:
        photo = cv2.imread(str(item.photo), cv2.IMREAD_GRAYSCALE)
        if photo is not None:
            return photo.shape
    return None


def evaluate(
    pred_dir: str | os.PathLike,
    gt: str | os.PathLike,
    out_dir: str | os.PathLike,
    at_pred_size: bool = False,
    overlays: int = 3,
    interpolation: str = "linear",
    progress: bool = True,
    dataset: str | None = None,
) -> dict:
    """Score ``<pred_dir>/<image>_{ma,he}.png`` against ``gt`` (:func:`score`) and write the report
    of the run to ``out_dir`` (:func:`redseg.evaluation.report.write_report`).

    Writes ``metrics.json`` (last, atomically), ``report.md``, ``pr_curves.png`` and
    ``overlays/<image>.png`` for the first ``overlays`` images in name order. Returns the content of
    metrics.json: ``{"MA": {...}, "HE": {...}, "meta": {...}}``, each lesion with ``auc_pr``,
    ``ap``, ``at_0.5``, ``break_even``, ``n_pos``, ``n_neg``, ``curves``; undefined values (no
    lesion pixel) are None. Raises ``DataError`` (``EvaluationError`` is one) for bad input,
    before anything is written.
    """
    start = time.perf_counter()
    result, panels = score(pred_dir, gt, at_pred_size, overlays, interpolation, progress, dataset)
    return report.write_report(Path(out_dir), result, panels, start)


def score(
    pred_dir: str | os.PathLike,
    gt: str | os.PathLike,
    at_pred_size: bool = False,
    overlays: int = 0,
    interpolation: str = "linear",
    progress: bool = True,
    dataset: str | None = None,
) -> tuple[dict, list[report.OverlayInput]]:
    """The metrics of ``<pred_dir>/<image>_{ma,he}.png`` against ``gt``; nothing is written.

    ``gt``: the official IDRiD root or a prepared set (:func:`find_ground_truth`). By default the
    maps are resized to the label size with ``interpolation`` (the authors' protocol);
    ``at_pred_size=True`` instead downsizes the labels to the map size with the "any" rule
    (``redseg.data.prepared_set.downsample_mask``). Returns the result (lesions and ``meta``) and, for
    the first ``overlays`` images, the scored maps and labels at overlay size.
    """
    pred_dir = Path(pred_dir)
    if interpolation not in INTERPOLATIONS:
        raise EvaluationError(f"unknown interpolation {interpolation!r}; one of {sorted(INTERPOLATIONS)}")
    if not pred_dir.is_dir():
        raise EvaluationError(f"prediction folder {pred_dir} does not exist")
    truth = find_ground_truth(gt, dataset)
    try:
        return _score(pred_dir, truth, at_pred_size, overlays, interpolation, progress)
    finally:
        truth.close()


def _score(
    pred_dir: Path, truth: GroundTruth, at_pred_size: bool, overlays: int, interpolation: str, progress: bool
) -> tuple[dict, list[report.OverlayInput]]:
    scored = [les for les in LESIONS if les not in truth.not_scored]
    missing = [
        prediction_path(pred_dir, it.name, les)
        for it in truth.images
        for les in scored
        if not prediction_path(pred_dir, it.name, les).is_file()
    ]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise EvaluationError(f"missing prediction {missing[0]}{more} for ground truth {truth.path}")
    log.info("scoring %d images of %s (%s layout)", len(truth.images), truth.path, truth.kind)

    interp = INTERPOLATIONS[interpolation]
    pos_total = {les: np.zeros(metrics.NBINS, np.int64) for les in LESIONS}
    neg_total = {les: np.zeros(metrics.NBINS, np.int64) for les in LESIONS}
    missing_masks: dict[str, list[str]] = {les: [] for les in LESIONS}
    label_sizes: set[tuple[int, int]] = set()
    pred_sizes: set[tuple[int, int]] = set()
    n_resized = 0
    overlay_data: list[report.OverlayInput] = []
    for item in tqdm(truth.images, desc="evaluate", unit="image", disable=not progress):
        preds = {les: read_prediction(prediction_path(pred_dir, item.name, les)) for les in scored}
        masks = {les: truth.read_mask(p) if p is not None else None for les, p in item.masks.items() if les in scored}
        ref = _ref_shape(item, masks, truth)
        if ref is None:
            ref = preds[scored[0]].shape
            log.warning("%s: no mask and no photo, label size taken from the prediction", item.name)
        label_sizes.add((ref[1], ref[0]))
        used_pred: dict[str, np.ndarray] = {}
        used_gt: dict[str, np.ndarray] = {}
        for les in scored:
            pred, mask = preds[les], masks[les]
            pred_sizes.add((pred.shape[1], pred.shape[0]))
            if mask is None:
                missing_masks[les].append(item.name)
            if at_pred_size:
                shape = pred.shape
                mask = np.zeros(shape, bool) if mask is None else downsample_mask(mask, shape)
                n_resized += pred.shape != ref
            else:
                if mask is None:
                    mask = np.zeros(ref, bool)
                if pred.shape != mask.shape:
                    _check_aspect(item.name, pred.shape, mask.shape)
                    pred = cv2.resize(pred, (mask.shape[1], mask.shape[0]), interpolation=interp)
                    n_resized += 1
            pos, neg = metrics.histograms(pred, mask)
            pos_total[les] += pos
            neg_total[les] += neg
            if len(overlay_data) < overlays:
                used_pred[les], used_gt[les] = pred, mask
        if len(overlay_data) < overlays:
            for les in truth.not_scored:  # drawn without a ground-truth outline
                path = prediction_path(pred_dir, item.name, les)
                pred = read_prediction(path) if path.is_file() else np.zeros(ref, np.uint8)
                if pred.shape != tuple(ref):
                    pred = cv2.resize(pred, (ref[1], ref[0]), interpolation=interp)
                used_pred[les], used_gt[les] = pred, np.zeros(ref, bool)
            overlay_data.append((item.name, item.photo, *report.shrink_for_overlay(used_pred, used_gt)))
    if n_resized:
        what = (
            "labels downsized to the prediction size ('any' rule)"
            if at_pred_size
            else (f"predictions resized to the label size, {INTERPOLATION_NAMES[interpolation]}")
        )
        log.info("%d of %d maps: %s", n_resized, len(truth.images) * len(LESIONS), what)

    result: dict = {les: metrics.lesion_metrics(pos_total[les], neg_total[les]) for les in LESIONS}
    for les, why in truth.not_scored.items():  # no ground truth: not scored, never 0
        result[les]["not_scored"] = why
        result[les]["n_neg"] = None
    notes = [
        f"{les}: not scored ({truth.not_scored[les]})"
        if les in truth.not_scored
        else f"{les}: no lesion pixel in the ground truth, AUC_PR/AP/recall undefined (null)"
        for les in LESIONS
        if result[les]["n_pos"] == 0
    ]
    result["meta"] = {
        "pred_dir": str(pred_dir),
        "gt": str(truth.path),
        "gt_kind": truth.kind,
        "gt_info": truth.info,
        "n_images": len(truth.images),
        "images": [it.name for it in truth.images],
        "scored_at": "prediction size" if at_pred_size else "label size",
        "resize": "labels downsized with the 'any' rule (INTER_AREA of 0/1 > 0)"
        if at_pred_size
        else f"predictions resized to the label size, {INTERPOLATION_NAMES[interpolation]} on the 8-bit map",
        "n_resized": n_resized,
        "label_sizes": sorted(label_sizes),
        "prediction_sizes": sorted(pred_sizes),
        "threshold_rule": THRESHOLD_RULE,
        "protocol_thresholds": PROTOCOL_THRESHOLDS,
        "missing_masks": missing_masks,
        "notes": notes,
    }
    if truth.not_scored:
        result["meta"]["not_scored"] = dict(truth.not_scored)
    for note in notes:
        log.warning(note)

    return result, overlay_data


def _check_aspect(name: str, pred_shape: tuple[int, ...], label_shape: tuple[int, ...]) -> None:
    pa = pred_shape[1] / pred_shape[0]
    la = label_shape[1] / label_shape[0]
    if abs(pa - la) > 0.01 * la:
        log.warning(
            "%s: prediction %dx%d and label %dx%d differ in aspect ratio; resizing anyway",
            name,
            pred_shape[1],
            pred_shape[0],
            label_shape[1],
            label_shape[0],
        )
