"""A trained Red-Seg deploy net as an ONNX model, built layer by layer with ``onnx.helper``.

Why: a trained model should run where Caffe does not build (Windows, a recent CUDA, a phone) and
without our patched Caffe; ONNX Runtime runs an ONNX model on CPU and GPU from one pip package.
No generic converter is used: the deploy nets (prototxt/deploy.prototxt and the fusion variants in
prototxt/ablations/, all made by redseg/model/net.py) contain a handful of layer types, and each is
translated here with Caffe's own semantics spelled out, so that the ONNX model gives the numbers
pycaffe gives (tests/deploy/test_onnx_export.py holds both to 1e-4 at odd input sizes):

* ``Input`` -> the graph input ``data``, float32 1x3xHxW (BGR minus the training mean, exactly
  what the Caffe net takes: redseg.data.prepared_set.image_blob), height and width dynamic, or
  fixed with ``input_size`` (below);
* ``Convolution`` -> ``Conv``; ``ReLU`` -> ``Relu`` (``LeakyRelu`` for a negative slope);
  ``Concat`` -> ``Concat``; ``Sigmoid`` -> ``Sigmoid``;
* ``Pooling`` (MAX) -> ``MaxPool`` with ``ceil_mode=1``: Caffe rounds the pooled size up,
  ``ceil((H + 2 pad - k) / s) + 1``, and drops the last window when it would start inside the
  bottom padding. With pad 0 (all Red-Seg pools) that is exactly ONNX's ceil mode; a padded pool
  is refused rather than converted on an unchecked rule;
* ``Deconvolution`` (Caffe's bilinear upsampling: kernel 2f, stride f, no bias, fixed weights)
  -> ``ConvTranspose`` with the trained (bilinear) weights as initializers. Caffe's deconvolution
  output is ``s (H - 1) + k - 2 pad``, which is ONNX's with no output padding;
* ``Crop`` -> ``Slice``: Caffe crops every axis from ``crop_param.axis`` on to the size of the
  second bottom (the reference), starting at ``offset`` (one value for all those axes, or one per
  axis). The reference's size depends on the input, so the ends are computed in the graph
  (``Shape`` of the reference, plus the offsets).

A **fixed-size export** (``input_size=(H, W)``, ``tools/export_onnx.py --input-size HxW``) takes
only inputs of that size: the input and outputs have fixed dimensions and each crop's ends are
constants (pycaffe's reference blob shapes with the net reshaped to that size), so the graph has
no ``Shape`` node. OpenCV's DNN module (``cv2.dnn.readNetFromONNX``) refuses the dynamic graph's
``Shape`` nodes and runs the fixed one; ONNX Runtime runs both. The size is recorded in the
metadata (``input_size``: ``[H, W]``, null for the dynamic export).

Anything else is refused with :class:`UnsupportedLayerError`, naming each unknown type and its
layers, rather than exported wrongly.

The model's ``metadata_props`` carry JSON strings (:data:`META_KEYS`): the deploy file's name, the
fusion stages of each branch, and what a user of the model needs to reproduce the training
preprocessing and the decision rule: ``mean_bgr`` (from the weights' sidecar ``<weights>.json``,
a prepared set's meta.json or given), and from the sidecar (redseg/deploy/model_info.py)
``fov_diameter_px``, ``thresholds``, ``threshold_rule`` and ``source``, each JSON-encoded as
``ModelInfo.as_metadata`` does, so that ``ModelInfo.from_metadata`` reads them back.
redseg.deploy.inference.OnnxSegmenter reads them back.
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from redseg import config as C
from redseg.deploy.model_info import KEYS as MODEL_INFO_KEYS
from redseg.deploy.model_info import read_model_info, sidecar_path
from redseg.fileio import atomic_path, file_digest

log = logging.getLogger(__name__)

# ONNX Runtime 1.23 (Python 3.10's pin) and 1.32 both run opset 17 with IR version 8; a newer
# opset would add nothing these nets use and would shut out older runtimes.
OPSET = 17
IR_VERSION = 8
HEIGHT, WIDTH = "height", "width"  # the symbolic input (and output) dimensions
SUPPORTED = ("Input", "Convolution", "ReLU", "Pooling", "Deconvolution", "Crop", "Concat", "Sigmoid")
# copied from the sidecar <weights>.json: mean_bgr, fov_diameter_px, thresholds, threshold_rule, source
SIDECAR_KEYS = MODEL_INFO_KEYS
# metadata_props keys (values are JSON strings)
META_KEYS = (
    "redseg_format",
    "deploy",
    "fusion_stages",
    "weights",
    "weights_sha256",
    "input",
    "input_size",
    *SIDECAR_KEYS,
)
FORMAT_VERSION = 1


class UnsupportedLayerError(ValueError):
    """The deploy net has layer types (or layer settings) this exporter does not translate."""


class ExportCheckError(ValueError):
    """The exported model does not give pycaffe's numbers (the export is not written)."""


