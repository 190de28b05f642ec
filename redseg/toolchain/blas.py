"""Which OpenBLAS kernels Caffe runs: chosen once at setup, applied before Caffe loads.

Why this exists: Caffe's convolutions are OpenBLAS ``sgemm`` calls, and a ``DYNAMIC_ARCH``
OpenBLAS picks its kernels from the CPU model when it loads. A library older than the CPU does not
know the model and falls back to its generic SSE3 kernels ("Prescott"). Debian 12's OpenBLAS 0.3.21
does this on recent Xeons (Sapphire/Emerald Rapids) and runs Red-Seg several times slower than it
could (docs/performance.md, "BLAS kernels"). OpenBLAS reads ``OPENBLAS_CORETYPE`` once, when it
loads, so the choice has to be in the environment before ``import caffe``.

How:

* :func:`decide` (``python -m redseg.toolchain.blas --setup``, run by tools/setup.sh) finds the OpenBLAS that
  Caffe's ``_caffe.so`` links (``ldd``) and probes it in subprocesses, never in this process (that
  would fix this process's kernels for good): the core it picks by itself, and, when that is a
  generic core on a CPU with AVX-512 or AVX2, the matching core (SkylakeX, then Haswell). A
  candidate is kept only if the library reports running it (a build without that kernel silently
  ignores the variable) and its ``sgemm`` matches numpy's float64 product on random matrices (some
  OpenBLAS builds compute wrong results on some CPUs); otherwise the library's default stays. The
  decision goes to a small JSON file (:func:`decision_path`), keyed on ``_caffe.so``, the real file
  behind the library link (path, size, mtime) and the CPU, so a rebuilt Caffe, another library or
  another machine invalidates it.
* :func:`configure` (called by ``redseg.toolchain.caffe_utils.import_caffe``, tests/conftest.py, and a
  ``.pth`` hook in the venv for a plain ``import caffe``) reads that file and sets
  ``OPENBLAS_CORETYPE``. It never overrides a value the user set. Without a valid decision it
  probes once itself (about half a second) and stores the result; the ``.pth`` hook, which runs at
  every start of the venv's interpreter, only reads the file.

The variable also reaches numpy's own OpenBLAS, which is newer and picks a fitting core by itself;
the cores chosen here (SkylakeX, Haswell) are ones it knows, so numpy runs the same kind of kernels.

The module imports only ``os``, ``sys`` and ``json`` at the top: the ``.pth`` hook imports it at
every interpreter start, and everything else is needed only when probing.
"""

from __future__ import annotations

import json
import os
import sys

ENV = "OPENBLAS_CORETYPE"
# The value configure() put into ENV: tells our own choice (inherited by child processes) from a
# value the user set, which is never touched.
MARK = "REDSEG_BLAS_CORETYPE"
DECISION_FILE = "redseg-blas.json"
PTH_FILE = "redseg_blas.pth"  # sorts after redseg.pth, which puts the repository on sys.path
FORMAT = 1

# OpenBLAS's pre-AVX cores (names as openblas_get_corename() spells them; compared case-insensitively).
# A DYNAMIC_ARCH library that does not recognise a CPU lands on one of these.
GENERIC_CORES = frozenset(
    c.lower()
    for c in (
        "Unknown",
        "Generic",
        "Katmai",
        "Coppermine",
        "Northwood",
        "Prescott",
        "Banias",
        "Core2",
        "Penryn",
        "Dunnington",
        "Nehalem",
        "Atom",
        "Opteron",
        "Opteron_SSE3",
        "Barcelona",
        "Nano",
    )
)
AVX512 = frozenset({"avx512f", "avx512bw", "avx512vl", "avx512dq", "avx512cd"})  # what SkylakeX kernels use
AVX2 = frozenset({"avx2", "fma"})  # what Haswell kernels use
KEY_FLAGS = AVX512 | AVX2 | {"avx", "avx512_bf16", "sse4_2"}  # the flags a decision depends on

