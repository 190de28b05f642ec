#!/usr/bin/env python3
"""Time Red-Seg's real nets on this machine: iterations, loss layers, data layer, inference, scoring.

    python tools/benchmark.py [--size 712x1072] [--gpu N] [--json OUT] [--repeats 3]

Builds the stage-1 and stage-2 train nets and the deploy net from redseg/model/net.py, on synthetic
images it makes in a temporary folder (no IDRiD or VGG16 weights needed), and measures: one
training iteration per stage (with a per-layer breakdown, like `caffe time`), the 8 Python loss
layers' forward + backward (and the float64 reference losses of redseg/model/reference_losses.py on the
same inputs, with the speed-up), the data layer per iteration, one deploy forward pass, scoring
27 test images, and the peak resident memory. Prints a table; writes JSON (default
runs/benchmark/benchmark_<H>x<W>_<cpu|gpuN>.json). See docs/performance.md.

    python tools/benchmark.py --onnx [--size 712x1072] [--repeats 3]

instead times one photograph through the deploy net in pycaffe and through its ONNX export in
ONNX Runtime, both on the CPU, side by side on the same input (JSON default
runs/benchmark/onnx_<H>x<W>_cpu.json). See docs/onnx.md.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from redseg import cli  # noqa: E402
from redseg.experiments.benchmark import (  # noqa: E402
    TARGET_SIZE,
    BenchConfig,
    format_onnx_report,
    format_report,
    run_benchmark,
    run_onnx_benchmark,
)


def main(argv: list[str] | None = None) -> int:
    ap = cli.parser(__doc__)
    ap.add_argument(
        "--size",
        type=cli.size_at_least(32, "the net downsamples 16x"),
        default=TARGET_SIZE,
        help="image size HxW (rows x columns; default 712x1072, the paper's)",
    )
    ap.add_argument("--gpu", type=int, help="GPU id (needs a CUDA build of Caffe; default: CPU)")
    ap.add_argument("--json", type=Path, help="where to write the JSON result")
    ap.add_argument("--repeats", type=int, default=3, help="timed iterations / forward passes / scorings (default 3)")
    ap.add_argument("--fast-repeats", type=int, default=20, help="timed runs of the loss and data layers (default 20)")
    ap.add_argument("--warmup", type=int, default=1, help="untimed iterations first (default 1)")
    ap.add_argument("--stages", default="1,2", help="training stages to time (default 1,2)")
    ap.add_argument("--workdir", type=Path, help="keep the generated set and nets here (default: a temp folder)")
    ap.add_argument(
        "--onnx", action="store_true", help="only the deploy forward pass: pycaffe and ONNX Runtime on the CPU"
    )
    args = cli.parse(ap, argv)
    if args.repeats < 1 or args.fast_repeats < 1 or args.warmup < 0:
        ap.error("--repeats and --fast-repeats must be >= 1, --warmup >= 0")
    try:
        stages = tuple(int(s) for s in args.stages.split(","))
    except ValueError:
        ap.error(f"--stages wants e.g. 1,2; got {args.stages!r}")
    if not stages or set(stages) - {1, 2}:
        ap.error("--stages: 1, 2 or 1,2")
    if args.onnx and args.gpu is not None:
        ap.error("--onnx compares the two on the CPU; drop --gpu")
    if args.onnx:
        return cli.run(lambda: run_onnx(args), ap.prog)
    return cli.run(lambda: run(args, stages), ap.prog)


def run(args, stages: tuple[int, ...]) -> int:
    cfg = BenchConfig(
        size=args.size,
        gpu=args.gpu,
        repeats=args.repeats,
        fast_repeats=args.fast_repeats,
        warmup=args.warmup,
        stages=stages,
        workdir=args.workdir,
    )
    result = run_benchmark(cfg)  # --gpu on a CPU-only Caffe build: a RuntimeError, exit 1
    print(format_report(result))
    h, w = args.size
    mode = "cpu" if args.gpu is None else f"gpu{args.gpu}"
    out = args.json or Path("runs/benchmark") / f"benchmark_{h}x{w}_{mode}.json"
    cli.save_json(out, result)
    return 0


def run_onnx(args) -> int:
    cfg = BenchConfig(size=args.size, repeats=args.repeats, warmup=args.warmup, workdir=args.workdir)
    result = run_onnx_benchmark(cfg)
    print(format_onnx_report(result))
    h, w = args.size
    cli.save_json(args.json or Path("runs/benchmark") / f"onnx_{h}x{w}_cpu.json", result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
