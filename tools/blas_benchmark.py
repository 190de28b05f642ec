#!/usr/bin/env python3
"""Time the Red-Seg deploy net under several OpenBLAS cores, each in a fresh process (docs/performance.md).

    python tools/blas_benchmark.py [--size 178x268] [--rounds 5] [--cores Prescott,Haswell,SkylakeX]

OpenBLAS picks its kernels once, when it loads, so every measurement is a child process started
with OPENBLAS_CORETYPE set to the core under test (redseg.toolchain.blas keeps a value set like this). Each
child builds the deploy net from redseg/model/net.py with the same random weights and image, runs one
untimed forward + backward pass, then times --passes of them and saves the probability maps; the
parent compares the maps with the first core's. The cores are interleaved, one child per core per
round, in a rotating order, so that load from other users of the machine spreads over all of them.
With --sgemm it also times single-threaded 1024^3 sgemm per core. Prints a table and writes JSON
(default runs/benchmark/blas_cores_<H>x<W>.json).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402

from redseg import cli  # noqa: E402
from redseg.toolchain import blas  # noqa: E402

SEED = 7


def child_deploy(size: tuple[int, int], passes: int, maps: Path) -> dict:
    """In a fresh process: forward + backward of the deploy net at ``size`` (H, W), ``passes`` times."""
    from redseg.toolchain.caffe_utils import import_caffe

    caffe = import_caffe()
    from redseg.model.net import NetOptions, redseg

    caffe.set_mode_cpu()
    caffe.set_random_seed(SEED)
    param = redseg(NetOptions(stage="deploy"))
    param.force_backward = True  # the deploy net has no loss; backward from the probability maps
    with tempfile.NamedTemporaryFile("w", suffix=".prototxt", delete=False) as f:
        f.write(str(param))
    try:
        net = caffe.Net(f.name, caffe.TEST)
    finally:
        os.unlink(f.name)
    h, w = size
    net.blobs["data"].reshape(1, 3, h, w)
    net.reshape()
    net.blobs["data"].data[...] = np.random.default_rng(SEED).normal(0, 40, (1, 3, h, w))

    def step():
        net.forward()
        for top in ("prob_ma", "prob_he"):
            net.blobs[top].diff[...] = 1.0
        net.backward()

    step()
    times = []
    for _ in range(passes):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    np.savez(maps, prob_ma=net.blobs["prob_ma"].data, prob_he=net.blobs["prob_he"].data)
    st = blas.describe()
    return {"times_s": times, "running_core": st["running_core"], "blas": st["summary"]}


def child_sgemm(library: str, n: int, repeats: int) -> dict:
    """In a fresh process: GFLOP/s of one n^3 sgemm through the library's cblas_sgemm (best and median)."""
    import ctypes

    lib = ctypes.CDLL(library)
    lib.openblas_get_corename.restype = ctypes.c_char_p
    f = lib.cblas_sgemm
    i, p, fl = ctypes.c_int, ctypes.c_void_p, ctypes.c_float
    f.argtypes, f.restype = [i, i, i, i, i, i, fl, p, i, p, i, fl, p, i], None
    rng = np.random.default_rng(SEED)
    a, b = (rng.standard_normal((n, n), dtype=np.float32) for _ in range(2))
    c = np.zeros((n, n), np.float32)

    def run():
        f(101, 111, 111, n, n, n, 1.0, a.ctypes.data, n, b.ctypes.data, n, 0.0, c.ctypes.data, n)

    run()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        run()
        times.append(time.perf_counter() - t0)
    gflop = 2.0 * n**3 / 1e9
    return {
        "core": lib.openblas_get_corename().decode(),
        "gflops_best": round(gflop / min(times), 1),
        "gflops_median": round(gflop / float(np.median(times)), 1),
    }


