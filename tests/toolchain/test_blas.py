"""redseg.toolchain.blas: the OpenBLAS core that Caffe runs, chosen at setup and applied before Caffe loads.

Everything runs against the real library that this Caffe links, in subprocesses where a fresh
OpenBLAS start is needed (it reads OPENBLAS_CORETYPE only when it loads). A failing library is
simulated by a probe that corrupts the real sgemm result. A user-set OPENBLAS_CORETYPE in the
environment of the test run is left alone: the tests that set one do so in a child's environment.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from redseg.toolchain import blas

REPO = Path(__file__).resolve().parents[2]
AVX512_CPU = {
    "vendor": "GenuineIntel",
    "family": "6",
    "model": "207",
    "model_name": "a CPU with AVX-512",
    "flags": sorted({"sse2", "avx", "avx2", "fma", *blas.AVX512}),
}


@pytest.fixture(scope="module")
def linked() -> tuple[str, str]:
    """(the _caffe.so that `import caffe` loads, the OpenBLAS it links)."""
    ext = blas.caffe_extension()
    lib = blas.linked_blas(ext) if ext else None
    if lib is None:
        pytest.skip("this Caffe links no BLAS library that ldd shows")
    if blas.probe(lib, None, gemm=False)["corename"] is None:
        pytest.skip(f"{lib} is not OpenBLAS: nothing to choose")
    return ext, lib


def _user_core() -> str | None:
    """OPENBLAS_CORETYPE as the user set it for this run (not our own choice), or None."""
    value = os.environ.get(blas.ENV)
    return value if value is not None and value != os.environ.get(blas.MARK) else None


def _generic_default(real_probe):
    """A probe of a library whose own choice is the generic Prescott core (Debian 12's on new Xeons)."""

    def probe_fn(library, core, **kw):
        return real_probe(library, "Prescott" if core is None else core, **kw)

    return probe_fn


def _child(code: str, env: dict) -> dict:
    """Run ``code`` in a fresh interpreter of this venv (its .pth hook included); its last line is JSON."""
    full = {k: v for k, v in os.environ.items() if k not in (blas.ENV, blas.MARK)}
    full.update(env)
    full["PYTHONPATH"] = os.pathsep.join([str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])])
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=full)
    assert r.returncode == 0, r.stdout + r.stderr
    return json.loads(r.stdout.strip().splitlines()[-1])


CONFIGURE_THEN_IMPORT = """
import json, os
from redseg.toolchain import blas
st = blas.configure(path={path!r}, allow_probe=False, announce=False)
import caffe
print(json.dumps({{"status": st, "env": os.environ.get("OPENBLAS_CORETYPE"), "running": blas.running_core()}}))
"""


def _decision(ext: str, lib: str, chosen: str | None, default: str) -> dict:
    return {
        "format": blas.FORMAT,
        "key": blas.library_key(ext, lib, blas.cpu_info()),
        "library": os.path.realpath(lib),
        "version": "test",
        "default_core": default,
        "chosen_core": chosen,
        "reason": "written by the test",
    }


# --- the probe on the real library -----------------------------------------------------------------


def test_probe_reports_the_core_and_its_gemm_matches_numpy(linked):
    """The core this test run uses (the user's, else the library's own choice) passes the check."""
    _, lib = linked
    c = blas.check(lib, _user_core())
    assert c["reported"], c
    assert c["config"].startswith("OpenBLAS ") and blas.version_of(c["config"]), c
    assert c["ok"] and c["max_error"] < 1e-5, c


def test_a_core_the_library_ignores_is_rejected(linked):
    """OpenBLAS silently runs its own choice for a name it does not know: the check must notice."""
    _, lib = linked
    c = blas.check(lib, "NoSuchCore")
    assert not c["ok"] and "ignored" in c["why"] and c["reported"] not in (None, "NoSuchCore"), c


def test_candidates_only_replace_generic_cores():
    flags512 = AVX512_CPU["flags"]
    assert blas.candidate_cores("Prescott", flags512) == ["SkylakeX", "Haswell"]
    assert blas.candidate_cores("prescott", ["avx2", "fma", "sse2"]) == ["Haswell"]
    assert blas.candidate_cores("Nehalem", ["avx2", "fma", "avx512f"]) == ["Haswell"]  # AVX-512 incomplete
    assert blas.candidate_cores("Prescott", ["sse2", "sse3", "avx"]) == []
    assert blas.candidate_cores("Cooperlake", flags512) == []
    assert blas.candidate_cores("Haswell", flags512) == []
    assert blas.candidate_cores(None, flags512) == []


