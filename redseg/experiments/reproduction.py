"""The reproduction's tables and figures, assembled from what the experiments wrote.

Everything here is read back from the experiment folders (redseg/experiments/reproduce.py): the metrics of
each test (``<experiment>/test/eval/metrics.json``, the authors' protocol, redseg/evaluation/scoring.py),
the training records (``stage<N>_run.json``), the loss logs (``stage<N>_log.csv``,
``stage<N>_test_log.csv``) and the side-output maps (``test/sides/``). So the tables always show
what the runs produced, and a table can be rebuilt without training (``--assemble-only``).

Outputs in the run folder: ``reproduction.json`` (every number), ``reproduction.md`` (the paper's
tables with the paper's numbers beside ours, the figures, what produced them),
``fig6_loss_curves.png`` and ``fig7_side_outputs.png``.
"""

from __future__ import annotations

import csv
import logging
import math
import time
from pathlib import Path

import numpy as np

from redseg import config as C
from redseg.experiments.reproduce import EXPERIMENTS, Settings, load_outcomes, settings_json
from redseg.fileio import read_json_object, write_bytes, write_json, write_text

log = logging.getLogger(__name__)

TABLE2_PAPER = {
    "stage1": C.PAPER_RESULTS["Red-Seg stage 1 only (Table 2)"],
    "two_stage": C.PAPER_RESULTS["Red-Seg two-stage (Table 2)"],
}
TABLE5_PAPER = {"stage1": C.PAPER_TABLE5["conv2-4"], "ma_conv2-5": C.PAPER_TABLE5["conv2-5"]}
TABLE5_PAPER["ma_conv1-4"] = C.PAPER_TABLE5["conv1-4"]
TABLE5_TITLES = {"stage1": "conv2 + conv3 + conv4 (Red-Seg)", "ma_conv2-5": "conv2 + ... + conv5"}
TABLE5_TITLES["ma_conv1-4"] = "conv1 + ... + conv4"
FIG6 = "fig6_loss_curves.png"
FIG7 = "fig7_side_outputs.png"


def lesion_numbers(m: dict) -> dict:
    """The numbers the tables show for one lesion of a metrics.json."""
    be, at5 = m.get("break_even") or {}, m.get("at_0.5") or {}
    return {
        "auc_pr": m.get("auc_pr"),
        "ap": m.get("ap"),
        "precision": be.get("precision"),  # at the break-even point, as the paper's P and R
        "recall": be.get("recall"),
        "break_even_threshold": be.get("threshold"),
        "precision_at_0.5": at5.get("precision"),
        "recall_at_0.5": at5.get("recall"),
    }


def collect(s: Settings, experiments=EXPERIMENTS) -> dict:
    """Every experiment's status, training settings and numbers."""
    records = load_outcomes(s, experiments)
    out = {}
    for exp in experiments:
        folder = s.folder(exp)
        rec = records[exp.name]
        entry = {
            "title": exp.title,
            "tables": list(exp.tables),
            "status": rec.get("status"),
            "error": rec.get("error", ""),
            "seconds": rec.get("seconds"),
            "gpu": rec.get("gpu"),
            "steps": rec.get("steps", []),
        }
        runs = [read_json_object(folder / f"stage{n}_run.json") for n in (1, 2)]
        entry["training"] = [r for r in runs if r]
        if exp.after:  # a two-stage row also rests on its stage 1
            parent = read_json_object(s.run / exp.after / "stage1_run.json")
            if parent:
                entry["training"].insert(0, parent)
        entry["paper_settings"] = bool(entry["training"]) and all(r.get("paper_settings") for r in entry["training"])
        metrics = read_json_object(folder / "test" / "eval" / "metrics.json")
        if metrics and entry["status"] in ("done", "skipped"):
            entry["metrics"] = {les: lesion_numbers(metrics[les]) for les in C.LESIONS if les in metrics}
            entry["metrics_file"] = str(folder / "test" / "eval" / "metrics.json")
        out[exp.name] = entry
    return out


# --- Markdown ------------------------------------------------------------------------------------


def _f(x) -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.4f}"


def _row_label(name: str, entry: dict) -> str:
    mark = "" if entry.get("paper_settings") else " †"
    return f"{entry['title']}{mark}"


def _ours(entry: dict, lesion: str, keys: tuple[str, ...]) -> list[str]:
    if "metrics" not in entry:
        return [entry.get("status") or "not run"] + [""] * (len(keys) - 1)
    m = entry["metrics"].get(lesion, {})
    return [_f(m.get(k)) for k in keys]


