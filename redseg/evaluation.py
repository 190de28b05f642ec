"""Scoring prediction maps against IDRiD ground truth, and the report of a run.

Used by ``tools/evaluate.py`` (any method's maps) and ``tools/test_net.py`` (right after it writes
a model's maps). It implements the authors' released IDRiD evaluation as restated in SPEC section
1 "Evaluation" (paper section 3.3): predictions are 8-bit maps (probability x 255), resized to the
label size when they differ, thresholded at t = i/30, and TP/FP/FN are pooled over all test images
before P, R and the trapezoid AUC_PR are computed (``redseg.metrics``).

Ground truth comes from either
  * the official IDRiD folder (the one holding ``A. Segmentation``): colour TIFF masks of the
    test set (``b. Testing Set``), a pixel is lesion where any channel is non-zero, a missing mask
    file means no lesion of that kind; image names are discovered from the files present; or
  * a prepared set (``tools/prepare_idrid.py``): its ``test.txt`` list and 0/255 PNG masks.
See docs/data_format.md for both layouts and docs/evaluation.md for the choices made here.
"""

from __future__ import annotations

import io
import logging
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np
from tqdm import tqdm

from redseg import config as C
from redseg import metrics
from redseg.config import (
    ALL_IDRID_LESIONS,
    IDRID_LESION_DIRS,
    LESIONS,
    PAPER_COMPARISON_AUC_PR,
    PAPER_RESULTS,
    PROTOCOL_THRESHOLDS,
)
from redseg.fileio import write_bytes, write_image, write_json, write_text
from redseg.prepared_set import DataError, downsample_mask, list_path, read_list, read_mask, read_meta, require_complete

log = logging.getLogger(__name__)

MASK_EXTS = (".tif", ".tiff", ".png")
PHOTO_EXTS = (".jpg", ".jpeg", ".png", ".tif", ".tiff")

# How a prediction of another size is brought to the label size (SPEC: "resized to the label size
# if they differ"; the interpolation is not stated there, bilinear is our default).
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
OVERLAY_MAX_WIDTH = 1072  # overlay panels are drawn at most this wide (the 4x-downsampled size)
GT_OUTLINE_BGR = {"MA": (255, 255, 0), "HE": (0, 255, 0)}  # cyan, green
GT_OUTLINE_NAME = {"MA": "cyan", "HE": "green"}


class EvaluationError(DataError):
    """Bad input to the evaluation (a path that is not ground truth, a missing prediction...)."""


@dataclass
class GtImage:
    """One test image: its masks (None = no mask file = no lesion) and its fundus photo if found."""

    name: str
    masks: dict[str, Path | None]
    photo: Path | None = None


@dataclass
class GroundTruth:
    """A test set's ground truth, whichever layout it came from."""

    kind: str  # "official" or "prepared"
    path: Path  # what the user gave
    images: list[GtImage]
    info: dict = field(default_factory=dict)  # e.g. the prepared set's meta.json


# --- ground truth -------------------------------------------------------------------------------


def find_ground_truth(gt: str | os.PathLike) -> GroundTruth:
    """Detect the layout of ``gt`` and list its test images.

    Accepted: the official IDRiD root (holding ``A. Segmentation``) or that folder itself; a
    prepared set's folder (holding ``test.txt``) or its list file. Anything else raises
    ``EvaluationError`` naming the path.
    """
    path = Path(gt)
    if not path.exists():
        raise EvaluationError(f"ground truth {path} does not exist")
    if path.is_file():
        if path.suffix.lower() == ".txt":
            return _prepared(path)
        raise EvaluationError(f"ground truth {path} is a file but not a prepared set's list file (.txt)")
    if (path / C.IDRID_SEG_DIR).is_dir():
        return _official(path / C.IDRID_SEG_DIR, path)
    if path.name == C.IDRID_SEG_DIR or (path / C.IDRID_GT_DIR).is_dir():
        return _official(path, path)
    if list_path(path, "test").is_file():
        return _prepared(list_path(path, "test"))
    raise EvaluationError(
        f"ground truth {path} is neither the official IDRiD folder (no '{C.IDRID_SEG_DIR}' "
        f"inside) nor a prepared set (no '{list_path(path, 'test').name}' inside); see docs/data_format.md"
    )


