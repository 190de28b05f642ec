"""A trained Red-Seg as a package that others can check and use (docs/model_package.md).

A package is one folder (``models/<name>/``)::

    readme.md               Caffe Model Zoo front matter (name, caffemodel, caffemodel_url, license,
                            sha1, caffe_commit, redseg_commit), then the model card
    metadata.json           the same facts for tools (format_version, preprocessing, outputs,
                            metrics, training, provenance, licences, every file's sha256)
    SHA256SUMS              sha256 of every other file, ``sha256sum -c`` format (metadata.json too)
    deploy.prototxt         the deploy net
    model.caffemodel        the weights
    model.caffemodel.json   their sidecar (redseg.deploy.model_info): mean, FOV diameter, thresholds
    model.onnx              ONNX export, any input size (ONNX Runtime), checked against pycaffe
    model_<H>x<W>.onnx      fixed-size ONNX export (OpenCV DNN, ONNX Runtime), checked against pycaffe
    eval/<test set>/        metrics.json and pr_curves.png of each evaluation

:func:`build_package` writes one (built in a work folder, renamed into place at the end);
:func:`open_package` checks every file's digest before anything uses it and raises
:class:`PackageError` naming each changed, truncated or missing file; :func:`fetch_package` gets one
from a folder, a ``.tar.gz``/``.zip`` archive or a URL (``file://``, ``http(s)://``) and checks it
before it takes its final name. The layout takes the Caffe Model Zoo's readme front matter (read by
Caffe's ``scripts/download_model_binary.py``, which checks the weights' sha1), the facts a MONAI
bundle's ``configs/metadata.json`` records (task, intended use, each input's and output's format,
value range and channel meaning, metrics, references) and a model card's (licence, data,
limitations), written here in this project's own terms.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import logging
import os
import platform
import re
import shutil
import subprocess
import tarfile
import tempfile
import urllib.parse
import urllib.request
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from redseg import config as C
from redseg.deploy.model_info import BREAK_EVEN_RULE, ModelInfo, ModelInfoError, break_even_thresholds
from redseg.fileio import building_dir, file_digest, write_json, write_text

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
README, METADATA, SUMS = "readme.md", "metadata.json", "SHA256SUMS"
DEPLOY, WEIGHTS, ONNX = "deploy.prototxt", "model.caffemodel", "model.onnx"
SIDECAR = WEIGHTS + ".json"
BACKENDS = ("auto", "caffe", "onnx")
LESION_NAMES = {"MA": "microaneurysm", "HE": "haemorrhage"}
REPO = Path(__file__).resolve().parents[2]
DISCLAIMER = (
    "This model is a research tool, not a diagnosis: its maps and counts are not a medical finding "
    "and must not be used to decide the care of a patient."
)
IDRID_TERMS = {
    "data": "IDRiD (Indian Diabetic Retinopathy Image Dataset), segmentation part",
    "license": "CC-BY-4.0",
    "attribution": "P. Porwal et al., Indian Diabetic Retinopathy Image Dataset (IDRiD), IEEE Dataport, 2018, "
    "doi:10.21227/H25W98; P. Porwal et al., Data 3(3):25, 2018",
}
SYNTHETIC_TERMS = {
    "data": "synthetic fundus photographs made by this project's generator (redseg/data/synthetic.py)",
    "license": "none needed: generated, no third-party images",
    "attribution": None,
}
VGG16_TERMS = "ImageNet VGG16 (K. Simonyan, A. Zisserman, ICLR 2015), Creative Commons Attribution (docs/weights.md)"
CODE_LICENSES = {
    "redseg": "not stated: the project's repository has no licence file",
    "caffe": "BSD-2-Clause (BVLC Caffe)",
}
PAPER = (
    "Red-Seg: multi-task segmentation of red lesions (microaneurysms, haemorrhages) in fundus photographs "
    "with a two-stage loss (Top-k cross-entropy, then FN+FP); this project reproduces it in BVLC Caffe"
)


class PackageError(ValueError):
    """A model package cannot be built, fetched or used; the message names the files concerned."""


# --- small helpers --------------------------------------------------------------------------------


def digests(path: str | os.PathLike) -> tuple[str, str, int]:
    """(sha256, sha1, size in bytes) of a file, read once in 1 MiB chunks."""
    h256, h1 = hashlib.sha256(), hashlib.sha1()  # noqa: S324 - sha1: the Model Zoo's check, not security
    n = 0
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h256.update(chunk)
            h1.update(chunk)
            n += len(chunk)
    return h256.hexdigest(), h1.hexdigest(), n


def _read_json(path: Path, what: str) -> dict:
    try:
        d = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise PackageError(f"cannot read {what} {path}: {e}") from e
    if not isinstance(d, dict):
        raise PackageError(f"{what} {path} holds no JSON object")
    return d


def _read_json_or_none(path: Path) -> dict | None:
    try:
        d = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None
    return d if isinstance(d, dict) else None


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("._") or "test"


def _finite(x) -> float | None:
    try:
        v = float(x)
    except (TypeError, ValueError):
        return None
    return v if v == v and abs(v) != float("inf") else None


# --- provenance -----------------------------------------------------------------------------------


def project_commit(repo: Path = REPO) -> dict:
    """The project's git commit (``HEAD``) and whether tracked files differ from it; without a git
    checkout (the Docker image holds no .git) the commit the image was built from, which its build
    records in ``REDSEG_COMMIT``; None values when neither is there."""
    out: dict = {"commit": os.environ.get("REDSEG_COMMIT") or None, "dirty": None}
    if not (repo / ".git").exists():
        return out
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True, text=True, timeout=30)
        if head.returncode == 0:
            out["commit"] = head.stdout.strip()
            st = subprocess.run(
                ["git", "status", "--porcelain", "--untracked-files=no"],
                cwd=repo,
                capture_output=True,
                text=True,
                timeout=60,
            )
            out["dirty"] = bool(st.stdout.strip()) if st.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        pass
    return out


def caffe_build(caffe_file: str | None = None) -> dict:
    """Which Caffe the weights were checked with: the build cache folder that tools/setup.sh names
    ``caffe-<source>-p<patch set>-<variant>-py<version>`` (as make reproduce reports it), its source,
    Caffe commit and patch-set id, and the patch set of this checkout."""
    from redseg.toolchain.caffe_source import UPSTREAM_COMMIT, patchset_id

    if caffe_file is None:
        from redseg.toolchain.caffe_utils import import_caffe

        caffe_file = import_caffe().__file__
    path = Path(caffe_file).resolve()
    build = path.parents[3].name if len(path.parents) > 3 else None
    out = {
        "build": build,
        "source": None,
        "caffe_commit": None,
        "patch_set": None,
        "patch_set_of_this_checkout": patchset_id(),
    }
    m = re.match(r"^caffe-(?P<src>.+)-p(?P<p>[0-9a-f]{8})-(?P<var>[^-]+)-py(?P<py>[0-9.]+)$", build or "")
    if m is None:
        out["source"] = f"a Caffe outside the project's build cache ({path.parent})"
        return out
    src = m.group("src")
    out["source"], out["patch_set"], out["variant"] = src, m.group("p"), m.group("var")
    if src.startswith("bvlc-"):
        out["caffe_commit"] = UPSTREAM_COMMIT
    else:
        git = re.search(r"git\d{8}\.([0-9a-f]{7,40})", src)  # Debian's 1.0.0+git20180821.99bd997-8
        out["caffe_commit"] = git.group(1) if git else None
    return out


def blas_facts() -> dict:
    """The OpenBLAS kernels Caffe runs here (redseg.toolchain.blas): one line, the core, the version."""
    from redseg.toolchain import blas

    try:
        st = blas.describe()
    except Exception as e:  # provenance only: never a reason to fail packaging
        log.warning("BLAS not described: %s", e)
        return {"summary": None, "core": None, "version": None}
    return {
        "summary": st.get("summary"),
        "core": st.get("running_core") or st.get("core"),
        "version": st.get("version"),
    }


# --- what the run holds ---------------------------------------------------------------------------


def dataset_of(path: str | os.PathLike | None) -> dict:
    """What data a path holds: a prepared set (its meta.json's ``source``) or an IDRiD-layout tree;
    synthetic when the tree carries the generator's marker (redseg.data.synthetic.MARKER)."""
    from redseg.data.synthetic import MARKER

    if path is None:
        return {"name": "unknown", "synthetic": None, "path": None, "terms": None}
    p = Path(path)
    tree = p
    meta = _read_json_or_none(p / "meta.json") if p.is_dir() else None
    if meta is None and p.is_file() and p.suffix == ".txt":
        meta = _read_json_or_none(p.parent / "meta.json")
    if meta is not None and meta.get("source"):
        tree = Path(meta["source"])
    candidates = [tree, tree.parent, p, p.parent]
    synthetic = any((c / MARKER).is_file() for c in candidates)
    if synthetic:
        return {"name": "synthetic", "synthetic": True, "path": str(p), "terms": SYNTHETIC_TERMS}
    looks_idrid = "idrid" in str(tree).lower() or (tree / C.IDRID_SEG_DIR).is_dir() or tree.name == C.IDRID_SEG_DIR
    if looks_idrid:
        return {"name": "IDRiD", "synthetic": False, "path": str(p), "terms": IDRID_TERMS}
    return {"name": "unknown", "synthetic": None, "path": str(p), "terms": None}


def stage_records(run: Path | None) -> list[dict]:
    """The run's stage<N>_run.json records (redseg.training.train), in stage order."""
    if run is None:
        return []
    out = []
    for n in (1, 2):
        rec = _read_json_or_none(run / f"stage{n}_run.json")
        if rec is not None:
            out.append(rec)
    return out


def default_weights(run: Path) -> Path:
    for name in ("stage2_final.caffemodel", "stage1_final.caffemodel"):
        if (run / name).is_file():
            return run / name
    raise PackageError(f"{run} holds neither stage2_final.caffemodel nor stage1_final.caffemodel; pass --weights")


def find_evals(run: Path | None, weights: Path, info: ModelInfo | None) -> list[Path]:
    """The evaluation folders of a run when none is given: the sidecar's (where its thresholds come
    from), else ``<run>/test/eval`` (make evaluate, make demo), else ``<weights folder>/test_<stem>/eval``
    (tools/test_net.py's default)."""
    candidates = []
    if info is not None and info.source:
        candidates.append(Path(info.source).parent)
    if run is not None:
        candidates.append(run / "test" / "eval")
    candidates.append(weights.parent / f"test_{weights.stem}" / "eval")
    for c in candidates:
        if (c / "metrics.json").is_file():
            return [c]
    return []


def eval_dir(path: Path) -> Path:
    """An evaluation folder (metrics.json inside) from it or from a tools/test_net.py output folder."""
    for c in (path, path / "eval"):
        if (c / "metrics.json").is_file():
            return c
    raise PackageError(f"--eval {path}: no metrics.json in it or in {path / 'eval'} (tools/test_net.py writes one)")


def _lesion_scores(m: dict) -> dict:
    be = m.get("break_even") or {}
    return {
        "auc_pr": _finite(m.get("auc_pr")),
        "ap": _finite(m.get("ap")),
        "break_even": {k: _finite(be.get(k)) for k in ("threshold", "precision", "recall", "f1", "iou")},
        "n_pos": m.get("n_pos"),
        "n_neg": m.get("n_neg"),
    }


def read_evaluation(d: Path, name: str | None = None) -> dict:
    """One test set's scores from an evaluation folder, with the data set and split it was scored on."""
    metrics = _read_json(d / "metrics.json", "evaluation")
    meta = metrics.get("meta") or {}
    ds = dataset_of(meta.get("gt"))
    label = name or (f"{ds['name']}_test" if ds["name"] != "unknown" else _slug(d.parent.name))
    return {
        "name": _slug(label),
        "data": ds["name"],
        "synthetic": ds["synthetic"],
        "split": "test",
        "n_images": meta.get("n_images"),
        "ground_truth": meta.get("gt_kind"),
        "scored_at": meta.get("scored_at"),
        "protocol": "AUC_PR: the authors' 31-threshold protocol; AP: exact step-wise average precision over "
        "the 256 8-bit thresholds; P, R at the break-even point (docs/evaluation.md)",
        "lesions": {les: _lesion_scores(metrics.get(les) or {}) for les in C.LESIONS},
        "_dir": d,
        "_metrics": metrics,
    }


# --- building --------------------------------------------------------------------------------------


@dataclass
class BuildOptions:
    """What tools/package_model.py passes to :func:`build_package`."""

    out: Path
    run: Path | None = None
    weights: Path | None = None
    deploy: Path | None = None
    evals: Sequence[str] = ()  # "DIR" or "NAME=DIR"
    name: str | None = None
    input_size: tuple[int, int] | None = None  # the fixed-size ONNX export; None: the training size
    fixed_onnx: bool = True
    license: str = "CC-BY-4.0"
    url: str | None = None
    version: str = "1"
    description: str | None = None
    force: bool = False
    verify: bool = True


def _parse_eval(spec: str) -> tuple[str | None, Path]:
    if "=" in spec and not Path(spec).exists():
        name, path = spec.split("=", 1)
        return name.strip() or None, Path(path)
    return None, Path(spec)


def _mean_and_fov(info: ModelInfo | None, records: list[dict]) -> tuple[list[float], float | None, str]:
    """The input mean and training FOV diameter: the sidecar's, else the training set's meta.json."""
    if info is not None:
        return [float(v) for v in info.mean_bgr], info.fov_diameter_px, "the weights' sidecar"
    data = next((r.get("data") for r in reversed(records) if r.get("data")), None)
    if data and Path(data, "meta.json").is_file():
        from redseg.data.prepared_set import fov_diameter, mean_bgr

        return [float(v) for v in mean_bgr(data)], fov_diameter(data), f"the training set {data}"
    raise PackageError(
        "no input mean: the weights have no sidecar <weights>.json (run tools/test_net.py) and the run records "
        "no training set with a meta.json"
    )


def _training_size(records: list[dict]) -> tuple[int, int] | None:
    """(H, W) of the training images (the prepared set's meta.json ``size``: [W, H]), if one size."""
    for r in reversed(records):
        meta = _read_json_or_none(Path(r.get("data") or "", "meta.json")) if r.get("data") else None
        size = (meta or {}).get("size")
        if isinstance(size, list) and len(size) == 2:
            return int(size[1]), int(size[0])
    return None


def _training_section(records: list[dict]) -> dict:
    from redseg.data.prepared_set import read_meta

    data = next((r.get("data") for r in reversed(records) if r.get("data")), None)
    ds = dataset_of(data)
    meta = None
    if data:
        try:
            meta = read_meta(data)
        except Exception:  # an absent or unfinished set: record what the run says
            meta = None
    first = records[0] if records else {}
    init = None
    if records:
        if first.get("from_scratch"):
            init = "none: trained from scratch (not the paper's ImageNet start)"
        elif first.get("weights"):
            init = f"{first['weights']}: {VGG16_TERMS}"
    schedule = sorted({r.get("schedule") for r in records if r.get("schedule")})
    return {
        "data": {
            "name": ds["name"],
            "synthetic": ds["synthetic"],
            "prepared_set": data,
            "source": (meta or {}).get("source"),
            "counts": (meta or {}).get("counts"),
            "size_wh": (meta or {}).get("size"),
            "mask_rule": (meta or {}).get("mask_rule"),
            "augmentations": (meta or {}).get("augmentations"),
            "terms": ds["terms"],
        },
        "schedule": schedule[0] if len(schedule) == 1 else schedule or None,
        "stages": records,
        "overrides": {f"stage{r.get('stage')}": r.get("overrides") or {} for r in records},
        "paper_settings": all(r.get("paper_settings") for r in records) if records else None,
        "initial_weights": init,
        "seed": {
            "data_layer_shuffle_seed": 1,
            "note": "python_layers/data_layer.py shuffles the training samples with seed 1 (its default); "
            "Caffe's weight fillers and GPU kernels are not seeded, so a rerun is close, not bit-identical",
        },
    }


def _front_matter(fm: dict) -> str:
    """YAML front matter: one ``key: value`` line each, strings JSON-quoted (valid YAML scalars)."""
    lines = ["---"]
    for k, v in fm.items():
        lines.append(f"{k}: {'null' if v is None else json.dumps(v)}")
    lines.append("---")
    return "\n".join(lines)


def _f(x, digits: int = 3) -> str:
    return "n/a" if x is None else f"{x:.{digits}f}"


def render_readme(meta: dict, front: dict) -> str:
    """The model card: the zoo's front matter, then what the model is, does and is not."""
    pre, out, tr, prov = meta["preprocessing"], meta["outputs"], meta["training"], meta["provenance"]
    synthetic = tr["data"]["synthetic"]
    lines = [_front_matter(front), "", f"# {meta['name']}", ""]
    if synthetic:
        lines += [
            "> **Trained on synthetic fundus photographs** (this project's generator), to show the pipeline",
            "> working. It has never seen a real photograph: its maps of real photographs mean nothing.",
            "",
        ]
    lines += [
        f"**{DISCLAIMER}**",
        "",
        "## What it does",
        "",
        f"{meta['description']}",
        "",
        "Input: one colour fundus photograph, BGR channel order (as OpenCV reads it), 0-255, minus the",
        f"per-channel training mean B, G, R = {', '.join(f'{v:.3f}' for v in pre['mean_bgr'])}, as a float32",
        "1x3xHxW blob. Rescale the photograph first so that its circular field of view is"
        + (f" {pre['fov_diameter_px']:.1f} px" if pre["fov_diameter_px"] else " as wide as the training images'")
        + " across",
        "(the training images' FOV diameter; `tools/segment.py` does this). Outputs, at the input's size:",
        "",
        "| output | meaning | range | threshold |",
        "|---|---|---|---|",
    ]
    for name, o in out.items():
        lines.append(f"| `{name}` | {o['meaning']} | 0-1 | {_f(o['threshold'], 4)} |")
    lines += [
        "",
        f"Thresholds: {meta['thresholds']['rule'] or 'none recorded (0.5 is used)'}"
        + (f" ({meta['thresholds']['source']})" if meta["thresholds"].get("source") else "")
        + ".",
        "",
        "## Files",
        "",
        "| file | what | sha256 |",
        "|---|---|---|",
    ]
    for fname, f in meta["files"].items():
        lines.append(f"| `{fname}` | {f['role']} | `{f['sha256'][:16]}...` |")
    lines += [
        "",
        "Every digest is in `SHA256SUMS` (`sha256sum -c SHA256SUMS`); the project's tools check them all",
        "before using the model (`tools/segment.py --model`, `tools/test_net.py --model`, `tools/fetch_model.py`).",
        "",
        "## Training",
        "",
        f"- data: {tr['data']['name']}" + (f" ({tr['data']['terms']['data']})" if tr["data"]["terms"] else ""),
    ]
    counts = tr["data"].get("counts") or {}
    if counts:
        lines.append(
            f"- images: {counts.get('train_images')} training photographs ({counts.get('train_samples')} samples with "
            f"the rotations and mirrorings), {counts.get('test_images')} test photographs"
        )
    if tr["data"].get("size_wh"):
        w, h = tr["data"]["size_wh"]
        lines.append(f"- training size: {w}x{h} px (W x H)")
    lines.append(f"- initial weights: {tr['initial_weights'] or 'not recorded'}")
    lines.append(f"- schedule: `{tr['schedule']}`" + ("" if tr["paper_settings"] else " (not the paper's settings)"))
    for r in tr["stages"]:
        ov = r.get("overrides") or {}
        lines.append(
            f"- stage {r.get('stage')}: lr {r.get('base_lr')}, {r.get('max_iter')} iterations"
            + (f", overrides {json.dumps(ov)}" if ov else "")
        )
    if not tr["stages"]:
        lines.append("- stages: not recorded (no stage<N>_run.json beside the weights)")
    lines += ["", "## Scores", ""]
    if not meta["metrics"]:
        lines += ["Not scored: no evaluation was packaged.", ""]
    for ev in meta["metrics"]:
        lines += [
            f"### {ev['name']}: {ev['data']}, {ev['split']} split, {ev['n_images']} images",
            "",
            "| lesion | AUC_PR (protocol) | AP | P at break-even | R at break-even | threshold |",
            "|---|---|---|---|---|---|",
        ]
        for les, s in ev["lesions"].items():
            be = s["break_even"]
            lines.append(
                f"| {les} | {_f(s['auc_pr'])} | {_f(s['ap'])} | {_f(be['precision'])} | {_f(be['recall'])} "
                f"| {_f(be['threshold'], 4)} |"
            )
        lines += [""]
        if ev.get("pr_curves"):
            lines += [f"![precision-recall curves, {ev['name']}]({ev['pr_curves']})", ""]
        if ev["synthetic"]:
            lines += ["Synthetic test images: these numbers show the pipeline, not skill on real photographs.", ""]
    lines += [f"{meta['metrics_protocol']}", "", "## Limitations", ""]
    lines += [f"- {x}" for x in meta["limitations"]]
    lines += [
        "",
        "## Provenance",
        "",
        f"- project commit: `{prov['project']['commit']}`"
        + (" (with uncommitted changes)" if prov["project"]["dirty"] else ""),
        f"- Caffe: build `{prov['caffe']['build']}`, commit `{prov['caffe']['caffe_commit']}`, "
        f"patch set `{prov['caffe']['patch_set']}`",
        f"- {prov['blas']['summary']}" if prov["blas"].get("summary") else "- BLAS: not recorded",
        f"- ONNX: opset {prov['onnx_opset']}, checked against pycaffe to {prov['onnx_tolerance']:g} before writing",
        f"- packaged {prov['packaged_at']} by `tools/package_model.py`",
        "",
        "## Licences",
        "",
        f"- weights: {meta['licenses']['weights']}",
        f"- code: redseg {meta['licenses']['code']['redseg']}; Caffe {meta['licenses']['code']['caffe']}",
    ]
    for t in meta["licenses"]["data"]:
        lines.append(
            f"- training data: {t['data']}: {t['license']}"
            + (f"; cite {t['attribution']}" if t.get("attribution") else "")
        )
    if tr["initial_weights"] and not tr["initial_weights"].startswith("none"):
        lines.append(f"- initial weights: {VGG16_TERMS}")
    lines += ["", "## Reference", "", PAPER + ".", ""]
    return "\n".join(lines)


def build_package(opts: BuildOptions) -> Path:
    """Write the package folder ``opts.out`` (see the module docstring); returns it.

    Built in ``<out>.partial-<pid>`` and renamed into place when finished; an existing ``out`` is
    refused unless ``opts.force``. The ONNX exports are checked against pycaffe before they are
    written (redseg.deploy.onnx_export.export), the fixed-size one in OpenCV DNN too.
    """
    from redseg.deploy.model_info import read_model_info
    from redseg.deploy.onnx_export import OPSET, export, fusion_stages
    from redseg.toolchain.caffe_utils import REPO as CAFFE_REPO
    from redseg.toolchain.caffe_utils import read_net_param

    out = Path(opts.out)
    if out.exists() and not opts.force:
        raise FileExistsError(f"{out} exists; remove it or pass --force to replace it")
    run = Path(opts.run) if opts.run is not None else None
    if run is not None and not run.is_dir():
        raise PackageError(f"run folder {run} does not exist")
    if opts.weights is not None:
        weights = Path(opts.weights)
    elif run is not None:
        weights = default_weights(run)
    else:
        raise PackageError("give --run or --weights")
    if not weights.is_file():
        raise PackageError(f"weights file not found: {weights}")
    run = run if run is not None else weights.parent
    deploy = Path(opts.deploy) if opts.deploy is not None else CAFFE_REPO / "prototxt" / DEPLOY
    if not deploy.is_file():
        raise PackageError(f"deploy net not found: {deploy}")
    try:
        info = read_model_info(weights)
    except ModelInfoError as e:
        raise PackageError(str(e)) from e
    records = stage_records(run)
    stage = next((int(m.group(1)) for m in [re.match(r"stage(\d)_final", weights.stem)] if m), None)
    if stage is not None:
        records = [r for r in records if int(r.get("stage", 0)) <= stage]
    mean, fov, pre_source = _mean_and_fov(info, records)
    if opts.evals:
        evals = [read_evaluation(eval_dir(p), n) for n, p in map(_parse_eval, opts.evals)]
    else:
        evals = [read_evaluation(d) for d in find_evals(run, weights, info)]
        if not evals:
            log.warning("no evaluation found for %s (no --eval, no %s/test/eval): the card has no scores", weights, run)
    seen: set[str] = set()
    for ev in evals:  # unique folder names
        base, i = ev["name"], 1
        while ev["name"] in seen:
            i += 1
            ev["name"] = f"{base}_{i}"
        seen.add(ev["name"])
    thresholds = dict(info.thresholds) if info is not None else {}
    thr_rule = info.threshold_rule if info is not None else ""
    thr_source = "the weights' sidecar" if info is not None and info.thresholds else None
    if not thresholds and evals:
        thresholds = break_even_thresholds(evals[0]["_metrics"])
        thr_rule, thr_source = BREAK_EVEN_RULE, f"eval/{evals[0]['name']}/metrics.json"
    elif info is not None and info.source:
        for ev in evals:
            if Path(info.source).resolve() == (ev["_dir"] / "metrics.json").resolve():
                thr_source = f"break-even on eval/{ev['name']}/metrics.json"
    input_size = opts.input_size
    if opts.fixed_onnx and input_size is None:
        input_size = _training_size(records)
        if input_size is None:
            log.warning("the training image size is unknown (no prepared set's meta.json): no fixed-size ONNX export")
    if not opts.fixed_onnx:
        input_size = None
    training = _training_section(records)
    name = opts.name or out.name
    synthetic = training["data"]["synthetic"]
    description = opts.description or (
        "Red-Seg segments microaneurysms (MA) and haemorrhages (HE), the red lesions of diabetic retinopathy, in a "
        "colour fundus photograph: one forward pass of a VGG16-based net with one fused side-output branch per "
        "lesion gives a probability map per lesion at the input's size."
        + (" This copy was trained on synthetic photographs." if synthetic else "")
    )
    net_param = read_net_param(deploy)
    with building_dir(out) as work:
        shutil.copyfile(deploy, work / DEPLOY)
        shutil.copyfile(weights, work / WEIGHTS)
        sidecar = ModelInfo(mean, fov, thresholds, thr_rule, thr_source)
        write_json(work / SIDECAR, sidecar.as_dict())
        verify = (67, 93) if opts.verify else None
        export(work / WEIGHTS, work / ONNX, deploy=work / DEPLOY, mean_bgr=mean, verify_size=verify)
        fixed_name = None
        if input_size is not None:
            fixed_name = f"model_{input_size[0]}x{input_size[1]}.onnx"
            export(
                work / WEIGHTS,
                work / fixed_name,
                deploy=work / DEPLOY,
                mean_bgr=mean,
                verify_size=input_size if opts.verify else None,
                input_size=input_size,
            )
        for ev in evals:
            d = work / "eval" / ev["name"]
            d.mkdir(parents=True)
            shutil.copyfile(ev["_dir"] / "metrics.json", d / "metrics.json")
            if (ev["_dir"] / "pr_curves.png").is_file():
                shutil.copyfile(ev["_dir"] / "pr_curves.png", d / "pr_curves.png")
                ev["pr_curves"] = f"eval/{ev['name']}/pr_curves.png"
            ev["metrics_file"] = f"eval/{ev['name']}/metrics.json"
        roles = {
            DEPLOY: "Caffe deploy net",
            WEIGHTS: "Caffe weights",
            SIDECAR: "the weights' sidecar: mean, FOV diameter, thresholds (redseg)",
            ONNX: "ONNX, any input size (ONNX Runtime)",
        }
        if fixed_name:
            roles[fixed_name] = f"ONNX, input exactly {input_size[0]}x{input_size[1]} (OpenCV DNN, ONNX Runtime)"
        for ev in evals:
            roles[ev["metrics_file"]] = f"scores on {ev['name']}"
            if ev.get("pr_curves"):
                roles[ev["pr_curves"]] = f"precision-recall curves on {ev['name']}"
        files, sha1 = {}, None
        for fname, role in roles.items():
            h256, h1, size = digests(work / fname)
            files[fname] = {"sha256": h256, "bytes": size, "role": role}
            if fname == WEIGHTS:
                sha1 = h1
        caffe = caffe_build()
        provenance = {
            "project": project_commit(),
            "caffe": caffe,
            "blas": blas_facts(),
            "python": platform.python_version(),
            "onnx_opset": OPSET,
            "onnx_tolerance": 1e-4,
            "packaged_at": _dt.datetime.now(_dt.timezone.utc).replace(microsecond=0).isoformat(),
            "packaged_from": {"run": str(run), "weights": str(weights), "deploy": str(deploy)},
            "preprocessing_from": pre_source,
        }
        data_terms = [training["data"]["terms"] or {"data": "unknown", "license": "unknown", "attribution": None}]
        meta = {
            "format_version": FORMAT_VERSION,
            "name": name,
            "version": opts.version,
            "task": "semantic segmentation of red lesions (MA, HE) in colour fundus photographs",
            "description": description,
            "authors": "trained and packaged with redseg (Red-Seg in Caffe)",
            "intended_use": "research on red-lesion segmentation; comparing with the Red-Seg paper; "
            "a starting point for further training. " + DISCLAIMER,
            "not_for": ["diagnosis", "screening decisions about a patient", "any clinical use"],
            "limitations": _limitations(synthetic, fov),
            "network": {
                "architecture": "Red-Seg: VGG16 stages with side outputs fused per lesion (prototxt/deploy.prototxt)",
                "deploy": DEPLOY,
                "fusion_stages": fusion_stages(net_param),
            },
            "preprocessing": {
                "channel_order": "BGR",
                "value_range": [0, 255],
                "dtype": "float32",
                "layout": "NCHW, 1x3xHxW",
                "mean_bgr": [float(v) for v in mean],
                "subtract_mean": True,
                "scale": 1.0,
                "fov_diameter_px": fov,
                "rescale": "resize the photograph so that its circular field of view is fov_diameter_px across "
                "(redseg.data.fov; tools/segment.py); the net takes any size",
                "training_image_size_hw": list(_training_size(records) or []) or None,
            },
            "inputs": {
                "data": {
                    "type": "image",
                    "format": "BGR minus mean_bgr",
                    "dtype": "float32",
                    "shape": [1, 3, "H", "W"],
                    "value_range": [-255, 255],
                    "channels": ["blue", "green", "red"],
                }
            },
            "outputs": {
                f"prob_{les.lower()}": {
                    "lesion": les,
                    "meaning": f"probability that the pixel belongs to a {LESION_NAMES[les]} ({les})",
                    "dtype": "float32",
                    "shape": [1, 1, "H", "W"],
                    "value_range": [0, 1],
                    "channels": [les],
                    "threshold": thresholds.get(les),
                }
                for les in C.LESIONS
            },
            "thresholds": {**{les: thresholds.get(les) for les in C.LESIONS}, "rule": thr_rule, "source": thr_source},
            "backends": {
                "caffe": {"deploy": DEPLOY, "weights": WEIGHTS},
                "onnx": {"file": ONNX, "input_size": None, "runs_in": ["onnxruntime"]},
                **(
                    {
                        "onnx_fixed": {
                            "file": fixed_name,
                            "input_size": list(input_size),
                            "runs_in": ["onnxruntime", "opencv-dnn"],
                        }
                    }
                    if fixed_name
                    else {}
                ),
            },
            "metrics": [{k: v for k, v in ev.items() if not k.startswith("_")} for ev in evals],
            "metrics_protocol": "AUC_PR is the authors' 31-threshold protocol (compare with the paper's tables); "
            "AP the exact 256-threshold area; P and R at the precision-recall break-even point (docs/evaluation.md).",
            "training": training,
            "provenance": provenance,
            "licenses": {"weights": opts.license, "code": CODE_LICENSES, "data": data_terms},
            "references": [PAPER, "BVLC Caffe (Jia et al., 2014)"],
            "files": files,
        }
        front = {
            "name": name,
            "caffemodel": WEIGHTS,
            "caffemodel_url": f"{opts.url.rstrip('/')}/{WEIGHTS}" if opts.url else None,
            "license": opts.license,
            "sha1": sha1,
            "caffe_commit": caffe.get("caffe_commit"),
            "redseg_commit": provenance["project"]["commit"],
            "redseg_format_version": FORMAT_VERSION,
            "trained_on": "synthetic data" if synthetic else training["data"]["name"],
        }
        write_text(work / README, render_readme(meta, front))
        write_json(work / METADATA, meta)
        _write_sums(work)
    log.info("package %s: %s", out, ", ".join(sorted(roles)))
    return out


def _limitations(synthetic: bool | None, fov: float | None) -> list[str]:
    out = [
        "Not a diagnosis and not a medical device; no clinical validation of any kind.",
        "Trained and scored on few photographs from one source; other cameras, fields of view, compression or "
        "populations may give worse maps without warning.",
        "Expects a colour fundus photograph with a circular field of view, rescaled to the training FOV diameter"
        + (f" ({fov:.1f} px)" if fov else "")
        + "; other images (OCT, red-free, wide-field, cropped) are outside what it was trained on.",
        "The thresholds are the break-even points of its own test set, not clinically chosen operating points.",
        "Segments only MA and HE; other lesions (exudates, neovascularisation) are not looked for.",
    ]
    if synthetic:
        out.insert(0, "Trained on synthetic photographs only: its output on real photographs is meaningless.")
    return out


def _write_sums(folder: Path) -> None:
    lines = []
    for p in sorted(q for q in folder.rglob("*") if q.is_file() and q.name != SUMS):
        rel = p.relative_to(folder).as_posix()
        lines.append(f"{file_digest(p)}  {rel}")
    write_text(folder / SUMS, "\n".join(lines) + "\n")


def archive(folder: str | os.PathLike, out: str | os.PathLike | None = None) -> Path:
    """``<folder>.tar.gz`` (or ``out``: ``.tar.gz``/``.tgz``, or ``.zip``, stored: weights hardly compress)
    holding the checked package under its folder name; written atomically."""
    from redseg.fileio import atomic_path

    folder = Path(folder)
    out = Path(out) if out is not None else folder.with_name(folder.name + ".tar.gz")
    if _archive_name(out.name) is None:
        raise PackageError(f"{out}: an archive must end in {', '.join(ARCHIVE_SUFFIXES)}")
    open_package(folder)  # only a sound package is archived
    files = sorted(p for p in folder.rglob("*") if p.is_file())
    with atomic_path(out) as tmp:
        if out.name.lower().endswith(".zip"):
            with zipfile.ZipFile(tmp, "w", zipfile.ZIP_STORED) as z:
                for p in files:
                    z.write(p, f"{folder.name}/{p.relative_to(folder).as_posix()}")
        else:
            with tarfile.open(tmp, "w:gz", compresslevel=1) as tar:
                for p in files:
                    tar.add(p, arcname=f"{folder.name}/{p.relative_to(folder).as_posix()}")
    return out


# --- checking and using ------------------------------------------------------------------------------


@dataclass
class Package:
    """A checked package: its folder and metadata."""

    root: Path
    metadata: dict

    @property
    def name(self) -> str:
        return str(self.metadata.get("name") or self.root.name)

    def path(self, key: str) -> Path:
        return self.root / key

    @property
    def info(self) -> ModelInfo:
        pre, thr = self.metadata["preprocessing"], self.metadata.get("thresholds") or {}
        return ModelInfo(
            pre["mean_bgr"],
            pre.get("fov_diameter_px"),
            {les: thr[les] for les in C.LESIONS if thr.get(les) is not None},
            thr.get("rule") or "",
            f"package {self.root}",
        )

    @property
    def synthetic(self) -> bool:
        return bool(((self.metadata.get("training") or {}).get("data") or {}).get("synthetic"))


def read_sums(folder: Path) -> dict[str, str]:
    path = folder / SUMS
    try:
        text = path.read_text()
    except OSError as e:
        raise PackageError(f"{folder}: not a model package, or an incomplete one: cannot read {SUMS} ({e})") from e
    out = {}
    for i, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        m = re.match(r"^([0-9a-f]{64}) [ *](.+)$", line)
        if m is None:
            raise PackageError(f"{path}: line {i} is not '<sha256>  <file>': {line[:80]!r}")
        rel = m.group(2)
        if rel.startswith("/") or ".." in Path(rel).parts:
            raise PackageError(f"{path}: line {i} names a file outside the package: {rel}")
        out[rel] = m.group(1)
    return out


def check_format(metadata: dict, where: str) -> None:
    v = metadata.get("format_version")
    if not isinstance(v, int):
        raise PackageError(f"{where}: no integer format_version; not a redseg model package")
    if v > FORMAT_VERSION:
        raise PackageError(
            f"{where}: package format_version {v} is newer than this redseg reads ({FORMAT_VERSION}); "
            "update the project (git pull) to use it"
        )


def open_package(folder: str | os.PathLike) -> Package:
    """Check a package and return it: format_version readable, every file in SHA256SUMS present with
    its digest, metadata.json's file list agreeing. Raises :class:`PackageError` naming each file
    that is missing, truncated or changed (nothing is used before this passed)."""
    root = Path(folder)
    if not root.is_dir():
        raise PackageError(f"model package {root} does not exist (a folder made by tools/package_model.py)")
    meta_path = root / METADATA
    if not meta_path.is_file():
        raise PackageError(f"{root}: no {METADATA}; not a model package")
    try:
        metadata = json.loads(meta_path.read_text())
    except (OSError, ValueError):
        metadata = None
    if isinstance(metadata, dict):
        check_format(metadata, str(meta_path))  # a newer layout is named as such, before its digests
    sums = read_sums(root)
    problems = []
    for rel, want in sums.items():
        p = root / rel
        if not p.is_file():
            problems.append(f"{rel}: missing")
            continue
        if file_digest(p) != want:
            listed = ((metadata or {}).get("files") or {}).get(rel) if isinstance(metadata, dict) else None
            size = p.stat().st_size
            if listed and size < int(listed.get("bytes", 0)):
                problems.append(f"{rel}: truncated ({size} of {listed['bytes']} bytes)")
            else:
                problems.append(f"{rel}: changed (sha256 differs from {SUMS})")
    for must in (METADATA, README, DEPLOY, WEIGHTS):
        if must not in sums and must not in [x.split(":")[0] for x in problems]:
            problems.append(f"{must}: not listed in {SUMS}")
    if problems:
        raise PackageError(f"model package {root} fails its check; refused: " + "; ".join(problems))
    if not isinstance(metadata, dict):
        raise PackageError(f"{meta_path}: not a JSON object")
    for rel, f in (metadata.get("files") or {}).items():
        if sums.get(rel) != f.get("sha256"):
            problems.append(f"{rel}: {METADATA} and {SUMS} disagree")
    if problems:
        raise PackageError(f"model package {root} fails its check; refused: " + "; ".join(problems))
    extra = sorted(
        p.relative_to(root).as_posix()
        for p in root.rglob("*")
        if p.is_file() and p.name != SUMS and p.relative_to(root).as_posix() not in sums
    )
    if extra:
        log.warning("%s: files not in the package's %s, ignored: %s", root, SUMS, ", ".join(extra))
    return Package(root, metadata)


def caffe_available() -> str | None:
    """None when pycaffe imports here (it is then loaded), else why not."""
    try:
        from redseg.toolchain.caffe_utils import import_caffe

        import_caffe()
    except ImportError as e:
        return str(e)
    return None


def choose_backend(pkg: Package, backend: str = "auto") -> str:
    """``caffe`` or ``onnx``: as asked, or with ``auto`` Caffe when pycaffe imports, else ONNX Runtime."""
    if backend not in BACKENDS:
        raise PackageError(f"backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
    if backend in ("auto", "caffe"):
        why = caffe_available()
        if why is None:
            return "caffe"
        if backend == "caffe":
            raise PackageError(f"backend caffe asked for, but {why}; --backend onnx runs the package's ONNX model")
        log.info("pycaffe does not import (%s): ONNX Runtime runs the package", why)
    if not (pkg.root / ONNX).is_file():
        raise PackageError(f"{pkg.root} has no {ONNX}")
    return "onnx"


def segmenter(pkg: Package, backend: str = "auto", gpu: int | None = None, mean_bgr=None):
    """A segmenter of the package (called like redseg.deploy.inference.Segmenter) and its backend's name;
    the input mean is the package's unless ``mean_bgr`` is given."""
    from redseg.deploy.inference import OnnxSegmenter, Segmenter

    backend = choose_backend(pkg, backend)
    mean = pkg.info.mean_bgr if mean_bgr is None else mean_bgr
    if backend == "caffe":
        from redseg.toolchain.caffe_utils import set_mode

        set_mode(gpu)
        return Segmenter(pkg.root / WEIGHTS, mean, pkg.root / DEPLOY), backend
    if gpu is not None:
        log.warning("--gpu is for Caffe; ONNX Runtime picks CUDA itself when onnxruntime-gpu is installed")
    return OnnxSegmenter(pkg.root / ONNX, mean_bgr=mean), backend


# --- fetching ---------------------------------------------------------------------------------------

ARCHIVE_SUFFIXES = (".tar.gz", ".tgz", ".zip")


def _is_url(src: str) -> bool:
    return urllib.parse.urlparse(src).scheme in ("file", "http", "https")


def _archive_name(name: str) -> str | None:
    for suf in ARCHIVE_SUFFIXES:
        if name.lower().endswith(suf):
            return name[: -len(suf)]
    return None


def _download(url: str, dest: Path, timeout: float = 60) -> None:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r, open(dest, "wb") as f:  # noqa: S310 - file/http(s) only
            shutil.copyfileobj(r, f, 1 << 20)
    except (OSError, ValueError) as e:
        raise PackageError(f"cannot download {url}: {e}") from e


def _safe_extract(archive_path: Path, dest: Path) -> None:
    """Unpack a .tar.gz or .zip into ``dest``, refusing members outside it, links and devices."""
    dest = dest.resolve()

    def inside(name: str) -> bool:
        target = (dest / name).resolve()
        return target == dest or dest in target.parents

    try:
        if zipfile.is_zipfile(archive_path):
            with zipfile.ZipFile(archive_path) as z:
                for n in z.namelist():
                    if not inside(n):
                        raise PackageError(f"{archive_path}: member {n} would land outside the package; refused")
                z.extractall(dest)
            return
        with tarfile.open(archive_path, "r:*") as t:
            members = t.getmembers()
            for m in members:
                if not (m.isfile() or m.isdir()) or not inside(m.name):
                    raise PackageError(f"{archive_path}: member {m.name} is a link, device or outside path; refused")
            t.extractall(dest, members=members)  # noqa: S202 - every member checked above
    except (tarfile.TarError, zipfile.BadZipFile, EOFError, OSError) as e:
        raise PackageError(f"{archive_path}: not a readable .tar.gz or .zip archive: {e}") from e


def _package_root(folder: Path) -> Path:
    """The package inside an unpacked archive: the folder itself or its one subfolder with metadata.json."""
    if (folder / METADATA).is_file():
        return folder
    subs = [d for d in folder.iterdir() if d.is_dir() and (d / METADATA).is_file()]
    if len(subs) == 1:
        return subs[0]
    raise PackageError(f"the archive holds no model package (no {METADATA} at its top or in one folder)")


def fetch_package(src: str, out_dir: str | os.PathLike, name: str | None = None, force: bool = False) -> Package:
    """Get a package from ``src`` (a local folder or archive, or a ``file://``/``http(s)://`` URL of a
    folder or an archive) into ``out_dir/<name>`` (default name: the folder's or the archive's), check
    every digest, and return it. Everything is fetched and checked in a work folder beside the
    final one, which is named only when the check passed; an existing one is kept unless ``force``."""
    out_dir = Path(out_dir)
    url = _is_url(src)
    path_part = urllib.parse.unquote(urllib.parse.urlparse(src).path) if url else src
    base = Path(path_part.rstrip("/")).name
    arch = _archive_name(base)
    final = out_dir / (name or arch or base)
    if not final.name or final.name in (".", ".."):
        raise PackageError(f"cannot tell the package's name from {src}; pass --name")
    if final.exists() and not force:
        raise FileExistsError(f"{final} exists; remove it or pass --force to replace it")
    out_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out_dir, prefix=f".{final.name}.fetch-") as tmp:
        tmp = Path(tmp)
        if arch is not None:
            local = tmp / base
            if url:
                _download(src, local)
            elif Path(src).is_file():
                shutil.copyfile(src, local)
            else:
                raise PackageError(f"archive {src} not found")
            unpacked = tmp / "unpacked"
            unpacked.mkdir()
            _safe_extract(local, unpacked)
            root = _package_root(unpacked)
        elif url and urllib.parse.urlparse(src).scheme != "file":
            root = _fetch_folder_url(src, tmp / "pkg")
        else:
            folder = Path(path_part)
            if not folder.is_dir():
                raise PackageError(f"{src}: neither a package folder nor a .tar.gz/.zip archive")
            root = tmp / "pkg"
            shutil.copytree(folder, root)
        open_package(root)  # checked before it takes its final name
        with building_dir(final) as work:
            work.rmdir()
            shutil.move(str(root), str(work))
    return open_package(final)


def _fetch_folder_url(url: str, dest: Path) -> Path:
    """A package folder served over http(s): its SHA256SUMS first, then every file it lists."""
    base = url.rstrip("/") + "/"
    dest.mkdir(parents=True)
    _download(base + SUMS, dest / SUMS)
    for rel in read_sums(dest):
        target = dest / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        _download(base + urllib.parse.quote(rel), target)
    return dest


def describe(pkg: Package) -> str:
    """A few lines on what a package is (tools/fetch_model.py's report)."""
    m = pkg.metadata
    files = m.get("files") or {}
    size = sum(int(f.get("bytes", 0)) for f in files.values())
    lines = [
        f"{pkg.root}: {pkg.name} (format {m.get('format_version')}), {len(files)} files, {size / 1e6:.1f} MB, "
        "every sha256 checked",
        f"  trained on: {((m.get('training') or {}).get('data') or {}).get('name')}"
        + (" (SYNTHETIC: not for real photographs)" if pkg.synthetic else ""),
        f"  backends: {', '.join(sorted(m.get('backends') or {}))}",
    ]
    for ev in m.get("metrics") or []:
        scores = ", ".join(
            f"{les} AUC_PR {_f(s.get('auc_pr'))} AP {_f(s.get('ap'))}" for les, s in ev.get("lesions", {}).items()
        )
        lines.append(f"  {ev.get('name')} ({ev.get('data')}, {ev.get('split')}): {scores}")
    lines.append(f"  {DISCLAIMER}")
    return "\n".join(lines)