def _table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def table2(entries: dict) -> str:
    keys = ("precision", "recall", "auc_pr")
    rows = []
    for name in ("stage1", "stage2_only", "two_stage"):
        if name not in entries:
            continue
        e = entries[name]
        rows.append([_row_label(name, e), "ours", *_ours(e, "MA", keys), *_ours(e, "HE", keys)])
        paper = TABLE2_PAPER.get(name)
        paper_cells = [_f(paper[les][k]) for les in C.LESIONS for k in keys] if paper else ["-"] * 6
        rows.append(["", "paper", *paper_cells])
    header = ["training", "", "MA P", "MA R", "MA AUC_PR", "HE P", "HE R", "HE AUC_PR"]
    return _table(header, rows)


def table5(entries: dict) -> str:
    keys = ("precision", "recall", "auc_pr")
    rows = []
    for name in ("stage1", "ma_conv2-5", "ma_conv1-4"):
        if name not in entries:
            continue
        e = entries[name]
        mark = "" if e.get("paper_settings") else " †"
        rows.append([TABLE5_TITLES[name] + mark, "ours", *_ours(e, "MA", keys)])
        rows.append(["", "paper", *[_f(TABLE5_PAPER[name][k]) for k in keys]])
    return _table(["MA branch fused from", "", "P", "R", "AUC_PR"], rows)


def choices_table(entries: dict) -> str:
    keys = ("auc_pr", "ap", "precision", "recall")
    rows = []
    for name, e in entries.items():
        if "choices" not in e["tables"]:
            continue
        label = "default (`any`, all negatives)" if name == "stage1" else e["title"]
        mark = "" if e.get("paper_settings") else " †"
        rows.append([label + mark, *_ours(e, "MA", keys), *_ours(e, "HE", keys)])
    header = ["stage 1 with", "MA AUC_PR", "MA AP", "MA P", "MA R", "HE AUC_PR", "HE AP", "HE P", "HE R"]
    return _table(header, rows)


def all_numbers_table(entries: dict) -> str:
    keys = ("auc_pr", "ap", "precision", "recall", "precision_at_0.5", "recall_at_0.5")
    rows = [[e["title"], les, *_ours(e, les, keys)] for e in entries.values() for les in C.LESIONS]
    return _table(["experiment", "lesion", "AUC_PR", "AP", "P (BE)", "R (BE)", "P (0.5)", "R (0.5)"], rows)


def experiments_table(entries: dict) -> str:
    rows = []
    for name, e in entries.items():
        tr = e["training"][-1] if e["training"] else {}
        how = (
            "paper"
            if e.get("paper_settings")
            else ", ".join(
                x
                for x in (
                    f"schedule {tr.get('schedule')}" if tr else "",
                    "from scratch" if tr.get("from_scratch") else "",
                    f"overrides {tr.get('overrides')}" if tr.get("overrides") else "",
                )
                if x
            )
        )
        secs = e.get("seconds")
        wall = f"{secs / 60:.1f} min" if isinstance(secs, (int, float)) else "-"
        status = e["status"] + (f": {e['error']}" if e.get("error") else "")
        rows.append(
            [f"`{name}`", status.replace("|", "/"), how or "-", wall, "-" if e["gpu"] is None else str(e["gpu"])]
        )
    return _table(["experiment", "status", "settings", "wall time", "GPU"], rows)


def _figure(result: dict, key: str, fname: str, title: str) -> str:
    if result["figures"].get(key):
        return f"![{title}]({fname})"
    return f"(not drawn: {result['notes'].get(key, '')})"


def _collapsed_note(entries: dict) -> list[str]:
    """A map with no lesion above any threshold (AP about the lesion share) still gets AUC_PR of
    about 0.5 from the protocol, whose curve starts at (R = 0, P = 1): say so where it happens."""
    rows = [
        f"{e['title']} ({les})"
        for e in entries.values()
        for les, m in e.get("metrics", {}).items()
        if m.get("ap") is not None and m["ap"] < 0.05 and (m.get("auc_pr") or 0) > 0.4
    ]
    if not rows:
        return []
    return [
        f"Collapsed maps: {', '.join(rows)}. These maps mark (almost) no pixel as lesion at any",
        "threshold: AP is about the lesion share, P at break-even about the same with R = 1. Their",
        "AUC_PR of about 0.5 comes from the protocol's curve, which starts at (R = 0, P = 1) and so",
        "gets (1 + P) / 2 from a single point (docs/evaluation.md); it is no sign of skill.",
        "",
    ]


