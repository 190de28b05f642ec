"""Running a trained Red-Seg on images: one deploy forward pass per image (paper section 3.3).

Red-Seg is an image-level model: the whole (downsampled) photograph goes through the net once and
``prob_ma`` / ``prob_he`` (sigmoid of the fused maps) come out at the input's size.

Two runners with one call contract: :class:`Segmenter` (pycaffe, the trained ``.caffemodel``) and
:class:`OnnxSegmenter` (ONNX Runtime, a model from tools/export_onnx.py). Importing this module
loads neither Caffe nor ONNX Runtime: each runner loads its own when it is built, so that a
machine with only ``onnxruntime`` installed can segment (docs/onnx.md).
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from redseg import config as C
from redseg.data.prepared_set import image_blob
from redseg.toolchain.caffe_utils import REPO, load_net

log = logging.getLogger(__name__)

DEPLOY = REPO / "prototxt" / "deploy.prototxt"


class Segmenter:
    """A deploy net with trained weights (checked against the net before Caffe loads them)."""

    def __init__(self, weights: str | os.PathLike, mean_bgr, deploy: str | os.PathLike = DEPLOY):
        self.net = load_net(deploy, "TEST", weights)
        self.mean = np.asarray(mean_bgr, dtype=np.float32)

    def __call__(self, img_bgr: np.ndarray) -> dict[str, np.ndarray]:
        """BGR uint8 HxWx3 -> {"MA": HxW float32 probabilities, "HE": ...}."""
        h, w = img_bgr.shape[:2]
        data = self.net.blobs["data"]
        if data.data.shape != (1, 3, h, w):
            data.reshape(1, 3, h, w)
            self.net.reshape()
        image_blob(img_bgr, self.mean, out=data.data)
        self.net.forward()
        return {"MA": self.net.blobs["prob_ma"].data[0, 0].copy(), "HE": self.net.blobs["prob_he"].data[0, 0].copy()}


@dataclass(frozen=True)
class OnnxModelInfo:
    """What an exported model records about itself (redseg/deploy/onnx_export.py, ``metadata_props``)."""

    mean_bgr: tuple[float, float, float] | None = None
    fov_diameter_px: float | None = None
    thresholds: dict[str, float] | None = None
    threshold_rule: str | None = None
    fusion_stages: dict[str, list[int]] | None = None
    deploy: str | None = None
    raw: dict[str, str] | None = None  # every metadata entry as stored (JSON strings)


def _import_onnxruntime():
    try:
        import onnxruntime
    except ImportError as e:  # pragma: no cover - depends on the installation
        raise ImportError(
            f"cannot import onnxruntime ({e}): pip install onnxruntime (CPU) or onnxruntime-gpu (CUDA)"
        ) from e
    return onnxruntime


def default_providers() -> list[str]:
    """CUDA when this ONNX Runtime has it (the onnxruntime-gpu package), then the CPU."""
    available = _import_onnxruntime().get_available_providers()
    return [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in available]


def _model_info(custom: dict[str, str], source: str) -> OnnxModelInfo:
    values = {}
    for key, text in custom.items():
        try:
            values[key] = json.loads(text)
        except ValueError:
            log.warning("%s: metadata %s is not JSON (%r); ignored", source, key, text[:40])
    mean = values.get("mean_bgr")
    if mean is not None and (not isinstance(mean, list) or len(mean) != 3):
        log.warning("%s: metadata mean_bgr %r is not three numbers; ignored", source, mean)
        mean = None
    return OnnxModelInfo(
        mean_bgr=tuple(float(v) for v in mean) if mean is not None else None,
        fov_diameter_px=values.get("fov_diameter_px"),
        thresholds=values.get("thresholds"),
        threshold_rule=values.get("threshold_rule"),
        fusion_stages=values.get("fusion_stages"),
        deploy=values.get("deploy"),
        raw=dict(custom),
    )


def _session(path: Path, providers: list[str]):
    """An ONNX Runtime session of ``path``; a missing or unreadable file is an OSError/ValueError naming it."""
    ort = _import_onnxruntime()
    if not path.is_file():
        raise FileNotFoundError(f"ONNX model not found: {path}")
    try:
        return ort.InferenceSession(str(path), providers=providers)
    except Exception as e:  # onnxruntime's own types (InvalidProtobuf, Fail, ...): bad input, one line
        raise ValueError(f"{path}: ONNX Runtime cannot load it as a model: {e}") from e


def read_onnx_info(model_path: str | os.PathLike) -> OnnxModelInfo:
    """The mean, FOV diameter, thresholds and fusion stages an exported model carries (absent: None)."""
    sess = _session(Path(model_path), ["CPUExecutionProvider"])
    return _model_info(sess.get_modelmeta().custom_metadata_map, str(model_path))


class OnnxSegmenter:
    """An exported model (tools/export_onnx.py) run by ONNX Runtime, called like :class:`Segmenter`.

    ``mean_bgr``: the input mean; default the model's own (its metadata), else the L-Seg IDRiD mean
    with a warning. ``providers``: ONNX Runtime execution providers, default
    :func:`default_providers` (CUDA first when onnxruntime-gpu is installed, then the CPU).
    """

    def __init__(self, model_path: str | os.PathLike, mean_bgr=None, providers: list[str] | None = None):
        path = Path(model_path)
        self.session = _session(path, providers or default_providers())
        self.info = _model_info(self.session.get_modelmeta().custom_metadata_map, str(path))
        if mean_bgr is None:
            mean_bgr = self.info.mean_bgr
            if mean_bgr is None:
                mean_bgr = C.LSEG_MEAN_BGR
                log.warning("%s records no input mean; using the L-Seg IDRiD mean %s", path, mean_bgr)
        self.mean = np.asarray(mean_bgr, dtype=np.float32)
        if self.mean.shape != (3,):
            raise ValueError(f"mean_bgr must be three numbers B, G, R; got {mean_bgr!r}")
        names = [i.name for i in self.session.get_inputs()]
        outs = [o.name for o in self.session.get_outputs()]
        if names != ["data"] or not {"prob_ma", "prob_he"} <= set(outs):
            raise ValueError(f"{path}: not a Red-Seg model (inputs {names}, outputs {outs})")
        log.info("ONNX Runtime on %s", ", ".join(self.session.get_providers()))

    def __call__(self, img_bgr: np.ndarray) -> dict[str, np.ndarray]:
        """BGR uint8 HxWx3 -> {"MA": HxW float32 probabilities, "HE": ...}."""
        ma, he = self.session.run(["prob_ma", "prob_he"], {"data": image_blob(img_bgr, self.mean)})
        return {"MA": ma[0, 0], "HE": he[0, 0]}


def to_u8(prob: np.ndarray) -> np.ndarray:
    """Probability -> 8-bit map, probability x 255 rounded (the authors' saved predictions)."""
    return np.clip(np.rint(prob * 255.0), 0, 255).astype(np.uint8)


def side_maps(net) -> dict[str, np.ndarray]:
    """After a forward pass: the sigmoid of every side output at the input size, by name
    (``ma_conv2``, ..., ``he_conv5``; paper Fig. 7), next to ``ma_fuse`` / ``he_fuse`` (the fused
    maps, ``prob_ma`` / ``prob_he``). Side outputs are the upsampled, cropped ``score_*`` blobs;
    a stride-1 side (conv1 in Table 5's conv1-4 variant) has no upsampling: its ``side_*`` blob."""
    out = {}
    for name in net.blobs:
        for prefix in ("score_", "side_"):
            if name.startswith(prefix):
                key = name[len(prefix) :]
                if prefix == "side_" and f"score_{key}" in net.blobs:
                    continue
                x = net.blobs[name].data[0, 0].astype(np.float64)
                out[key] = (1.0 / (1.0 + np.exp(-x))).astype(np.float32)
    for lesion in ("ma", "he"):
        out[f"{lesion}_fuse"] = net.blobs[f"prob_{lesion}"].data[0, 0].copy()
    return out