def _spawn(args: list[str], core: str, extra_env: dict | None = None) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in (blas.ENV, blas.MARK)}
    env[blas.ENV] = core
    env.setdefault("GLOG_minloglevel", "2")
    env.update(extra_env or {})
    r = subprocess.run([sys.executable, __file__, *args], capture_output=True, text=True, env=env, timeout=900)
    if r.returncode != 0:
        raise RuntimeError(f"child for {core} failed:\n{r.stderr[-2000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def machine() -> dict:
    cpu = blas.cpu_info() or {}
    flags = set(cpu.get("flags", ()))
    isa = [f for f in ("sse4_2", "avx", "avx2", "fma", *sorted(blas.AVX512), "avx512_bf16", "amx_tile") if f in flags]
    return {
        "cpu": cpu.get("model_name"),
        "family_model": f"{cpu.get('family')}/{cpu.get('model')}",
        "isa": isa,
        "usable_cpus": len(os.sched_getaffinity(0)),
        "python": sys.version.split()[0],
        "numpy": np.__version__,
    }


def main(argv: list[str] | None = None) -> int:
    ap = cli.parser(__doc__)
    ap.add_argument(
        "--size",
        type=cli.size_at_least(32, "the net downsamples 16x"),
        default=(178, 268),
        help="HxW (default 178x268: IDRiD at 1/16)",
    )
    ap.add_argument("--cores", default="Prescott,Haswell,SkylakeX", help="OpenBLAS cores, the first is the baseline")
    ap.add_argument("--rounds", type=int, default=5, help="children per core (default 5)")
    ap.add_argument("--passes", type=int, default=3, help="timed forward+backward passes per child (default 3)")
    ap.add_argument("--sgemm", type=int, default=0, metavar="N", help="also time single-thread N^3 sgemm per core")
    ap.add_argument("--json", type=Path, help="where to write the JSON")
    ap.add_argument("--child", choices=("deploy", "sgemm"), help=argparse.SUPPRESS)
    ap.add_argument("--maps", help=argparse.SUPPRESS)
    ap.add_argument("--library", help=argparse.SUPPRESS)
    args = cli.parse(ap, argv)
    if args.child == "deploy":
        print(json.dumps(child_deploy(args.size, args.passes, Path(args.maps))))
        return 0
    if args.child == "sgemm":
        print(json.dumps(child_sgemm(args.library, args.sgemm, 5)))
        return 0
    return cli.run(lambda: run(args), ap.prog)


def run(args) -> int:
    h, w = args.size
    cores = [c.strip() for c in args.cores.split(",") if c.strip()]
    ext = blas.caffe_extension()
    library = os.path.realpath(blas.linked_blas(ext)) if ext else None
    if library is None:
        raise RuntimeError("no BLAS library found behind pycaffe")
    decision = blas.decide(ext)
    result: dict = {
        "tool": "tools/blas_benchmark.py",
        "size": [h, w],
        "machine": machine(),
        "library": library,
        "openblas": decision.get("config"),
        "default_core": decision.get("default_core"),
        "chosen_core": decision.get("chosen_core"),
        "loadavg_start": [round(v, 2) for v in os.getloadavg()],
        "cores": {c: {"times_s": [], "running": None} for c in cores},
    }
    t_start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="redseg-blasbench-") as tmp:
        for r in range(args.rounds):
            order = cores[r % len(cores) :] + cores[: r % len(cores)]
            for core in order:
                maps = Path(tmp) / f"{core}.npz"
                out = _spawn(
                    ["--child", "deploy", "--size", f"{h}x{w}", "--passes", str(args.passes), "--maps", str(maps)], core
                )
                entry = result["cores"][core]
                entry["times_s"] += [round(t, 4) for t in out["times_s"]]
                entry["running"] = out["running_core"]
                entry["blas"] = out["blas"]
            print(
                f"round {r + 1}/{args.rounds}: "
                + ", ".join(f"{c} {np.median(result['cores'][c]['times_s']):.3f} s" for c in cores),
                flush=True,
            )
        base = np.load(Path(tmp) / f"{cores[0]}.npz")
        for core in cores:
            other = np.load(Path(tmp) / f"{core}.npz")
            result["cores"][core]["max_map_diff_vs_" + cores[0]] = float(
                max(np.abs(other[k] - base[k]).max() for k in ("prob_ma", "prob_he"))
            )
    if args.sgemm:
        for core in cores:
            one = {"OPENBLAS_NUM_THREADS": "1"}
            out = _spawn(["--child", "sgemm", "--sgemm", str(args.sgemm), "--library", library], core, one)
            result["cores"][core]["sgemm_1thread"] = {"n": args.sgemm, **out}
    result["loadavg_end"] = [round(v, 2) for v in os.getloadavg()]
    result["elapsed_s"] = round(time.perf_counter() - t_start, 1)
    base_med = float(np.median(result["cores"][cores[0]]["times_s"]))
    print(f"\nRed-Seg deploy net forward + backward at {w}x{h} (W x H), {result['machine']['cpu']}")
    print(f"{result['openblas']}; load average {result['loadavg_start']} -> {result['loadavg_end']}")
    print(
        f"{'core':12s} {'runs':>4s} {'median s':>9s} {'IQR s':>7s} {'vs ' + cores[0]:>12s} {'max map diff':>13s} sgemm"
    )
    for core in cores:
        e = result["cores"][core]
        t = np.asarray(e["times_s"])
        q1, med, q3 = np.percentile(t, [25, 50, 75])
        e["median_s"], e["iqr_s"] = round(float(med), 4), round(float(q3 - q1), 4)
        e["speedup_vs_" + cores[0]] = round(base_med / float(med), 2)
        sg = e.get("sgemm_1thread")
        sgs = f"{sg['gflops_median']} GFLOP/s ({sg['core']})" if sg else ""
        diff = e["max_map_diff_vs_" + cores[0]]
        speed = e["speedup_vs_" + cores[0]]
        print(f"{core:12s} {len(t):4d} {med:9.3f} {q3 - q1:7.3f} {speed:11.2f}x {diff:13.2g} {sgs}")
        if (e["running"] or "").lower() != core.lower():
            print(f"  note: the library ran {e['running']} when asked for {core}")
    out = args.json or Path("runs/benchmark") / f"blas_cores_{h}x{w}.json"
    cli.save_json(out, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
