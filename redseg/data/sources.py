"""What every reader of a public lesion data set shares (docs/datasets.md).

A reader (redseg.data.ddr, .fgadr, .eophtha, .diaretdb1; IDRiD's own is redseg.data.idrid) says
where its layout starts (the *anchor* folder: ``lesion_segmentation``, ``Seg-set``...), how a file
below it is an image or a mask (:meth:`LayoutSource.classify`), how a mask file becomes a boolean
map (:meth:`LayoutSource.binarise`, each set's own rule, recorded in a prepared set's meta.json),
how many images each part of the set has as published, and how its images fall into the prepared
splits. This base class does the rest:

* finds the anchor in the folder or zip (redseg.data.archive); a copy without it (re-packaged for
  another hub, an incomplete join of a split zip) is refused with the layout that was expected;
* indexes images and masks, refusing a name that appears twice;
* checks the counts against the published ones: a partial download (a group or a lesion folder
  missing, fewer images or masks than published) is one error naming what is missing, before
  anything is written, unless ``allow_partial`` (then a warning). A synthetic copy made by
  tools/make_synthetic.py carries its own counts in ``synthetic.json`` at the tree's root, which
  then stand in for the published ones.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

import cv2
import numpy as np

from redseg.data.archive import Archive, SourceError, SourceFile

log = logging.getLogger(__name__)

SYNTHETIC_MARKER = "synthetic.json"  # redseg.data.synthetic's marker at a generated tree's root
SYNTHETIC_GENERATOR = "redseg.synthetic"
MARKER_LEVELS = 2  # folders above the anchor where a generated copy's root can be (DiaretDB1: resources/images)


@dataclass(frozen=True)
class SourceImage:
    """One photograph of a split: its file and its masks per lesion (None: no mask file)."""

    name: str
    image: SourceFile | None
    masks: dict[str, SourceFile | None]


@dataclass(frozen=True)
class Entry:
    """What :meth:`LayoutSource.classify` makes of one file below the anchor."""

    group: str  # a part of the set as published ("train", "valid", "MA", "healthy", "all"...)
    name: str  # the image's name (the file stem), unique in the set
    lesion: str | None = None  # None: the photograph; else the mask's lesion


def colour_max(pixels: np.ndarray) -> np.ndarray:
    """The largest colour channel of a decoded mask (grey, grey + alpha, BGR, BGRA): alpha ignored."""
    if pixels.ndim == 2:
        return pixels
    chans = cv2.split(pixels)
    colour = chans[:1] if len(chans) == 2 else chans[:3]
    acc = colour[0]
    for c in colour[1:]:
        acc = cv2.max(acc, c)
    return acc


def at_least(pixels: np.ndarray, level: int) -> np.ndarray:
    """Lesion where the largest colour channel is >= ``level`` (8-bit scale; 16-bit masks are scaled)."""
    m = colour_max(pixels)
    if m.dtype == np.uint16:
        level = level * 257
    return m >= level


@dataclass
class Index:
    root: str  # the anchor folder as a user finds it
    images: dict[str, dict[str, SourceFile]] = field(default_factory=dict)  # group -> name -> file
    masks: dict[tuple[str, str], SourceFile] = field(default_factory=dict)  # (name, lesion) -> file
    mask_groups: dict[str, set[str]] = field(default_factory=dict)  # group -> lesions seen there
    ignored: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    synthetic: dict | None = None  # synthetic.json of a generated copy


class LayoutSource(Archive):
    """A public data set's published layout in a folder or a .zip, read in place."""

    dataset: ClassVar[str]  # the --dataset name
    title: ClassVar[str]
    anchors: ClassVar[tuple[str, ...]]  # the anchor folder's name(s), lower case
    layout: ClassVar[str]  # the expected layout in words, for the refusal message
    splits: ClassVar[tuple[str, ...]]  # the prepared set's splits
    lesions: ClassVar[tuple[str, ...]]  # lesions with ground truth in this set
    published: ClassVar[dict[str, int]]  # images per group as published
    mask_groups: ClassVar[dict[str, tuple[str, ...]]]  # lesions whose masks each group must have
    every_mask: ClassVar[bool] = True  # every image has a mask file per lesion (all-black: none)
    mask_rule_text: ClassVar[str]  # how a mask file is binarised, in words (meta.json)
    split_rule: ClassVar[str]  # how the images fall into the splits, in words (meta.json)
    not_scored: ClassVar[dict[str, str]] = {}  # lesion -> why this set has no ground truth for it

    def __init__(self, src: str | os.PathLike, allow_partial: bool = False):
        self.what = f"the {self.title} folder or a .zip of it, laid out as published: {self.layout}"
        super().__init__(src)
        try:
            self.index = self._build_index()
            self.partial = self._check_counts(allow_partial)
        except BaseException:
            self.close()
            raise

    # --- what a reader says ---------------------------------------------------------------------

    def classify(self, rest: tuple[str, ...]) -> Entry | None:
        """What the file at ``rest`` (path parts below the anchor) is; None: not part of the layout."""
        raise NotImplementedError

    def binarise(self, pixels: np.ndarray) -> np.ndarray:
        """The set's mask rule on a mask as decoded unchanged (cv2.IMREAD_UNCHANGED): a bool map."""
        raise NotImplementedError

    def split_of(self, group: str, name: str) -> str:
        """The prepared split an image of ``group`` goes to."""
        return group

    # --- reading -----------------------------------------------------------------------------------

    def read_mask(self, f: SourceFile) -> np.ndarray:
        return self.binarise(self.decode(f, cv2.IMREAD_UNCHANGED))

    def items(self, split: str, lesions: Sequence[str] | None = None) -> list[SourceImage]:
        """The photographs of prepared split ``split`` in name order, each with its masks."""
        lesions = self.lesions if lesions is None else lesions
        idx = self.index
        names = sorted(
            (name, group)
            for group, images in idx.images.items()
            for name in images
            if self.split_of(group, name) == split
        )
        return [
            SourceImage(
                name,
                idx.images[group][name],
                {x: idx.masks.get((name, x)) if x in self.lesions else None for x in lesions},
            )
            for name, group in names
        ]

    def fingerprint_files(self) -> list[list]:
        files = [f for g in self.index.images.values() for f in g.values()] + list(self.index.masks.values())
        return sorted([f.key, f.size, f.stamp] for f in files)

    @property
    def synthetic(self) -> bool:
        return self.index.synthetic is not None

    def all_warnings(self) -> list[str]:
        return list(self.index.warnings)

    def ignored_files(self) -> list[str]:
        return list(self.index.ignored)

    # --- indexing and checking ----------------------------------------------------------------------

    def _anchor_at(self, parts: tuple[str, ...]) -> int | None:
        for i, p in enumerate(parts[:-1]):
            if p.strip().lower() in self.anchors:
                return i
        return None

    def _build_index(self) -> Index:
        roots: set[tuple[str, ...]] = set()
        found: list[tuple[tuple[str, ...], tuple[str, ...], SourceFile]] = []
        listing = list(self.listing())
        for parts, member, size, stamp in listing:
            i = self._anchor_at(parts)
            if i is None:
                continue
            roots.add(parts[: i + 1])
            rest = parts[i + 1 :]
            found.append((parts[: i + 1], rest, SourceFile("/".join(rest), member, size, stamp)))
        if not roots:
            raise SourceError(
                f"no {self.title} layout in {self.src}: expected {self.layout} (a copy re-packaged "
                "for another site is not read; use the data set's own download)"
            )
        if len(roots) > 1:
            shown = ", ".join(sorted("/".join(r) for r in roots))
            raise SourceError(f"several {self.title} trees in {self.src} ({shown}); point --src at one")
        (root,) = roots
        index = Index(root=self.root_path(root))
        # a generated copy's synthetic.json sits at its root: beside the anchor or above it
        markers = {root[:k] + (SYNTHETIC_MARKER,) for k in range(len(root))}
        for parts, member, _, _ in sorted(listing, key=lambda e: -len(e[0])):
            if parts in markers:
                index.synthetic = self._read_marker(SourceFile(SYNTHETIC_MARKER, member, 0, 0))
                break
        else:  # --src at the anchor (or between it and the root): the marker is above what was listed
            if not self.is_zip:
                for folder in list(Path(index.root).parents)[:MARKER_LEVELS]:
                    if (folder / SYNTHETIC_MARKER).is_file():
                        marker = SourceFile(SYNTHETIC_MARKER, str(folder / SYNTHETIC_MARKER), 0, 0)
                        index.synthetic = self._read_marker(marker)
                        break
        for _, rest, f in found:
            e = self.classify(tuple(rest))
            if e is None:
                index.ignored.append(f.key)
                continue
            if e.lesion is None:
                other = [g for g, imgs in index.images.items() if e.name in imgs]
                if other:
                    raise SourceError(f"{e.name} appears twice ({self.describe(f)}); keep one image per name")
                index.images.setdefault(e.group, {})[e.name] = f
            else:
                if (e.name, e.lesion) in index.masks:
                    raise SourceError(f"two {e.lesion} masks for {e.name} ({self.describe(f)}); keep one")
                index.masks[(e.name, e.lesion)] = f
                index.mask_groups.setdefault(e.group, set()).add(e.lesion)
        names = {n for g in index.images.values() for n in g}
        for (name, lesion), f in sorted(index.masks.items()):
            if name not in names:
                index.warnings.append(f"{f.key}: {lesion} mask of {name}, which has no image (ignored)")
        return index

    def _read_marker(self, f: SourceFile) -> dict | None:
        try:
            info = json.loads(self.read(f))
        except (ValueError, SourceError):
            return None
        if not isinstance(info, dict) or info.get("generator") != SYNTHETIC_GENERATOR:
            return None
        if info.get("layout") != self.dataset:
            raise SourceError(
                f"{self.describe(f)}: a synthetic copy of the '{info.get('layout')}' layout, "
                f"not of {self.title}; pass --dataset {info.get('layout')}"
            )
        return info

    def expected_counts(self) -> dict[str, int]:
        """Images per group: the published counts, or a synthetic copy's own."""
        if self.index.synthetic is not None:
            counts = self.index.synthetic.get("counts", {})
            return {g: int(counts.get(g, 0)) for g in self.published}
        return dict(self.published)

    def _check_counts(self, allow_partial: bool) -> list[str]:
        """What is missing compared with the published set; raises unless ``allow_partial``."""
        idx = self.index
        expected = self.expected_counts()
        missing: list[str] = []
        for group, n in expected.items():
            have = idx.images.get(group, {})
            if n and not have:
                missing.append(f"'{group}' images (none of {n})")
            elif len(have) < n:
                missing.append(f"{n - len(have)} of {n} '{group}' images")
            for lesion in self.mask_groups.get(group, ()):
                if not have:
                    continue
                n_masks = sum((name, lesion) in idx.masks for name in have)
                if n_masks == 0:
                    missing.append(f"the '{group}' {lesion} masks (none of {len(have)})")
                elif self.every_mask and n_masks < len(have):
                    absent = sorted(name for name in have if (name, lesion) not in idx.masks)
                    missing.append(f"{len(absent)} '{group}' {lesion} masks (e.g. {absent[0]})")
        if not any(idx.images.values()):
            raise SourceError(f"{self.title} at {idx.root}: no photographs found; expected {self.layout}")
        if missing and not allow_partial:
            raise SourceError(
                f"partial {self.title} download at {idx.root}: missing {'; '.join(missing)}. "
                "Re-download (or re-join a split zip), or pass --allow-partial to go on without them"
            )
        for m in missing:
            log.warning("%s: missing %s (--allow-partial)", self.title, m)
        return missing

    def summary(self) -> dict:
        """Counts per group, for logs and meta.json."""
        return {g: len(imgs) for g, imgs in sorted(self.index.images.items())}
