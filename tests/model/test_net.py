"""The generated nets: committed copies, the architecture of Table 1, output sizes."""

from __future__ import annotations

import numpy as np
import pytest

from redseg import config as C
from redseg.model.net import NetOptions, generate, loss_names, redseg
from redseg.toolchain.caffe_utils import load_net, read_net_param

REPO = __import__("pathlib").Path(__file__).resolve().parents[2]


def test_committed_prototxts_equal_generator_output(tmp_path):
    written = generate(tmp_path)
    assert len(written) >= 5
    for path in written:
        rel = path.relative_to(tmp_path)
        committed = REPO / "prototxt" / rel
        assert committed.is_file(), f"{rel} is not committed; run make prototxt"
        assert committed.read_text() == path.read_text(), f"prototxt/{rel} is stale; run make prototxt"


def test_train_net_has_vgg16_encoder_and_eight_losses():
    param = read_net_param(REPO / "prototxt" / "train_stage1.prototxt")
    convs = [lay for lay in param.layer if lay.type == "Convolution" and lay.name.startswith("conv")]
    assert [c.name for c in convs] == [f"{stage}_{i}" for stage, _, n in C.VGG16_CONVS for i in range(1, n + 1)]
    assert all(c.convolution_param.kernel_size == [3] and c.convolution_param.pad == [1] for c in convs)
    assert [lay.name for lay in param.layer if lay.type == "Pooling"] == ["pool1", "pool2", "pool3", "pool4"]
    losses = [lay for lay in param.layer if lay.type == "Python" and lay.python_param.module == "losses"]
    assert sorted(lay.name for lay in losses) == sorted(sum(loss_names().values(), []))
    assert all(lay.python_param.layer == "TopKBalancedCELoss" and lay.loss_weight == [1] for lay in losses)
    # Side convs sit on the stages of docs/method.md#lesion-branches: MA on conv2_2/3_3/4_3, HE on
    # conv3_3/4_3/5_3.
    sides = {lay.name: lay.bottom[0] for lay in param.layer if lay.name.startswith("side_")}
    assert sides == {
        "side_ma_conv2": "conv2_2",
        "side_ma_conv3": "conv3_3",
        "side_ma_conv4": "conv4_3",
        "side_he_conv3": "conv3_3",
        "side_he_conv4": "conv4_3",
        "side_he_conv5": "conv5_3",
    }
    ups = {lay.name: lay for lay in param.layer if lay.type == "Deconvolution"}
    assert ups["up_he_conv5"].convolution_param.stride == [16] and ups["up_he_conv5"].param[0].lr_mult == 0
    s2 = read_net_param(REPO / "prototxt" / "train_stage2.prototxt")
    assert {lay.python_param.layer for lay in s2.layer if lay.python_param.module == "losses"} == {"FNFPLoss"}


@pytest.mark.parametrize("h, w", [(712, 1072), (97, 131)])
def test_deploy_sizes(caffe, h, w):
    net = load_net(REPO / "prototxt" / "deploy.prototxt")
    net.blobs["data"].reshape(1, 3, h, w)
    net.reshape()  # Caffe computes every blob's shape here; a forward pass only at the small size
    if h < 200:
        net.blobs["data"].data[...] = np.random.default_rng(0).normal(size=(1, 3, h, w))
        out = net.forward()
        assert np.all((out["prob_ma"] >= 0) & (out["prob_ma"] <= 1)) and np.isfinite(out["prob_he"]).all()
    assert net.blobs["prob_ma"].data.shape == (1, 1, h, w) and net.blobs["prob_he"].data.shape == (1, 1, h, w)

    # Side outputs before upsampling: conv k is at 1/2^(k-1), with Caffe's ceil-mode pooling.
    def down(n, k):
        for _ in range(k - 1):
            n = -(-n // 2)
        return n

    for lesion, stages in C.BRANCH_STAGES.items():
        for s in stages:
            assert net.blobs[f"side_{lesion.lower()}_conv{s}"].data.shape == (1, 1, down(h, s), down(w, s))
            assert net.blobs[f"score_{lesion.lower()}_conv{s}"].data.shape == (1, 1, h, w)
    if (h, w) == (712, 1072):
        assert net.blobs["side_he_conv5"].data.shape[2:] == (45, 67)  # 712 / 16 rounds up to 45


def test_bilinear_upsampling_is_exact_on_a_constant(caffe):
    net = load_net(REPO / "prototxt" / "deploy.prototxt")
    net.blobs["data"].reshape(1, 3, 64, 80)
    net.reshape()
    net.forward()
    for name in ("up_ma_conv2", "up_he_conv5"):
        layer = net.params[name][0].data
        f = layer.shape[-1] // 2
        # the fixed bilinear filler is in place (a bilinear kernel of stride f sums to f^2), not zeros
        assert layer.sum() == pytest.approx(f * f)


@pytest.mark.parametrize("variant", ["conv2-5", "conv1-4"])
def test_table5_ablations_build(caffe, tmp_path, variant, tiny_set):
    stages = C.MA_FUSION_VARIANTS[variant]
    p = tmp_path / "net.prototxt"
    p.write_text(str(redseg(NetOptions(stage=1, ma_stages=stages, train_list=str(tiny_set / "train.txt")))))
    net = load_net(p, phase="TRAIN")
    out = net.forward()
    assert set(out) == set(sum(loss_names(ma_stages=stages).values(), []))
    assert all(np.isfinite(v).all() for v in out.values())


def test_negatives_in_fov_net_feeds_the_fov_to_every_topk_loss(caffe, tmp_path):
    """The open choice "lambda counts only the negatives inside the field of view": the data layer's
    fov top is redseg.data.fov's mask of the sample, and each Top-k layer keeps ceil(lambda0 * N-) of
    the negatives inside it."""
    import json
    import math

    import cv2
    from conftest import write_prepared_set

    from redseg.data.fov import fov_mask
    from redseg.data.prepared_set import list_path, read_list

    data = write_prepared_set(tmp_path / "set", n=2, size=(96, 72), seed=4)
    yy, xx = np.mgrid[:72, :96]
    outside = (yy - 36) ** 2 + (xx - 48) ** 2 > 40**2  # a disc cut at the top and bottom, black around
    for s in read_list(list_path(data, "train")):
        img = cv2.imread(str(s.image))
        img[outside] = 0
        cv2.imwrite(str(s.image), img)
    p = tmp_path / "net.prototxt"
    p.write_text(str(redseg(NetOptions(stage=1, negatives="fov", train_list=str(data / "train.txt")))))
    net = load_net(p, phase="TRAIN")
    net.forward()
    mean = np.array(json.loads((data / "meta.json").read_text())["mean_bgr"], np.float32)
    img = np.rint(net.blobs["data"].data[0].transpose(1, 2, 0) + mean).astype(np.uint8)
    fov = net.blobs["fov"].data[0, 0]
    assert np.array_equal(fov > 0.5, fov_mask(img))
    assert 0.5 < fov.mean() < 0.9 and fov[outside].mean() < 0.02  # the fitted circle, within a pixel
    for les in ("ma", "he"):
        layer = net.layers[list(net._layer_names).index(f"loss_{les}_fuse")]
        n_neg = int(((fov > 0.5) & (net.blobs[f"label_{les}"].data[0, 0] < 0.5)).sum())
        assert layer.last["k"] == math.ceil(C.LAMBDA0 * n_neg)