# --- the decision ----------------------------------------------------------------------------------


def test_a_generic_default_gets_the_cpus_core_after_a_real_check(linked):
    """Library defaulting to Prescott on this CPU: the matching core is probed for real and chosen."""
    if _user_core() is not None:
        pytest.skip(f"OPENBLAS_CORETYPE={_user_core()} is set for this machine; other cores are not probed")
    cpu = blas.cpu_info()
    expected = blas.candidate_cores("Prescott", cpu["flags"] if cpu else ())
    if not expected:
        pytest.skip("this CPU has neither AVX-512 nor AVX2: no core to choose")
    ext, lib = linked
    d = blas.decide(ext, lib, probe_fn=_generic_default(blas.probe))
    assert d["default_core"] == "Prescott" and d["default_check"]["ok"], d
    assert d["chosen_core"] == expected[0], d
    assert d["tried"][0]["reported"] == expected[0] and d["tried"][0]["max_error"] < 1e-5, d
    assert d["key"]["library"] == os.path.realpath(lib) and d["key"]["cpu"] == blas.cpu_key(cpu)


def test_a_failed_check_keeps_the_default_and_configure_sets_nothing(linked, tmp_path):
    """Simulated wrong kernels (one sgemm element off by 1): no core is chosen, the default runs."""
    ext, lib = linked
    real_default = blas.probe(lib, None, gemm=False)["corename"]

    def wrong_candidates(library, core, **kw):
        p = blas.probe(library, core, **kw)
        if core is not None and p.get("outputs"):
            p["outputs"][0] = p["outputs"][0].copy()
            p["outputs"][0][3, 5] += 1.0
        return p

    # A library that defaults to Prescott on a CPU with AVX-512: both candidates get probed and fail
    # (on a CPU without AVX-512 the SkylakeX probe dies of SIGILL instead, also a failure).
    d = blas.decide(ext, lib, cpu=AVX512_CPU, probe_fn=_generic_default(wrong_candidates))
    assert d["chosen_core"] is None, d
    assert [t["requested"] for t in d["tried"]] == ["SkylakeX", "Haswell"], d
    assert not any(t["ok"] for t in d["tried"]), d
    assert "kept the library's default Prescott" in d["reason"], d
    haswell = d["tried"][1]
    if haswell["why"] and "GEMM check" in haswell["why"]:
        assert haswell["max_error"] > blas.GEMM_TOL

    # That decision, valid for this Caffe, library and CPU, in a fresh process: nothing set, even
    # over a choice inherited from a parent process; the library's default runs.
    path = tmp_path / "decision.json"
    blas.save({**d, "key": blas.library_key(ext, lib, blas.cpu_info())}, path)
    out = _child(CONFIGURE_THEN_IMPORT.format(path=str(path)), {blas.ENV: "SkylakeX", blas.MARK: "SkylakeX"})
    assert out["status"]["source"] == "default" and out["status"]["chosen_core"] is None, out
    assert out["env"] is None and out["running"] == real_default, out


def test_a_user_set_core_is_never_overridden(linked, tmp_path):
    """OPENBLAS_CORETYPE set by the user wins over the decision, and really runs."""
    ext, lib = linked
    path = tmp_path / "decision.json"
    blas.save(_decision(ext, lib, chosen="SkylakeX", default="Prescott"), path)
    out = _child(CONFIGURE_THEN_IMPORT.format(path=str(path)), {blas.ENV: "Haswell"})
    assert out["status"]["source"] == "user-set" and out["status"]["core"] == "Haswell", out
    assert out["env"] == "Haswell" and out["running"] == "Haswell", out
    assert "set by the user" in blas.summary(out["status"])


