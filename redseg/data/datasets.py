"""The data sets this package reads, by name: one reader each (docs/datasets.md).

``open_source(src, dataset)`` opens ``src`` (a folder or a .zip) with the named reader; without a
name the layout is recognised by its anchor folder (``A. Segmentation``, ``lesion_segmentation``,
``Seg-set``, ``e_optha_MA``, ``ddb1_fundusimages``), and a folder that is none of them is refused
with every layout that was looked for. Used by tools/prepare_data.py and by the scoring
(redseg.evaluation.scoring), so a set is read the same way for training and for scoring.
"""

from __future__ import annotations

import os
from pathlib import Path

from redseg import config as C
from redseg.data.archive import Archive, SourceError
from redseg.data.ddr import DdrSource
from redseg.data.diaretdb1 import Diaretdb1Source
from redseg.data.eophtha import EophthaMaSource
from redseg.data.fgadr import FgadrSource
from redseg.data.idrid import IdridSource

READERS = {
    "idrid": IdridSource,
    "ddr": DdrSource,
    "fgadr": FgadrSource,
    "eophtha-ma": EophthaMaSource,
    "diaretdb1": Diaretdb1Source,
}
DATASETS = tuple(READERS)
assert DATASETS == C.DATASETS, "config.DATASETS and the readers disagree"


def detect(src: str | os.PathLike) -> str:
    """The name of the layout found at ``src``; SourceError naming what was looked for if none."""
    src = Path(src)
    with Archive(src) as archive:
        parts_list = [parts for parts, *_ in archive.listing()]
    found = []
    for name, reader in READERS.items():
        if name == "idrid":
            hit = any("a. segmentation" in (p.strip().lower() for p in parts[:-1]) for parts in parts_list)
        else:
            hit = any(reader._anchor_at(reader, parts) is not None for parts in parts_list)
        if hit:
            found.append(name)
    if len(found) == 1:
        return found[0]
    if not found:
        raise SourceError(
            f"{src}: no known data set layout found; expected one of IDRiD ('A. Segmentation/...'), "
            + ", ".join(f"{r.title} ({r.layout})" for n, r in READERS.items() if n != "idrid")
        )
    raise SourceError(f"{src} holds several data sets ({', '.join(found)}); point at one or pass --dataset")


def open_source(src: str | os.PathLike, dataset: str | None = None, allow_partial: bool = False):
    """The reader of ``dataset`` (detected when None) on ``src``; close it (or use ``with``)."""
    name = dataset or detect(src)
    if name not in READERS:
        raise SourceError(f"unknown data set {name!r}; one of {', '.join(DATASETS)}")
    return READERS[name](src, allow_partial=allow_partial)
