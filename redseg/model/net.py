"""Red-Seg nets and solvers, built with ``caffe.NetSpec`` (the style of FCN's net.py).

Architecture: paper Table 1 and Figs. 2-4 (docs/method.md#network):

* encoder: the 13 convolutions of VGG16 (3x3, pad 1, ReLU), max pooling 2x2/2 between stages,
  no pool5 and no fully connected layers;
* one branch per lesion: a 1x1 convolution with one output on the last convolution of some stages
  (MA: conv2_2, conv3_3, conv4_3; HE: conv3_3, conv4_3, conv5_3), each upsampled bilinearly to the
  input size, each with its own deeply supervised loss; the side maps concatenated and fused by a
  1x1 convolution, with a fourth loss. The sigmoid of the fused map is the probability map.

[assumption, docs/method.md#upsampling] Upsampling is Caffe's idiom: a ``Deconvolution`` with a
fixed bilinear kernel (kernel 2f, stride f, lr_mult 0, no bias) then a ``Crop`` to the data blob
(offsets from ``caffe.coord_map.crop``). lr multipliers follow the authors' L-Seg net
(redseg.config; docs/method.md#learning-rate-multipliers).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from redseg import config as C
from redseg.fileio import write_text
from redseg.toolchain.caffe_utils import import_caffe

caffe = import_caffe()
from caffe import layers as L  # noqa: E402
from caffe import params as P  # noqa: E402
from caffe.coord_map import crop  # noqa: E402

LOSS_MODULE = "losses"
DATA_MODULE = "data_layer"
DEFAULT_TRAIN_LIST = "data/idrid/train.txt"


@dataclass(frozen=True)
class NetOptions:
    """What distinguishes one generated net from another."""

    stage: int | str = 1  # 1: Top-k balanced CE (section 2.2, eq. L1); 2: FN + FP (eq. L2); "deploy"
    ma_stages: tuple[int, ...] = C.BRANCH_STAGES["MA"]  # Table 5 ablations change this
    he_stages: tuple[int, ...] = C.BRANCH_STAGES["HE"]
    train_list: str = DEFAULT_TRAIN_LIST
    lambda0: float = C.LAMBDA0
    period: int = C.LAMBDA_PERIOD
    max_iter: int = C.SCHEDULES["paper"].stage1.max_iter
    seed: int = 1
    negatives: str = "image"  # stage 1: "image" (every pixel) or "fov" (docs/method.md#counting-negatives)


def _param(mult: tuple[float, float]):
    return [dict(lr_mult=mult[0], decay_mult=1), dict(lr_mult=mult[1], decay_mult=0)]


def conv_relu(bottom, nout: int, mult: tuple[float, float]):
    conv = L.Convolution(
        bottom,
        kernel_size=3,
        pad=1,
        num_output=nout,
        param=_param(mult),
        weight_filler=dict(type="msra"),  # used only without ImageNet weights (from scratch)
        bias_filler=dict(type="constant", value=0),
    )
    return conv, L.ReLU(conv, in_place=True)


def max_pool(bottom):
    return L.Pooling(bottom, pool=P.Pooling.MAX, kernel_size=2, stride=2)


def side_output(n, bottom, name: str, factor: int, ref):
    """1x1 conv to one channel, bilinear upsampling by ``factor`` and crop to ``ref``'s size."""
    n[f"side_{name}"] = L.Convolution(
        bottom,
        kernel_size=1,
        num_output=1,
        param=_param(C.LR_MULT_SIDE),
        weight_filler=dict(type="gaussian", std=0.01),
        bias_filler=dict(type="constant", value=0),
    )
    if factor == 1:
        return n[f"side_{name}"]
    n[f"up_{name}"] = L.Deconvolution(
        n[f"side_{name}"],
        convolution_param=dict(
            num_output=1,
            kernel_size=2 * factor,
            stride=factor,
            bias_term=False,
            weight_filler=dict(type="bilinear"),
        ),
        param=[dict(lr_mult=0, decay_mult=0)],
    )
    n[f"score_{name}"] = crop(n[f"up_{name}"], ref)
    return n[f"score_{name}"]


