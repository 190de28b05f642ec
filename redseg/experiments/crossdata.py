"""Beyond IDRiD: train on each data set, score every model on every test set (``make crossdata``).

A lesion segmentation method is judged by how it does on data it was not trained on. This runner
takes the prepared sets that are present (tools/prepare_data.py: IDRiD, DDR, FGADR, e-ophtha MA,
DiaretDB1, all at one scale, docs/datasets.md), trains Red-Seg with the same two-stage schedule on
each set that has a training split (IDRiD, DDR, FGADR; optionally "pooled", all their training
splits together) and scores each two-stage model on the test split of every set, at that set's
own label size where the set as published is at hand (the authors' AUC_PR protocol, plus AP). The
result is a train-set x test-set matrix (``crossdata.md`` / ``crossdata.json``), the diagonal (a
model on its own set's test split) marked.

It runs through the reproduction's runner (redseg.experiments.reproduce): each model is two
experiments, ``<set>_stage1`` and ``<set>`` (stage 2 from it, then one test step per test set),
in their own folders, resumable, one progress bar each, several GPUs side by side, or as SLURM
jobs (redseg.experiments.slurm). DiaretDB1 (28 training images) and e-ophtha MA (no HE labels, no
split) are test sets only.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Sequence
from pathlib import Path

from redseg import config as C
from redseg.experiments.reproduce import Experiment, Settings, TestSet, finished, load_outcomes, test_folder
from redseg.fileio import is_complete, read_json_object, write_json, write_text

log = logging.getLogger(__name__)

TRAIN_SETS = ("idrid", "ddr", "fgadr")  # the sets a model is trained on (those with a real training split)
POOLED = "pooled"
TITLES = {
    "idrid": "IDRiD",
    "ddr": "DDR",
    "fgadr": "FGADR",
    "eophtha-ma": "e-ophtha MA",
    "diaretdb1": "DiaretDB1",
    POOLED: "pooled",
}


def experiments(train_keys: Sequence[str], test_keys: Sequence[str]) -> list[Experiment]:
    """Two experiments per training set: stage 1, then stage 2 scored on every test set."""
    out = []
    for key in train_keys:
        title = f"trained on {TITLES.get(key, key)}"
        out.append(Experiment(f"{key}_stage1", f"{title}, stage 1", ("crossdata",), data=key))
        out.append(
            Experiment(key, title, ("crossdata",), stage=2, after=f"{key}_stage1", data=key, tests=tuple(test_keys))
        )
    return out


# --- the prepared sets --------------------------------------------------------------------------


def read_prepared(folder: Path) -> dict | None:
    """meta.json of a complete prepared set, None when the folder is not one."""
    if not is_complete(folder):
        return None
    return read_json_object(folder / "meta.json")


def test_set(folder: Path, meta: dict) -> TestSet:
    """The set's test split, scored against the set as published when its source is still there."""
    src = Path(meta.get("source") or "")
    gt = src if meta.get("source") and src.exists() else None
    if gt is None:
        log.warning("%s: its source %s is not at hand; scored on the prepared masks", folder, meta.get("source"))
    return TestSet(folder, gt, meta.get("dataset", "idrid"))


def find_sets(root: Path) -> dict[str, tuple[Path, dict]]:
    """The prepared sets present under ``root`` (``root/<dataset>``), by data set name."""
    found = {}
    for key in C.DATASETS:
        meta = read_prepared(root / key)
        if meta is None:
            continue
        if meta.get("dataset", "idrid") != key:
            log.warning("%s holds a prepared %s set, not %s; left out", root / key, meta.get("dataset"), key)
            continue
        found[key] = (root / key, meta)
    return found