def _find_file(folder: Path, stem: str, exts: tuple[str, ...]) -> Path | None:
    for ext in exts:
        for cand in (folder / f"{stem}{ext}", folder / f"{stem}{ext.upper()}"):
            if cand.is_file():
                return cand
    return None


def _official(seg: Path, given: Path) -> GroundTruth:
    gt_dir = seg / C.IDRID_GT_DIR / C.IDRID_SPLIT_DIRS["test"]
    if not gt_dir.is_dir():
        raise EvaluationError(f"official IDRiD ground truth: test-set mask folder {gt_dir} is missing")
    img_dir = seg / C.IDRID_IMAGES_DIR / C.IDRID_SPLIT_DIRS["test"]
    # Names come from every file present (all lesion kinds and the photos), so an image without
    # any red lesion is still scored (all background) and no fixed list IDRiD_55..81 is required.
    names: set[str] = set()
    by_lesion: dict[str, dict[str, Path]] = {}
    for code in ALL_IDRID_LESIONS:
        found: dict[str, Path] = {}
        folder = gt_dir / IDRID_LESION_DIRS[code]
        if folder.is_dir():
            for f in folder.iterdir():
                suffix = f"_{code}".lower()
                if f.suffix.lower() in MASK_EXTS and f.stem.lower().endswith(suffix):
                    found[f.stem[: -len(suffix)]] = f
        by_lesion[code] = found
        names.update(found)
    if img_dir.is_dir():
        names.update(f.stem for f in img_dir.iterdir() if f.suffix.lower() in PHOTO_EXTS)
    if not names:
        raise EvaluationError(f"official IDRiD ground truth: no test masks or images under {seg}")
    images = [
        GtImage(
            name,
            {les: by_lesion[les].get(name) for les in LESIONS},
            _find_file(img_dir, name, PHOTO_EXTS) if img_dir.is_dir() else None,
        )
        for name in sorted(names)
    ]
    # tools/make_synthetic.py leaves synthetic.json beside "A. Segmentation": say so in the report.
    synthetic = (seg.parent / "synthetic.json").is_file()
    return GroundTruth("official", given, images, {"masks": str(gt_dir), "synthetic": synthetic})


def _prepared(list_file: Path) -> GroundTruth:
    folder = list_file.parent
    require_complete(folder)
    images = [GtImage(s.name, s.masks, s.image) for s in read_list(list_file)]
    info: dict = {"list": str(list_file)}
    if (folder / "meta.json").is_file():
        try:
            meta = read_meta(folder)
            info.update({k: meta[k] for k in ("factor", "size", "mask_rule", "source") if k in meta})
        except DataError as e:
            log.warning("%s", e)
    return GroundTruth("prepared", list_file, images, info)


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