@dataclass
class _Graph:
    """The ONNX graph under construction: nodes, initializers and the current tensor of each blob."""

    nodes: list
    inits: list
    tensor: dict[str, str]  # Caffe blob name -> ONNX tensor holding its latest value
    used: set[str]

    def fresh(self, name: str) -> str:
        """A tensor name not yet used: ``name`` itself, else ``name/2``, ``name/3`` ... (in-place layers)."""
        out, i = name, 1
        while out in self.used:
            i += 1
            out = f"{name}/{i}"
        self.used.add(out)
        return out

    def const(self, name: str, values, dtype=np.int64) -> str:
        from onnx import numpy_helper

        name = self.fresh(name)
        self.inits.append(numpy_helper.from_array(np.asarray(values, dtype=dtype), name))
        return name


# --- reading Caffe's layer parameters -------------------------------------------------------------


def _pair(repeated: Sequence[int], h: int | None, w: int | None, default: int, what: str, layer: str) -> list[int]:
    """Caffe's 2-D convolution fields: ``x_h``/``x_w`` when set, else one value for both or one per axis."""
    if h is not None or w is not None:
        return [h if h is not None else default, w if w is not None else default]
    vals = list(repeated)
    if not vals:
        return [default, default]
    if len(vals) == 1:
        return vals * 2
    if len(vals) == 2:
        return vals
    raise UnsupportedLayerError(f"layer '{layer}': {len(vals)} {what} values; only 2-D layers are exported")


def _field(msg, name: str) -> int | None:
    return getattr(msg, name) if msg.HasField(name) else None


def _conv_attrs(layer) -> dict:
    """kernel_shape, strides, pads, dilations and group of a Convolution or Deconvolution layer."""
    cp = layer.convolution_param
    if cp.axis != 1:
        raise UnsupportedLayerError(f"layer '{layer.name}': convolution axis {cp.axis}; only axis 1 is exported")
    k = _pair(cp.kernel_size, _field(cp, "kernel_h"), _field(cp, "kernel_w"), 0, "kernel_size", layer.name)
    s = _pair(cp.stride, _field(cp, "stride_h"), _field(cp, "stride_w"), 1, "stride", layer.name)
    p = _pair(cp.pad, _field(cp, "pad_h"), _field(cp, "pad_w"), 0, "pad", layer.name)
    d = _pair(cp.dilation, None, None, 1, "dilation", layer.name)
    return {"kernel_shape": k, "strides": s, "pads": [p[0], p[1], p[0], p[1]], "dilations": d, "group": cp.group}


def _pool_attrs(layer) -> dict:
    """MaxPool attributes of a Caffe MAX Pooling layer (ceil rounding, see the module docstring)."""
    from caffe.proto import caffe_pb2

    pp = layer.pooling_param
    if pp.pool != caffe_pb2.PoolingParameter.MAX:
        raise UnsupportedLayerError(f"layer '{layer.name}': only MAX pooling is exported")
    if pp.global_pooling:
        raise UnsupportedLayerError(f"layer '{layer.name}': global pooling is not exported")
    k = [pp.kernel_h, pp.kernel_w] if pp.HasField("kernel_h") else [pp.kernel_size] * 2
    s = [pp.stride_h, pp.stride_w] if pp.HasField("stride_h") else [pp.stride] * 2
    p = [pp.pad_h, pp.pad_w] if pp.HasField("pad_h") else [pp.pad] * 2
    if any(p):
        # Caffe drops a last window that starts in the padding; ONNX runtimes differ on that rule.
        raise UnsupportedLayerError(f"layer '{layer.name}': padded pooling (pad {p}) is not exported")
    return {"kernel_shape": k, "strides": s, "pads": [0, 0, 0, 0], "ceil_mode": 1}