def render(result: dict) -> str:
    st, env, entries = result["settings"], result["environment"], result["experiments"]
    synthetic = st["synthetic"]
    out = ["# Red-Seg: the paper's tables and figures, reproduced", ""]
    if synthetic:
        out += [
            "> **These numbers come from synthetic fundus photographs** (the project's generator,",
            f"> redseg/data/synthetic.py), trained from scratch with the `{st['schedule']}` schedule, because IDRiD",
            "> and the ImageNet weights cannot be shipped. They show the pipeline and the experiments working;",
            "> they are not comparable with the paper's numbers beside them. Run `make reproduce",
            "> IDRID=/path/to/IDRiD` for the real reproduction.",
            "",
        ]
    out += [
        "## What produced them",
        "",
        f"- data: {'synthetic set' if synthetic else 'IDRiD'} at `{st['gt']}`; prepared sets "
        + ", ".join(f"`{k}`: `{v}`" for k, v in st["data"].items()),
        f"- schedule: `{st['schedule']}`: {st['schedule_description']}",
        f"- initial weights: {st['weights'] or 'none (from scratch; not the paper)'}",
        f"- machine: {env.get('cpu')}, {env.get('usable_cpus')} usable CPUs"
        + (f", GPUs {env['gpus']}" if env.get("gpus") else ", CPU only"),
        f"- Caffe build: `{env.get('caffe')}`; {env.get('blas')}",
        f"- wall time of this invocation: {result['wall_seconds'] / 60:.1f} min; per experiment below",
        f"- written {result['written']}",
        "",
        "P and R are taken at the break-even point of the protocol's curve (P = R; the paper's",
        "P and R, docs/method.md#p-and-r-at-break-even); AUC_PR is the authors' 31-threshold",
        "protocol, AP the exact 256-threshold area (docs/evaluation.md).",
        "† not at the paper's settings (see the experiments table).",
        "",
        "## Table 2: the training stages",
        "",
        table2(entries),
        "",
        "The paper reports no numbers for the stage-2 loss alone. Ours trains FN + FP from the initial",
        "weights with stage 1's schedule (docs/method.md#stage-2-only-ablation).",
        "",
        "## Table 5: fusion variants of the MA branch (stage 1 only)",
        "",
        table5(entries),
        "",
        "## The open choices (the paper is silent; stage 1, same schedule)",
        "",
        choices_table(entries),
        "",
        "Mask rules: docs/method.md#mask-downsampling; negatives: docs/method.md#counting-negatives.",
        "",
        "## Figure 6: loss on the training and the test set",
        "",
        _figure(result, "fig6", FIG6, "Figure 6"),
        "",
        "Training loss: every iteration (faint) and its running mean; test loss: the train net's",
        "losses averaged over the test images every `test_interval` iterations. The loss changes",
        "from Top-k CE to FN + FP at the dashed line, so its scale changes there.",
        "",
        "## Figure 7: side outputs and fused output",
        "",
        _figure(result, "fig7", FIG7, "Figure 7"),
        "",
        "## All numbers",
        "",
        all_numbers_table(entries),
        "",
        *_collapsed_note(entries),
        "## Experiments",
        "",
        experiments_table(entries),
        "",
        "Each experiment's folder holds its commands and logs (`train.log`, `test.log`), the",
        "training records (`stage<N>_run.json`), the loss logs and `test/eval/metrics.json`.",
        "",
    ]
    return "\n".join(out)


# --- figures -------------------------------------------------------------------------------------


def _read_log(path: Path) -> dict[str, np.ndarray] | None:
    if not path.is_file():
        return None
    with path.open(newline="") as f:
        rows = [r for r in csv.DictReader(f) if r.get("iter", "").isdigit()]
    if not rows:
        return None
    return {k: np.array([float(r[k]) for r in rows]) for k in ("iter", "loss_ma", "loss_he")}


def _running_mean(v: np.ndarray, n: int) -> np.ndarray:
    n = max(1, min(n, v.size))
    c = np.cumsum(np.insert(v, 0, 0.0))
    out = np.empty_like(v)
    out[n - 1 :] = (c[n:] - c[:-n]) / n
    out[: n - 1] = c[1:n] / np.arange(1, n)
    return out