def loss_layer(score, label, opts: NetOptions, fov=None):
    bottoms = [score, label]
    if opts.stage == 1:
        cls = "TopKBalancedCELoss"
        param = dict(lambda0=opts.lambda0, period=opts.period, max_iter=opts.max_iter)
        if opts.negatives != "image":
            param["negatives"] = opts.negatives
            bottoms.append(fov)
    else:
        cls, param = "FNFPLoss", {}
    return L.Python(
        *bottoms,
        module=LOSS_MODULE,
        layer=cls,
        param_str=json.dumps(param, sort_keys=True),
        loss_weight=1,  # docs/method.md#loss-weights
    )


def redseg(opts: NetOptions):
    """The Red-Seg net as a ``caffe.NetSpec`` (train net for stage 1/2, or the deploy net)."""
    n = caffe.NetSpec()
    deploy = opts.stage == "deploy"
    if deploy:
        n.data = L.Input(shape=dict(dim=[1, 3, 712, 1072]))  # any H, W: reshape before forward
    elif opts.negatives == "fov" and opts.stage == 1:
        n.data, n.label_ma, n.label_he, n.fov = L.Python(
            module=DATA_MODULE,
            layer="RedSegData",
            ntop=4,
            param_str=json.dumps(dict(list=opts.train_list, shuffle=True, seed=opts.seed, fov=True), sort_keys=True),
        )
    else:
        n.data, n.label_ma, n.label_he = L.Python(
            module=DATA_MODULE,
            layer="RedSegData",
            ntop=3,
            param_str=json.dumps(dict(list=opts.train_list, shuffle=True, seed=opts.seed), sort_keys=True),
        )
    # Encoder: VGG16's 13 convolutions (Table 1).
    stage_out = {}
    bottom = n.data
    for s, (stage, nout, nconv) in enumerate(C.VGG16_CONVS, start=1):
        if s > 1:
            n[f"pool{s - 1}"] = max_pool(bottom)
            bottom = n[f"pool{s - 1}"]
        mult = C.LR_MULT_CONV5 if s == 5 else C.LR_MULT_CONV
        for i in range(1, nconv + 1):
            n[f"{stage}_{i}"], n[f"relu{s}_{i}"] = conv_relu(bottom, nout, mult)
            bottom = n[f"{stage}_{i}"]
        stage_out[s] = bottom
    # One branch per lesion (Figs. 2-4).
    for lesion, stages in (("MA", opts.ma_stages), ("HE", opts.he_stages)):
        les = lesion.lower()
        sides = [side_output(n, stage_out[s], f"{les}_conv{s}", 2 ** (s - 1), n.data) for s in stages]
        n[f"concat_{les}"] = L.Concat(*sides, concat_param=dict(axis=1))
        n[f"fuse_{les}"] = L.Convolution(
            n[f"concat_{les}"],
            kernel_size=1,
            num_output=1,
            param=_param(C.LR_MULT_FUSE),
            weight_filler=dict(type="constant", value=C.FUSE_INIT),
            bias_filler=dict(type="constant", value=0),
        )
        if deploy:
            n[f"prob_{les}"] = L.Sigmoid(n[f"fuse_{les}"])
        else:
            label = n[f"label_{les}"]
            fov = n["fov"] if "fov" in n.tops else None
            for s in stages:
                src = n[f"score_{les}_conv{s}"] if s > 1 else n[f"side_{les}_conv{s}"]
                n[f"loss_{les}_conv{s}"] = loss_layer(src, label, opts, fov)
            n[f"loss_{les}_fuse"] = loss_layer(n[f"fuse_{les}"], label, opts, fov)
    proto = n.to_proto()
    proto.name = "Red-Seg " + (f"stage {opts.stage} (train)" if not deploy else "deploy")
    return proto