def _canonical_axis(axis: int, ndim: int, layer: str) -> int:
    a = axis + ndim if axis < 0 else axis
    if not 0 <= a < ndim:
        raise UnsupportedLayerError(f"layer '{layer}': axis {axis} out of range for a {ndim}-D blob")
    return a


def check_supported(net_param, source: str = "net") -> None:
    """Raise :class:`UnsupportedLayerError` naming every layer type not in :data:`SUPPORTED` and its layers."""
    unknown: dict[str, list[str]] = {}
    for layer in net_param.layer:
        if layer.type not in SUPPORTED:
            unknown.setdefault(layer.type, []).append(layer.name)
    if net_param.layers:  # V1 layers (an old prototxt): Caffe upgrades them; we do not
        unknown.setdefault("V1 'layers'", []).extend(ly.name for ly in net_param.layers)
    if unknown:
        what = "; ".join(f"type '{t}' (layer{'s' if len(n) > 1 else ''} {', '.join(n)})" for t, n in unknown.items())
        raise UnsupportedLayerError(
            f"{source}: cannot export to ONNX: {what}. Supported layer types: {', '.join(SUPPORTED)}"
        )


def fusion_stages(net_param) -> dict[str, list[int]]:
    """Lesion -> the VGG16 stages its branch fuses, read off the ``concat_<lesion>`` layers (redseg/model/net.py)."""
    out = {}
    by_name = {layer.name: layer for layer in net_param.layer}
    for lesion in C.LESIONS:
        concat = by_name.get(f"concat_{lesion.lower()}")
        if concat is None:
            continue
        stages = [re.search(r"_conv(\d+)$", b) for b in concat.bottom]
        out[lesion] = [int(m.group(1)) for m in stages if m]
    return out


# --- the translation --------------------------------------------------------------------------


def _params(net, layer) -> list[np.ndarray]:
    return [np.ascontiguousarray(b.data, dtype=np.float32) for b in net.params[layer.name]]


def _translate(layer, net, g: _Graph, fixed: bool = False) -> None:
    """Append the ONNX nodes of one Caffe layer to ``g``."""
    from onnx import helper, numpy_helper

    ins = [g.tensor[b] for b in layer.bottom]
    tops = [g.fresh(t) for t in layer.top]
    name, t = layer.name, layer.type
    if t in ("Convolution", "Deconvolution"):
        attrs = _conv_attrs(layer)
        blobs = _params(net, layer)
        w = g.fresh(f"{name}.weight")
        g.inits.append(numpy_helper.from_array(blobs[0], w))
        args = [ins[0], w]
        if len(blobs) > 1:
            b = g.fresh(f"{name}.bias")
            g.inits.append(numpy_helper.from_array(blobs[1].reshape(-1), b))
            args.append(b)
        op = "Conv" if t == "Convolution" else "ConvTranspose"
        g.nodes.append(helper.make_node(op, args, tops, name=name, **attrs))
    elif t == "ReLU":
        slope = layer.relu_param.negative_slope
        if slope:
            g.nodes.append(helper.make_node("LeakyRelu", ins, tops, name=name, alpha=slope))
        else:
            g.nodes.append(helper.make_node("Relu", ins, tops, name=name))
    elif t == "Pooling":
        g.nodes.append(helper.make_node("MaxPool", ins, tops, name=name, **_pool_attrs(layer)))
    elif t == "Sigmoid":
        g.nodes.append(helper.make_node("Sigmoid", ins, tops, name=name))
    elif t == "Concat":
        cp = layer.concat_param
        axis = cp.concat_dim if cp.HasField("concat_dim") else cp.axis
        ndim = net.blobs[layer.top[0]].data.ndim
        g.nodes.append(helper.make_node("Concat", ins, tops, name=name, axis=_canonical_axis(axis, ndim, name)))
    elif t == "Crop":
        _crop(layer, net, ins, tops[0], g, fixed)
    else:  # check_supported ran first
        raise UnsupportedLayerError(f"layer '{name}': type '{t}' is not exported")
    for blob, tensor in zip(layer.top, tops, strict=True):
        g.tensor[blob] = tensor


