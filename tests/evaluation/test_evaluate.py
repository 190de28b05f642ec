"""redseg.evaluation.scoring and tools/evaluate.py on small real files in both ground-truth layouts.

Expected values are computed here from the arrays the test wrote (sklearn's AP, a pixel loop for
the protocol, direct counts), never read back from the code under test.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
from sklearn.metrics import average_precision_score

from redseg.config import IDRID_LESION_DIRS, LESIONS
from redseg.data.prepared_set import DataError
from redseg.evaluation.scoring import EvaluationError, evaluate, find_ground_truth

REPO = Path(__file__).resolve().parents[2]
PYTHON = REPO / ".venv" / "bin" / "python"
H, W = 48, 64  # label size of the small test images
NAMES = ("IDRiD_55", "IDRiD_57", "IDRiD_60")  # not contiguous: names come from the files


def make_case(seed: int = 0, names=NAMES, shape=(H, W)):
    """Ground truth and predictions (correlated with it) per image and lesion."""
    rng = np.random.default_rng(seed)
    gts, preds = {}, {}
    for name in names:
        gts[name], preds[name] = {}, {}
        for k, les in enumerate(LESIONS):
            gt = np.zeros(shape, bool)
            for _ in range(3 + k):
                y, x = rng.integers(2, shape[0] - 6), rng.integers(2, shape[1] - 6)
                gt[y : y + 2 + 2 * k, x : x + 3 + k] = True
            gts[name][les] = gt
            p = np.clip(rng.normal(70 + 90 * gt, 50), 0, 255)
            preds[name][les] = p.astype(np.uint8)
    return gts, preds


def write_official(root: Path, gts: dict, photos=True, skip=()) -> Path:
    """The official layout; lesion pixels coloured (any channel), masks listed in ``skip`` left out."""
    seg = root / "A. Segmentation"
    colours = [(0, 0, 255), (0, 255, 0), (255, 0, 0), (1, 0, 0)]
    for i, (name, masks) in enumerate(gts.items()):
        for les, gt in masks.items():
            if (name, les) in skip:
                continue
            folder = seg / "2. All Segmentation Groundtruths" / "b. Testing Set" / IDRID_LESION_DIRS[les]
            folder.mkdir(parents=True, exist_ok=True)
            img = np.zeros((*gt.shape, 3), np.uint8)
            img[gt] = colours[i % len(colours)]
            assert cv2.imwrite(str(folder / f"{name}_{les}.tif"), img)
        if photos:
            folder = seg / "1. Original Images" / "b. Testing Set"
            folder.mkdir(parents=True, exist_ok=True)
            photo = np.full((*next(iter(masks.values())).shape, 3), (30, 60, 150), np.uint8)
            assert cv2.imwrite(str(folder / f"{name}.jpg"), photo)
    return root


def write_prepared(root: Path, gts: dict) -> Path:
    (root / "test" / "images").mkdir(parents=True)
    (root / "test" / "masks").mkdir(parents=True)
    lines = ["# image\tMA\tHE"]
    for name, masks in gts.items():
        shape = next(iter(masks.values())).shape
        cv2.imwrite(str(root / "test" / "images" / f"{name}.png"), np.full((*shape, 3), 90, np.uint8))
        rels = [f"test/images/{name}.png"]
        for les in LESIONS:
            rel = f"test/masks/{name}_{les}.png"
            cv2.imwrite(str(root / rel), masks[les].astype(np.uint8) * 255)
            rels.append(rel)
        lines.append("\t".join(rels))
    (root / "test.txt").write_text("\n".join(lines) + "\n")
    (root / "meta.json").write_text(json.dumps({"factor": 4, "size": [W, H], "mask_rule": "any"}))
    (root / ".complete").write_text("")
    return root


def write_preds(folder: Path, preds: dict) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for name, maps in preds.items():
        for les, p in maps.items():
            assert cv2.imwrite(str(folder / f"{name}_{les.lower()}.png"), p)
    return folder


def naive_protocol_auc(score: np.ndarray, y: np.ndarray) -> float:
    pts = []
    for i in range(31):
        hit = score / 255.0 >= i / 30
        tp, fp, fn = np.sum(hit & y), np.sum(hit & ~y), np.sum(~hit & y)
        if tp + fp and tp + fn and tp:
            pts.append((tp / (tp + fn), -i, tp / (tp + fp)))
    pts.sort()
    r = [0.0] + [a for a, _, _ in pts]
    p = [1.0] + [c for _, _, c in pts]
    return sum((r[k] - r[k - 1]) * (p[k] + p[k - 1]) / 2 for k in range(1, len(r)))


def expected(gts: dict, preds: dict, les: str) -> dict:
    y = np.concatenate([gts[n][les].ravel() for n in gts])
    s = np.concatenate([preds[n][les].ravel() for n in gts]).astype(np.float64)
    hit = s >= 128
    tp, fp = np.sum(hit & y), np.sum(hit & ~y)
    return {
        "ap": average_precision_score(y, s),
        "auc_pr": naive_protocol_auc(s, y),
        "n_pos": int(y.sum()),
        "n_neg": int((~y).sum()),
        "p05": tp / (tp + fp),
        "r05": tp / y.sum(),
    }


def check(result: dict, gts: dict, preds: dict) -> None:
    for les in LESIONS:
        e = expected(gts, preds, les)
        m = result[les]
        assert (m["n_pos"], m["n_neg"]) == (e["n_pos"], e["n_neg"])
        assert m["ap"] == pytest.approx(e["ap"], abs=1e-9)
        assert m["auc_pr"] == pytest.approx(e["auc_pr"], abs=1e-9)
        assert m["at_0.5"]["precision"] == pytest.approx(e["p05"])
        assert m["at_0.5"]["recall"] == pytest.approx(e["r05"])


# --- ground truth layouts -----------------------------------------------------------------------


def test_official_layout_colour_tiffs(tmp_path):
    gts, preds = make_case(0)
    gt_root = write_official(tmp_path / "idrid", gts)
    pred = write_preds(tmp_path / "pred", preds)
    result = evaluate(pred, gt_root, tmp_path / "eval", progress=False)
    check(result, gts, preds)
    meta = result["meta"]
    assert meta["gt_kind"] == "official" and meta["images"] == list(NAMES)
    assert meta["n_resized"] == 0 and meta["missing_masks"] == {les: [] for les in LESIONS}
    on_disk = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert on_disk == result
    assert not [p for p in (tmp_path / "eval").iterdir() if p.name.endswith(".tmp")]


def test_official_missing_mask_means_no_lesion(tmp_path):
    gts, preds = make_case(1)
    gt_root = write_official(tmp_path / "idrid", gts, skip={("IDRiD_57", "HE")})
    # an image with a photo but no mask at all is still scored (all background, size of the photo)
    extra = np.zeros((H, W), bool)
    photo_dir = gt_root / "A. Segmentation" / "1. Original Images" / "b. Testing Set"
    cv2.imwrite(str(photo_dir / "IDRiD_81.jpg"), np.zeros((H, W, 3), np.uint8))
    gts_expected = {n: dict(m) for n, m in gts.items()}
    gts_expected["IDRiD_57"]["HE"] = np.zeros((H, W), bool)
    gts_expected["IDRiD_81"] = {les: extra for les in LESIONS}
    preds["IDRiD_81"] = {les: np.full((H, W), 200, np.uint8) for les in LESIONS}
    pred = write_preds(tmp_path / "pred", preds)
    result = evaluate(pred, gt_root, tmp_path / "eval", overlays=0, progress=False)
    check(result, gts_expected, preds)
    assert result["meta"]["missing_masks"] == {"MA": ["IDRiD_81"], "HE": ["IDRiD_57", "IDRiD_81"]}
    assert result["meta"]["images"] == [*NAMES, "IDRiD_81"]


def test_official_segmentation_folder_itself_without_photos(tmp_path):
    """Masks alone name the images; a missing HE mask is no lesion, sized by the image's MA mask."""
    gts, preds = make_case(13)
    gt_root = write_official(tmp_path / "idrid", gts, photos=False, skip={("IDRiD_57", "HE")})
    gts["IDRiD_57"]["HE"] = np.zeros((H, W), bool)
    pred = write_preds(tmp_path / "pred", preds)
    result = evaluate(pred, gt_root / "A. Segmentation", tmp_path / "eval", overlays=1, progress=False)
    check(result, gts, preds)
    assert result["meta"]["images"] == list(NAMES)
    assert result["meta"]["missing_masks"] == {"MA": [], "HE": ["IDRiD_57"]}
    assert result["meta"]["label_sizes"] == [[W, H]]