def loss_names(ma_stages=C.BRANCH_STAGES["MA"], he_stages=C.BRANCH_STAGES["HE"]) -> dict[str, list[str]]:
    """The loss blobs of a train net, per lesion (3 deep-supervision losses + fuse each)."""
    out = {}
    for lesion, stages in (("MA", ma_stages), ("HE", he_stages)):
        les = lesion.lower()
        out[lesion] = [f"loss_{les}_conv{s}" for s in stages] + [f"loss_{les}_fuse"]
    return out


def solver_text(train_net: str, st: C.StageSchedule, title: str, snapshot_prefix: str, gpu: bool = True) -> str:
    """Solver of one stage (Algorithm 1, section 3.2): SGD, fixed lr, momentum 0.9, decay 5e-4."""
    lines = [
        f"# {title}",
        f'net: "{train_net}"',
        'type: "SGD"',
        f"base_lr: {st.base_lr:g}",
        'lr_policy: "fixed"',
        f"momentum: {C.MOMENTUM:g}",
        f"weight_decay: {C.WEIGHT_DECAY:g}",
        "iter_size: 1",
        f"max_iter: {st.max_iter}",
        f"display: {st.display}",
        "average_loss: 20",
        f"snapshot: {st.snapshot}",
        f'snapshot_prefix: "{snapshot_prefix}"',
        f"solver_mode: {'GPU' if gpu else 'CPU'}",
        "random_seed: 1  # reproducible fillers (side and fuse convs; all layers when from scratch)",
    ]
    return "\n".join(lines) + "\n"


HEADER = "# Generated by `make prototxt` (redseg/model/net.py). Do not edit: change the generator.\n"


def generate(out_dir: str | Path) -> list[Path]:
    """Write every committed prototxt; returns the paths written."""
    out = Path(out_dir)
    (out / "ablations").mkdir(parents=True, exist_ok=True)
    sched = C.SCHEDULES["paper"]
    files = {
        "train_stage1.prototxt": redseg(NetOptions(stage=1)),
        "train_stage2.prototxt": redseg(NetOptions(stage=2)),
        "deploy.prototxt": redseg(NetOptions(stage="deploy")),
    }
    for variant, stages in C.MA_FUSION_VARIANTS.items():
        if stages == C.BRANCH_STAGES["MA"]:
            continue
        files[f"ablations/train_stage1_ma_{variant}.prototxt"] = redseg(NetOptions(stage=1, ma_stages=stages))
        files[f"ablations/deploy_ma_{variant}.prototxt"] = redseg(NetOptions(stage="deploy", ma_stages=stages))
    # Open choice (docs/method.md#counting-negatives): lambda counts only the negatives in the FOV.
    files["ablations/train_stage1_negatives_fov.prototxt"] = redseg(NetOptions(stage=1, negatives="fov"))
    written = []
    for name, proto in files.items():
        written.append(write_text(out / name, HEADER + str(proto)))
    # Paths relative to the repository root, where `make` and the tools run (Caffe resolves them
    # against the working directory); tools/train.py writes per-run copies with absolute paths.
    s1, s2 = sched.stage1, sched.stage2
    solvers = {
        "solver_stage1.prototxt": solver_text(
            "prototxt/train_stage1.prototxt",
            s1,
            "Red-Seg stage 1: Top-k balanced CE, lr 1e-8",
            "runs/idrid/stage1",
        ),
        "solver_stage2.prototxt": solver_text(
            "prototxt/train_stage2.prototxt",
            s2,
            "Red-Seg stage 2: FN + FP loss, lr 1e-9",
            "runs/idrid/stage2",
        ),
        # Table 2, "stage 2 loss only": the FN+FP loss from ImageNet weights at stage 1's schedule.
        "ablations/solver_l2_only.prototxt": solver_text(
            "prototxt/train_stage2.prototxt",
            s1,
            "Table 2 ablation: FN + FP loss only",
            "runs/idrid_l2only/stage1",
        ),
    }
    for name, text in solvers.items():
        written.append(write_text(out / name, HEADER + text))
    return written
