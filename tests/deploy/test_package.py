"""Model packages (redseg/deploy/package.py; tools/package_model.py, fetch_model.py, test_net.py
--model): a demo-sized run (the seeded random deploy model, a tiny synthetic-labelled training set,
a real tools/test_net.py evaluation) packaged, read as Caffe's model zoo script reads it, used through
Caffe and ONNX Runtime, refused when any file is changed, fetched from archives over file://."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import subprocess
import tarfile
import zipfile
from pathlib import Path

import pytest
import yaml
from conftest import save_random_model, write_prepared_set

from redseg import config as C
from redseg.deploy import package as P

REPO = Path(__file__).resolve().parents[2]


def _tool(name: str):
    spec = importlib.util.spec_from_file_location(f"tool_{name}", REPO / "tools" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def run(caffe, tmp_path_factory) -> Path:
    """A finished demo-sized run: stage records, stage2_final.caffemodel, its evaluation and sidecar."""
    root = tmp_path_factory.mktemp("pkg_run")
    tree = root / "idrid"  # the generator's marker: this set counts as synthetic
    tree.mkdir()
    (tree / "synthetic.json").write_text("{}")
    data = write_prepared_set(root / "data", n=3)
    meta = json.loads((data / "meta.json").read_text())
    meta |= {"source": str(tree), "fov_diameter_px": 40.0, "counts": {"train_images": 3, "test_images": 3}}
    (data / "meta.json").write_text(json.dumps(meta))
    run = root / "run"
    run.mkdir()
    for stage, lr, overrides in ((1, 1e-3, {}), (2, 1e-6, {"max_iter": 3})):
        rec = {"stage": stage, "schedule": "demo", "base_lr": lr, "max_iter": 3, "overrides": overrides}
        rec |= {"from_scratch": stage == 1, "paper_settings": False, "data": str(data), "weights": None}
        (run / f"stage{stage}_run.json").write_text(json.dumps(rec))
    save_random_model(run / "stage2_final.caffemodel", seed=3)
    test_net = _tool("test_net")
    out = run / "test"
    argv = ["-q", "--weights", str(run / "stage2_final.caffemodel"), "--data", str(data), "--out", str(out)]
    assert test_net.main([*argv, "--overlays", "0"]) == 0
    assert (out / "eval" / "metrics.json").is_file() and (run / "stage2_final.caffemodel.json").is_file()
    return run


@pytest.fixture(scope="module")
def pkg(run, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("models") / "redseg-demo"
    tool = _tool("package_model")
    assert tool.main(["-q", "--run", str(run), "--out", str(out), "--url", "https://models.example/redseg-demo"]) == 0
    return out


def _copy_hardlinked(src: Path, dst: Path, real: str) -> Path:
    """A copy of a package whose files are hard links, except ``real``, copied (so it can be edited)."""

    def link(s, d):
        if Path(s) == src / real:
            shutil.copy2(s, d)
        else:
            os.link(s, d)

    shutil.copytree(src, dst, copy_function=link)
    return dst


def test_package_holds_the_model_its_card_and_its_digests(pkg, run, capsys):
    names = sorted(p.relative_to(pkg).as_posix() for p in pkg.rglob("*") if p.is_file())
    fixed = "model_48x64.onnx"  # the training images' size (the prepared set's 64x48, W x H)
    assert names == sorted(
        [
            "SHA256SUMS",
            "deploy.prototxt",
            "eval/synthetic_test/metrics.json",
            "eval/synthetic_test/pr_curves.png",
            "metadata.json",
            "model.caffemodel",
            "model.caffemodel.json",
            "model.onnx",
            fixed,
            "readme.md",
        ]
    )
    assert not list(pkg.parent.glob("*.partial-*"))
    weights = (run / "stage2_final.caffemodel").read_bytes()
    assert (pkg / "model.caffemodel").read_bytes() == weights

    # The front matter as Caffe's scripts/download_model_binary.py reads it: stripped lines, the
    # first two '---', YAML in between; then the sha1 check it makes.
    lines = [line.strip() for line in (pkg / "readme.md").read_text().splitlines()]
    top = lines.index("---")
    bottom = lines.index("---", top + 1)
    front = yaml.safe_load("\n".join(lines[top + 1 : bottom]))
    assert all(k in front for k in ("name", "caffemodel", "caffemodel_url", "sha1", "license", "caffe_commit"))
    assert front["sha1"] == hashlib.sha1(weights).hexdigest()  # noqa: S324 - the zoo's check
    assert front["caffemodel"] == "model.caffemodel" and front["name"] == "redseg-demo"
    assert front["caffemodel_url"] == "https://models.example/redseg-demo/model.caffemodel"
    assert front["redseg_commit"] and front["trained_on"] == "synthetic data"
    card = (pkg / "readme.md").read_text()
    assert "research tool, not a diagnosis" in card and "Trained on synthetic fundus photographs" in card
    assert "](eval/synthetic_test/pr_curves.png)" in card and "AUC_PR" in card and "| MA |" in card

    meta = json.loads((pkg / "metadata.json").read_text())
    side = json.loads((run / "stage2_final.caffemodel.json").read_text())
    assert meta["format_version"] == P.FORMAT_VERSION
    pre = meta["preprocessing"]
    assert pre["channel_order"] == "BGR" and pre["value_range"] == [0, 255]
    assert pre["mean_bgr"] == side["mean_bgr"] and pre["fov_diameter_px"] == 40.0
    assert {o["lesion"]: o["threshold"] for o in meta["outputs"].values()} == side["thresholds"]
    assert list(meta["outputs"]) == ["prob_ma", "prob_he"]
    (ev,) = meta["metrics"]
    scored = json.loads((run / "test" / "eval" / "metrics.json").read_text())
    assert ev["data"] == "synthetic" and ev["split"] == "test" and ev["n_images"] == 3
    for lesion in C.LESIONS:
        assert ev["lesions"][lesion]["auc_pr"] == pytest.approx(scored[lesion]["auc_pr"])
        assert ev["lesions"][lesion]["ap"] == pytest.approx(scored[lesion]["ap"])
    tr = meta["training"]
    assert [s["stage"] for s in tr["stages"]] == [1, 2] and tr["overrides"]["stage2"] == {"max_iter": 3}
    assert tr["data"]["synthetic"] is True and tr["schedule"] == "demo" and tr["seed"]["data_layer_shuffle_seed"] == 1
    assert meta["licenses"]["data"][0]["license"].startswith("none needed") and meta["licenses"]["weights"]
    prov = meta["provenance"]
    assert prov["project"]["commit"] and prov["caffe"]["build"] and prov["caffe"]["patch_set_of_this_checkout"]
    assert prov["blas"]["core"] and prov["blas"]["summary"].startswith("BLAS:")
    assert meta["backends"]["onnx_fixed"] == {
        "file": fixed,
        "input_size": [48, 64],
        "runs_in": ["onnxruntime", "opencv-dnn"],
    }
    sums = P.read_sums(pkg)
    assert set(sums) == set(names) - {"SHA256SUMS"}
    for rel, f in meta["files"].items():
        assert f["sha256"] == sums[rel] == hashlib.sha256((pkg / rel).read_bytes()).hexdigest()

    # An existing package is kept unless --force; nothing half-built is left.
    tool = _tool("package_model")
    before = (pkg / "metadata.json").read_bytes()
    assert tool.main(["-q", "--run", str(run), "--out", str(pkg), "--no-fixed-onnx"]) == 1
    assert "--force" in capsys.readouterr().err and (pkg / "metadata.json").read_bytes() == before


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> Path:
    import cv2
    import numpy as np

    from redseg.data.synthetic import SyntheticParams, render_fundus

    d = tmp_path_factory.mktemp("pkg_photos")
    img = render_fundus(np.random.default_rng(1), SyntheticParams(160, 106)).image
    cv2.imwrite(str(d / "eye1.png"), img)
    cv2.imwrite(str(d / "eye2.png"), cv2.resize(img, (240, 159)))  # another camera's size
    return d


def segment(*args, blocked: bool = False):
    import subprocess
    import sys

    from test_segment_tool import NO_CAFFE

    argv = [str(REPO / "tools" / "segment.py"), "--no-progress", *map(str, args)]
    cmd = [sys.executable, "-c", NO_CAFFE, *argv] if blocked else [sys.executable, *argv]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300)


def summary(out: Path) -> dict:
    return {Path(r["image"]).name: r for r in json.loads((out / "summary.json").read_text())["photos"]}


def test_segment_through_the_package_with_caffe_and_without(pkg, run, photos, tmp_path):
    """segment.py --model: through pycaffe (auto, Caffe importable), then with every Caffe import
    blocked (auto falls back to ONNX Runtime); the package's FOV diameter and thresholds either way."""
    side = json.loads((run / "stage2_final.caffemodel.json").read_text())
    results = {}
    for blocked in (False, True):
        out = tmp_path / ("onnx" if blocked else "caffe")
        proc = segment("--model", pkg, "--out", out, photos, blocked=blocked)
        assert proc.returncode == 0, proc.stderr
        assert ("ONNX Runtime" if blocked else "Caffe") in proc.stderr
        results[blocked] = summary(out)
        settings = json.loads((out / "summary.json").read_text())["settings"]
        assert settings["fov_diameter_px"] == 40.0 and "package" in settings["fov_source"]
    for name in ("eye1.png", "eye2.png"):
        a, b = results[False][name], results[True][name]
        assert a["status"] == b["status"] == "ok"
        for lesion in C.LESIONS:
            key = lesion.lower()
            assert a[f"{key}_threshold"] == b[f"{key}_threshold"] == side["thresholds"][lesion]
            assert a[f"{key}_count"] == b[f"{key}_count"]
    proc = segment("--model", pkg, "--backend", "caffe", "--out", tmp_path / "x", photos, blocked=True)
    assert proc.returncode == 1 and "Caffe is blocked" in proc.stderr  # asked for, not available