# sgemm calls of the check, row-major: (transA, transB, M, N, K, alpha, beta). Odd sizes exercise the
# kernels' edge handling, K = 27 is conv1_1's im2col depth, beta = 1 is Caffe's accumulating weight
# gradient, and the first is big enough for OpenBLAS to use its threads.
GEMM_CASES = (
    (False, False, 257, 193, 311, 1.0, 0.0),
    (False, True, 64, 1001, 27, 1.0, 0.0),
    (True, False, 129, 67, 515, 0.5, 1.0),
)
# Largest |C - C_ref| / (|alpha| |A||B| + |beta C0|) accepted. Correct float32 kernels stay near
# 1e-7 at these depths (K <= 515); a wrong kernel is off by O(1).
GEMM_TOL = 1e-4
PROBE_TIMEOUT_S = 60
THREADING = {0: "sequential", 1: "pthread", 2: "openmp"}

_status: dict | None = None
_announced = False


def _log():
    import logging

    return logging.getLogger(__name__)


# --- the machine ---------------------------------------------------------------------------------


def cpu_info(cpuinfo: str = "/proc/cpuinfo") -> dict | None:
    """Vendor, model and flags of the first CPU, or None off Linux x86-64 (nothing to choose there)."""
    if not sys.platform.startswith("linux") or os.uname().machine != "x86_64":
        return None
    try:
        with open(cpuinfo, errors="replace") as f:
            text = f.read()
    except OSError:
        return None
    info: dict = {}
    for line in text.split("\n\n", 1)[0].splitlines():
        k, _, v = line.partition(":")
        info[k.strip()] = v.strip()
    return {
        "vendor": info.get("vendor_id", ""),
        "family": info.get("cpu family", ""),
        "model": info.get("model", ""),
        "model_name": info.get("model name", ""),
        "flags": sorted(set(info.get("flags", "").split())),
    }


def cpu_key(cpu: dict | None) -> str | None:
    """The CPU's identity in a decision's key: model and the flags that choose a core."""
    if cpu is None:
        return None
    flags = " ".join(sorted(KEY_FLAGS.intersection(cpu["flags"])))
    return f"{cpu['vendor']} {cpu['family']}/{cpu['model']} {cpu['model_name']} [{flags}]"


def candidate_cores(default_core: str | None, flags) -> list[str]:
    """The cores to try instead of ``default_core``, best first; empty when the default is fine."""
    if not default_core or default_core.lower() not in GENERIC_CORES:
        return []
    flags = set(flags)
    out = []
    if AVX512 <= flags:
        out.append("SkylakeX")
    if AVX2 <= flags:
        out.append("Haswell")
    return out


# --- the library Caffe links ----------------------------------------------------------------------


def caffe_extension() -> str | None:
    """The real path of the ``_caffe*.so`` that ``import caffe`` would load, found without importing."""
    import importlib.util

    try:
        spec = importlib.util.find_spec("caffe")
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.origin:
        return None
    folder = os.path.dirname(spec.origin)
    try:
        found = sorted(f for f in os.listdir(folder) if f.startswith("_caffe") and f.endswith(".so"))
    except OSError:
        return None
    return os.path.realpath(os.path.join(folder, found[0])) if found else None