def figure6(s: Settings) -> bytes | None:
    """Loss curves of both stages (stage 1 of ``stage1``, stage 2 of ``two_stage``), per branch."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    parts = [
        (s.run / "stage1" / "stage1_log.csv", s.run / "stage1" / "stage1_test_log.csv", 0),
        (s.run / "two_stage" / "stage2_log.csv", s.run / "two_stage" / "stage2_test_log.csv", None),
    ]
    train1 = _read_log(parts[0][0])
    if train1 is None:
        return None
    offset2 = s.schedule.stage1.max_iter
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for ax, les in zip(axes, ("ma", "he"), strict=True):
        for i, (train_csv, test_csv, offset) in enumerate(parts):
            off = offset2 if offset is None else offset
            tr, te = _read_log(train_csv), _read_log(test_csv)
            label = f"stage {i + 1}"
            if tr is not None:
                raw = tr[f"loss_{les}"]
                # An image without a lesion of this kind has zero Top-k loss (beta = 1): off a log axis.
                ax.plot(tr["iter"] + off, np.where(raw > 0, raw, np.nan), color=f"C{i}", alpha=0.2, lw=0.6)
                window = max(1, tr["iter"].size // 40)
                mean = _running_mean(raw, window)
                what = f"running mean of {window}" if window > 1 else "every iteration"
                ax.plot(tr["iter"] + off, np.where(mean > 0, mean, np.nan), color=f"C{i}", lw=1.5,
                        label=f"{label} training ({what})")  # fmt: skip
            if te is not None:
                ax.plot(te["iter"] + off, te[f"loss_{les}"], "o--", color=f"C{i + 2}", ms=4, lw=1,
                        label=f"{label} test")  # fmt: skip
        ax.axvline(offset2, color="grey", ls=":", lw=1)
        ax.set_yscale("log")
        ax.set_xlabel("iteration (stage 2 continues after stage 1)")
        ax.set_ylabel("loss (sum over pixels; 4 losses of the branch)")
        ax.set_title(f"{les.upper()} branch")
        ax.legend(fontsize=8)
    fig.tight_layout()
    return _png(fig)


def figure7(s: Settings, n_images: int = 3) -> bytes | None:
    """Per test image: the photograph, then for each branch its label, side outputs and fused map."""
    import cv2
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from redseg.data.prepared_set import list_path, read_image, read_list, read_mask

    for name in ("two_stage", "stage1"):
        sides = s.run / name / "test" / "sides"
        if sides.is_dir() and any(sides.glob("*_fuse.png")):
            break
    else:
        return None
    samples = [t for t in read_list(list_path(s.data["any"], "test")) if (sides / f"{t.name}_ma_fuse.png").is_file()]
    samples = samples[:n_images]
    keys = {
        les: sorted(
            {p.name[len(samples[0].name) + 1 : -4] for p in sides.glob(f"{samples[0].name}_{les}_*.png")},
            key=lambda k: (k.endswith("fuse"), k),
        )
        for les in ("ma", "he")
    }
    cols = 1 + sum(1 + len(v) for v in keys.values())
    fig, axes = plt.subplots(len(samples), cols, figsize=(1.9 * cols, 1.5 * len(samples) + 0.6), squeeze=False)
    for r, t in enumerate(samples):
        panels = [("photograph", cv2.cvtColor(read_image(t.image), cv2.COLOR_BGR2RGB), None)]
        for les in ("ma", "he"):
            panels.append((f"{les.upper()} label", read_mask(t.masks[les.upper()]).astype(np.float32), "gray"))
            for k in keys[les]:
                img = cv2.imread(str(sides / f"{t.name}_{k}.png"), cv2.IMREAD_UNCHANGED)
                title = k.replace("_", " ").replace("ma ", "MA ").replace("he ", "HE ")
                panels.append((title, img.astype(np.float32) / 255.0, "magma"))
        for ax, (title, img, cmap) in zip(axes[r], panels, strict=True):
            ax.imshow(img, cmap=cmap, vmin=0, vmax=1) if cmap else ax.imshow(img)
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(title, fontsize=8)
        axes[r][0].set_ylabel(t.name, fontsize=8)
    fig.suptitle(f"Side outputs and fused output ({name}), probability 0 (black) to 1 (yellow)", fontsize=9)
    fig.tight_layout()
    return _png(fig)


def _png(fig) -> bytes:
    import io

    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    return buf.getvalue()


# --- the whole ----------------------------------------------------------------------------------


def assemble(s: Settings, environment: dict, wall_seconds: float, experiments=EXPERIMENTS) -> dict:
    """Write reproduction.json, reproduction.md and both figures; returns the JSON's content."""
    figures, notes = {}, {}
    for key, fname, draw in (("fig6", FIG6, figure6), ("fig7", FIG7, figure7)):
        try:
            png = draw(s)
        except Exception as e:  # a figure must not cost the tables
            log.warning("%s not drawn: %s", fname, e)
            png, notes[key] = None, f"{type(e).__name__}: {e}"
        if png is None:
            notes.setdefault(key, "its experiment has not produced the inputs")
        else:
            write_bytes(s.run / fname, png)
            figures[key] = str(s.run / fname)
    result = {
        "settings": settings_json(s),
        "environment": environment,
        "wall_seconds": wall_seconds,
        "written": time.strftime("%Y-%m-%d %H:%M:%S"),
        "experiments": collect(s, experiments),
        "paper": {"table2": TABLE2_PAPER, "table5": TABLE5_PAPER},
        "figures": figures,
        "notes": notes,
    }
    write_json(s.run / "reproduction.json", result)
    write_text(s.run / "reproduction.md", render(result))
    return result