def _crop(layer, net, ins: list[str], top: str, g: _Graph, fixed: bool = False) -> None:
    """Caffe Crop as Slice: axes ``axis..ndim-1`` of bottom 0 from ``offset`` to ``offset + reference size``.

    ``fixed``: the ends are constants, the reference blob's shape in ``net`` (reshaped to the fixed
    input size); else they are computed in the graph from the reference's ``Shape``."""
    from onnx import helper

    ndim = net.blobs[layer.bottom[0]].data.ndim
    axis = _canonical_axis(layer.crop_param.axis, ndim, layer.name)
    n = ndim - axis
    off = list(layer.crop_param.offset)
    if len(off) == 0:
        off = [0] * n
    elif len(off) == 1:
        off = off * n
    elif len(off) != n:
        raise UnsupportedLayerError(f"layer '{layer.name}': {len(off)} crop offsets for {n} cropped axes")
    name = layer.name
    starts = g.const(f"{name}.starts", off)
    axes = g.const(f"{name}.axes", list(range(axis, ndim)))
    if fixed:
        ref = net.blobs[layer.bottom[1]].data.shape[axis:]
        ends = g.const(f"{name}.ends", [o + int(r) for o, r in zip(off, ref, strict=True)])
        g.nodes.append(helper.make_node("Slice", [ins[0], starts, ends, axes], [top], name=name))
        return
    ref_shape = g.fresh(f"{name}.reference_shape")
    ends = g.fresh(f"{name}.ends")
    g.nodes += [
        helper.make_node("Shape", [ins[1]], [ref_shape], name=f"{name}.shape", start=axis),
        helper.make_node("Add", [starts, ref_shape], [ends], name=f"{name}.add"),
        helper.make_node("Slice", [ins[0], starts, ends, axes], [top], name=name),
    ]


def build_model(net_param, net, metadata: dict | None = None, input_size: tuple[int, int] | None = None):
    """The ``onnx.ModelProto`` of a loaded deploy net (``net``: pycaffe, with its weights).

    ``net_param`` is the parsed prototxt (layer settings); ``metadata``: key -> JSON-able value,
    stored as JSON strings in ``metadata_props``. ``input_size`` (H, W): a fixed-size graph (see
    the module's docstring; ``net`` is reshaped to that size), else height and width are free.
    """
    import onnx
    from onnx import TensorProto, helper

    check_supported(net_param)
    if input_size is not None:
        h, w = (int(v) for v in input_size)
        if h < 1 or w < 1:
            raise ValueError(f"input size must be positive, got {h}x{w}")
        net.blobs["data"].reshape(1, 3, h, w)
        net.reshape()  # every blob at its shape for this input: the crops' references
        height, width = h, w
    else:
        height, width = HEIGHT, WIDTH
    g = _Graph(nodes=[], inits=[], tensor={}, used=set())
    inputs = []
    legacy = [(name, list(s.dim)) for name, s in zip(net_param.input, net_param.input_shape, strict=False)]
    input_layers = [(ly.top[0], list(ly.input_param.shape[0].dim)) for ly in net_param.layer if ly.type == "Input"]
    for blob, dims in legacy + input_layers:
        if len(dims) != 4:
            raise UnsupportedLayerError(f"input '{blob}' has shape {dims}; a 1x3xHxW image blob is expected")
        shape = [dims[0], dims[1], height, width]
        inputs.append(helper.make_tensor_value_info(blob, TensorProto.FLOAT, shape))
        g.tensor[blob] = g.fresh(blob)
    for layer in net_param.layer:
        if layer.type != "Input":
            _translate(layer, net, g, fixed=input_size is not None)
    outputs = []
    made = {top: i for i, layer in enumerate(net_param.layer) for top in layer.top}  # last producer wins
    for blob in sorted(net.outputs, key=made.__getitem__):  # the prototxt's order: prob_ma, prob_he
        final = g.tensor[blob]
        if final != blob:  # an in-place layer wrote last: give the output its blob's name
            g.nodes.append(helper.make_node("Identity", [final], [blob], name=f"{blob}.output"))
        channels = net.blobs[blob].data.shape[1]
        outputs.append(helper.make_tensor_value_info(blob, TensorProto.FLOAT, [1, channels, height, width]))
    graph = helper.make_graph(g.nodes, net_param.name or "redseg", inputs, outputs, initializer=g.inits)
    model = helper.make_model(
        graph,
        producer_name="redseg",
        producer_version=str(FORMAT_VERSION),
        opset_imports=[helper.make_opsetid("", OPSET)],
        ir_version=IR_VERSION,
    )
    model.doc_string = "Red-Seg (MA and HE segmentation of fundus photographs), exported from Caffe by redseg"
    helper.set_model_props(model, {k: json.dumps(v) for k, v in (metadata or {}).items()})
    onnx.checker.check_model(model, full_check=True)  # structure and shape inference
    return model


