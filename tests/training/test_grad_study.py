"""redseg/training/grad_study.py and tools/stage2_lr_study.py on a tiny prepared set with real pycaffe.

What the study reports must be what the nets compute: the per-layer gradient norms are those of
the nets' own parameter diffs, FNFPLoss's gradient at the fused logit is 2 (p - y) p (1 - p), a
branch's gradient is what its four losses alone give, and the pixel sums are the fuse bias's
gradient.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import write_prepared_set


@pytest.fixture(scope="module")
def study_set(tmp_path_factory):
    return write_prepared_set(tmp_path_factory.mktemp("grad_study_set"), n=3, size=(64, 48), seed=5)


@pytest.fixture(scope="module")
def weights(caffe, study_set, tmp_path_factory):
    """A stage-1 net's random initial weights, saved (fillers seeded), so that both nets share them."""
    from redseg.model.net import NetOptions, redseg

    d = tmp_path_factory.mktemp("grad_study_weights")
    path = d / "net.prototxt"
    path.write_text(str(redseg(NetOptions(stage=1, train_list=str(study_set / "train.txt")))))
    caffe.set_random_seed(3)
    net = caffe.Net(str(path), caffe.TRAIN)
    # Move the fuse bias so the maps are not centred on p = 0.5 (a case the formulas must also meet).
    net.params["fuse_ma"][1].data[...] = -1.5
    out = d / "init.caffemodel"
    net.save(str(out))
    return out


@pytest.fixture(scope="module")
def result(caffe, study_set, weights, tmp_path_factory):
    from redseg.training.grad_study import measure

    return measure(weights, study_set, tmp_path_factory.mktemp("work"), {1: 1e-7, 2: 1e-8}, n_images=1)


def test_fnfp_logit_gradient_is_the_formula(caffe, study_set, weights, tmp_path):
    from redseg.training.grad_study import build_train_net, fnfp_logit_grad, sigmoid

    net, _ = build_train_net(2, study_set, tmp_path, weights)
    net.forward()
    net.backward()
    for les in ("ma", "he"):
        x = net.blobs[f"fuse_{les}"].data.astype(np.float64)
        y = net.blobs[f"label_{les}"].data.astype(np.float64)
        got = net.blobs[f"fuse_{les}"].diff
        p = sigmoid(x)
        want = 2 * (p - y) * p * (1 - p)
        np.testing.assert_allclose(fnfp_logit_grad(x, y), want, rtol=1e-12)
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-7)
        # The fuse bias adds to every pixel: its gradient is the sum over pixels of the logit gradient.
        np.testing.assert_allclose(net.params[f"fuse_{les}"][1].diff[0], want.sum(), rtol=1e-3)


def test_reported_layer_norms_equal_the_nets_diffs(caffe, study_set, weights, result, tmp_path):
    from redseg.training.grad_study import build_train_net

    for stage in (1, 2):
        net, mults = build_train_net(stage, study_set, tmp_path, weights)
        net.forward()  # the first sample, as measure()'s first image
        net.clear_param_diffs()
        net.backward()
        layers = result["stages"][str(stage)]["layers"]
        assert set(layers) == set(net.params)
        for name, blobs in net.params.items():
            direct = [float(np.linalg.norm(b.diff.astype(np.float64))) for b in blobs]
            np.testing.assert_allclose(layers[name]["grad_norm"]["all"], direct, rtol=1e-5, atol=1e-12)
            w = [float(np.linalg.norm(b.data.astype(np.float64))) for b in blobs]
            np.testing.assert_allclose(layers[name]["weight_norm"], w, rtol=1e-6)
            assert layers[name]["lr_mult"] == mults[name]
        lr = result["stages"][str(stage)]["lr"]
        c1 = layers["conv1_1"]
        assert c1["sgd_step_rel"][0] == pytest.approx(lr * c1["grad_norm"]["all"][0] / c1["weight_norm"][0])
        assert layers["conv5_1"]["lr_mult"] == [100, 200]
        assert layers["up_ma_conv2"]["lr_mult"] == [0]
    r = result["ratio_stage2_over_stage1"]["groups"]["total"]["grad"]
    g1, g2 = (result["stages"][s]["groups"]["total"]["grad_norm"]["all"] for s in ("1", "2"))
    assert r == pytest.approx(g2 / g1)