def linked_blas(extension: str) -> str | None:
    """The BLAS library path the dynamic linker gives ``extension`` (``ldd``), OpenBLAS preferred.

    Debian's ``libblas.so.3`` from OpenBLAS is a thin wrapper around ``libopenblas.so.0``; when
    both appear, the latter is the one that holds the kernels.
    """
    import re
    import subprocess

    try:
        out = subprocess.run(["ldd", extension], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    libs = {}
    for line in out.splitlines():
        m = re.match(r"\s*(\S+)\s+=>\s+(/\S+)", line)
        if m:
            libs[m.group(1)] = m.group(2)
    for pattern in (r"libopenblas", r"lib(blas|cblas)\.so", r".*blas"):
        for name, path in libs.items():
            if re.match(pattern, name):
                return path
    return None


def _stat(path: str) -> list[int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return [st.st_size, st.st_mtime_ns]


def library_key(extension: str, library_link: str, cpu: dict | None) -> dict:
    """What a decision depends on: the Caffe extension, the library file behind its link, the CPU."""
    real = os.path.realpath(library_link) if library_link else ""
    return {
        "caffe": extension,
        "caffe_stat": _stat(extension),
        "library_link": library_link,
        "library": real,
        "library_stat": _stat(real) if real else None,
        "cpu": cpu_key(cpu),
    }


def decision_path() -> str:
    """Where the decision lives: inside the venv, or in the user's cache for a Python without one."""
    if sys.prefix != getattr(sys, "base_prefix", sys.prefix):
        return os.path.join(sys.prefix, DECISION_FILE)
    from redseg.fileio import cache_root  # standard library only, cheap for the start-up hook

    return str(cache_root() / DECISION_FILE)


# --- probing in a subprocess -----------------------------------------------------------------------

# Runs under `python -I -S`: no site (so no .pth hook, no numpy), only ctypes. Loads the library with
# OPENBLAS_CORETYPE as the parent set it, reports what it runs and computes the GEMM cases in place.
_CHILD = r"""
import ctypes, json, sys
lib_path, spec = sys.argv[1], json.loads(sys.argv[2])
out = {}
lib = ctypes.CDLL(lib_path)
def text(name):
    f = getattr(lib, name, None)
    if f is None:
        return None
    f.restype, f.argtypes = ctypes.c_char_p, []
    v = f()
    return v.decode("ascii", "replace") if v else None
out["corename"] = text("openblas_get_corename")
out["config"] = text("openblas_get_config")
par = getattr(lib, "openblas_get_parallel", None)
out["parallel"] = par() if par is not None else None
if spec and hasattr(lib, "cblas_sgemm"):
    with open(spec["data"], "rb") as fh:
        data = bytearray(fh.read())
    base = ctypes.addressof((ctypes.c_char * len(data)).from_buffer(data))
    f = lib.cblas_sgemm
    i, p, fl = ctypes.c_int, ctypes.c_void_p, ctypes.c_float
    f.argtypes, f.restype = [i, i, i, i, i, i, fl, p, i, p, i, fl, p, i], None
    for c in spec["cases"]:
        f(101, 112 if c["ta"] else 111, 112 if c["tb"] else 111, c["m"], c["n"], c["k"], c["alpha"],
          base + c["a"], c["lda"], base + c["b"], c["ldb"], c["beta"], base + c["c"], c["n"])
    with open(spec["out"], "wb") as fh:
        fh.write(bytes(data))
    out["gemm"] = True
print(json.dumps(out))
"""


def gemm_cases(seed: int = 0) -> list[dict]:
    """Random float32 operands of GEMM_CASES, laid out for the row-major cblas calls."""
    import numpy as np

    rng = np.random.default_rng(seed)
    cases = []
    for ta, tb, m, n, k, alpha, beta in GEMM_CASES:
        a = rng.standard_normal((k, m) if ta else (m, k), dtype=np.float32)
        b = rng.standard_normal((n, k) if tb else (k, n), dtype=np.float32)
        c0 = rng.standard_normal((m, n), dtype=np.float32)
        cases.append(
            {"ta": ta, "tb": tb, "m": m, "n": n, "k": k, "alpha": alpha, "beta": beta, "A": a, "B": b, "C": c0}
        )
    return cases


def gemm_error(cases: list[dict], outputs: list) -> float:
    """Largest error of the library's sgemm results against the float64 product, relative to its scale."""
    import numpy as np

    worst = 0.0
    for case, got in zip(cases, outputs, strict=True):
        a = case["A"].astype(np.float64)
        b = case["B"].astype(np.float64)
        a = a.T if case["ta"] else a
        b = b.T if case["tb"] else b
        c0 = case["C"].astype(np.float64)
        ref = case["alpha"] * (a @ b) + case["beta"] * c0
        scale = abs(case["alpha"]) * (np.abs(a) @ np.abs(b)) + abs(case["beta"]) * np.abs(c0)
        err = np.abs(np.asarray(got, dtype=np.float64) - ref) / np.maximum(scale, 1e-30)
        if not np.isfinite(err).all():
            return float("inf")
        worst = max(worst, float(err.max()))
    return worst


def probe(library: str, core: str | None, gemm: bool = True, timeout: float = PROBE_TIMEOUT_S) -> dict:
    """Load ``library`` in a fresh interpreter with ``OPENBLAS_CORETYPE=core`` (None: unset) and ask it.

    Returns ``corename``, ``config`` and ``parallel`` as the library reports them, and with ``gemm``
    the GEMM cases (``cases``) with the library's results (``outputs``); ``error`` says why there
    are none (the library did not load, lacks cblas_sgemm, or the child died, e.g. of SIGILL).
    """
    import subprocess
    import tempfile

    import numpy as np

    env = {k: v for k, v in os.environ.items() if k not in (ENV, MARK)}
    if core is not None:
        env[ENV] = core
    result: dict = {"requested": core, "corename": None, "config": None, "parallel": None, "error": None}
    with tempfile.TemporaryDirectory(prefix="redseg-blas-") as tmp:
        spec, cases, layout = None, [], []
        if gemm:
            cases = gemm_cases()
            blob = bytearray()
            for c in cases:
                entry = {k: c[k] for k in ("ta", "tb", "m", "n", "k", "alpha", "beta")}
                for name in ("A", "B", "C"):
                    entry[name.lower()] = len(blob)
                    blob += np.ascontiguousarray(c[name]).tobytes()
                entry["lda"], entry["ldb"] = c["A"].shape[1], c["B"].shape[1]
                layout.append(entry)
            spec = {"data": os.path.join(tmp, "in.bin"), "out": os.path.join(tmp, "out.bin"), "cases": layout}
            with open(spec["data"], "wb") as f:
                f.write(bytes(blob))
        cmd = [sys.executable, "-I", "-S", "-c", _CHILD, library, json.dumps(spec)]
        try:
            r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
        except subprocess.TimeoutExpired:
            result["error"] = f"the probe timed out after {timeout} s"
            return result
        if r.returncode != 0:
            why = f"was killed by signal {-r.returncode}" if r.returncode < 0 else f"exited with {r.returncode}"
            tail = (r.stderr.strip().splitlines() or [""])[-1]
            result["error"] = f"the probe {why} {tail}".strip()
            return result
        try:
            result.update(json.loads(r.stdout.strip().splitlines()[-1]))
        except (ValueError, IndexError):
            result["error"] = f"unreadable probe output {r.stdout[-200:]!r}"
            return result
        if gemm and result.get("gemm"):
            with open(spec["out"], "rb") as f:
                raw = np.frombuffer(f.read(), dtype=np.float32)
            result["cases"] = cases
            result["outputs"] = [
                raw[e["c"] // 4 : e["c"] // 4 + e["m"] * e["n"]].reshape(e["m"], e["n"]) for e in layout
            ]
        elif gemm:
            result["error"] = "no cblas_sgemm in the library"
    return result


def version_of(config: str | None) -> str | None:
    """``0.3.21`` from ``openblas_get_config()``'s ``OpenBLAS 0.3.21 DYNAMIC_ARCH ...``."""
    import re

    m = re.match(r"OpenBLAS\s+(\S+)", config or "")
    return m.group(1) if m else None


def check(library: str, core: str | None, probe_fn=probe) -> dict:
    """Probe ``core`` (None: the library's own choice) and judge it: the core it reports, the GEMM error."""
    p = probe_fn(library, core)
    out = {
        "requested": core,
        "reported": p.get("corename"),
        "config": p.get("config"),
        "parallel": p.get("parallel"),
        "max_error": None,
        "ok": False,
        "why": p.get("error"),
    }
    if p.get("error"):
        return out
    if core is not None and (p.get("corename") or "").lower() != core.lower():
        out["why"] = f"is ignored by the library, which runs {p.get('corename')}"
        return out
    err = gemm_error(p["cases"], p["outputs"])
    out["max_error"] = float(f"{err:.3g}")
    out["ok"] = err <= GEMM_TOL
    if not out["ok"]:
        out["why"] = f"failed the GEMM check (error {err:.3g} against numpy's float64 product; limit {GEMM_TOL:g})"
    return out


# --- the decision ------------------------------------------------------------------------------------

_THIS_CPU = "this CPU"


def decide(extension: str | None = None, library_link: str | None = None, cpu=_THIS_CPU, probe_fn=probe) -> dict:
    """Probe the library that ``extension`` (default: the importable Caffe's) links and choose a core.

    ``cpu`` is :func:`cpu_info`'s record (default: this machine's). ``probe_fn`` does the probing; the
    tests substitute one that corrupts a result, to simulate a library that computes wrong numbers.
    Returns the record that :func:`save` writes.
    """
    import time

    if cpu is _THIS_CPU:
        cpu = cpu_info()
    if extension is None:
        extension = caffe_extension()
    rec: dict = {"format": FORMAT, "decided": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    rec.update(library=None, openblas=False, chosen_core=None)
    if extension is None:
        return {**rec, "key": None, "reason": "no pycaffe to import"}
    if library_link is None:
        library_link = linked_blas(extension) or ""
    rec["key"] = key = library_key(extension, library_link, cpu)
    if not library_link:
        return {**rec, "reason": "Caffe links no BLAS library that ldd shows"}
    rec["library"] = key["library"]
    default = check(key["library"], None, probe_fn)
    rec.update(
        openblas=default["reported"] is not None,
        version=version_of(default["config"]),
        config=default["config"],
        threading=THREADING.get(default["parallel"]),
        default_core=default["reported"],
        default_check={k: default[k] for k in ("ok", "max_error", "why")},
        tried=[],
    )
    if not rec["openblas"]:
        rec["reason"] = "not OpenBLAS (no openblas_get_corename), left as it is"
        if default["why"]:
            rec["reason"] += f"; {default['why']}"
        return rec
    candidates = candidate_cores(default["reported"], cpu["flags"] if cpu else ())
    if not candidates:
        rec["reason"] = "it suits this CPU" if cpu else "no CPU flags to judge by off Linux x86-64"
        return rec
    for core in candidates:
        c = check(key["library"], core, probe_fn)
        rec["tried"].append({k: c[k] for k in ("requested", "reported", "ok", "max_error", "why")})
        if c["ok"]:
            rec["chosen_core"] = core
            isa = "AVX-512" if core == "SkylakeX" else "AVX2 and FMA"
            rec["reason"] = f"the library's default {default['reported']} is a generic core; this CPU has {isa}"
            return rec
    tried = "; ".join(f"{t['requested']} {t['why']}" for t in rec["tried"])
    rec["reason"] = f"kept the library's default {default['reported']}: {tried}"
    return rec


def save(decision: dict, path: str | None = None) -> str:
    """Write the decision atomically (several processes may decide at once); returns the path."""
    import tempfile

    path = str(path or decision_path())
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=os.path.basename(path) + ".", dir=folder)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(decision, f, indent=1)
            f.write("\n")
        os.chmod(tmp, 0o644)  # mkstemp makes it private; every user of the venv reads it
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def load(path: str | None = None) -> dict | None:
    """The stored decision, or None (missing, unreadable, or of another format)."""
    try:
        with open(path or decision_path()) as f:
            d = json.load(f)
    except (OSError, ValueError):
        return None
    return d if isinstance(d, dict) and d.get("format") == FORMAT else None


def is_current(decision: dict | None, extension: str | None = None) -> bool:
    """Whether ``decision`` still describes this Caffe, the file behind its library link and this CPU."""
    key = (decision or {}).get("key")
    if not key:
        return False
    ext = os.path.realpath(extension) if extension else caffe_extension()
    return ext is not None and library_key(ext, key["library_link"], cpu_info()) == key


# --- applying it before Caffe loads -------------------------------------------------------------------


def _loaded_openblas() -> str | None:
    """The path of an OpenBLAS of Caffe's kind already mapped into this process (numpy's is not it)."""
    try:
        with open("/proc/self/maps") as f:
            maps = f.read()
    except OSError:
        return None
    for line in maps.splitlines():
        parts = line.split(None, 5)
        if len(parts) == 6 and os.path.basename(parts[5]).startswith("libopenblas"):
            return parts[5]
    return None


def running_core() -> str | None:
    """The core the loaded OpenBLAS runs, asked in this process; None if none is loaded yet."""
    path = _loaded_openblas()
    if path is None:
        return None
    import ctypes

    try:
        f = ctypes.CDLL(path).openblas_get_corename  # already loaded: the same handle, no new start-up
    except (OSError, AttributeError):
        return None
    f.restype, f.argtypes = ctypes.c_char_p, []
    name = f()
    return name.decode("ascii", "replace") if name else None


def configure(path: str | None = None, allow_probe: bool = True, announce: bool = True) -> dict:
    """Set ``OPENBLAS_CORETYPE`` from the setup-time decision, before Caffe's OpenBLAS loads.

    Never overrides a value the user set. Cheap after the first call of a process: the status is
    kept (a ``path`` other than the kept status's file is evaluated afresh). ``allow_probe``:
    without a valid decision, probe now and store the result (False in the interpreter-start
    hook). ``announce``: log the one-line :func:`summary` at INFO, once per process. Returns the
    status that :func:`describe` reports.
    """
    global _status, _announced
    other_file = path is not None and str(path) != _status["decision_file"] if _status else False
    if _status is None or other_file or (allow_probe and _status["source"] == "no decision"):
        _status = _configure(path, allow_probe)
    if announce and not _announced:
        _announced = True
        _log().info("%s", summary(_status))
    return _status


def _configure(path: str | None, allow_probe: bool) -> dict:
    user, ours = os.environ.get(ENV), os.environ.get(MARK)
    decision = load(path)
    facts = ("library", "version", "threading", "default_core", "chosen_core")
    st: dict = {k: (decision or {}).get(k) for k in facts}
    st["decision_file"] = str(path or decision_path())
    if user is not None and user != ours:
        return {**st, "core": user, "source": "user-set"}
    if _loaded_openblas() is not None:  # too late to choose: say what runs
        return {**st, "core": running_core(), "source": "inherited" if user is not None else "already loaded"}
    if is_current(decision):
        source = "chosen at setup"
    elif allow_probe and caffe_extension() is not None:
        decision = decide()
        try:
            save(decision, path)
        except OSError as e:
            _log().debug("cannot store the BLAS decision: %s", e)
        st.update({k: decision.get(k) for k in facts})
        source = "chosen now"
    else:
        _unset_ours(ours)
        return {**st, "chosen_core": None, "core": None, "source": "no decision"}
    chosen = decision.get("chosen_core")
    if chosen:
        os.environ[ENV] = os.environ[MARK] = chosen
        return {**st, "core": chosen, "source": source}
    _unset_ours(ours)
    return {**st, "core": decision.get("default_core"), "source": "default", "reason": decision.get("reason")}


def _unset_ours(ours: str | None) -> None:
    """Drop a choice inherited from a parent process that this process's decision does not make."""
    if ours is not None and os.environ.get(ENV) == ours:
        del os.environ[ENV]
    os.environ.pop(MARK, None)


def summary(st: dict | None) -> str:
    """One log line: library, version, threading, the core that runs, and why."""
    st = st or {}
    lib = f"OpenBLAS {st['version']}" if st.get("version") else (st.get("library") or "BLAS unknown")
    if st.get("threading"):
        lib += f" ({st['threading']})"
    core, src, default = st.get("core"), st.get("source"), st.get("default_core")
    if src == "user-set":
        why = f"OPENBLAS_CORETYPE set by the user; the library's default: {default or 'unknown'}"
    elif src in ("chosen at setup", "chosen now"):
        why = f"{src}; the library's default: {default}"
    elif src == "inherited":
        why = f"chosen by a parent process; the library's default: {default}"
    elif src == "default":
        why = "the library's default" + (f"; {st['reason']}" if st.get("reason") else "")
    elif src == "already loaded":
        why = "Caffe's OpenBLAS was loaded before redseg.toolchain.blas could choose"
    else:
        why = f"no BLAS decision at {st.get('decision_file')}; `make setup` makes one"
    return f"BLAS: {lib}, core {core or 'unknown'} ({why})"


def describe() -> dict:
    """The BLAS facts for the benchmark's JSON: the status, and the core really running once Caffe is loaded."""
    st = dict(configure(announce=False))
    st["running_core"] = running_core()
    st["OPENBLAS_CORETYPE"] = os.environ.get(ENV)
    st["summary"] = summary(st)
    return st


# --- setup -------------------------------------------------------------------------------------------


def install_pth_hook() -> str | None:
    """A ``.pth`` line in the venv, so that a plain ``import caffe`` gets the decision too.

    Python runs it at every start of the venv's interpreter, so it only reads the decision file
    (about 10 ms with the import, no probing) and swallows any error: a broken hook must not break
    Python.
    """
    if sys.prefix == getattr(sys, "base_prefix", sys.prefix):
        return None
    import sysconfig

    hook = os.path.join(sysconfig.get_paths()["purelib"], PTH_FILE)
    # Skipped under `python -m redseg.toolchain.blas`, which would otherwise find itself imported already.
    line = (
        'import sys; exec("try:\\n from redseg.toolchain import blas\\n'
        ' blas.configure(allow_probe=False, announce=False)\\nexcept Exception:\\n pass")'
        ' if "redseg.toolchain.blas" not in getattr(sys, "orig_argv", ()) else None\n'
    )
    with open(hook, "w") as f:
        f.write(line)
    return hook


def setup(path: str | None = None) -> dict:
    """Decide afresh, store the decision, install the ``.pth`` hook; print what was chosen."""
    d = decide()
    where = save(d, path)
    hook = install_pth_hook()
    st = {**d, "core": d.get("chosen_core") or d.get("default_core")}
    st["source"] = "chosen at setup" if d.get("chosen_core") else "default"
    print(f"setup: {summary(st)}")
    for t in d.get("tried") or []:
        verdict = "chosen" if t["ok"] else f"rejected: {t['why']}"
        print(f"setup:   {t['requested']}: {verdict} (largest GEMM error {t['max_error']})")
    print(f"setup:   decision in {where}" + (f", read at start-up by {hook}" if hook else ""))
    if os.environ.get(ENV) is not None and os.environ.get(ENV) != os.environ.get(MARK):
        print(f"setup:   OPENBLAS_CORETYPE={os.environ[ENV]} is set here, and wins wherever it is set")
    return d


def main(argv: list[str] | None = None) -> int:
    import argparse

    ap = argparse.ArgumentParser(prog="python -m redseg.toolchain.blas", description=__doc__.split("\n\n")[0])
    ap.add_argument("--setup", action="store_true", help="probe the library Caffe links, choose a core, store it")
    ap.add_argument("--file", help=f"the decision file (default {decision_path()})")
    args = ap.parse_args(argv)
    if args.setup:
        setup(args.file)
        return 0
    d = load(args.file)
    print(json.dumps({"decision": d, "current": is_current(d)}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