def test_the_decision_is_applied_before_caffe_loads(linked, tmp_path):
    """Without a user value the chosen core is exported and is what Caffe's OpenBLAS runs."""
    ext, lib = linked
    path = tmp_path / "decision.json"
    blas.save(_decision(ext, lib, chosen="Haswell", default="Prescott"), path)
    out = _child(CONFIGURE_THEN_IMPORT.format(path=str(path)), {})
    assert out["status"]["source"] == "chosen at setup", out
    assert out["env"] == "Haswell" and out["running"] == "Haswell", out


def test_a_stale_decision_is_not_applied(linked, tmp_path):
    """Another CPU in the key: the decision is ignored (the hook does not probe), nothing is set."""
    ext, lib = linked
    d = _decision(ext, lib, chosen="Haswell", default="Prescott")
    d["key"]["cpu"] = "GenuineIntel 6/85 another machine [avx2 fma]"
    path = tmp_path / "decision.json"
    blas.save(d, path)
    out = _child(CONFIGURE_THEN_IMPORT.format(path=str(path)), {})
    assert out["status"]["source"] == "no decision" and out["env"] is None, out


def test_the_key_follows_the_library_file_and_the_caffe_build(linked, tmp_path):
    """A decision is current only for the same _caffe.so and the same file behind the library link."""
    ext, lib = linked
    caffe_copy = tmp_path / "_caffe.so"
    shutil.copy2(ext, caffe_copy)
    lib_a, lib_b = tmp_path / "libopenblas_a.so", tmp_path / "libopenblas_b.so"
    shutil.copy2(os.path.realpath(lib), lib_a)
    lib_b.write_bytes(lib_a.read_bytes()[: 1 << 16])
    link = tmp_path / "libopenblas.so.0"
    link.symlink_to(lib_a)
    d = {"format": blas.FORMAT, "key": blas.library_key(str(caffe_copy), str(link), blas.cpu_info())}
    assert blas.is_current(d, caffe_copy)

    st = lib_a.stat()
    os.utime(lib_a, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # the library updated in place
    assert not blas.is_current(d, caffe_copy)
    os.utime(lib_a, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert blas.is_current(d, caffe_copy)

    link.unlink()
    link.symlink_to(lib_b)  # the link switched to another library (update-alternatives)
    assert not blas.is_current(d, caffe_copy)
    link.unlink()
    link.symlink_to(lib_a)
    assert blas.is_current(d, caffe_copy)

    with open(caffe_copy, "ab") as f:  # Caffe rebuilt
        f.write(b"\0")
    assert not blas.is_current(d, caffe_copy)
    assert not blas.is_current({"format": blas.FORMAT, "key": None}, caffe_copy)


def test_saved_decisions_round_trip_and_other_formats_are_ignored(tmp_path):
    path = tmp_path / "d.json"
    d = {"format": blas.FORMAT, "key": None, "chosen_core": "SkylakeX", "max_error": np.float64(1e-7).item()}
    blas.save(d, path)
    assert blas.load(path) == d
    path.write_text(json.dumps({**d, "format": blas.FORMAT + 1}))
    assert blas.load(path) is None
    path.write_text("{not json")
    assert blas.load(path) is None
    assert blas.load(tmp_path / "missing.json") is None


# --- what the tools say ----------------------------------------------------------------------------


def test_the_first_log_line_of_a_caffe_tool_names_the_core(tmp_path):
    """import_caffe announces the BLAS core once, before anything else Caffe-related."""
    code = (
        "import logging; logging.basicConfig(level=logging.INFO, format='%(levelname)s %(message)s')\n"
        "from redseg.toolchain.caffe_utils import import_caffe\n"
        "import_caffe(); import_caffe()\n"
        "from redseg.toolchain import blas; import json; print(json.dumps(blas.describe()))\n"
    )
    env = {k: v for k, v in os.environ.items()}
    env["PYTHONPATH"] = str(REPO)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env)
    assert r.returncode == 0, r.stderr
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert lines and lines[0].startswith("INFO BLAS: "), r.stderr
    assert sum("BLAS:" in ln for ln in lines) == 1, r.stderr
    described = json.loads(r.stdout.strip().splitlines()[-1])
    assert described["summary"] in lines[0]
    if described["running_core"] is not None and described["source"] in ("user-set", "chosen at setup", "chosen now"):
        assert described["running_core"].lower() == described["core"].lower(), described
