"""FGADR, its Seg-set: 1,842 photographs at 1280x1280 with pixel masks (docs/datasets.md).

Published layout::

    Seg-set/Original_Images/<id>.png
    Seg-set/{Microaneurysms_Masks,Hemohedge_Masks,HardExudate_Masks,SoftExudate_Masks}/<id>.png
    Seg-set/DR_Seg_Grading_Label.csv                        ('Hemohedge' is spelled as published)

The masks are grey (or RGB with equal channels) with anti-aliased edges: lesion where the largest
colour channel is >= 128, half way (never "> 0", which would grow every lesion by its soft edge).
A mask file that is absent means no lesion of that kind. FGADR has no official split; this package
takes a deterministic one that does not depend on what else is present or on a seed: an image is
in the test split when the first 8 hex digits of the SHA-256 of its id, as a number, are divisible
by 5 (about 20 %), else in train (:func:`test_by_hash`).
"""

from __future__ import annotations

import hashlib

import numpy as np

from redseg.data.sources import Entry, LayoutSource, at_least

_MASK_DIRS = {
    "microaneurysms_masks": "MA",
    "hemohedge_masks": "HE",
    "hemorrhage_masks": "HE",  # the spelling users expect; accepted too
    "hardexudate_masks": "EX",
    "softexudate_masks": "SE",
}
_IMAGE_EXT = (".png", ".jpg", ".jpeg", ".tif", ".tiff")
TEST_EVERY = 5  # one image in five (by hash) is a test image


def test_by_hash(name: str) -> bool:
    """The project's FGADR split: test when int(sha256(id)[:8], 16) % 5 == 0."""
    return int(hashlib.sha256(name.encode()).hexdigest()[:8], 16) % TEST_EVERY == 0


class FgadrSource(LayoutSource):
    dataset = "fgadr"
    title = "FGADR"
    anchors = ("seg-set",)
    layout = "Seg-set/Original_Images/<id>.png with Seg-set/{Microaneurysms_Masks,Hemohedge_Masks}/<id>.png"
    splits = ("train", "test")
    lesions = ("MA", "HE", "EX", "SE")
    published = {"all": 1842}
    mask_groups = {"all": ("MA", "HE")}
    every_mask = False
    mask_rule_text = (
        "anti-aliased grey PNG: lesion where the largest colour channel is >= 128; no mask file = no lesion"
    )
    split_rule = (
        "no official split: test when int(sha256(id)[:8], 16) % 5 == 0 (about 20 %), else train "
        "(redseg.data.fgadr.test_by_hash)"
    )

    def classify(self, rest: tuple[str, ...]) -> Entry | None:
        if len(rest) != 2:
            return None
        folder = rest[0].strip().lower()
        stem, dot, ext = rest[1].rpartition(".")
        if not dot or "." + ext.lower() not in _IMAGE_EXT:
            return None
        if folder == "original_images":
            return Entry("all", stem)
        if folder in _MASK_DIRS:
            return Entry("all", stem, _MASK_DIRS[folder])
        return None

    def binarise(self, pixels: np.ndarray) -> np.ndarray:
        return at_least(pixels, 128)

    def split_of(self, group: str, name: str) -> str:
        return "test" if test_by_hash(name) else "train"
