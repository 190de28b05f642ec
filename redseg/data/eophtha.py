"""e-ophtha MA: 148 photographs with microaneurysms and 233 without (docs/datasets.md).

Published layout (the top folder is also seen spelled ``e_ophtha_MA``)::

    e_optha_MA/MA/<patient>/<img>.(jpg|JPG|png)      e_optha_MA/Annotation_MA/<patient>/<img>.png
    e_optha_MA/healthy/<patient>/<img>               (no annotation: no microaneurysm)

Masks have the image's size, binary (0/255, possibly 3-channel): lesion where the largest colour
channel is >= 128. There is no haemorrhage ground truth, so HE is never scored on this set ("not
scored", never 0), and the set has no official split: the whole set is one test split. (Training
on it would need a split by patient and HE labels; neither is offered.)
"""

from __future__ import annotations

import numpy as np

from redseg.data.sources import Entry, LayoutSource, at_least

_IMAGE_EXT = (".jpg", ".jpeg", ".png", ".tif", ".tiff", ".bmp")


class EophthaMaSource(LayoutSource):
    dataset = "eophtha-ma"
    title = "e-ophtha MA"
    anchors = ("e_optha_ma", "e_ophtha_ma")
    layout = (
        "e_optha_MA/MA/<patient>/<img>.jpg with e_optha_MA/Annotation_MA/<patient>/<img>.png, "
        "and e_optha_MA/healthy/<patient>/<img>.jpg"
    )
    splits = ("test",)
    lesions = ("MA",)
    published = {"MA": 148, "healthy": 233}
    mask_groups = {"MA": ("MA",)}
    every_mask = True
    mask_rule_text = (
        "binary PNG (0/255, grey or RGB): lesion where the largest colour channel is >= 128; healthy images: no lesion"
    )
    split_rule = "no official split: every image (MA and healthy) is a test image"
    not_scored = {"HE": "e-ophtha MA has no haemorrhage ground truth"}

    def classify(self, rest: tuple[str, ...]) -> Entry | None:
        if len(rest) != 3:
            return None
        folder = rest[0].strip().lower()
        stem, dot, ext = rest[2].rpartition(".")
        if not dot or "." + ext.lower() not in _IMAGE_EXT:
            return None
        if folder == "ma":
            return Entry("MA", stem)
        if folder == "healthy":
            return Entry("healthy", stem)
        if folder == "annotation_ma":
            return Entry("MA", stem.removesuffix("_MA"), "MA")
        return None

    def binarise(self, pixels: np.ndarray) -> np.ndarray:
        return at_least(pixels, 128)

    def split_of(self, group: str, name: str) -> str:
        return "test"
