"""ImageNet VGG16 weights from Keras' HDF5 file (docs/weights.md): conversion, recognition,
fetching, refusals.

No test downloads: files are written here in Keras' exact layout with known random weights, and the
fetch chain is exercised with file:// addresses and a local HTTP server on 127.0.0.1.
"""

from __future__ import annotations

import dataclasses
import hashlib
import http.server
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest

from redseg import config as C
from redseg.model import vgg16
from redseg.toolchain.caffe_utils import CaffeInputError, check_weights, load_net, read_net_param

REPO = Path(__file__).resolve().parents[2]
CONVS = list(vgg16.conv_shapes())  # conv1_1 ... conv5_3


# --- Keras' layout, written directly ---------------------------------------------------------------
def keras_layer_names(top: bool) -> list[str]:
    names = ["input_1"]
    for stage, _, n in C.VGG16_CONVS:
        b = stage.removeprefix("conv")
        names += [f"block{b}_conv{i}" for i in range(1, n + 1)] + [f"block{b}_pool"]
    return names + (["flatten", "fc1", "fc2", "predictions"] if top else [])


def random_keras_convs(seed: int = 0) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Caffe name -> (kernel (3,3,in,out), bias) with activations that stay O(100) through 13 layers.

    conv1_1 has two output channels with one non-zero tap each, so that a flip, a spatial transpose
    or a channel swap in the conversion shows: channel 0 reads only the top-left neighbour of input
    channel 0 (B), channel 1 only the top-right neighbour of input channel 2 (R).
    """
    rng = np.random.default_rng(seed)
    convs = {}
    for name, (cout, cin, kh, kw) in vgg16.conv_shapes().items():
        k = rng.standard_normal((kh, kw, cin, cout)) * np.sqrt(2.0 / (kh * kw * cin))
        b = rng.standard_normal(cout) * 0.1
        convs[name] = (k.astype(np.float32), b.astype(np.float32))
    k, b = convs["conv1_1"]
    k[..., 0] = 0
    k[0, 0, 0, 0] = 1.0  # row above, column left, channel B
    k[..., 1] = 0
    k[0, 2, 2, 1] = 2.0  # row above, column right, channel R
    b[0], b[1] = 0.25, -0.5
    return convs


def write_keras_h5(
    path: Path,
    convs: dict[str, tuple[np.ndarray, np.ndarray]],
    top: bool = False,
    style: str = "old",
    backend: str = "tensorflow",
    skip: tuple[str, ...] = (),
) -> Path:
    """An HDF5 file in Keras 2's save_weights layout (the layout of Keras' released VGG16 files).

    ``style``: "old" weight names as in the fchollet v0.1 files (``block1_conv1_W_1:0``), "new" as
    written by later Keras (``block1_conv1/kernel:0``, i.e. a subgroup). ``skip``: Keras groups to
    leave out. Top layers get small stand-in arrays (the converter ignores them).
    """
    import h5py

    keras = {vgg16.keras_layer(n): v for n, v in convs.items()}
    names = [n for n in keras_layer_names(top) if n not in skip]
    with h5py.File(path, "w") as f:
        f.attrs["layer_names"] = np.array([n.encode() for n in names])
        f.attrs["backend"] = backend.encode()
        f.attrs["keras_version"] = b"2.0.8"
        for lname in names:
            g = f.create_group(lname)
            if lname in keras:
                kernel, bias = keras[lname]
                wn = (
                    [f"{lname}_W_1:0", f"{lname}_b_1:0"] if style == "old" else [f"{lname}/kernel:0", f"{lname}/bias:0"]
                )
                g.create_dataset(wn[0], data=kernel)
                g.create_dataset(wn[1], data=bias)
            elif lname.startswith("fc") or lname == "predictions":
                wn = [f"{lname}_W_1:0", f"{lname}_b_1:0"]
                g.create_dataset(wn[0], data=np.zeros((8, 4), np.float32))
                g.create_dataset(wn[1], data=np.zeros(4, np.float32))
            else:
                wn = []
            g.attrs["weight_names"] = np.array([w.encode() for w in wn], dtype="S64")
    return path


@pytest.fixture(scope="module")
def keras_convs():
    return random_keras_convs()


@pytest.fixture(scope="module")
def keras_file(tmp_path_factory, keras_convs) -> Path:
    """Keras' notop layout with the known random weights (full VGG16 shapes, about 59 MB)."""
    return write_keras_h5(tmp_path_factory.mktemp("keras") / "vgg16_notop.h5", keras_convs)