def _ref_shape(item: GtImage, masks: dict[str, np.ndarray | None]) -> tuple[int, int] | None:
    """The label size of an image with a missing mask: another mask's size, else the photo's."""
    for m in masks.values():
        if m is not None:
            return m.shape
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
) -> dict:
    """Score ``<pred_dir>/<image>_{ma,he}.png`` against ``gt`` and write the report to ``out_dir``.

    ``gt``: the official IDRiD root or a prepared set (``find_ground_truth``). By default the
    maps are resized to the label size with ``interpolation`` (the authors' protocol);
    ``at_pred_size=True`` instead downsizes the labels to the map size with the "any" rule
    (``downsize_any``). ``overlays``: how many images (the first in name order) get an overlay PNG.

    Writes ``metrics.json`` (last, atomically), ``report.md``, ``pr_curves.png`` and
    ``overlays/<image>.png``. Returns the content of metrics.json: ``{"MA": {...}, "HE": {...},
    "meta": {...}}``, each lesion with ``auc_pr``, ``ap``, ``at_0.5``, ``break_even``, ``n_pos``,
    ``n_neg``, ``curves``; undefined values (no lesion pixel) are None. Raises
    ``DataError`` (``EvaluationError`` is one) for bad input, before anything is written.
    """
    start = time.perf_counter()
    pred_dir = Path(pred_dir)
    out_dir = Path(out_dir)
    if interpolation not in INTERPOLATIONS:
        raise EvaluationError(f"unknown interpolation {interpolation!r}; one of {sorted(INTERPOLATIONS)}")
    if not pred_dir.is_dir():
        raise EvaluationError(f"prediction folder {pred_dir} does not exist")
    truth = find_ground_truth(gt)
    missing = [
        prediction_path(pred_dir, it.name, les)
        for it in truth.images
        for les in LESIONS
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
    overlay_data: list[tuple[GtImage, dict, dict]] = []
    for item in tqdm(truth.images, desc="evaluate", unit="image", disable=not progress):
        preds = {les: read_prediction(prediction_path(pred_dir, item.name, les)) for les in LESIONS}
        masks = {les: read_mask(p) if p is not None else None for les, p in item.masks.items()}
        ref = _ref_shape(item, masks)
        if ref is None:
            ref = preds[LESIONS[0]].shape
            log.warning("%s: no mask and no photo, label size taken from the prediction", item.name)
        label_sizes.add((ref[1], ref[0]))
        used_pred: dict[str, np.ndarray] = {}
        used_gt: dict[str, np.ndarray] = {}
        for les in LESIONS:
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
            overlay_data.append((item, *_overlay_inputs(used_pred, used_gt)))
    if n_resized:
        what = (
            "labels downsized to the prediction size ('any' rule)"
            if at_pred_size
            else (f"predictions resized to the label size, {INTERPOLATION_NAMES[interpolation]}")
        )
        log.info("%d of %d maps: %s", n_resized, len(truth.images) * len(LESIONS), what)

    result: dict = {les: metrics.lesion_metrics(pos_total[les], neg_total[les]) for les in LESIONS}
    notes = [
        f"{les}: no lesion pixel in the ground truth, AUC_PR/AP/recall undefined (null)"
        for les in LESIONS
        if result[les]["n_pos"] == 0
    ]
    out_dir.mkdir(parents=True, exist_ok=True)
    outputs = {
        "metrics": str(out_dir / "metrics.json"),
        "report": str(out_dir / "report.md"),
        "pr_curves": str(out_dir / "pr_curves.png"),
        "overlays": [],
    }
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
        "outputs": outputs,
    }
    for note in notes:
        log.warning(note)

    if overlay_data:
        (out_dir / "overlays").mkdir(exist_ok=True)
    for item, preds_small, gts_small in overlay_data:
        path = out_dir / "overlays" / f"{item.name}.png"
        write_image(path, draw_overlay(item, preds_small, gts_small))
        outputs["overlays"].append(str(path))
    write_bytes(out_dir / "pr_curves.png", plot_curves(result))
    result["meta"]["seconds"] = round(time.perf_counter() - start, 2)
    safe = _json_safe(result)
    write_text(out_dir / "report.md", render_report(safe))
    write_json(out_dir / "metrics.json", safe)
    log.info("wrote %s", out_dir / "report.md")
    return safe


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


# --- outputs ------------------------------------------------------------------------------------


def _json_safe(obj):
    """numpy -> Python, nan/inf -> None (strict JSON has no NaN)."""
    if isinstance(obj, dict):
        return {str(k): _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple, np.ndarray)):
        return [_json_safe(v) for v in (obj.tolist() if isinstance(obj, np.ndarray) else obj)]
    if isinstance(obj, (np.integer,)):
        return int(obj)
    if isinstance(obj, (float, np.floating)):
        return float(obj) if math.isfinite(obj) else None
    return obj


