"""The report of a scored run: metrics.json, report.md, the P-R curves and the overlays.

Scoring is redseg.evaluation.scoring (the numbers, nothing drawn or written); this module turns its result
into files, as FCN keeps its score.py apart from the drawing. It also owns the one overlay picture
of the project (:func:`draw_overlay`), used by the report and by tools/segment.py alike: per
lesion a panel of the fundus photo with the predicted probability above 0.5 as a magenta to white
heat map and, where ground truth is known, its outline (MA cyan, HE green); panels side by side,
MA left, each at most ``OVERLAY_MAX_WIDTH`` pixels wide.
"""

from __future__ import annotations

import io
import logging
import math
import time
from pathlib import Path

import cv2
import numpy as np

from redseg.config import LESIONS, PAPER_COMPARISON_AUC_PR, PAPER_RESULTS
from redseg.data.prepared_set import downsample_mask
from redseg.fileio import write_bytes, write_image, write_json, write_text

log = logging.getLogger(__name__)

OVERLAY_MAX_WIDTH = 1072  # overlay panels are drawn at most this wide (the 4x-downsampled size)
GT_OUTLINE_BGR = {"MA": (255, 255, 0), "HE": (0, 255, 0)}  # cyan, green
GT_OUTLINE_NAME = {"MA": "cyan", "HE": "green"}

# One image of the report's overlays: its name, its photo (None: grey background), and the scored
# maps and labels per lesion at overlay size (shrink_for_overlay).
OverlayInput = tuple[str, Path | None, dict, dict]


def write_report(out_dir: Path, result: dict, overlays: list[OverlayInput], start: float) -> dict:
    """Write the run's files into ``out_dir``: overlays, pr_curves.png, report.md, metrics.json last.

    ``result``: redseg.evaluation.scoring.score's; ``start``: the perf_counter value when scoring began (the
    report states the time taken). Returns the JSON-safe result written to metrics.json, its
    ``meta.outputs`` naming the files.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    outputs = {
        "metrics": str(out_dir / "metrics.json"),
        "report": str(out_dir / "report.md"),
        "pr_curves": str(out_dir / "pr_curves.png"),
        "overlays": [],
    }
    result["meta"]["outputs"] = outputs
    if overlays:
        (out_dir / "overlays").mkdir(exist_ok=True)
    for name, photo_path, preds, gts in overlays:
        photo = cv2.imread(str(photo_path), cv2.IMREAD_COLOR) if photo_path is not None else None
        path = out_dir / "overlays" / f"{name}.png"
        write_image(path, draw_overlay(name, photo, preds, gts))
        outputs["overlays"].append(str(path))
    write_bytes(out_dir / "pr_curves.png", plot_curves(result))
    result["meta"]["seconds"] = round(time.perf_counter() - start, 2)
    safe = json_safe(result)
    write_text(out_dir / "report.md", render_report(safe))
    write_json(out_dir / "metrics.json", safe)
    log.info("wrote %s", out_dir / "report.md")
    return safe


def json_safe(obj):
    """numpy -> Python, nan/inf -> None (strict JSON has no NaN)."""
    if isinstance(obj, dict):
        return {str(k): json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple, np.ndarray)):
        return [json_safe(v) for v in (obj.tolist() if isinstance(obj, np.ndarray) else obj)]
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
        if m.get("not_scored"):
            rows.append(f"| {les} | not scored: {m['not_scored']} |" + " |" * 9)
            continue
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
        if m.get("not_scored"):
            lines.append(f"- {les}: not scored ({m['not_scored']})")
            continue
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


def shrink_for_overlay(preds: dict, gts: dict | None = None) -> tuple[dict, dict | None]:
    """8-bit maps (pixel-area average) and bool labels ("any" rule) at overlay size.

    Called by the scoring as it goes, so the full-size arrays need not be kept; a no-op on maps
    already small enough.
    """
    small_p, small_g = {}, {} if gts is not None else None
    for les in LESIONS:
        shape = _overlay_shape(preds[les].shape)
        p = preds[les]
        small_p[les] = p if p.shape == shape else cv2.resize(p, shape[::-1], interpolation=cv2.INTER_AREA)
        if gts is not None:
            small_g[les] = downsample_mask(gts[les], shape)
    return small_p, small_g


def draw_overlay(name: str, photo: np.ndarray | None, preds: dict, gts: dict | None = None) -> np.ndarray:
    """One panel per lesion side by side: photo, probability above 0.5 (magenta -> white), gt outline.

    ``preds``: 8-bit maps per lesion; ``gts``: bool labels per lesion, or None (no outline: a
    photograph without ground truth, tools/segment.py); ``photo``: BGR, None for a grey background.
    """
    preds, gts = shrink_for_overlay(preds, gts)
    shape = preds[LESIONS[0]].shape
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
        label = f"{name} {les}: prediction p>0.5 magenta->white"
        if gts is not None:
            gt = gts[les] if gts[les].shape == shape else downsample_mask(gts[les], shape)
            contours, _ = cv2.findContours(gt.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
            cv2.drawContours(panel, contours, -1, GT_OUTLINE_BGR[les], 1)
            label += f", gt {GT_OUTLINE_NAME[les]}"
        scale = max(0.4, shape[1] / 1600)
        cv2.putText(panel, label, (8, int(24 * scale / 0.6)), cv2.FONT_HERSHEY_SIMPLEX, scale, (255, 255, 255), 1)
        panels.append(panel)
    gap = np.full((shape[0], 4, 3), 255, np.uint8)
    out = [panels[0]]
    for panel in panels[1:]:
        out += [gap, panel]
    return np.hstack(out)