def make_pooled(out: Path, sets: dict[str, tuple[Path, dict]]) -> Path:
    """A prepared set whose training list is every training set's, paths pointing into them.

    The input mean is the training sets' means weighted by their number of training images (each
    set's mean is over its own images); the test list joins their test lists (used for nothing
    but a check: the pooled model is scored on each set's own test split).
    """
    from redseg.data.prepared_set import list_path, read_list, write_list
    from redseg.fileio import COMPLETE, mark_complete

    out.mkdir(parents=True, exist_ok=True)
    rows: dict[str, list[list[str]]] = {"train": [], "test": []}
    weights, means, parts = [], [], {}
    for key, (folder, meta) in sets.items():
        n = int(meta["counts"]["train_images"])
        if not n:
            continue
        weights.append(n)
        means.append(meta["mean_bgr"])
        parts[key] = str(folder)
        for split in rows:
            for smp in read_list(list_path(folder, split)):
                rows[split].append([_rel(p, out) for p in (smp.image, smp.ma, smp.he)])
    total = sum(weights)
    mean = [sum(w * m[c] for w, m in zip(weights, means, strict=True)) / total for c in range(3)]
    fov = [m["fov_diameter_px"] for _, m in sets.values() if m.get("fov_diameter_px")]
    meta = {
        "generator": "redseg.crossdata.pooled",
        "dataset": POOLED,
        "parts": parts,
        "mean_bgr": mean,
        "mean_source": "the training sets' means weighted by their training images",
        "fov_diameter_px": sorted(fov)[len(fov) // 2] if fov else None,
        "counts": {"train_images": total, "train_samples": len(rows["train"]), "test_images": len(rows["test"])},
        "not_scored": {},
    }
    (out / COMPLETE).unlink(missing_ok=True)
    for split, r in rows.items():
        write_list(list_path(out, split), r, f"{split} samples of the pooled training sets ({', '.join(parts)})")
    write_json(out / "meta.json", meta)
    mark_complete(out, time.strftime("%Y-%m-%dT%H:%M:%S%z") + "\n")
    return out


def _rel(path: Path, base: Path) -> str:
    import os

    return os.path.relpath(Path(path).resolve(), base.resolve())


# --- the table -------------------------------------------------------------------------------------


def _cell(m: dict | None, key: str) -> str:
    if m is None:
        return "-"
    if m.get("not_scored"):
        return "n.s."
    v = m.get(key)
    return "n/a" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.3f}"


def assemble(
    s: Settings, train_keys: Sequence[str], test_keys: Sequence[str], sets: dict, environment: dict, seconds: float
) -> dict:
    """crossdata.json and crossdata.md from what the experiments wrote."""
    exps = experiments(train_keys, test_keys)
    records = load_outcomes(s, exps)
    matrix: dict[str, dict[str, dict | None]] = {}
    for key in train_keys:
        exp = next(e for e in exps if e.name == key)
        row = {}
        for t in test_keys:
            res = read_json_object(s.folder(exp) / test_folder(exp, t) / "eval" / "metrics.json")
            if res is None or not finished(s.folder(exp), exp):
                row[t] = None
                continue
            row[t] = {
                les: {
                    "auc_pr": res[les].get("auc_pr"),
                    "ap": res[les].get("ap"),
                    "not_scored": res[les].get("not_scored"),
                    "n_pos": res[les].get("n_pos"),
                }
                for les in C.LESIONS
            }
            row[t]["scored_against"] = res["meta"].get("gt_kind")
            row[t]["n_images"] = res["meta"].get("n_images")
        matrix[key] = row
    data = {
        key: {
            "folder": str(folder),
            "dataset": meta.get("dataset"),
            "source": meta.get("source"),
            "synthetic": bool(meta.get("synthetic")),
            "counts": meta.get("counts"),
            "mask_rule": meta.get("mask_rule"),
            "mask_binarisation": meta.get("mask_binarisation"),
            "split_rule": meta.get("split_rule"),
            "scale": (meta.get("fov") or {}).get("scale", "factor"),
            "fov_target_px": (meta.get("fov") or {}).get("target_px"),
            "factor": meta.get("factor"),
            "fov_diameter_px": meta.get("fov_diameter_px"),
            "not_scored": meta.get("not_scored", {}),
        }
        for key, (folder, meta) in sets.items()
    }
    result = {
        "train_sets": list(train_keys),
        "test_sets": list(test_keys),
        "matrix": matrix,
        "experiments": records,
        "data": data,
        "schedule": s.schedule.name,
        "schedule_description": s.schedule.description,
        "weights": str(s.weights) if s.weights else "from scratch",
        "synthetic": s.synthetic,
        "environment": environment,
        "seconds": round(seconds, 1),
    }
    write_json(s.run / "crossdata.json", result)
    write_text(s.run / "crossdata.md", render(result))
    return result