def test_official_folder_without_test_masks_is_refused(tmp_path):
    gts, _ = make_case(14)
    gt_root = write_official(tmp_path / "idrid", gts, skip={(n, les) for n in gts for les in LESIONS})
    with pytest.raises(EvaluationError, match="test-set mask"):
        find_ground_truth(gt_root)


def test_prepared_layout(tmp_path):
    gts, preds = make_case(2)
    prepared = write_prepared(tmp_path / "prepared", gts)
    pred = write_preds(tmp_path / "pred", preds)
    result = evaluate(pred, prepared, tmp_path / "eval", overlays=1, progress=False)
    check(result, gts, preds)
    assert result["meta"]["gt_kind"] == "prepared"
    assert result["meta"]["gt_info"]["mask_rule"] == "any"
    # the list file itself is accepted too
    again = evaluate(pred, prepared / "test.txt", tmp_path / "eval2", overlays=0, progress=False)
    assert again["MA"]["ap"] == result["MA"]["ap"]
    assert "not strictly comparable" in (tmp_path / "eval" / "report.md").read_text()


def test_prediction_smaller_than_labels_is_resized_bilinearly(tmp_path):
    gts, _ = make_case(3)
    _, small = make_case(4, shape=(H // 2, W // 2))
    gt_root = write_official(tmp_path / "idrid", gts)
    pred = write_preds(tmp_path / "pred", small)
    result = evaluate(pred, gt_root, tmp_path / "eval", overlays=1, progress=False)
    upsized = {
        n: {les: cv2.resize(small[n][les], (W, H), interpolation=cv2.INTER_LINEAR) for les in LESIONS} for n in small
    }
    check(result, gts, upsized)
    assert result["meta"]["n_resized"] == len(NAMES) * len(LESIONS)
    assert result["meta"]["label_sizes"] == [[W, H]]
    assert result["meta"]["prediction_sizes"] == [[W // 2, H // 2]]


def test_at_pred_size_downsizes_labels_with_any_rule(tmp_path):
    gts, _ = make_case(5)
    _, small = make_case(6, shape=(H // 2, W // 2))
    gt_root = write_official(tmp_path / "idrid", gts)
    pred = write_preds(tmp_path / "pred", small)
    result = evaluate(pred, gt_root, tmp_path / "eval", at_pred_size=True, overlays=0, progress=False)
    # "any" rule by hand: a 2x2 block is lesion if any of its 4 pixels is
    blocks = {n: {les: gts[n][les].reshape(H // 2, 2, W // 2, 2).any(axis=(1, 3)) for les in LESIONS} for n in gts}
    check(result, blocks, small)
    assert result["meta"]["scored_at"] == "prediction size"


# --- outputs ------------------------------------------------------------------------------------


def test_report_curves_and_overlays(tmp_path):
    gts, preds = make_case(7)
    gt_root = write_official(tmp_path / "idrid", gts)
    pred = write_preds(tmp_path / "pred", preds)
    out = tmp_path / "eval"
    result = evaluate(pred, gt_root, out, overlays=2, progress=False)
    report = (out / "report.md").read_text()
    assert f"{result['MA']['auc_pr']:.4f}" in report
    assert "0.4839" in report and "0.5695" in report  # the paper's Red-Seg AUC_PR (Tables 2-4)
    assert "break-even" in report
    curves = cv2.imread(str(out / "pr_curves.png"))
    assert curves is not None and curves.shape[1] > 500
    shots = sorted(p.name for p in (out / "overlays").iterdir())
    assert shots == ["IDRiD_55.png", "IDRiD_57.png"]
    ov = cv2.imread(str(out / "overlays" / "IDRiD_55.png"))
    assert ov.shape == (H, 2 * W + 4, 3)
    # gt outlines: MA cyan in the left panel, HE green in the right panel
    left, right = ov[:, :W], ov[:, W + 4 :]
    assert np.any(np.all(left == (255, 255, 0), axis=2))
    assert np.any(np.all(right == (0, 255, 0), axis=2))


def test_empty_ground_truth_gives_null(tmp_path):
    gts, preds = make_case(8)
    for name in gts:
        gts[name]["HE"][:] = False
    gt_root = write_official(tmp_path / "idrid", gts)
    pred = write_preds(tmp_path / "pred", preds)
    result = evaluate(pred, gt_root, tmp_path / "eval", overlays=0, progress=False)
    assert result["HE"]["auc_pr"] is None and result["HE"]["ap"] is None
    assert result["HE"]["n_pos"] == 0
    assert result["MA"]["auc_pr"] is not None
    assert any("HE" in note for note in result["meta"]["notes"])
    json.loads((tmp_path / "eval" / "metrics.json").read_text())  # strict JSON: no NaN


# --- errors -------------------------------------------------------------------------------------


def test_missing_prediction_is_named(tmp_path):
    gts, preds = make_case(9)
    gt_root = write_official(tmp_path / "idrid", gts)
    pred = write_preds(tmp_path / "pred", preds)
    (pred / "IDRiD_57_he.png").unlink()
    with pytest.raises(EvaluationError, match="IDRiD_57_he.png"):
        evaluate(pred, gt_root, tmp_path / "eval", progress=False)
    assert not (tmp_path / "eval" / "metrics.json").exists()


def test_wrong_ground_truth_folder(tmp_path):
    wrong = tmp_path / "not_gt"
    wrong.mkdir()
    (wrong / "readme.txt").write_text("hello")
    with pytest.raises(EvaluationError, match="not_gt.*neither"):
        find_ground_truth(wrong)
    with pytest.raises(EvaluationError, match="does not exist"):
        find_ground_truth(tmp_path / "nowhere")
    prepared = write_prepared(tmp_path / "prepared", make_case(10)[0])
    (prepared / ".complete").unlink()
    with pytest.raises(DataError, match="incomplete"):
        find_ground_truth(prepared)


# --- the CLI ------------------------------------------------------------------------------------


def run_cli(*args: str) -> subprocess.CompletedProcess:
    python = str(PYTHON) if PYTHON.exists() else sys.executable
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    return subprocess.run(
        [python, str(REPO / "tools" / "evaluate.py"), "--no-progress", *args],
        capture_output=True,
        text=True,
        cwd=str(REPO.parent),  # not the repo: the script must find redseg by itself
        env=env,
        timeout=120,
    )


def test_cli_end_to_end(tmp_path):
    gts, preds = make_case(11)
    gt_root = write_official(tmp_path / "idrid", gts)
    pred = write_preds(tmp_path / "run" / "pred", preds)
    proc = run_cli("--pred", str(pred), "--gt", str(gt_root), "--overlays", "1")
    assert proc.returncode == 0, proc.stderr
    out = tmp_path / "run" / "eval"  # default: the prediction folder's sibling
    for f in ("metrics.json", "report.md", "pr_curves.png", "overlays/IDRiD_55.png"):
        assert (out / f).is_file(), f
    result = json.loads((out / "metrics.json").read_text())
    check(result, gts, preds)
    assert f"{result['HE']['auc_pr']:.4f}" in proc.stdout
    assert "report.md" in proc.stdout


def test_cli_errors_are_one_line(tmp_path):
    gts, preds = make_case(12)
    gt_root = write_official(tmp_path / "idrid", gts)
    pred = write_preds(tmp_path / "pred", preds)
    (pred / "IDRiD_60_ma.png").unlink()
    proc = run_cli("--pred", str(pred), "--gt", str(gt_root), "--out", str(tmp_path / "e"))
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr
    assert "IDRiD_60_ma.png" in proc.stderr.strip().splitlines()[-1]
    proc = run_cli("--pred", str(pred), "--gt", str(tmp_path), "--out", str(tmp_path / "e"))
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    assert str(tmp_path) in proc.stderr and "neither" in proc.stderr


def test_report_says_when_labels_are_synthetic(tmp_path):
    """make_synthetic's marker file beside 'A. Segmentation' puts a warning into report.md."""

    root = tmp_path / "syn"
    subprocess.run(
        [sys.executable, str(REPO / "tools/make_synthetic.py"), "--out", str(root), "--size", "64x96",
         "--n-train", "1", "--n-test", "2", "-q"],
        check=True, capture_output=True,
    )  # fmt: skip
    pred = tmp_path / "pred"
    pred.mkdir()
    for name in ("IDRiD_02", "IDRiD_03"):
        for les in ("ma", "he"):
            cv2.imwrite(str(pred / f"{name}_{les}.png"), np.full((64, 96), 100, np.uint8))
    evaluate(pred, root, tmp_path / "out", overlays=0, progress=False)
    assert "These labels are synthetic" in (tmp_path / "out" / "report.md").read_text()
    (root / "synthetic.json").unlink()
    evaluate(pred, root, tmp_path / "out2", overlays=0, progress=False)
    assert "synthetic" not in (tmp_path / "out2" / "report.md").read_text()


# --- the other published layouts (redseg.data.datasets) -------------------------------------------


@pytest.fixture(scope="module")
def eophtha_copy(tmp_path_factory) -> Path:
    from redseg.data.synthetic_layouts import generate_layout

    root = tmp_path_factory.mktemp("eophtha") / "e-ophtha"
    generate_layout("eophtha-ma", root, n={"MA": 2, "healthy": 1}, progress=False)
    return root


def _maps_from_labels(source, out: Path, noise: int, scale: float = 0.5) -> dict:
    """Predictions made from the set's own labels (lesion 200, else `noise`), smaller than the labels."""
    out.mkdir(parents=True, exist_ok=True)
    labels = {}
    for it in source.items("test"):
        h, w = source.read_image(it.image).shape[:2]
        ma = source.read_mask(it.masks["MA"]) if it.masks.get("MA") else np.zeros((h, w), bool)
        labels[it.name] = ma
        p = np.where(ma, 200, noise).astype(np.uint8)
        cv2.imwrite(str(out / f"{it.name}_ma.png"), cv2.resize(p, (int(w * scale), int(h * scale))))
        cv2.imwrite(str(out / f"{it.name}_he.png"), np.full((int(h * scale), int(w * scale)), 77, np.uint8))
    return labels


def test_eophtha_scored_at_its_label_size_and_he_not_scored(eophtha_copy, tmp_path):
    """--gt an e-ophtha MA folder (and its zip): MA at the photographs' size by its >= 128 rule, HE
    not scored (no ground truth), never 0, in metrics.json and report.md."""
    import shutil

    from redseg.data.datasets import open_source

    with open_source(eophtha_copy) as src:
        labels = _maps_from_labels(src, tmp_path / "pred", noise=10)
    archive = Path(shutil.make_archive(str(tmp_path / "eophtha"), "zip", eophtha_copy.parent, eophtha_copy.name))
    for gt in (eophtha_copy, archive):
        proc = run_cli("--pred", str(tmp_path / "pred"), "--gt", str(gt), "--out", str(tmp_path / f"e_{gt.suffix}"))
        assert proc.returncode == 0, proc.stderr
        m = json.loads((tmp_path / f"e_{gt.suffix}" / "metrics.json").read_text())
        assert m["meta"]["gt_info"]["dataset"] == "eophtha-ma" and m["meta"]["n_images"] == 3
        assert m["HE"]["not_scored"] and m["HE"]["auc_pr"] is None and m["HE"]["n_pos"] == 0
        assert m["MA"]["n_pos"] == sum(int(v.sum()) for v in labels.values())  # every label pixel, at full size
        assert m["MA"]["auc_pr"] > 0.9
        sizes = {tuple(v.shape[::-1]) for v in labels.values()}
        assert {tuple(s) for s in m["meta"]["label_sizes"]} == sizes
        report = (tmp_path / f"e_{gt.suffix}" / "report.md").read_text()
        assert "| HE | not scored" in report
        assert "HE: not scored" in proc.stdout or "not scored" in proc.stdout


def test_a_layout_named_wrongly_is_refused_in_one_line(eophtha_copy, tmp_path):
    proc = run_cli("--pred", str(tmp_path), "--gt", str(eophtha_copy), "--dataset", "ddr")
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    assert "DDR" in proc.stderr.strip().splitlines()[-1] and "lesion_segmentation" in proc.stderr
