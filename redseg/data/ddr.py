"""DDR (OIA-DDR), its lesion segmentation part: 757 photographs from many cameras (docs/datasets.md).

Published layout::

    lesion_segmentation/{train,valid,test}/image/<stem>.jpg                      383 / 149 / 225
    lesion_segmentation/{train,test}/label/{EX,HE,MA,SE}/<stem>.tif
    lesion_segmentation/valid/segmentation label/{EX,HE,MA,SE}/<stem>.tif     (sic: not 'label')

Every image has all four masks (an all-black mask means no lesion), single-channel 0/255 TIFFs:
lesion where the (largest colour) channel is non-zero, as IDRiD's rule. The splits are DDR's own:
train, valid (the prepared set's ``val``) and test. The download is a zip split into parts that are
joined with ``cat`` before unzipping; an incomplete join loses ``lesion_segmentation/``, which is
then reported as missing by name.
"""

from __future__ import annotations

import numpy as np

from redseg.data.sources import Entry, LayoutSource, colour_max

_GROUPS = {"train": "train", "valid": "val", "test": "test"}
_LABEL_DIRS = {"label", "segmentation label"}
_LESIONS = ("MA", "HE", "EX", "SE")
_IMAGE_EXT = (".jpg", ".jpeg", ".png", ".tif", ".tiff", ".bmp")


class DdrSource(LayoutSource):
    dataset = "ddr"
    title = "DDR"
    anchors = ("lesion_segmentation",)
    layout = (
        "lesion_segmentation/{train,valid,test}/image/<stem>.jpg with masks in "
        "{train,test}/label/{EX,HE,MA,SE}/<stem>.tif and 'valid/segmentation label/{EX,HE,MA,SE}/<stem>.tif'"
    )
    splits = ("train", "val", "test")
    lesions = _LESIONS
    published = {"train": 383, "valid": 149, "test": 225}
    mask_groups = {g: _LESIONS for g in _GROUPS}
    every_mask = True
    mask_rule_text = "single-channel 0/255 TIFF: lesion where the largest colour channel is > 0 (alpha ignored)"
    split_rule = "DDR's own: train -> train, valid -> val, test -> test"

    def classify(self, rest: tuple[str, ...]) -> Entry | None:
        low = [p.strip().lower() for p in rest]
        if len(low) < 3 or low[0] not in _GROUPS:
            return None
        stem, dot, ext = rest[-1].rpartition(".")
        if not dot or "." + ext.lower() not in _IMAGE_EXT:
            return None
        if len(low) == 3 and low[1] == "image":
            return Entry(low[0], stem)
        if len(low) == 4 and low[1] in _LABEL_DIRS and rest[2].strip().upper() in _LESIONS:
            return Entry(low[0], stem, rest[2].strip().upper())
        return None

    def binarise(self, pixels: np.ndarray) -> np.ndarray:
        return colour_max(pixels) > 0

    def split_of(self, group: str, name: str) -> str:
        return _GROUPS[group]