def test_pixel_sums_are_the_fuse_bias_gradient(result):
    for stage in ("1", "2"):
        st = result["stages"][stage]
        for les in ("MA", "HE"):
            px = st["pixels"][les]
            bias = st["layers"][f"fuse_{les.lower()}"]["grad_norm"]["all"][1]
            assert bias == pytest.approx(abs(px["grad_sum"]), rel=1e-3, abs=1e-6)
            assert px["grad_sum"] == pytest.approx(px["grad_sum_pos"] + px["grad_sum_neg"])
            shares = px["grad_l1_share_pos"] + sum(b["grad_l1_share"] for b in px["neg_bins"])
            assert shares == pytest.approx(1.0, abs=1e-6)


def test_branch_gradients_add_up(caffe, study_set, weights, tmp_path):
    from redseg.training.grad_study import backward_param_grads, build_train_net

    net, _ = build_train_net(1, study_set, tmp_path, weights)
    net.forward()
    both = backward_param_grads(net)
    ma = backward_param_grads(net, only="MA")
    he = backward_param_grads(net, only="HE")
    again = backward_param_grads(net)  # the loss weights are restored after a branch-only pass
    for name in both:
        for a, m, h, b in zip(both[name], ma[name], he[name], again[name], strict=True):
            np.testing.assert_allclose(m + h, a, rtol=1e-4, atol=1e-6 * (np.abs(a).max() + 1e-12))
            np.testing.assert_array_equal(a, b)
    assert not np.any(ma["fuse_he"][0]) and not np.any(he["side_ma_conv2"][0])
    assert np.any(ma["conv3_1"][0]) and np.any(he["conv3_1"][0])
    # conv5 feeds only the HE branch (MA: conv2-4): the MA losses alone leave it untouched.
    assert not np.any(ma["conv5_1"][0]) and np.any(he["conv5_1"][0])


def test_tool_writes_the_json(caffe, study_set, weights, tmp_path, capsys):
    import importlib.util

    from conftest import REPO

    spec = importlib.util.spec_from_file_location("stage2_lr_study", REPO / "tools" / "stage2_lr_study.py")
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    out = tmp_path / "g.json"
    args = ["--weights", str(weights), "--data", str(study_set), "--images", "2", "--no-branch-split", "--maps"]
    assert tool.main([*args, "--json", str(out), "-q"]) == 0
    got = json.loads(out.read_text())
    assert [im["shape"] for im in got["images"]] == [[48, 64], [48, 64]]
    assert got["lr"] == {"1": 1e-7, "2": 5e-11}  # the demo schedule's
    assert set(got["test_maps"]) == {"MA", "HE"}
    assert "| total |" in capsys.readouterr().out
    assert tool.main(["--weights", str(tmp_path / "missing.caffemodel"), "--data", str(study_set), "-q"]) == 1


def test_pred_map_stats_reads_what_test_net_writes(caffe, study_set, weights, tmp_path):
    """The 8-bit maps of tools/test_net.py give the deploy net's mean probabilities to within 1/255."""
    import importlib.util

    from conftest import REPO

    from redseg.training.grad_study import map_stats, pred_map_stats

    spec = importlib.util.spec_from_file_location("test_net_tool", REPO / "tools" / "test_net.py")
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    out = tmp_path / "test"
    assert tool.main(["--weights", str(weights), "--data", str(study_set), "--out", str(out), "--no-eval", "-q"]) == 0
    direct = map_stats(weights, study_set)
    from_pred = pred_map_stats(out / "pred", study_set)
    for les in ("MA", "HE"):
        for key in ("mean_p_pos", "mean_p_neg"):
            assert from_pred[les][key] == pytest.approx(direct[les][key], abs=0.5 / 255 + 1e-6)
        assert 0 < direct[les]["mean_p_neg"] < 1
