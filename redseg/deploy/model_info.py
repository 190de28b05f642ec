"""What a trained model needs beside its weights to segment a new photograph: its sidecar.

``<weights>.json`` beside the weights (``runs/demo/stage2_final.caffemodel.json``) holds::

    {"mean_bgr": [b, g, r],              # the training images' input mean
     "fov_diameter_px": 226.1 | null,    # the training images' field-of-view diameter (redseg.data.fov)
     "thresholds": {"MA": t, "HE": t},   # per lesion, a probability in [0, 1]
     "threshold_rule": "...",            # how the thresholds were chosen
     "source": "runs/.../metrics.json"}  # where they come from

``tools/test_net.py`` writes it (atomically, redseg.fileio) after its evaluation: the thresholds
are each lesion's precision-recall break-even threshold on the test set (redseg.evaluation.metrics.break_even,
``metrics.json``'s ``<lesion>.break_even.threshold``). ``tools/segment.py`` (redseg.deploy.screening)
reads it. The ONNX exporter copies the same keys into the ONNX model's metadata, each value
JSON-encoded (:meth:`ModelInfo.as_metadata`, :meth:`ModelInfo.from_metadata`), so a model
segments the same way from Caffe weights and from ONNX.

This module loads neither Caffe nor onnxruntime.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

from redseg.config import LESIONS
from redseg.fileio import write_json

KEYS = ("mean_bgr", "fov_diameter_px", "thresholds", "threshold_rule", "source")
SUFFIX = ".json"
BREAK_EVEN_RULE = (
    "per lesion, the precision-recall break-even threshold on the test set (the 8-bit cut v/255 where "
    "|precision - recall| is smallest; redseg.evaluation.metrics.break_even); a pixel is lesion where probability >= t"
)


class ModelInfoError(ValueError):
    """A sidecar or a model's metadata is unreadable or malformed; the message names it."""


@dataclass
class ModelInfo:
    """A model's sidecar (see the module's docstring)."""

    mean_bgr: list[float]
    fov_diameter_px: float | None = None
    thresholds: dict[str, float] = field(default_factory=dict)
    threshold_rule: str = ""
    source: str | None = None

    def as_dict(self) -> dict:
        return {
            "mean_bgr": [float(v) for v in self.mean_bgr],
            "fov_diameter_px": None if self.fov_diameter_px is None else float(self.fov_diameter_px),
            "thresholds": {k: float(v) for k, v in self.thresholds.items()},
            "threshold_rule": self.threshold_rule,
            "source": self.source,
        }

    def as_metadata(self) -> dict[str, str]:
        """The keys as ONNX metadata (string -> string): each value JSON-encoded."""
        return {k: json.dumps(v) for k, v in self.as_dict().items()}

    @classmethod
    def from_dict(cls, d: dict, where: str = "model info") -> ModelInfo:
        """Check and convert a sidecar's JSON object; ModelInfoError naming ``where`` when malformed."""
        if not isinstance(d, dict):
            raise ModelInfoError(f"{where}: expected a JSON object, got {type(d).__name__}")
        try:
            mean = [float(v) for v in d["mean_bgr"]]
        except (KeyError, TypeError, ValueError):
            raise ModelInfoError(f"{where}: 'mean_bgr' must be three numbers B, G, R") from None
        if len(mean) != 3:
            raise ModelInfoError(f"{where}: 'mean_bgr' must be three numbers B, G, R, got {len(mean)}")
        fov = d.get("fov_diameter_px")
        if fov is not None:
            try:
                fov = float(fov)
            except (TypeError, ValueError):
                raise ModelInfoError(f"{where}: 'fov_diameter_px' must be a number or null, got {fov!r}") from None
            if not (math.isfinite(fov) and fov > 0):
                raise ModelInfoError(f"{where}: 'fov_diameter_px' must be positive, got {fov}")
        raw = d.get("thresholds") or {}
        if not isinstance(raw, dict):
            raise ModelInfoError(f"{where}: 'thresholds' must be an object lesion -> threshold")
        thresholds = {}
        for lesion, t in raw.items():
            if t is None:  # no break-even point (no lesion pixel in the test set): no threshold
                continue
            try:
                t = float(t)
            except (TypeError, ValueError):
                raise ModelInfoError(f"{where}: threshold of {lesion} must be a number, got {t!r}") from None
            if not 0.0 <= t <= 1.0:
                raise ModelInfoError(f"{where}: threshold of {lesion} must lie in [0, 1], got {t}")
            thresholds[str(lesion)] = t
        source = d.get("source")
        return cls(mean, fov, thresholds, str(d.get("threshold_rule") or ""), None if source is None else str(source))

    @classmethod
    def from_metadata(cls, meta: dict[str, str], where: str = "ONNX metadata") -> ModelInfo:
        """The inverse of :meth:`as_metadata` (values JSON strings; keys other than :data:`KEYS` ignored)."""
        d = {}
        for k in KEYS:
            if k in meta:
                try:
                    d[k] = json.loads(meta[k])
                except (TypeError, ValueError):
                    raise ModelInfoError(f"{where}: key {k!r} is not JSON: {meta[k]!r}") from None
        return cls.from_dict(d, where)


def sidecar_path(weights: str | os.PathLike) -> Path:
    """``<weights>.json`` beside the weights file."""
    weights = Path(weights)
    return weights.with_name(weights.name + SUFFIX)


def write_model_info(weights: str | os.PathLike, info: ModelInfo) -> Path:
    """Write ``info`` as the sidecar of ``weights`` (atomically); returns its path."""
    return write_json(sidecar_path(weights), info.as_dict())


def read_model_info(weights: str | os.PathLike) -> ModelInfo | None:
    """The sidecar of ``weights``, or None when there is none; ModelInfoError when it is malformed."""
    path = sidecar_path(weights)
    if not path.is_file():
        return None
    try:
        d = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise ModelInfoError(f"cannot read the model sidecar {path}: {e}; delete it or run tools/test_net.py") from e
    return ModelInfo.from_dict(d, str(path))


def break_even_thresholds(result: dict) -> dict[str, float]:
    """Each lesion's break-even threshold from an evaluation result (redseg.evaluation.scoring / metrics.json);
    a lesion without one (no lesion pixel in the ground truth: nan or null) is left out."""
    out = {}
    for lesion in LESIONS:
        t = ((result.get(lesion) or {}).get("break_even") or {}).get("threshold")
        if t is not None and math.isfinite(float(t)):
            out[lesion] = float(t)
    return out


def from_evaluation(
    result: dict, mean_bgr, fov_diameter_px: float | None, metrics_path: str | os.PathLike
) -> ModelInfo:
    """The sidecar of a model evaluated into ``result`` (saved as ``metrics_path``)."""
    return ModelInfo(
        [float(v) for v in mean_bgr],
        None if fov_diameter_px is None else float(fov_diameter_px),
        break_even_thresholds(result),
        BREAK_EVEN_RULE,
        str(metrics_path),
    )