def test_segment_refuses_a_changed_package_and_writes_nothing(pkg, photos, tmp_path):
    bad = _copy_hardlinked(pkg, tmp_path / "bad", "model.onnx")
    with open(bad / "model.onnx", "r+b") as fh:
        fh.truncate(1000)
    out = tmp_path / "out"
    proc = segment("-q", "--model", bad, "--backend", "onnx", "--out", out, photos, blocked=True)
    assert proc.returncode == 1 and "model.onnx: truncated" in proc.stderr and "Traceback" not in proc.stderr
    assert not out.exists()


def test_test_net_takes_the_package_through_onnx_and_writes_nothing_into_it(pkg, run, tmp_path, capsys):
    data = Path(json.loads((run / "stage2_run.json").read_text())["data"])
    before = {p: p.stat().st_mtime_ns for p in pkg.rglob("*")}
    tool = _tool("test_net")
    out = tmp_path / "t"
    argv = ["-q", "--model", str(pkg), "--backend", "onnx", "--data", str(data), "--out", str(out), "--overlays", "0"]
    assert tool.main(argv) == 0
    text = capsys.readouterr().out
    assert "MA: the package's threshold" in text and (out / "eval" / "metrics.json").is_file()
    assert {p: p.stat().st_mtime_ns for p in pkg.rglob("*")} == before
    scored = json.loads((run / "test" / "eval" / "metrics.json").read_text())
    again = json.loads((out / "eval" / "metrics.json").read_text())
    for lesion in C.LESIONS:  # ONNX Runtime and the package's mean give Caffe's scores
        assert again[lesion]["ap"] == pytest.approx(scored[lesion]["ap"], abs=1e-3)


