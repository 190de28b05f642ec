"""DiaretDB1: 89 photographs at 1500x1152 with experts' merged confidence maps (docs/datasets.md).

Published layout::

    resources/images/ddb1_fundusimages/imageNNN.png
    resources/images/ddb1_groundtruth/{redsmalldots,hemorrhages,hardexudates,softexudates}/imageNNN.png

``redsmalldots`` are microaneurysms (MA), ``hemorrhages`` haemorrhages (HE). The ground truth is
four experts' markings merged into one confidence map per lesion kind: 8-bit, confidence x 255.
The rule taken here is the usual consensus: lesion where the confidence is >= 0.75, i.e. a value
>= 192 (0.75 x 255 = 191.25, rounded up), on the largest colour channel. The official split is 28
training and 61 test images (config.DIARETDB1_TRAIN_IDS).
"""

from __future__ import annotations

import math
import re

import numpy as np

from redseg.config import DIARETDB1_TRAIN_IDS
from redseg.data.sources import Entry, LayoutSource, at_least

CONSENSUS = 0.75  # the confidence at which an expert-merged map counts as lesion
_LEVEL = math.ceil(CONSENSUS * 255)  # 192
_FOLDERS = {"redsmalldots": "MA", "hemorrhages": "HE", "hardexudates": "EX", "softexudates": "SE"}
_NAME = re.compile(r"^image(\d{3})$", re.IGNORECASE)


class Diaretdb1Source(LayoutSource):
    dataset = "diaretdb1"
    title = "DiaretDB1"
    anchors = ("images",)
    layout = (
        "resources/images/ddb1_fundusimages/imageNNN.png with merged confidence maps in "
        "resources/images/ddb1_groundtruth/{redsmalldots,hemorrhages,hardexudates,softexudates}/imageNNN.png"
    )
    splits = ("train", "test")
    lesions = ("MA", "HE", "EX", "SE")
    published = {"train": len(DIARETDB1_TRAIN_IDS), "test": 89 - len(DIARETDB1_TRAIN_IDS)}
    mask_groups = {"train": ("MA", "HE"), "test": ("MA", "HE")}
    every_mask = True
    mask_rule_text = (
        f"merged expert confidence map (confidence x 255): lesion where confidence >= {CONSENSUS} (value >= {_LEVEL})"
    )
    split_rule = "the official 28 / 61 split (config.DIARETDB1_TRAIN_IDS)"

    def _anchor_at(self, parts: tuple[str, ...]) -> int | None:
        for i in range(len(parts) - 2):
            if parts[i + 1].strip().lower() in ("ddb1_fundusimages", "ddb1_groundtruth"):
                return i
        return None

    def classify(self, rest: tuple[str, ...]) -> Entry | None:
        low = [p.strip().lower() for p in rest]
        stem, dot, ext = rest[-1].rpartition(".")
        m = _NAME.match(stem)
        if not dot or ext.lower() not in ("png", "jpg", "bmp", "tif") or m is None:
            return None
        group = "train" if int(m.group(1)) in DIARETDB1_TRAIN_IDS else "test"
        if len(low) == 2 and low[0] == "ddb1_fundusimages":
            return Entry(group, stem.lower())
        if len(low) == 3 and low[0] == "ddb1_groundtruth" and low[1] in _FOLDERS:
            return Entry(group, stem.lower(), _FOLDERS[low[1]])
        return None

    def binarise(self, pixels: np.ndarray) -> np.ndarray:
        return at_least(pixels, _LEVEL)
