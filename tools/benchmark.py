#!/usr/bin/env python3
"""Time Red-Seg's real nets on this machine: iterations, loss layers, data layer, inference, scoring.

    python tools/benchmark.py [--size 712x1072] [--gpu N] [--json OUT] [--repeats 3]

Builds the stage-1 and stage-2 train nets and the deploy net from redseg/model/net.py, on synthetic
images it makes in a temporary folder (no IDRiD or VGG16 weights needed), and measures: one
training iteration per stage (with a per-layer breakdown, like `caffe time`), the 8 Python loss
layers' forward + backward (and the float64 reference losses of redseg/model/reference_losses.py on the
same inputs, with the speed-up), the data layer per iteration, one deploy forward pass, scoring
27 test images, and the peak resident memory. First, each net (stage-1 and stage-2 train nets, deploy
net) in a process of its own, with Caffe's shared im2col buffer and with one per layer
(REDSEG_SHARED_COL=0): peak resident memory and seconds per iteration both ways, the deploy net at
--deploy-scales of the size (the largest photograph within 16 GB), and the GPU memory of a stage-1
iteration on paper. Prints a table; writes JSON (default
runs/benchmark/benchmark_<H>x<W>_<cpu|gpuN>.json). See docs/performance.md.

    python tools/benchmark.py --memory-only [--size 712x1072] [--deploy-scales 0.5,1]

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
    mem = ap.add_mutually_exclusive_group()
    mem.add_argument("--no-memory", action="store_true", help="skip the per-net memory runs (shared / own im2col)")
    mem.add_argument("--memory-only", action="store_true", help="only the per-net memory runs")
    ap.add_argument(
        "--memory-rounds", type=int, default=1, help="fresh processes per net and way, taking turns (default 1)"
    )
    ap.add_argument(
        "--deploy-scales",
        default="0.5,1",
        help="deploy net sizes for the 16 GB photograph, as fractions of --size (default 0.5,1)",
    )
    args = cli.parse(ap, argv)
    if args.repeats < 1 or args.fast_repeats < 1 or args.warmup < 0 or args.memory_rounds < 1:
        ap.error("--repeats, --fast-repeats and --memory-rounds must be >= 1, --warmup >= 0")
    try:
        stages = tuple(int(s) for s in args.stages.split(","))
    except ValueError:
        ap.error(f"--stages wants e.g. 1,2; got {args.stages!r}")
    if not stages or set(stages) - {1, 2}:
        ap.error("--stages: 1, 2 or 1,2")
    try:
        scales = tuple(float(s) for s in args.deploy_scales.split(","))
    except ValueError:
        ap.error(f"--deploy-scales wants e.g. 0.5,1; got {args.deploy_scales!r}")
    if not scales or min(scales) <= 0:
        ap.error("--deploy-scales: positive fractions, e.g. 0.5,1")
    args.deploy_scales = scales
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
        memory=not args.no_memory,
        memory_only=args.memory_only,
        deploy_scales=args.deploy_scales,
        memory_rounds=args.memory_rounds,
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