# --- metadata ---------------------------------------------------------------------------------


def read_sidecar(weights: str | os.PathLike) -> dict:
    """The sidecar ``<weights>.json`` (redseg.deploy.model_info: mean, FOV diameter, thresholds and where they
    come from) as a dict of :data:`SIDECAR_KEYS`; empty when there is none, ModelInfoError when malformed."""
    info = read_model_info(weights)
    return {} if info is None else {k: v for k, v in info.as_dict().items() if k in SIDECAR_KEYS}


def export_metadata(
    net_param,
    deploy: str | os.PathLike,
    weights: str | os.PathLike,
    mean_bgr: Sequence[float] | None = None,
    input_size: tuple[int, int] | None = None,
) -> dict:
    """What the ONNX model records about itself (:data:`META_KEYS`; values JSON-able).

    The mean: ``mean_bgr`` when given (a prepared set's or the user's), else the sidecar's; the
    model has no mean when neither exists, and OnnxSegmenter then warns and uses the L-Seg mean.
    """
    meta: dict = {
        "redseg_format": FORMAT_VERSION,
        "deploy": Path(deploy).name,
        "fusion_stages": fusion_stages(net_param),
        "weights": Path(weights).name,
        "weights_sha256": file_digest(weights),
        "input": "data: float32 1x3xHxW, BGR minus mean_bgr (per channel), "
        + ("H and W any size" if input_size is None else f"H x W exactly {input_size[0]}x{input_size[1]}")
        + "; outputs prob_ma, prob_he: 1x1xHxW probabilities",
        "input_size": None if input_size is None else [int(v) for v in input_size],
    }
    side = read_sidecar(weights)
    if side:
        log.info("model sidecar %s: %s", sidecar_path(weights), ", ".join(sorted(side)))
    meta.update(side)
    if mean_bgr is not None:
        mean = [round(float(v), 6) for v in mean_bgr]
        if len(mean) != 3:
            raise ValueError(f"mean_bgr must have 3 values (B, G, R), got {len(mean)}")
        if "mean_bgr" in side and not np.allclose(side["mean_bgr"], mean, atol=1e-3):
            log.warning("using mean %s instead of the sidecar's %s", mean, side["mean_bgr"])
        meta["mean_bgr"] = mean
    if "mean_bgr" not in meta:
        log.warning("no mean stored in the model (no sidecar %s, no --data or --mean-bgr)", sidecar_path(weights))
    return meta


# --- export and its check -----------------------------------------------------------------------


