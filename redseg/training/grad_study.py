"""How large a stage-2 (FN + FP) step is next to a stage-1 (Top-k) step: the measurements behind
docs/stage2_lr.md.

The paper trains stage 2 at 1/10 of stage 1's learning rate (section 3.2; docs/method.md#training).
Whether that ratio is safe depends on how the two losses' gradients compare on the model stage 1
leaves behind, and both losses are *sums* over pixels (docs/method.md#loss-reduction), so their
gradients depend on how many pixels there are and on what the model predicts on them. This module
measures, for given weights and images:

* the gradient of each loss with respect to every learnable parameter, after one forward/backward
  of the stage-1 train net and of the stage-2 train net on the *same* image (both nets' data layers
  use the same seed, so they draw the same sequence; this is checked), per parameter blob, per
  group (encoder, MA branch, HE branch) and in total, and with the losses of one branch only
  (each branch's 4 losses reach the shared encoder);
* the size of one plain SGD step relative to the weights, ``lr * lr_mult * |dL/dw| / |w|``, at each
  stage's learning rate (momentum 0.9 multiplies a steady, same-signed gradient by up to 10; weight
  decay is left out: it is the same in both stages);
* at each branch's fused logit x (the test-time map is sigmoid(x)), which pixels the gradients
  come from: the stage-1 gradient is ``-beta (1 - p)`` on positives and ``(1 - beta) p`` on the k
  selected negatives, 0 elsewhere; the stage-2 gradient is ``2 (p - y) p (1 - p)`` on every pixel
  (docs/method.md#losses). Their sums over pixels equal the gradient of the fuse bias, which moves
  the whole map up or down at once.

Stage 1's lambda is held at a given value (by default the end of the staircase, 0.0104, where the
stage-1 model was last trained). Nothing here trains: the nets are built from redseg.model.net with the
prepared set's train list and the weights copied in. :func:`map_stats` and :func:`pred_map_stats`
follow the symptom through a stage-2 run: the mean test-time probability on lesion and on background
pixels (a map being erased has both fall towards 0).
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from redseg import config as C
from redseg.data.prepared_set import list_path, load_sample, mean_bgr, read_list
from redseg.fileio import write_text
from redseg.model.topk_schedule import topk_lambda
from redseg.toolchain.caffe_utils import check_weights, import_caffe

# lambda at the last stage-1 iteration of the paper's schedule (and of every schedule of the same
# shape, M / S = 9.72): the value the stage-1 model was last trained with.
FINAL_LAMBDA = topk_lambda(
    C.SCHEDULES["paper"].stage1.max_iter, C.LAMBDA0, C.LAMBDA_PERIOD, C.SCHEDULES["paper"].stage1.max_iter
)
# A period longer than any run: the staircase stays on its first step, so lambda0 is lambda.
_NO_STEPS = 1 << 40
# Bins of the probability on negatives for "where does the gradient come from".
P_BINS = (0.0, 0.01, 0.1, 0.3, 0.7, 1.0)
GROUPS = ("encoder", "MA", "HE")


def sigmoid(x: np.ndarray) -> np.ndarray:
    """Stable float64 sigmoid."""
    x = np.asarray(x, dtype=np.float64)
    e = np.exp(-np.abs(x))
    return np.where(x >= 0, 1.0 / (1.0 + e), e / (1.0 + e))


def fnfp_logit_grad(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """d(FN + FP)/dx per pixel: ``2 (p - y) p (1 - p)`` with p = sigmoid(x) (docs/method.md#stage-2-loss).

    float64, from the formula alone; what FNFPLoss writes into its bottom diff must equal it.
    """
    p = sigmoid(x)
    return 2.0 * (p - y) * p * (1.0 - p)


def param_group(layer: str) -> str:
    """Which part of the net a learnable layer belongs to: the shared encoder or one branch."""
    for lesion in C.LESIONS:
        if f"_{lesion.lower()}" in layer and (layer.startswith(("side_", "fuse_"))):
            return lesion
    return "encoder"


def build_train_net(stage: int, data: str | Path, workdir: str | Path, weights: str | Path, lam: float = FINAL_LAMBDA):
    """The stage-``stage`` train net of redseg.model.net on ``data``'s train list, with ``weights`` copied in.

    Stage 1's Top-k layers keep lambda = ``lam`` for every forward pass (the staircase's period is
    made longer than any run). Returns ``(net, lr_mults)`` with ``lr_mults[layer] = [weight, bias]``
    read from the generated net definition.
    """
    caffe = import_caffe()
    from caffe.proto import caffe_pb2
    from google.protobuf import text_format

    from redseg.model.net import NetOptions, redseg

    opts = NetOptions(
        stage=stage,
        train_list=str(list_path(data, "train").resolve()),
        lambda0=lam,
        period=_NO_STEPS,
        max_iter=_NO_STEPS,
    )
    proto = redseg(opts)
    path = Path(workdir) / f"grad_study_stage{stage}_train.prototxt"
    write_text(path, str(proto))
    net = caffe.Net(str(path), caffe.TRAIN)
    check_weights(weights, net, strict=True)
    net.copy_from(str(weights))
    param = caffe_pb2.NetParameter()
    text_format.Merge(path.read_text(), param)
    lr_mults = {
        layer.name: [p.lr_mult if p.HasField("lr_mult") else 1.0 for p in layer.param]
        for layer in param.layer
        if layer.name in net.params
    }
    for name, blobs in net.params.items():  # a layer without param {} specs learns at lr_mult 1
        lr_mults[name] = (lr_mults.get(name, []) + [1.0] * len(blobs))[: len(blobs)]
    return net, lr_mults


def loss_blobs(net) -> dict[str, list[str]]:
    """The loss outputs of a train net, per lesion (``loss_ma_*``, ``loss_he_*``)."""
    return {les: [b for b in net.outputs if b.startswith(f"loss_{les.lower()}_")] for les in C.LESIONS}


def backward_param_grads(net, only: str | None = None) -> dict[str, list[np.ndarray]]:
    """dL/dw of every learnable blob after one backward pass of the last forward, as float64 copies.

    ``only``: a lesion; the other branch's losses get loss weight 0 for this pass (their top diff,
    which Caffe sets to the loss weight and the Python loss layers read as their scale), so the
    result is the gradient of that branch's 4 losses alone. Parameter diffs are cleared first
    (Caffe accumulates them; the solver clears them every iteration).
    """
    losses = loss_blobs(net)
    muted = [b for les, names in losses.items() if only is not None and les != only for b in names]
    saved = {b: net.blobs[b].diff.copy() for b in muted}
    for b in muted:
        net.blobs[b].diff[...] = 0
    try:
        net.clear_param_diffs()
        net.backward()
    finally:
        for b, d in saved.items():
            net.blobs[b].diff[...] = d
    return {name: [blob.diff.astype(np.float64) for blob in blobs] for name, blobs in net.params.items()}


def _norm(a: np.ndarray) -> float:
    return float(np.sqrt(np.sum(np.square(a, dtype=np.float64))))


def logit_pixel_stats(x: np.ndarray, y: np.ndarray, g: np.ndarray) -> dict:
    """Where a per-pixel gradient ``g`` at the logit ``x`` (labels ``y``) comes from.

    Counts, mean probability on positives and negatives, the signed sums of g over positives and
    negatives (their total is the fuse bias's gradient, which shifts the whole map) and the share of
    sum |g| carried by positives and by negatives in each probability bin :data:`P_BINS`.
    """
    x, y, g = (np.asarray(a, dtype=np.float64).ravel() for a in (x, y, g))
    p = sigmoid(x)
    pos = y > 0.5
    neg = ~pos
    l1 = float(np.abs(g).sum()) or 1.0
    bins = []
    for lo, hi in zip(P_BINS[:-1], P_BINS[1:], strict=True):
        sel = neg & (p >= lo) & ((p < hi) if hi < 1 else (p <= hi))
        bins.append(
            dict(
                p_range=[lo, hi],
                pixel_share=float(sel.sum()) / max(int(neg.sum()), 1),
                grad_l1_share=float(np.abs(g[sel]).sum()) / l1,
            )
        )
    return dict(
        n_pixels=int(x.size),
        n_pos=int(pos.sum()),
        neg_share=float(neg.mean()),
        mean_p_pos=float(p[pos].mean()) if pos.any() else None,
        mean_p_neg=float(p[neg].mean()) if neg.any() else None,
        p_neg_quantiles={q: float(np.quantile(p[neg], float(q))) for q in ("0.5", "0.9", "0.99")}
        if neg.any()
        else None,
        grad_sum_pos=float(g[pos].sum()),
        grad_sum_neg=float(g[neg].sum()),
        grad_sum=float(g.sum()),
        grad_l1=float(np.abs(g).sum()),
        grad_l2=_norm(g),
        grad_l1_share_pos=float(np.abs(g[pos]).sum()) / l1,
        neg_bins=bins,
    )


def _data_layer(net):
    return next(lay for lay in net.layers if type(lay).__name__ == "RedSegData")


def _next_sample_name(net) -> str:
    """The sample the data layer hands out at the next forward pass (python_layers/data_layer.py)."""
    d = _data_layer(net)
    return d.samples[int(d.order[d.pos])].name


def measure(
    weights: str | Path,
    data: str | Path,
    workdir: str | Path,
    lr: dict[int, float],
    n_images: int = 4,
    lam: float = FINAL_LAMBDA,
    branch_split: bool = True,
) -> dict:
    """Gradient norms of both stages' losses on the same ``n_images`` training samples.

    ``lr``: {1: stage-1 lr, 2: stage-2 lr} for the relative step sizes. Returns a JSON-ready dict:
    per stage, per learnable layer: |w| and, averaged over the images, |dL/dw| (all losses, and per
    branch when ``branch_split``), |mean over images of dL/dw| (how much of it keeps its direction
    from image to image) and the relative SGD step; totals per group; per branch the fused-logit
    pixel statistics of :func:`logit_pixel_stats`; and the stage-2 / stage-1 gradient ratios.
    """
    import_caffe()
    Path(workdir).mkdir(parents=True, exist_ok=True)
    nets = {}
    for stage in (1, 2):
        nets[stage] = build_train_net(stage, data, workdir, weights, lam)
    stages = {s: _StageAccumulator(nets[s][0], nets[s][1], lr[s]) for s in (1, 2)}
    images = []
    for _ in range(n_images):
        names = {s: _next_sample_name(nets[s][0]) for s in (1, 2)}
        for s in (1, 2):
            nets[s][0].forward()
        n1, n2 = nets[1][0], nets[2][0]
        if names[1] != names[2] or not np.array_equal(n1.blobs["data"].data, n2.blobs["data"].data):
            raise RuntimeError(f"the two nets' data layers drew different samples ({names[1]}, {names[2]})")
        images.append(dict(name=names[1], shape=list(n1.blobs["data"].data.shape[2:])))
        for s in (1, 2):
            stages[s].add(branch_split)
    out = dict(
        weights=str(weights),
        data=str(data),
        lambda_stage1=lam,
        lr={str(s): lr[s] for s in (1, 2)},
        images=images,
        stages={str(s): stages[s].result() for s in (1, 2)},
    )
    out["ratio_stage2_over_stage1"] = ratios(out["stages"]["1"], out["stages"]["2"])
    return out


class _StageAccumulator:
    """Sums, over images, one stage's per-blob gradient norms and gradients, and pixel statistics."""

    def __init__(self, net, lr_mults, lr):
        self.net, self.lr_mults, self.lr = net, lr_mults, lr
        self.n = 0
        self.norm_sums: dict[str, dict[str, np.ndarray]] = {}
        self.grad_sum = {k: [np.zeros(b.data.shape) for b in v] for k, v in net.params.items()}
        self.group_sums: dict[str, dict[str, float]] = {}
        self.pixels: dict[str, list[dict]] = {les: [] for les in C.LESIONS}

    def add(self, branch_split: bool) -> None:
        net = self.net
        self.n += 1
        # The fused logits and their gradients first: the branch-only passes below overwrite diffs
        # only where the muted losses are, but read them before anything else runs.
        passes = {"all": backward_param_grads(net)}
        for les in C.LESIONS:
            x = net.blobs[f"fuse_{les.lower()}"].data
            y = net.blobs[f"label_{les.lower()}"].data
            g = net.blobs[f"fuse_{les.lower()}"].diff
            self.pixels[les].append(logit_pixel_stats(x, y, g))
        if branch_split:
            for les in C.LESIONS:
                passes[les] = backward_param_grads(net, only=les)
        for which, grads in passes.items():
            per = self.norm_sums.setdefault(which, {})
            totals = self.group_sums.setdefault(which, {})
            sq = dict.fromkeys((*GROUPS, "total"), 0.0)
            for name, blobs in grads.items():
                norms = np.array([_norm(d) for d in blobs])
                per[name] = per.get(name, 0) + norms
                grp = param_group(name)
                # Only learnable blobs count (the bilinear upsampling kernels have lr_mult 0).
                s = sum(n * n for n, m in zip(norms, self.lr_mults[name], strict=True) if m)
                sq[grp] += s
                sq["total"] += s
            for k, v in sq.items():
                totals[k] = totals.get(k, 0.0) + math.sqrt(v)
        for name, blobs in passes["all"].items():
            for acc, d in zip(self.grad_sum[name], blobs, strict=True):
                acc += d

    def result(self) -> dict:
        net, n = self.net, self.n
        layers = {}
        step_sq = dict.fromkeys((*GROUPS, "total"), 0.0)
        w_sq = dict.fromkeys((*GROUPS, "total"), 0.0)
        for name, blobs in net.params.items():
            mults = self.lr_mults[name]
            w = [_norm(b.data) for b in blobs]
            g = self.norm_sums["all"][name] / n
            step = [self.lr * m * gi for m, gi in zip(mults, g, strict=True)]
            entry = dict(
                group=param_group(name),
                lr_mult=list(mults),
                weight_norm=w,
                grad_norm={k: (v[name] / n).tolist() for k, v in self.norm_sums.items()},
                grad_norm_of_mean=[_norm(a / n) for a in self.grad_sum[name]],
                sgd_step=step,
                sgd_step_rel=[s / wi if wi else None for s, wi in zip(step, w, strict=True)],
            )
            layers[name] = entry
            grp = param_group(name)
            for s, wi, m in zip(step, w, mults, strict=True):
                if m:
                    for k in (grp, "total"):
                        step_sq[k] += s * s
                        w_sq[k] += wi * wi
        groups = {
            k: dict(
                grad_norm={which: v[k] / n for which, v in self.group_sums.items()},
                weight_norm=math.sqrt(w_sq[k]),
                sgd_step=math.sqrt(step_sq[k]),
                sgd_step_rel=math.sqrt(step_sq[k] / w_sq[k]) if w_sq[k] else None,
            )
            for k in (*GROUPS, "total")
        }
        return dict(lr=self.lr, layers=layers, groups=groups, pixels=_mean_pixels(self.pixels))


def _mean_pixels(stats: dict[str, list[dict]]) -> dict:
    """Per lesion: every scalar of :func:`logit_pixel_stats` averaged over the images (None skipped)."""
    out = {}
    for les, items in stats.items():
        keys = [k for k, v in items[0].items() if isinstance(v, (int, float)) and not isinstance(v, bool)]
        m = {}
        for k in keys + ["mean_p_pos", "mean_p_neg"]:
            vals = [it[k] for it in items if it[k] is not None]
            m[k] = float(np.mean(vals)) if vals else None
        m["p_neg_quantiles"] = {
            q: float(np.mean([it["p_neg_quantiles"][q] for it in items if it["p_neg_quantiles"]]))
            for q in ("0.5", "0.9", "0.99")
        }
        m["neg_bins"] = [
            dict(
                p_range=b["p_range"],
                pixel_share=float(np.mean([it["neg_bins"][i]["pixel_share"] for it in items])),
                grad_l1_share=float(np.mean([it["neg_bins"][i]["grad_l1_share"] for it in items])),
            )
            for i, b in enumerate(items[0]["neg_bins"])
        ]
        m["per_image"] = items
        out[les] = m
    return out


def ratios(s1: dict, s2: dict) -> dict:
    """|stage-2 gradient| / |stage-1 gradient| per group and per layer (weights), and the ratio of the
    relative SGD steps at the two stages' learning rates. A stage-2 lr of ``lr1 / grad_ratio``
    would make the stage-2 step as large as a stage-1 step."""
    groups = {
        k: dict(
            grad=s2["groups"][k]["grad_norm"]["all"] / s1["groups"][k]["grad_norm"]["all"],
            step=s2["groups"][k]["sgd_step"] / s1["groups"][k]["sgd_step"],
        )
        for k in s1["groups"]
    }
    layers = {
        name: s2["layers"][name]["grad_norm"]["all"][0] / s1["layers"][name]["grad_norm"]["all"][0]
        for name in s1["layers"]
        if s1["layers"][name]["grad_norm"]["all"][0] > 0
    }
    return dict(groups=groups, layers=layers)


def _pooled_map_stats(pairs) -> dict:
    """Pooled over ``(lesion, probability map, 0/1 mask)`` triples: per lesion, the mean probability on
    lesion and on background pixels and the shares of each at or above 0.5."""
    sums = {les: dict(pos=0.0, neg=0.0, n_pos=0, n_neg=0, above_half_neg=0, above_half_pos=0) for les in C.LESIONS}
    for les, prob, mask in pairs:
        p = np.asarray(prob, dtype=np.float64)
        pos = np.asarray(mask) > 0
        acc = sums[les]
        acc["pos"] += float(p[pos].sum())
        acc["neg"] += float(p[~pos].sum())
        acc["n_pos"] += int(pos.sum())
        acc["n_neg"] += int((~pos).sum())
        acc["above_half_pos"] += int((p[pos] >= 0.5).sum())
        acc["above_half_neg"] += int((p[~pos] >= 0.5).sum())
    return {
        les: dict(
            mean_p_pos=a["pos"] / a["n_pos"] if a["n_pos"] else None,
            mean_p_neg=a["neg"] / a["n_neg"] if a["n_neg"] else None,
            share_pos_above_half=a["above_half_pos"] / a["n_pos"] if a["n_pos"] else None,
            share_neg_above_half=a["above_half_neg"] / a["n_neg"] if a["n_neg"] else None,
        )
        for les, a in sums.items()
    }


def map_stats(weights: str | Path, data: str | Path, split: str = "test", deploy: str | Path | None = None) -> dict:
    """Mean test-time probability on lesion and on background pixels, per lesion, over a split.

    The symptom docs/stage2_lr.md follows through stage 2: a map that is being erased has its mean
    probability on positives fall towards that on negatives. Pooled over the images of ``split``
    (the prepared set's masks, at the prepared size), from the deploy net's maps.
    """
    from redseg.deploy.inference import DEPLOY, Segmenter

    seg = Segmenter(weights, mean_bgr(data), deploy or DEPLOY)

    def pairs():
        for s in read_list(list_path(data, split)):
            img, ma, he = load_sample(s)
            probs = seg(img)
            yield from (("MA", probs["MA"], ma), ("HE", probs["HE"], he))

    return _pooled_map_stats(pairs())


def pred_map_stats(pred: str | Path, data: str | Path, split: str = "test") -> dict:
    """:func:`map_stats` from the 8-bit maps tools/test_net.py wrote (``<pred>/<image>_<ma|he>.png``,
    probability x 255, at the prepared size), so a scored model needs no second forward pass."""
    from redseg.data.prepared_set import read_mask
    from redseg.evaluation.scoring import prediction_path, read_prediction

    def pairs():
        for s in read_list(list_path(data, split)):
            for les, mask_path in (("MA", s.ma), ("HE", s.he)):
                yield les, read_prediction(prediction_path(Path(pred), s.name, les)) / 255.0, read_mask(mask_path)

    return _pooled_map_stats(pairs())


def format_report(result: dict) -> str:
    """The measurements as Markdown tables: per group, per branch's pixels, and the ratios."""
    s1, s2 = result["stages"]["1"], result["stages"]["2"]
    lr1, lr2 = s1["lr"], s2["lr"]
    shapes = sorted({"x".join(map(str, im["shape"])) for im in result["images"]})
    lines = [
        f"weights {result['weights']}, data {result['data']}, {len(result['images'])} training samples "
        f"({', '.join(shapes)} HxW), stage-1 lambda {result['lambda_stage1']:.4f}, lr {lr1:g} / {lr2:g}",
        "",
        "| part | |dL1/dw| | |dL2/dw| | ratio 2/1 | |w| | step 1 / |w| | step 2 / |w| |",
        "|---|---|---|---|---|---|---|",
    ]
    for k, g1 in s1["groups"].items():
        g2 = s2["groups"][k]
        ratio = result["ratio_stage2_over_stage1"]["groups"][k]["grad"]
        lines.append(
            f"| {k} | {g1['grad_norm']['all']:.4g} | {g2['grad_norm']['all']:.4g} | {ratio:.3g} | "
            f"{g1['weight_norm']:.4g} | {g1['sgd_step_rel']:.3g} | {g2['sgd_step_rel']:.3g} |"
        )
    lines += [
        "",
        "| lesion | pixels | negatives | mean p pos | mean p neg | median p neg | sum dL1/dx | sum dL2/dx | "
        "L2: share of sum abs(dL2/dx) from p_neg >= 0.1 |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for les in C.LESIONS:
        p1, p2 = s1["pixels"][les], s2["pixels"][les]
        hi = sum(b["grad_l1_share"] for b in p2["neg_bins"] if b["p_range"][0] >= 0.1)
        mp = "-" if p1["mean_p_pos"] is None else f"{p1['mean_p_pos']:.3f}"
        lines.append(
            f"| {les} | {p1['n_pixels']:.0f} | {p1['neg_share']:.4f} | {mp} | {p1['mean_p_neg']:.3f} | "
            f"{p1['p_neg_quantiles']['0.5']:.3f} | {p1['grad_sum']:.4g} | {p2['grad_sum']:.4g} | {hi:.3f} |"
        )
    return "\n".join(lines)
