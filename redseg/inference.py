"""Running a trained Red-Seg on images: one deploy forward pass per image (paper section 3.3).

Red-Seg is an image-level model: the whole (downsampled) photograph goes through the net once and
``prob_ma`` / ``prob_he`` (sigmoid of the fused maps) come out at the input's size.
"""

from __future__ import annotations

import logging
import os

import numpy as np

from redseg.caffe_utils import REPO, load_net
from redseg.prepared_set import image_blob

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


def to_u8(prob: np.ndarray) -> np.ndarray:
    """Probability -> 8-bit map, probability x 255 rounded (the authors' saved predictions)."""
    return np.clip(np.rint(prob * 255.0), 0, 255).astype(np.uint8)