def _matrix(r: dict, value: str) -> list[str]:
    """One train x test table of ``value`` (MA / HE), the diagonal bold."""
    tests = r["test_sets"]
    lines = ["| trained on \\ tested on | " + " | ".join(TITLES.get(t, t) for t in tests) + " |"]
    lines.append("|---|" + "---|" * len(tests))
    for key in r["train_sets"]:
        cells = []
        for t in tests:
            m = r["matrix"][key].get(t)
            text = f"{_cell(m and m['MA'], value)} / {_cell(m and m['HE'], value)}"
            cells.append(f"**{text}**" if t == key else text)
        lines.append(f"| {TITLES.get(key, key)} | " + " | ".join(cells) + " |")
    return lines


def render(r: dict) -> str:
    lines = ["# Red-Seg across data sets", ""]
    if r["synthetic"]:
        lines += [
            "**Synthetic data** (tools/make_synthetic.py --layout ...): every set here is a synthetic copy of "
            "the published layout with its own camera; the numbers show that the pipeline runs, not how "
            "Red-Seg does on the real sets.",
            "",
        ]
    lines += [
        f"Rows: the training set (two-stage Red-Seg, {r['schedule_description']}; stage 1 "
        + ("from scratch" if r["weights"] == "from scratch" else f"from {r['weights']}")
        + "). Columns: the test split scored on. Cells: MA / HE AUC_PR (the authors' "
        "protocol: 31 thresholds, pooled counts, trapezoid), **bold** on the diagonal (a model on its own "
        "set's test split); n.s.: not scored (the set has no ground truth for that lesion); -: not run.",
        "",
        *_matrix(r, "auc_pr"),
        "",
        "AP (exact, 256 thresholds), MA / HE:",
        "",
        *_matrix(r, "ap"),
    ]
    lines += ["", "## Data", "", "| set | images (train / val / test) | scale | mask rule | split | labels scored |"]
    lines.append("|---|---|---|---|---|---|")
    for key, d in r["data"].items():
        c = d.get("counts") or {}
        n = f"{c.get('train_images', 0)} / {c.get('val_images', '-')} / {c.get('test_images', 0)}"
        scale = f"FOV {d['fov_target_px']:g} px" if d.get("fov_target_px") else f"factor {d.get('factor')}"
        labels = "as published" if d.get("source") else "prepared"
        if d.get("not_scored"):
            labels += "; not scored: " + ", ".join(d["not_scored"])
        lines.append(
            f"| {TITLES.get(key, key)} | {n} | {scale} | {d.get('mask_binarisation') or '-'} "
            f"| {d.get('split_rule') or '-'} | {labels} |"
        )
    bad = {k: v for k, v in r["experiments"].items() if v.get("status") not in ("done", "skipped")}
    if bad:
        lines += ["", "## Not finished", ""]
        lines += [f"- {k}: {v.get('status')} {v.get('error', '')}".rstrip() for k, v in bad.items()]
    env = r.get("environment") or {}
    lines += ["", f"Machine: {env.get('cpu', 'unknown')}; {r['seconds']:.0f} s in all.", ""]
    return "\n".join(lines)