@pytest.mark.parametrize(
    "victim, how",
    [
        ("model.caffemodel", "truncate"),
        ("model.onnx", "flip"),
        ("deploy.prototxt", "edit"),
        ("metadata.json", "edit"),
    ],
)
def test_a_changed_file_is_refused_by_name_and_nothing_is_written(pkg, run, tmp_path, capsys, victim, how):
    bad = _copy_hardlinked(pkg, tmp_path / "bad", victim)
    f = bad / victim
    if how == "truncate":
        with open(f, "r+b") as fh:
            fh.truncate(f.stat().st_size - 1000)
    elif how == "flip":
        data = bytearray(f.read_bytes())
        data[len(data) // 2] ^= 0x01
        f.write_bytes(bytes(data))
    elif victim == "metadata.json":
        meta = json.loads(f.read_text())
        meta["preprocessing"]["mean_bgr"] = [0.0, 0.0, 0.0]
        f.write_text(json.dumps(meta))
    else:
        f.write_text(f.read_text().replace("num_output: 1", "num_output: 2", 1))
    with pytest.raises(P.PackageError, match=rf"{victim}: (truncated|changed)") as e:
        P.open_package(bad)
    assert isinstance(e.value, ValueError)
    if how == "truncate":
        assert "truncated" in str(e.value)
    for other in ("model.onnx", "deploy.prototxt", "readme.md"):
        if other != victim:
            assert f"{other}:" not in str(e.value)
    data = Path(json.loads((run / "stage2_run.json").read_text())["data"])
    out = tmp_path / "out"
    tool = _tool("test_net")
    assert tool.main(["-q", "--model", str(bad), "--data", str(data), "--out", str(out)]) == 1
    err = capsys.readouterr().err
    assert victim in err and err.count("\n") == 1 and not out.exists()


def _tiny_package(root: Path, format_version: int = P.FORMAT_VERSION) -> Path:
    """A package of small files in the layout (digests, metadata), for the fetch paths."""
    root.mkdir(parents=True)
    for name, text in {
        "deploy.prototxt": "name: 'x'\n",
        "model.caffemodel": "weights",
        "readme.md": "---\n---\n",
    }.items():
        (root / name).write_text(text)
    files = {
        n: {"sha256": P.file_digest(root / n), "bytes": (root / n).stat().st_size, "role": n}
        for n in sorted(os.listdir(root))
    }
    meta = {
        "format_version": format_version,
        "name": root.name,
        "files": files,
        "training": {"data": {"name": "synthetic", "synthetic": True}},
    }
    (root / "metadata.json").write_text(json.dumps(meta))
    P._write_sums(root)
    return root


def test_fetch_gets_archives_and_folders_over_file_urls(pkg, tmp_path, capsys):
    tool = _tool("fetch_model")
    zipped = P.archive(pkg, tmp_path / "redseg-demo.zip")
    models = tmp_path / "models"
    assert tool.main(["-q", zipped.as_uri(), "--out", str(models)]) == 0
    got = models / "redseg-demo"
    assert "every sha256 checked" in capsys.readouterr().out
    assert P.read_sums(got) == P.read_sums(pkg) and (got / "model.caffemodel").stat().st_size > 1e6
    assert sorted(p.name for p in models.iterdir()) == ["redseg-demo"]  # no work folder left
    assert tool.main(["-q", zipped.as_uri(), "--out", str(models)]) == 1  # kept without --force
    assert "--force" in capsys.readouterr().err

    tiny = _tiny_package(tmp_path / "src" / "tiny")
    tgz = P.archive(tiny)
    assert tgz.name == "tiny.tar.gz"
    assert tool.main(["-q", tgz.as_uri(), "--out", str(models)]) == 0
    assert tool.main(["-q", tiny.as_uri(), "--out", str(models), "--name", "tiny2"]) == 0  # a folder URL
    assert tool.main(["-q", str(tgz), "--out", str(models), "--name", "tiny3"]) == 0  # a local archive
    assert sorted(p.name for p in models.iterdir()) == ["redseg-demo", "tiny", "tiny2", "tiny3"]


def test_fetch_refuses_bad_packages_and_leaves_nothing(tmp_path, capsys):
    tool = _tool("fetch_model")
    models = tmp_path / "models"
    newer = _tiny_package(tmp_path / "src" / "newer", format_version=P.FORMAT_VERSION + 1)
    newer_tgz = tmp_path / "newer.tar.gz"
    with tarfile.open(newer_tgz, "w:gz") as t:  # P.archive archives only packages it can read
        t.add(newer, arcname="newer")
    assert tool.main(["-q", newer_tgz.as_uri(), "--out", str(models)]) == 1
    err = capsys.readouterr().err
    assert f"format_version {P.FORMAT_VERSION + 1} is newer than this redseg reads ({P.FORMAT_VERSION})" in err

    changed = _tiny_package(tmp_path / "src" / "changed")
    arch = P.archive(changed)
    (changed / "model.caffemodel").write_text("other weights")  # the folder itself, after archiving
    assert tool.main(["-q", changed.as_uri(), "--out", str(models)]) == 1
    assert "model.caffemodel: changed" in capsys.readouterr().err
    cut = tmp_path / "cut.tar.gz"
    cut.write_bytes(arch.read_bytes()[:100])
    assert tool.main(["-q", cut.as_uri(), "--out", str(models)]) == 1
    assert "not a readable .tar.gz or .zip archive" in capsys.readouterr().err

    evil = tmp_path / "evil.zip"
    with zipfile.ZipFile(evil, "w") as z:
        z.writestr("../outside.txt", "x")
    assert tool.main(["-q", evil.as_uri(), "--out", str(models)]) == 1
    assert "outside" in capsys.readouterr().err and not (tmp_path / "outside.txt").exists()
    assert not models.exists() or list(models.iterdir()) == []


def test_fetch_over_http_a_folder_through_its_sums_and_an_archive(tmp_path, capsys):
    """A local HTTP server (127.0.0.1): a package folder is read through SHA256SUMS, file by file."""
    import functools
    import http.server
    import threading

    served = tmp_path / "served"
    tiny = _tiny_package(served / "tiny")
    P.archive(tiny)
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(served))
    handler.log_message = lambda *a, **k: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        base = f"http://127.0.0.1:{server.server_address[1]}"
        tool = _tool("fetch_model")
        models = tmp_path / "models"
        assert tool.main(["-q", f"{base}/tiny/", "--out", str(models)]) == 0
        assert tool.main(["-q", f"{base}/tiny.tar.gz", "--out", str(models), "--name", "tiny2"]) == 0
        assert P.read_sums(models / "tiny") == P.read_sums(models / "tiny2") == P.read_sums(tiny)
        assert tool.main(["-q", f"{base}/missing.tar.gz", "--out", str(models)]) == 1
        assert "cannot download" in capsys.readouterr().err and not (models / "missing").exists()
    finally:
        server.shutdown()


def test_the_commit_comes_from_git_or_from_the_images_build(tmp_path, monkeypatch):
    """A checkout names its git HEAD; a tree without .git (the Docker image) the commit its build
    recorded in REDSEG_COMMIT; neither: None, never a guess."""
    monkeypatch.setenv("REDSEG_COMMIT", "0123abc")
    assert P.project_commit(tmp_path) == {"commit": "0123abc", "dirty": None}
    monkeypatch.delenv("REDSEG_COMMIT")
    assert P.project_commit(tmp_path) == {"commit": None, "dirty": None}
    here = P.project_commit(REPO)
    if (REPO / ".git").exists():
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True)
        assert here["commit"] == head.stdout.strip() and here["dirty"] in (True, False)
