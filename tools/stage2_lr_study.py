#!/usr/bin/env python3
"""Gradient sizes of the stage-2 (FN + FP) loss against the stage-1 (Top-k) loss on one model.

  python tools/stage2_lr_study.py --weights runs/demo/stage1_final.caffemodel --data runs/demo/data \
      [--schedule demo] [--images 4] [--maps] [--json runs/lr_study/grads.json]

Builds the stage-1 and the stage-2 train net on the prepared set's training list, copies the
weights into both, and runs one forward/backward of each on the same samples. Reports the L2 norm
of every parameter's gradient (all losses, and each branch's losses alone), per part (encoder, MA
branch, HE branch) and in total, the relative size of one SGD step at each stage's learning rate
(--schedule, or --lr1/--lr2), and, at each branch's fused logit, the mean probability on lesion and
background pixels and where the gradients come from. --maps adds the mean test-time probability on
the test split's lesion and background pixels. See redseg/training/grad_study.py and docs/stage2_lr.md.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from redseg import cli  # noqa: E402
from redseg import config as C  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    ap = cli.parser(__doc__)
    ap.add_argument("--weights", type=Path, required=True, help="a Red-Seg .caffemodel (e.g. stage1_final)")
    ap.add_argument("--data", type=Path, required=True, help="prepared set (its train list is used)")
    ap.add_argument("--schedule", choices=sorted(C.SCHEDULES), default="demo", help="learning rates from (demo)")
    ap.add_argument("--lr1", type=float, help="stage-1 lr (default: the schedule's)")
    ap.add_argument("--lr2", type=float, help="stage-2 lr (default: the schedule's)")
    ap.add_argument("--images", type=int, default=4, help="training samples to average over (default 4)")
    ap.add_argument("--lambda", dest="lam", type=float, help="stage-1 Top-k lambda (default: end of the staircase)")
    ap.add_argument("--no-branch-split", action="store_true", help="skip the per-branch backward passes (faster)")
    ap.add_argument("--maps", action="store_true", help="also the mean test-time probabilities on the test split")
    ap.add_argument("--json", type=Path, help="JSON result (default runs/lr_study/grads_<weights>_<HxW>.json)")
    ap.add_argument("--workdir", type=Path, help="keep the generated nets here (default: a temporary folder)")
    args = cli.parse(ap, argv)
    if args.images < 1:
        ap.error("--images must be >= 1")
    if args.lam is not None and not 0 < args.lam <= 1:
        ap.error("--lambda must be in (0, 1]")
    return cli.run(lambda: run(args), ap.prog)


def run(args) -> int:
    from redseg.data.prepared_set import read_meta
    from redseg.experiments.benchmark import machine_info
    from redseg.toolchain.caffe_utils import CaffeInputError, set_mode
    from redseg.training.grad_study import FINAL_LAMBDA, format_report, map_stats, measure

    if not args.weights.is_file():
        raise CaffeInputError(f"weights file not found: {args.weights}")
    meta = read_meta(args.data)
    sched = C.SCHEDULES[args.schedule]
    lr = {1: args.lr1 or sched.stage1.base_lr, 2: args.lr2 or sched.stage2.base_lr}
    set_mode(None)
    with tempfile.TemporaryDirectory() as tmp:
        result = measure(
            args.weights,
            args.data,
            args.workdir or Path(tmp),
            lr,
            n_images=args.images,
            lam=FINAL_LAMBDA if args.lam is None else args.lam,
            branch_split=not args.no_branch_split,
        )
    if args.maps:
        result["test_maps"] = map_stats(args.weights, args.data)
    result["machine"] = machine_info(None)
    print(format_report(result))
    if args.maps:
        for les, m in result["test_maps"].items():
            print(f"test maps {les}: mean p on lesion {m['mean_p_pos']}, on background {m['mean_p_neg']:.4f}")
    size = "x".join(map(str, meta.get("size", [])[::-1])) or "sizes"
    out = args.json or Path("runs/lr_study") / f"grads_{args.weights.stem}_{size}.json"
    cli.save_json(out, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