def _fmt(x, nd: int = 4) -> str:
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{nd}f}"


def summary_table(result: dict) -> str:
    """Markdown table of our numbers, one row per lesion (printed by tools/evaluate.py)."""
    rows = [
        "| lesion | AUC_PR (protocol) | AP (exact) | P @BE | R @BE | BE t | P @0.5 | R @0.5 | F1 @0.5 "
        "| IoU @0.5 | lesion px |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for les in LESIONS:
        m = result[les]
        be, half = m["break_even"], m["at_0.5"]
        rows.append(
            f"| {les} | {_fmt(m['auc_pr'])} | {_fmt(m['ap'])} | {_fmt(be['precision'])} | "
            f"{_fmt(be['recall'])} | {_fmt(be['threshold'], 3)} | {_fmt(half['precision'])} | "
            f"{_fmt(half['recall'])} | {_fmt(half['f1'])} | {_fmt(half['iou'])} | {m['n_pos']} |"
        )
    return "\n".join(rows)


def render_report(result: dict) -> str:
    """report.md: our numbers beside the paper's Tables 2-4 (from redseg.config), and how to read them."""
    meta = result["meta"]
    lines = [
        "# Red-Seg evaluation report",
        "",
        f"Predictions `{meta['pred_dir']}` scored against `{meta['gt']}` ({meta['gt_kind']} layout), "
        f"{meta['n_images']} images, at the {meta['scored_at']} ({meta['resize']}; "
        f"{meta['n_resized']} maps resized).",
        "",
        *(
            [
                "**These labels are synthetic** (tools/make_synthetic.py): the paper's IDRiD numbers below "
                "show the format of the comparison, not a result to compare with.",
                "",
            ]
            if meta["gt_info"].get("synthetic")
            else []
        ),
        "## Our numbers",
        "",
        summary_table(result),
        "",
        "- **AUC_PR (protocol)**: the protocol of the authors' IDRiD evaluation code, released later "
        "with another paper of theirs (SEBNet), not stated in the Red-Seg paper, whose section 3.3 only "
        "defines AUC_PR as the area under the P-R curve (docs/method.md#the-released-protocol): "
        f"{meta['protocol_thresholds']} thresholds t = i/30, TP/FP/FN pooled over all images, trapezoid "
        "over recall. This is the number to compare with the paper's AUC_PR (Tables 2, 3, 4).",
        "- **AP (exact)**: step-wise average precision over all 256 8-bit thresholds "
        "(= sklearn average_precision_score on the pooled pixels); a check that the 31-point "
        "protocol is not flattering or penalising the maps.",
        "- **@BE**: at the break-even threshold (|P - R| smallest). The paper does not say at which "
        "threshold its Table 2 reads P and R; every P there is within 0.01 of its R, so **we read "
        "Table 2's P and R as break-even values** and compare them with these columns, not with "
        "t = 0.5. This is our reading, not the paper's statement (docs/method.md#p-and-r-at-break-even).",
        "- **@0.5**: at t = 0.5 (8-bit value >= 128), where the authors' protocol reads F1 and IoU.",
        f"- Threshold rule: {meta['threshold_rule']}.",
    ]
    if meta["gt_kind"] == "prepared":
        info = meta.get("gt_info", {})
        lines.append(
            "- Scored against a prepared set's downsampled masks "
            f"(mask rule: {info.get('mask_rule', 'unknown')}, size {info.get('size', 'unknown')}), "
            "not the full-size official labels: not strictly comparable with the paper; use "
            "`--gt <IDRiD root>` for that."
        )
    if meta["scored_at"] == "prediction size":
        lines.append(
            "- `--at-pred-size`: labels were downsized to the prediction size; the authors' protocol "
            "resizes the predictions to the label size instead."
        )
    for note in meta["notes"]:
        lines.append(f"- **Note**: {note}.")
    lines += [
        "",
        "## Beside the paper's Table 2 (P and R of the paper vs our break-even P and R)",
        "",
        "| method | MA P | MA R | MA AUC_PR | HE P | HE R | HE AUC_PR |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, row in PAPER_RESULTS.items():
        cells = [_fmt(row[les][k]) for les in LESIONS for k in ("precision", "recall", "auc_pr")]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    for label, key in (("this run, break-even", "break_even"), ("this run, t = 0.5", "at_0.5")):
        cells = []
        for les in LESIONS:
            m = result[les]
            cells += [_fmt(m[key]["precision"]), _fmt(m[key]["recall"]), _fmt(m["auc_pr"])]
        lines.append(f"| **{label}** | " + " | ".join(cells) + " |")
    lines += [
        "",
        "## Beside the paper's Tables 3/4 (AUC_PR on the IDRiD test set)",
        "",
        "| method | MA AUC_PR | HE AUC_PR |",
        "|---|---|---|",
    ]
    for name, values in PAPER_COMPARISON_AUC_PR.items():
        lines.append(f"| {name} | " + " | ".join(_fmt(v) for v in values) + " |")
    lines.append("| **this run** | " + " | ".join(_fmt(result[les]["auc_pr"]) for les in LESIONS) + " |")
    missing = meta["missing_masks"]
    lines += [
        "",
        "## Data",
        "",
        f"- Images: {', '.join(meta['images'])}",
        f"- Label sizes (w x h): {', '.join(f'{w}x{h}' for w, h in meta['label_sizes'])}; prediction "
        f"sizes: {', '.join(f'{w}x{h}' for w, h in meta['prediction_sizes'])}",
    ]
    for les in LESIONS:
        m = result[les]
        gone = ", ".join(missing[les]) if missing[les] else "none"
        lines.append(
            f"- {les}: {m['n_pos']} lesion / {m['n_neg']} background pixels; images without a {les} "
            f"mask (no lesion): {gone}"
        )
        skipped = m["curves"]["protocol"]["skipped"]
        if skipped:
            lines.append(
                f"- {les}: protocol thresholds skipped (TP+FP=0, TP+FN=0 or P=R=0): "
                + ", ".join(f"{t:.3f}" for t in skipped)
            )
    lines += [
        "",
        "## Files",
        "",
        "- `metrics.json`: all numbers above, plus both curves",
        "- `pr_curves.png`: protocol (31 points) and exact P-R curves, with the paper's Table 2 point",
    ]
    if meta["outputs"]["overlays"]:
        outlines = ", ".join(f"{les} {GT_OUTLINE_NAME[les]}" for les in LESIONS)
        lines.append(
            "- `overlays/`: fundus photo, predicted probability above 0.5 as magenta (0.5) to white (1) "
            f"heat map, ground truth outlined ({outlines})"
        )
    lines.append(f"\nScored in {meta.get('seconds', 0):.1f} s.\n")
    return "\n".join(lines)


def plot_curves(result: dict) -> bytes:
    """pr_curves.png: per lesion, the protocol's 31-point curve and the exact 256-point curve."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paper = PAPER_RESULTS.get("Red-Seg two-stage (Table 2)")
    fig, axes = plt.subplots(1, len(LESIONS), figsize=(6 * len(LESIONS), 5.2))
    for ax, les in zip(np.atleast_1d(axes), LESIONS, strict=True):
        m = result[les]
        ex, pr = m["curves"]["exact"], m["curves"]["protocol"]
        if m["n_pos"]:
            ax.plot(
                ex["recall"],
                ex["precision"],
                "-",
                color="tab:blue",
                lw=1.2,
                label=f"exact, 256 thresholds (AP {_fmt(m['ap'])})",
            )
            ax.plot(
                pr["recall"],
                pr["precision"],
                "o-",
                color="tab:red",
                ms=3.5,
                lw=1,
                label=f"protocol, t = i/30 (AUC_PR {_fmt(m['auc_pr'])})",
            )
            be = m["break_even"]
            ax.plot(
                [be["recall"]],
                [be["precision"]],
                "s",
                color="k",
                ms=6,
                label=f"break-even (t = {_fmt(be['threshold'], 3)})",
            )
        else:
            ax.text(0.5, 0.5, "no lesion pixel in the ground truth", ha="center", va="center")
        if paper:
            ax.plot(
                [paper[les]["recall"]],
                [paper[les]["precision"]],
                "*",
                color="tab:green",
                ms=12,
                label="paper, Table 2 (two-stage)",
            )
        ax.set(xlim=(0, 1), ylim=(0, 1.02), xlabel="recall", ylabel="precision", title=les)
        ax.grid(alpha=0.3)
        ax.legend(loc="lower left", fontsize=8)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    return buf.getvalue()


def _overlay_shape(shape: tuple[int, int]) -> tuple[int, int]:
    h, w = shape
    if w <= OVERLAY_MAX_WIDTH:
        return h, w
    return round(h * OVERLAY_MAX_WIDTH / w), OVERLAY_MAX_WIDTH


def _overlay_inputs(preds: dict, gts: dict) -> tuple[dict, dict]:
    """Shrink the scored maps to overlay size now, so the full-size arrays need not be kept."""
    small_p, small_g = {}, {}
    for les in LESIONS:
        shape = _overlay_shape(preds[les].shape)
        p = preds[les]
        small_p[les] = p if p.shape == shape else cv2.resize(p, shape[::-1], interpolation=cv2.INTER_AREA)
        small_g[les] = downsample_mask(gts[les], shape)
    return small_p, small_g


def draw_overlay(item: GtImage, preds: dict, gts: dict) -> np.ndarray:
    """One panel per lesion side by side: photo, probability above 0.5 (magenta -> white), gt outline."""
    shape = preds[LESIONS[0]].shape
    photo = cv2.imread(str(item.photo), cv2.IMREAD_COLOR) if item.photo is not None else None
    if photo is None:
        photo = np.full((*shape, 3), 128, np.uint8)  # no photo found: grey background
    elif photo.shape[:2] != shape:
        photo = cv2.resize(photo, shape[::-1], interpolation=cv2.INTER_AREA)
    panels = []
    for les in LESIONS:
        p = preds[les].astype(np.float32) / 255.0
        if p.shape != shape:
            p = cv2.resize(p, shape[::-1], interpolation=cv2.INTER_LINEAR)
        heat = np.empty((*shape, 3), np.float32)
        # Where p > 0.5 (positive at the protocol's t = 0.5): magenta, turning white as p -> 1; both
        # stand out on an orange fundus. Opaque from p = 0.75.
        heat[..., 0] = 255.0
        heat[..., 1] = 255.0 * np.clip(2.0 * p - 1.0, 0.0, 1.0)
        heat[..., 2] = 255.0
        alpha = np.clip(4.0 * (p - 0.5), 0.0, 0.9)[..., None]
        panel = (photo.astype(np.float32) * (1.0 - alpha) + heat * alpha).astype(np.uint8)
        gt = gts[les] if gts[les].shape == shape else downsample_mask(gts[les], shape)
        contours, _ = cv2.findContours(gt.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
        cv2.drawContours(panel, contours, -1, GT_OUTLINE_BGR[les], 1)
        label = f"{item.name} {les}: prediction p>0.5 magenta->white, gt {GT_OUTLINE_NAME[les]}"
        scale = max(0.4, shape[1] / 1600)
        cv2.putText(panel, label, (8, int(24 * scale / 0.6)), cv2.FONT_HERSHEY_SIMPLEX, scale, (255, 255, 255), 1)
        panels.append(panel)
    gap = np.full((shape[0], 4, 3), 255, np.uint8)
    out = [panels[0]]
    for panel in panels[1:]:
        out += [gap, panel]
    return np.hstack(out)