def md5(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()  # noqa: S324


# --- Numpy evaluation of Keras' layout -------------------------------------------------------------
def conv_same(x: np.ndarray, kernel: np.ndarray, bias: np.ndarray) -> np.ndarray:
    """Cross-correlation with 'same' zero padding, directly on Keras' (3, 3, in, out) kernel; x (H, W, in)."""
    h, w, _ = x.shape
    xp = np.pad(x, ((1, 1), (1, 1), (0, 0)))
    out = np.zeros((h, w, kernel.shape[3]))
    for i in range(3):
        for j in range(3):
            out += xp[i : i + h, j : j + w, :] @ kernel[i, j].astype(np.float64)
    return out + bias


def vgg_reference(img_hwc: np.ndarray, convs) -> dict[str, np.ndarray]:
    """conv1_1 ... conv5_3 after ReLU (as Caffe's in-place ReLU leaves the blobs), 2x2 max pooling between stages."""
    x, out = img_hwc.astype(np.float64), {}
    for stage, _, n in C.VGG16_CONVS:
        if stage != "conv1":
            h, w, c = x.shape
            x = x.reshape(h // 2, 2, w // 2, 2, c).max(axis=(1, 3))
        for i in range(1, n + 1):
            k, b = convs[f"{stage}_{i}"]
            x = np.maximum(conv_same(x, k, b), 0)
            out[f"{stage}_{i}"] = x
    return out


def encoder_net(caffe, tmp_path: Path, h: int, w: int):
    """The real Red-Seg deploy net's VGG16 encoder (up to relu5_3), for an h x w input."""
    from google.protobuf import text_format

    param = read_net_param(REPO / "prototxt" / "deploy.prototxt")
    keep = []
    for layer in param.layer:
        keep.append(layer)
        if layer.name == "relu5_3":
            break
    assert keep[-1].name == "relu5_3", "deploy.prototxt has no relu5_3"
    del param.layer[len(keep) :]
    param.layer[0].input_param.shape[0].dim[:] = [1, 3, h, w]
    path = tmp_path / "encoder.prototxt"
    path.write_text(text_format.MessageToString(param))
    return load_net(path)


# --- The numerical proof -----------------------------------------------------------------------
def test_converted_weights_give_keras_convolutions_in_caffe(caffe, tmp_path, keras_file, keras_convs):
    model = vgg16.convert_keras(keras_file, tmp_path / "vgg16.caffemodel")
    h, w = 32, 48  # four 2x2 poolings (pool1 .. pool4) come before conv5_x, which runs at 2 x 3
    net = encoder_net(caffe, tmp_path, h, w)
    assert sorted(check_weights(model, net, strict=True)) == sorted(CONVS)
    net.copy_from(str(model))

    rng = np.random.default_rng(1)
    img = rng.uniform(-120, 130, (3, h, w)).astype(np.float32)  # mean-subtracted BGR, C x H x W
    net.blobs["data"].data[...] = img[None]
    net.forward()
    ref = vgg_reference(img.transpose(1, 2, 0), keras_convs)

    for name in CONVS:
        got = net.blobs[name].data[0].transpose(1, 2, 0)  # C x H x W -> H x W x C
        want = ref[name]
        assert got.shape == want.shape, name
        scale = np.abs(want).max()
        assert scale > 1e-3, f"{name}: activations vanished; the test would prove nothing"
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * scale, err_msg=name)

    # The asymmetric taps, spelled out: out[y, x] = in[y-1, x-1] (B) and 2 * in[y-1, x+1] (R).
    c11 = net.blobs["conv1_1"].data[0]
    np.testing.assert_allclose(c11[0, 1:, 1:], np.maximum(img[0, :-1, :-1] + 0.25, 0), rtol=1e-6, atol=1e-4)
    np.testing.assert_allclose(c11[1, 1:, :-1], np.maximum(2 * img[2, :-1, 1:] - 0.5, 0), rtol=1e-6, atol=1e-4)
    # ... and the mistakes this catches really differ: a flipped or spatially transposed kernel.
    k, b = keras_convs["conv1_1"]
    x = img.transpose(1, 2, 0).astype(np.float64)
    for wrong in (k[::-1, ::-1], k.transpose(1, 0, 2, 3), k[:, :, ::-1]):
        bad = np.maximum(conv_same(x, wrong, b), 0)
        assert not np.allclose(c11.transpose(1, 2, 0), bad, rtol=1e-3, atol=1e-2)


def test_conversion_layout_and_file(caffe, tmp_path, keras_file, keras_convs):
    """Caffe's blobs are (out, in, h, w) = Keras' kernel.transpose(3, 2, 0, 1); a V2 file that validates."""
    from caffe.proto import caffe_pb2

    model = vgg16.convert_keras(keras_file, tmp_path / "v.caffemodel")
    vgg16.validate_caffemodel(model)
    param = caffe_pb2.NetParameter()
    param.ParseFromString(model.read_bytes())
    assert [lay.name for lay in param.layer] == CONVS and not param.layers
    for lay in param.layer:
        k, b = keras_convs[lay.name]
        assert lay.type == "Convolution"
        w = np.array(lay.blobs[0].data, np.float32).reshape(tuple(lay.blobs[0].shape.dim))
        assert w.shape == vgg16.conv_shapes()[lay.name]
        np.testing.assert_array_equal(w, k.transpose(3, 2, 0, 1))
        np.testing.assert_array_equal(np.array(lay.blobs[1].data, np.float32), b)


# --- Recognised by content, cached beside the source -------------------------------------------
def test_keras_file_recognised_by_content_and_cached(caffe, tmp_path, keras_file, keras_convs):
    src = tmp_path / "weights.bin"  # the name says nothing
    shutil.copy(keras_file, src)
    assert vgg16.detect_format(src) == "keras-hdf5"
    out = vgg16.prepare_weights(src)
    assert out == tmp_path / "weights.bin.caffemodel" and out.is_file()
    assert (tmp_path / "weights.bin.caffemodel.json").is_file()
    assert not [p for p in tmp_path.iterdir() if ".part" in p.name]
    assert vgg16.detect_format(out) == "caffemodel"
    assert vgg16.prepare_weights(out) == out  # a caffemodel is used as is

    first = out.stat().st_mtime_ns
    assert vgg16.prepare_weights(src) == out and out.stat().st_mtime_ns == first  # re-used

    # A different source under the same name: converted again, never the stale file.
    other = random_keras_convs(seed=7)
    write_keras_h5(src, other)
    vgg16.prepare_weights(src)
    from caffe.proto import caffe_pb2

    param = caffe_pb2.NetParameter()
    param.ParseFromString(out.read_bytes())
    np.testing.assert_array_equal(np.array(param.layer[0].blobs[1].data, np.float32), other["conv1_1"][1])

    # A damaged cached file with a matching stamp is not trusted either.
    out.write_bytes(out.read_bytes()[:1000])
    assert vgg16.prepare_weights(src) == out
    vgg16.validate_caffemodel(out)


@pytest.mark.parametrize("top,style", [(True, "old"), (False, "new")])
def test_with_top_and_newer_weight_names(tmp_path, keras_convs, top, style):
    src = write_keras_h5(tmp_path / "k.h5", keras_convs, top=top, style=style)
    convs = vgg16.read_keras_convs(src)
    assert list(convs) == CONVS
    for name in CONVS:
        np.testing.assert_array_equal(convs[name][0], keras_convs[name][0])
        np.testing.assert_array_equal(convs[name][1], keras_convs[name][1])


def test_conversion_cached_in_cache_folder_when_source_folder_is_read_only(
    caffe, tmp_path, keras_file, monkeypatch, caplog
):
    # Root ignores permission bits, so the read-only folder is simulated at the writability probe.
    monkeypatch.setattr(vgg16, "_writable", lambda folder: False)
    monkeypatch.setenv("REDSEG_CACHE", str(tmp_path / "cache"))
    caplog.set_level("INFO", logger="redseg.model.vgg16")
    out = vgg16.prepare_weights(keras_file)
    assert out == tmp_path / "cache" / "vgg16" / f"{md5(keras_file)}.caffemodel"
    vgg16.validate_caffemodel(out)
    assert "not writable" in caplog.text and "matches no Keras release" in caplog.text


def test_stage1_initialises_from_keras_file(caffe, tmp_path, keras_file, keras_convs):
    """redseg/training/train.py's stage-1 spot takes the Keras file as --weights and copies the 13 convs."""
    from redseg.training.train import StageRun, _init_weights

    src = tmp_path / "vgg16.h5"
    shutil.copy(keras_file, src)
    net = load_net(REPO / "prototxt" / "deploy.prototxt")
    run = StageRun(1, tmp_path, tmp_path / "run", C.SCHEDULES["smoke"], weights=src)
    _init_weights(run, net)
    k, b = keras_convs["conv5_3"]
    np.testing.assert_array_equal(net.params["conv5_3"][0].data, k.transpose(3, 2, 0, 1))
    np.testing.assert_array_equal(net.params["conv5_3"][1].data, b)
    assert (tmp_path / "vgg16.h5.caffemodel").is_file()


# --- Refusals ----------------------------------------------------------------------------------
def test_wrong_md5_download_is_refused_and_deleted(tmp_path, keras_file):
    url = keras_file.as_uri()
    rel = vgg16.KerasRelease("vgg16_notop.h5", keras_file.stat().st_size, "0" * 32, (url,))
    out = tmp_path / "m" / "vgg.caffemodel"
    with pytest.raises(vgg16.FetchError) as e:
        vgg16.fetch(out, caffe_urls=(), keras=(rel,))
    ((tried, why),) = e.value.attempts
    assert tried == url
    assert f"md5 {md5(keras_file)}, expected {'0' * 32}" in why and "refused" in why
    assert not out.exists() and not (out.parent / rel.name).exists()
    assert not [p.name for p in out.parent.iterdir()]  # no partial file left


def test_truncated_files_are_refused(tmp_path, keras_file):
    size = keras_file.stat().st_size
    # A download that stops short (or the wrong file): the size check names what arrived.
    rel = vgg16.KerasRelease("vgg16_notop.h5", size + 1000, md5(keras_file), (keras_file.as_uri(),))
    with pytest.raises(vgg16.FetchError) as e:
        vgg16.fetch(tmp_path / "d" / "v.caffemodel", caffe_urls=(), keras=(rel,))
    assert f"{size + 1000:,}" in e.value.attempts[0][1]
    # A truncated file handed over by the user: refused with its name, before Caffe sees anything.
    cut = tmp_path / "cut.h5"
    cut.write_bytes(keras_file.read_bytes()[: size // 2])
    with pytest.raises(vgg16.VGG16Error, match=r"cut\.h5.*truncated or damaged"):
        vgg16.prepare_weights(cut)
    assert not (tmp_path / "cut.h5.caffemodel").exists()


def test_hdf5_without_vgg16_groups_is_refused(tmp_path, keras_convs):
    import h5py

    partial = {n: keras_convs[n] for n in CONVS[:4]}  # blocks 1 and 2 only
    src = write_keras_h5(tmp_path / "p.h5", partial, skip=tuple(vgg16.keras_layer(n) for n in CONVS[4:]))
    with pytest.raises(vgg16.VGG16Error) as e:
        vgg16.prepare_weights(src)
    msg = str(e.value)
    assert "no group block3_conv1, block3_conv2, block3_conv3, block4_conv1" in msg and "block5_conv3" in msg
    assert vgg16.KERAS_NOTOP.name in msg and "block1_conv1 ... block5_conv3" in msg

    with h5py.File(tmp_path / "other.h5", "w") as f:
        f.create_dataset("x", data=np.zeros(3))
    with pytest.raises(vgg16.VGG16Error, match="not Keras' VGG16 weights.*holds x"):
        vgg16.prepare_weights(tmp_path / "other.h5")


def test_wrong_shapes_and_theano_files_are_refused(tmp_path, keras_convs):
    bad = dict(keras_convs)
    k, b = bad["conv3_2"]
    bad["conv3_2"] = (k[:, :, :128], b)
    with pytest.raises(vgg16.VGG16Error, match=r"block3_conv2 has kernel \(3, 3, 128, 256\).*\(3, 3, 256, 256\)"):
        vgg16.read_keras_convs(write_keras_h5(tmp_path / "s.h5", bad))
    th = dict(keras_convs)
    th["conv1_1"] = (keras_convs["conv1_1"][0].transpose(3, 2, 0, 1), keras_convs["conv1_1"][1])
    with pytest.raises(vgg16.VGG16Error, match="Theano"):
        vgg16.read_keras_convs(write_keras_h5(tmp_path / "th.h5", th))
    with pytest.raises(vgg16.VGG16Error, match="Theano backend"):
        vgg16.read_keras_convs(write_keras_h5(tmp_path / "tb.h5", keras_convs, backend="theano"))


def test_web_page_instead_of_model_is_refused(tmp_path):
    """What the Oxford address serves since 2024: a few hundred bytes of HTML."""
    page = tmp_path / "VGG_ILSVRC_16_layers.caffemodel"
    page.write_text("<!DOCTYPE html>\n<html><head><title>Moved</title></head><body>moved</body></html>\n" * 3)
    for check in (vgg16.prepare_weights, vgg16.validate_caffemodel):
        with pytest.raises(CaffeInputError, match="a web page"):
            check(page)


# --- The fetch chain, without the internet -----------------------------------------------------
@pytest.fixture
def local_server():
    """A bounded HTTP server on 127.0.0.1: ``routes[path] = bytes``; anything else is a 404."""
    routes: dict[str, bytes] = {}

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 - the name http.server calls
            body = routes.get(self.path)
            if body is None:
                self.send_error(404)
                return
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.1}, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", routes
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)


def test_fetch_falls_back_to_keras_file(caffe, tmp_path, keras_file, local_server):
    base, routes = local_server
    routes["/vgg/VGG_ILSVRC_16_layers.caffemodel"] = b"<html><body>This page has moved.</body></html>\n" * 6
    routes["/keras-b/vgg16_notop.h5"] = keras_file.read_bytes()
    caffe_urls = (f"{base}/vgg/VGG_ILSVRC_16_layers.caffemodel", f"{base}/hed/5stage-vgg.caffemodel")
    keras_urls = (f"{base}/keras-a/vgg16_notop.h5", f"{base}/keras-b/vgg16_notop.h5")
    rel = vgg16.KerasRelease("vgg16_notop.h5", keras_file.stat().st_size, md5(keras_file), keras_urls)
    out = tmp_path / "models" / "VGG_ILSVRC_16_layers.caffemodel"

    path, source = vgg16.fetch(out, caffe_urls=caffe_urls, keras=(rel,), timeout=10)
    assert path == out and keras_urls[1] in source and "md5 checked" in source
    vgg16.validate_caffemodel(out)
    assert md5(out.parent / rel.name) == md5(keras_file)  # kept, so a re-conversion needs no download
    assert sorted(p.name for p in out.parent.iterdir()) == sorted(
        [out.name, out.name + ".json", rel.name]
    )  # nothing half-written, and the refused HTML page is not kept as the model
    assert vgg16.fetch(out, caffe_urls=caffe_urls, keras=(rel,))[1].endswith("already present")


def test_fetch_uses_a_keras_file_placed_by_hand(caffe, tmp_path, keras_file):
    out = tmp_path / "models" / vgg16.CAFFE_NAME
    out.parent.mkdir()
    shutil.copy(keras_file, out.parent / vgg16.KERAS_NOTOP.name)
    path, source = vgg16.fetch(out, caffe_urls=("http://127.0.0.1:9/none",), keras=())
    assert path == out and "by hand" in source
    vgg16.validate_caffemodel(out)


# --- tools/fetch_vgg16.py (`make vgg16`) -------------------------------------------------------
def fetch_tool(*args):
    return subprocess.run(
        [sys.executable, str(REPO / "tools/fetch_vgg16.py"), *map(str, args)],
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_tool_offline_names_every_address_and_the_manual_way(tmp_path):
    out = tmp_path / "models" / vgg16.CAFFE_NAME
    urls = [f"http://127.0.0.1:9/{n}" for n in ("a.caffemodel", "b.caffemodel", "k1.h5", "k2.h5")]
    proc = fetch_tool(
        "--out", out, "--url", urls[0], "--url", urls[1], "--keras-url", urls[2], "--keras-url", urls[3],
        "--timeout", 2,
    )  # fmt: skip
    assert proc.returncode == 1, proc.stderr
    for url in urls:
        assert url in proc.stderr
    for text in (vgg16.CAFFE_NAME, vgg16.KERAS_NOTOP.name, vgg16.KERAS_NOTOP.md5, str(out), "VGG16="):
        assert text in proc.stderr
    assert not out.exists()


def test_tool_checks_and_converts_a_keras_file(tmp_path, keras_file):
    src = tmp_path / "any name"
    shutil.copy(keras_file, src)
    proc = fetch_tool("--check", src)
    assert proc.returncode == 0, proc.stderr
    assert "valid VGG16 weights" in proc.stdout and "any name.caffemodel" in proc.stdout
    bad = tmp_path / "bad.h5"
    bad.write_bytes(keras_file.read_bytes()[:4096])
    proc = fetch_tool("--check", bad)
    assert proc.returncode == 1 and "bad.h5" in proc.stderr and "truncated" in proc.stderr
    assert fetch_tool("--timeout", "soon").returncode == 2  # a usage error


def test_known_release_constants_are_keras_own():
    """The constants the downloads are checked against (docs/weights.md): Keras' published values."""
    assert dataclasses.astuple(vgg16.KERAS_NOTOP)[1:3] == (58_889_256, "6d6bbae143d832006294945121d1f1fc")
    assert vgg16.KERAS_FULL.md5 == "64373286793e3c8b2b4e3219cbf3544b"
    assert [u.split("/")[2] for u in vgg16.KERAS_NOTOP.urls] == ["storage.googleapis.com", "github.com"]
    assert all(u.endswith(vgg16.KERAS_NOTOP.name) for u in vgg16.KERAS_NOTOP.urls)
