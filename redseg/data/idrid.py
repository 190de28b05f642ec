"""From the official IDRiD segmentation archive to a prepared set (docs/data_format.md).

Paper section 3.1 (docs/method.md#task-and-data): the 81 IDRiD segmentation images (54 training, 27
test, 4288x2848 JPEG, one colour TIFF mask per lesion type) are downsampled 4x to 1072x712 and the
training set is expanded 6x by rotation and mirroring (324 samples). The paper leaves open how the
masks are downsampled and which six transforms are used; the choices made here are stated and
switchable (docs/method.md#open-points-and-our-choices):

* images: ``cv2.INTER_AREA`` (pixel-area average) to ``round(W / factor) x round(H / factor)``,
  halves rounded up; a size not divisible by the factor is thus rounded to the nearest integer
  and INTER_AREA averages over the fractional pixel footprints;
* masks (``mask_rule``): ``any`` (default) - a low-resolution pixel is lesion if any full-resolution
  pixel it covers is, which keeps microaneurysms, only a few pixels wide at full size; ``area`` -
  if at least half of the covered area is lesion; ``nearest`` - the full-resolution pixel nearest
  to the low-resolution pixel's centre (``cv2.INTER_NEAREST_EXACT``);
* augmentations (config.AUGMENTATIONS), applied to the downsampled image and its masks alike:
  ``id``; ``rot90`` = ``np.rot90(a, 1)``, 90 degrees counter-clockwise as displayed (the top row
  becomes the left column); ``rot180``; ``rot270`` = ``np.rot90(a, 3)``, 90 degrees clockwise;
  ``fliph`` = left-right mirror ``a[:, ::-1]``; ``flipv`` = upside-down mirror ``a[::-1]``.
  rot90/rot270 samples are portrait (712x1072); the data layer takes each image at its own size;
* the field of view's diameter (``fov_diameter_px`` in meta.json): the median over the training
  images, downsampled, of redseg.data.fov's circle (tools/segment.py rescales a new photograph so that
  its field of view has this diameter);
* the input mean (docs/method.md#input-mean: BGR minus a per-channel training mean) is the mean of
  the downsampled training images before augmentation (rotations and mirrors do not change it) over
  all pixels, the black surround included - as the authors' L-Seg mean (16.3, 56.4, 116.5) evidently
  is.

The source is read as it comes from the IDRiD site: a folder holding ``A. Segmentation``, that
folder itself, or a .zip of either (members are read directly, nothing is extracted). Masks are
colour TIFFs, lesion where any colour channel is non-zero; a missing mask means "no lesion of that
kind" and becomes an all-zero mask, listed in the summary. JPEG EXIF orientation is ignored, so
images stay aligned with their masks. ``IdridSource`` is the project's one reader of this layout:
scoring against the official labels (redseg.evaluation.scoring) lists its test set with it too.

The output is written into ``<out>.partial-<pid>`` and renamed to ``<out>`` when done, with
``.complete`` written last; a complete set prepared from the same source with the same options
(a fingerprint in meta.json) is kept as it is, anything else is refused unless ``force``, and a
folder that is not a prepared set is never deleted.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np

from redseg.config import (
    ALL_IDRID_LESIONS,
    DOWNSAMPLE,
    IDRID_GT_DIR,
    IDRID_IMAGES_DIR,
    IDRID_LESION_DIRS,
    IDRID_SEG_DIR,
    IDRID_SPLIT_DIRS,
    TEST_IDS,
    TRAIN_IDS,
)
from redseg.data.archive import Archive, SourceError, SourceFile
from redseg.data.prepare import DEFAULT_LESIONS, PrepareOptions, prepare_source
from redseg.data.prepared_set import mask_from_pixels
from redseg.fileio import read_json_object

log = logging.getLogger(__name__)

_IMAGE_RE = re.compile(r"^(IDRiD_\d+)\.(jpe?g|png|tiff?|bmp)$", re.IGNORECASE)
_MASK_RE = re.compile(r"^(IDRiD_\d+)_([A-Z]{2})\.(tiff?|png|bmp|gif|jpe?g)$", re.IGNORECASE)


class IdridError(SourceError):
    """Bad input or an output folder we must not touch; the message names the file and the fix."""


# --------------------------------------------------------------------------------------------------
# reading the official tree from a folder or a zip


@dataclass
class IdridIndex:
    """What the source holds: images per split and masks per (image, lesion)."""

    root: str  # the "A. Segmentation" folder as a user finds it (a path, or 'archive.zip:member')
    images: dict[str, dict[str, SourceFile]] = field(default_factory=lambda: {"train": {}, "test": {}})
    masks: dict[tuple[str, str], SourceFile] = field(default_factory=dict)
    # per split: the ids with a mask filed under it (an id may have masks but no photo)
    mask_ids: dict[str, set[str]] = field(default_factory=lambda: {"train": set(), "test": set()})
    ignored: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class IdridImage:
    """One image id of a split: its photo and its masks per lesion (None: no such file)."""

    name: str
    image: SourceFile | None
    masks: dict[str, SourceFile | None]


class IdridSource(Archive):
    """The official IDRiD segmentation tree in a folder or a .zip, read in place."""

    Error = IdridError
    what = f"the IDRiD folder holding '{IDRID_SEG_DIR}', that folder itself, or a .zip of either"
    dataset = "idrid"
    title = "IDRiD"
    splits = ("train", "test")
    lesions = ALL_IDRID_LESIONS
    published = {"train": len(TRAIN_IDS), "test": len(TEST_IDS)}
    mask_rule_text = "colour TIFF: lesion where any colour channel is > 0 (alpha ignored); no mask file = no lesion"
    split_rule = "IDRiD's own: a. Training Set -> train, b. Testing Set -> test"
    not_scored: dict[str, str] = {}

    def __init__(self, src: str | Path, allow_partial: bool = True):
        super().__init__(src)
        try:
            self.index = self._build_index()
            self.partial = self._check_counts(allow_partial)
        except BaseException:
            self.close()
            raise

    def _synthetic_counts(self) -> dict[str, int] | None:
        """The counts a synthetic copy (tools/make_synthetic.py) says it has, from its synthetic.json."""
        if self.is_zip:  # the member beside 'A. Segmentation' inside the zip
            seg = self.index.root[len(str(self.src)) + 1 :]
            name = "/".join([*seg.split("/")[:-1], "synthetic.json"])
            member = next((m for parts, m, *_ in self.listing() if "/".join(parts) == name), None)
            try:
                info = json.loads(self.read(SourceFile(name, member, 0, 0))) if member else None
            except (ValueError, IdridError):
                info = None
        else:
            info = read_json_object(Path(self.index.root).parent / "synthetic.json")
        if not info or info.get("generator") != "redseg.synthetic":
            return None
        st = info.get("settings", {})
        return {"train": int(st.get("n_train", 0)), "test": int(st.get("n_test", 0))}

    @property
    def synthetic(self) -> bool:
        return self._synthetic_counts() is not None

    def _check_counts(self, allow_partial: bool) -> list[str]:
        """Fewer images than published (54 / 27, or a synthetic copy's own): raises unless allowed."""
        expected = self._synthetic_counts() or self.published
        missing = [
            f"{n - len(self.index.images[split])} of {n} {split} images"
            for split, n in expected.items()
            if len(self.index.images[split]) < n
        ]
        if missing and not allow_partial:
            raise IdridError(
                f"partial IDRiD download at {self.index.root}: missing {'; '.join(missing)}. Re-download, "
                "or pass --allow-partial to go on without them"
            )
        return missing

    def items(self, split: str, lesions: Sequence[str] = ALL_IDRID_LESIONS) -> list[IdridImage]:
        """The photographs of ``split`` in name order, each with its ``lesions`` masks (None: no file)."""
        idx = self.index
        return [
            IdridImage(stem, f, {x: idx.masks.get((stem, x)) for x in lesions})
            for stem, f in sorted(idx.images[split].items())
        ]

    def all_warnings(self) -> list[str]:
        """The index's warnings, and masks whose image is missing."""
        idx = self.index
        stems = {s for split in idx.images.values() for s in split}
        return idx.warnings + [
            f"{f.key}: {lesion} mask of {stem}, which has no image (ignored)"
            for (stem, lesion), f in sorted(idx.masks.items())
            if stem not in stems
        ]

    def ignored_files(self) -> list[str]:
        return list(self.index.ignored)

    def _build_index(self) -> IdridIndex:
        seg_l, img_l, gt_l = IDRID_SEG_DIR.lower(), IDRID_IMAGES_DIR.lower(), IDRID_GT_DIR.lower()
        split_of = {v.lower(): k for k, v in IDRID_SPLIT_DIRS.items()}
        roots: set[tuple[str, ...]] = set()
        found: list[tuple[tuple[str, ...], list[str], SourceFile]] = []
        for parts, member, size, stamp in self.listing():
            low = [p.strip().lower() for p in parts]
            for i in range(len(low) - 1):
                if low[i] == seg_l and low[i + 1] in (img_l, gt_l):
                    roots.add(parts[: i + 1])
                    rest = list(parts[i + 1 :])
                    found.append((parts[: i + 1], rest, SourceFile("/".join(rest), member, size, stamp)))
                    break
        if not roots:
            raise IdridError(
                f"no '{IDRID_SEG_DIR}/{IDRID_IMAGES_DIR}/...' in {self.src}: expected the IDRiD segmentation data "
                f"(the folder holding '{IDRID_SEG_DIR}', that folder itself, or a .zip of either) as "
                "downloaded from the IDRiD challenge site"
            )
        if len(roots) > 1:
            shown = ", ".join(sorted("/".join(r) for r in roots))
            raise IdridError(f"several '{IDRID_SEG_DIR}' folders in {self.src} ({shown}); point --src at one")
        (root,) = roots
        index = IdridIndex(root=self.root_path(root))
        for _, rest, f in found:
            low = [p.strip().lower() for p in rest]
            split = split_of.get(low[1]) if len(low) > 2 else None
            if low[0] == img_l and len(low) == 3 and split and (m := _IMAGE_RE.match(rest[2])):
                stem = m.group(1)
                other = "test" if split == "train" else "train"
                if stem in index.images[split] or stem in index.images[other]:
                    raise IdridError(f"{stem} appears twice ({self.describe(f)}); keep one image per id")
                index.images[split][stem] = f
            elif low[0] == gt_l and len(low) == 4 and split and (m := _MASK_RE.match(rest[3])):
                stem, lesion = m.group(1), m.group(2).upper()
                if lesion not in IDRID_LESION_DIRS:
                    index.ignored.append(f.key)
                    continue
                if low[2] != IDRID_LESION_DIRS[lesion].lower():
                    index.warnings.append(
                        f"{f.key}: a {lesion} mask outside '{IDRID_LESION_DIRS[lesion]}' (used as {lesion})"
                    )
                if (stem, lesion) in index.masks:
                    raise IdridError(f"two {lesion} masks for {stem} ({self.describe(f)}); keep one")
                index.masks[(stem, lesion)] = f
                index.mask_ids[split].add(stem)
            else:
                index.ignored.append(f.key)
        return index

    def split_images(self, split: str, lesions: Sequence[str] = ALL_IDRID_LESIONS) -> list[IdridImage]:
        """The image ids of ``split`` in name order, each with its photo and its ``lesions`` masks.

        An id is listed when it has a photo in the split or a mask filed under it (and no photo in
        the other split), so an image without any lesion is listed too; a mask missing from the
        source is None, meaning no lesion of that kind.
        """
        idx = self.index
        other = {s for sp, images in idx.images.items() if sp != split for s in images}
        names = set(idx.images[split]) | (idx.mask_ids[split] - other)
        return [
            IdridImage(name, idx.images[split].get(name), {x: idx.masks.get((name, x)) for x in lesions})
            for name in sorted(names)
        ]

    def read_mask(self, f: SourceFile) -> np.ndarray:
        """Boolean mask by the project's one mask rule (redseg.data.prepared_set.mask_from_pixels)."""
        return mask_from_pixels(self.decode(f, cv2.IMREAD_UNCHANGED))

    def fingerprint_files(self) -> list[list]:
        """What identifies the source's content: every image and mask with size and mtime/CRC."""
        idx = self.index
        files = [f for split in idx.images.values() for f in split.values()] + list(idx.masks.values())
        return sorted([f.key, f.size, f.stamp] for f in files)


# --------------------------------------------------------------------------------------------------
# the prepared set (redseg.data.prepare)


def prepare(
    src: str | Path,
    out: str | Path,
    factor: int = DOWNSAMPLE,
    mask_rule: str = "any",
    lesions: Sequence[str] = DEFAULT_LESIONS,
    force: bool = False,
    progress: bool = True,
    fov_diameter: float | None = None,
    allow_partial: bool = True,
) -> dict:
    """Prepare the IDRiD segmentation data at ``src`` into ``out`` (docs/data_format.md).

    By ``factor`` (the paper's 4x) unless ``fov_diameter`` is given (redseg.data.prepare). Returns
    meta.json's content, with ``"skipped": True`` added when ``out`` was already prepared from the
    same source with the same options.
    """
    options = PrepareOptions(
        int(factor),
        mask_rule,
        tuple(x.strip().upper() for x in lesions),
        None if fov_diameter is None else float(fov_diameter),
    )
    options.validate(ALL_IDRID_LESIONS, IdridError)
    with IdridSource(src, allow_partial=allow_partial) as source:
        if not any(source.index.images.values()):
            raise IdridError(
                f"no images IDRiD_NN.jpg under '{source.index.root}/{IDRID_IMAGES_DIR}/"
                f"{{{IDRID_SPLIT_DIRS['train']},{IDRID_SPLIT_DIRS['test']}}}'"
            )
        return prepare_source(source, out, options, force=force, progress=progress)