def export(
    weights: str | os.PathLike,
    out: str | os.PathLike,
    deploy: str | os.PathLike | None = None,
    mean_bgr: Sequence[float] | None = None,
    force: bool = False,
    verify_size: tuple[int, int] | None = (67, 93),
    tolerance: float = 1e-4,
    input_size: tuple[int, int] | None = None,
) -> Path:
    """Convert ``deploy`` (default prototxt/deploy.prototxt) with ``weights`` and write ``out`` atomically.

    ``verify_size``: before writing, run pycaffe and ONNX Runtime on one random image of that size
    (odd by default: ceil pooling and the crops matter there) and refuse the export when the
    probabilities differ by more than ``tolerance`` (:class:`ExportCheckError`); None skips it.
    ``input_size`` (H, W): a fixed-size export (module docstring), checked at that size (any
    ``verify_size`` but None is replaced by it) in ONNX Runtime and, when OpenCV is installed, in
    OpenCV's DNN module. An existing ``out`` is kept unless ``force``.
    """
    from redseg.toolchain.caffe_utils import REPO, load_net, read_net_param

    deploy = Path(deploy) if deploy is not None else REPO / "prototxt" / "deploy.prototxt"
    out = Path(out)
    if out.exists() and not force:
        raise FileExistsError(f"{out} exists; remove it or pass --force to overwrite it")
    net_param = read_net_param(deploy)
    check_supported(net_param, str(deploy))  # before loading 500 MB of weights for nothing
    net = load_net(deploy, "TEST", weights)  # checks the weights against the net first
    meta = export_metadata(net_param, deploy, weights, mean_bgr, input_size)
    model = build_model(net_param, net, meta, input_size)
    data = model.SerializeToString()
    log.info(
        "ONNX model: %d nodes, %d initializers, opset %d, %.1f MB",
        len(model.graph.node),
        len(model.graph.initializer),
        OPSET,
        len(data) / 1e6,
    )
    if verify_size is not None:
        verify_size = tuple(input_size) if input_size is not None else verify_size
        runners = [("ONNX Runtime", compare_with_caffe)]
        if input_size is not None and _have_opencv():
            runners.append(("OpenCV DNN", compare_with_opencv))
        for runner, compare in runners:
            diff = compare(net, data, verify_size)
            if diff > tolerance:
                raise ExportCheckError(
                    f"the ONNX model in {runner} differs from pycaffe by {diff:.3g} (> {tolerance:g}) at "
                    f"{verify_size[0]}x{verify_size[1]}; not written"
                )
            log.info("checked in %s against pycaffe at %dx%d: max |diff| %.2g", runner, *verify_size, diff)
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(out) as tmp:
        tmp.write_bytes(data)
    log.info("wrote %s", out)
    return out


def compare_with_caffe(net, model: bytes | str | os.PathLike, size: tuple[int, int], seed: int = 0) -> float:
    """Max |difference| of every output between pycaffe's ``net`` and ONNX Runtime (CPU) on one
    random input blob of ``size`` (H, W); the net is reshaped to that size."""
    import onnxruntime as ort

    h, w = size
    x = _caffe_forward(net, size, seed)
    src = model if isinstance(model, bytes) else str(model)
    names = list(net.outputs)
    try:
        sess = ort.InferenceSession(src, providers=["CPUExecutionProvider"])
        got = sess.run(names, {"data": x})
    except Exception as e:  # onnxruntime's own exception types (Fail, InvalidArgument, ...)
        raise ExportCheckError(f"ONNX Runtime cannot run the exported model at {h}x{w}: {e}") from e
    return max(float(np.abs(net.blobs[b].data - y).max()) for b, y in zip(names, got, strict=True))


def _have_opencv() -> bool:
    try:
        import cv2  # noqa: F401
    except ImportError:
        return False
    return True


def _caffe_forward(net, size: tuple[int, int], seed: int) -> np.ndarray:
    """Run ``net`` (reshaped to ``size``) on a seeded random input blob; returns the blob."""
    h, w = size
    x = np.random.default_rng(seed).normal(0.0, 40.0, (1, 3, h, w)).astype(np.float32)
    net.blobs["data"].reshape(1, 3, h, w)
    net.reshape()
    net.blobs["data"].data[...] = x
    net.forward()
    return x


def compare_with_opencv(net, model: bytes | str | os.PathLike, size: tuple[int, int], seed: int = 0) -> float:
    """As :func:`compare_with_caffe`, with OpenCV's DNN module (``cv2.dnn.readNetFromONNX``, CPU)
    running the model: only a fixed-size export of ``size`` loads there."""
    import cv2

    x = _caffe_forward(net, size, seed)
    names = list(net.outputs)
    try:
        if isinstance(model, bytes):
            dnn = cv2.dnn.readNetFromONNX(np.frombuffer(model, np.uint8))
        else:
            dnn = cv2.dnn.readNetFromONNX(str(model))
        dnn.setInput(x, "data")
        got = dnn.forward(names)
    except cv2.error as e:
        msg = str(e).strip().splitlines()[-1] if str(e).strip() else repr(e)
        raise ExportCheckError(f"OpenCV DNN cannot run the exported model at {size[0]}x{size[1]}: {msg}") from e
    return max(float(np.abs(net.blobs[b].data - y).max()) for b, y in zip(names, got, strict=True))
