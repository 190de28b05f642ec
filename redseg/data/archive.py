"""A data set as downloaded: an extracted folder or a .zip, listed and read in place.

Every reader of a public layout (redseg.data.idrid, redseg.data.datasets) stands on this: it lists
the files below ``--src`` (a folder walked to a bounded depth, or the members of a zip, nothing
extracted), reads them, decodes images and masks with OpenCV and names the file in every error
("cannot decode ...", "... is truncated"), so a corrupt download is found before any output is
written. A file is known by its posix path below the folder's parent (or its zip member name), with
its size and mtime (or CRC-32) for the fingerprint that tells a re-run on the same data apart.
"""

from __future__ import annotations

import contextlib
import os
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

MAX_DEPTH = 8  # folders below --src searched for a layout's anchor folder


class SourceError(ValueError):
    """Bad input or an output folder we must not touch; the message names the file and the fix."""


@contextlib.contextmanager
def quiet_opencv() -> Iterator[None]:
    """Silence OpenCV's own error lines (libtiff/libjpeg) while we report errors ourselves."""
    logging_mod = getattr(getattr(cv2, "utils", None), "logging", None)
    if logging_mod is None:
        yield
        return
    old = logging_mod.getLogLevel()
    logging_mod.setLogLevel(logging_mod.LOG_LEVEL_SILENT)
    try:
        yield
    finally:
        logging_mod.setLogLevel(old)


def jpeg_truncated(data: bytes) -> bool:
    """A JPEG whose last scan (SOS, FFDA) is not followed by an end-of-image marker (FFD9).

    Some OpenCV builds decode a truncated JPEG with a grey tail instead of failing, so this is
    checked explicitly. Marker bytes cannot occur inside entropy-coded data (0xFF is stuffed).
    """
    if data[:2] != b"\xff\xd8":
        return False
    sos, eoi = data.rfind(b"\xff\xda"), data.rfind(b"\xff\xd9")
    return sos < 0 or eoi < sos


@dataclass(frozen=True)
class SourceFile:
    key: str  # path below the layout's anchor folder, posix, as found (used in the fingerprint)
    member: str  # folder: absolute path; zip: member name
    size: int
    stamp: int  # folder: mtime_ns; zip: CRC-32


class Archive:
    """The files below ``src`` (a folder or a .zip), read in place. ``Error`` is raised for bad input."""

    Error: type[SourceError] = SourceError
    what = "the data set's folder or a .zip of it"  # for "--src ... is not ..." messages

    def __init__(self, src: str | os.PathLike):
        self.src = Path(src).expanduser().resolve()
        self._zip: zipfile.ZipFile | None = None
        if not self.src.exists():
            raise self.Error(f"--src {self.src} does not exist")
        if self.src.is_file():
            if not zipfile.is_zipfile(self.src):
                raise self.Error(f"--src {self.src} is a file but not a .zip; expected {self.what}")
            try:
                self._zip = zipfile.ZipFile(self.src)
                raw = [(i.filename, i.file_size, i.CRC) for i in self._zip.infolist() if not i.is_dir()]
            except (zipfile.BadZipFile, OSError) as e:
                raise self.Error(f"cannot read the zip {self.src}: {e}") from e
            self.files = [(n.replace("\\", "/"), n, s, c) for n, s, c in raw]
        else:
            self.files = list(self._walk())

    @property
    def is_zip(self) -> bool:
        return self._zip is not None

    def close(self) -> None:
        if self._zip is not None:
            self._zip.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _walk(self) -> Iterator[tuple[str, str, int, int]]:
        """(posix name relative to src's parent, absolute path, size, mtime_ns) of files below src."""
        base = self.src.parent
        for dirpath, dirnames, filenames in os.walk(self.src):
            rel = Path(dirpath).relative_to(base)
            if len(rel.parts) > MAX_DEPTH:
                dirnames[:] = []
                continue
            dirnames[:] = sorted(d for d in dirnames if not d.startswith(".") and d != "__MACOSX")
            for f in sorted(filenames):
                p = Path(dirpath) / f
                try:
                    st = p.stat()
                except OSError:
                    continue
                yield (rel / f).as_posix(), str(p), st.st_size, st.st_mtime_ns

    def listing(self) -> Iterator[tuple[tuple[str, ...], str, int, int]]:
        """(path parts, member, size, stamp) of every file, macOS resource forks left out."""
        for name, member, size, stamp in self.files:
            parts = tuple(p for p in name.split("/") if p)
            if not parts or "__MACOSX" in parts or parts[-1].startswith("._"):
                continue
            yield parts, member, size, stamp

    def root_path(self, parts: tuple[str, ...]) -> str:
        """Where the folder ``parts`` (below src's parent, or inside the zip) is, as a user finds it."""
        if self._zip is not None:
            return f"{self.src}:{'/'.join(parts)}"
        return str(self.src.parent.joinpath(*parts))

    def describe(self, f: SourceFile) -> str:
        """The file as a user finds it: a path, or 'archive.zip:member'."""
        return f"{self.src}:{f.member}" if self._zip is not None else f.member

    def local_path(self, f: SourceFile) -> Path:
        """The file on disk; only for a source that is a folder (a zip member has no path)."""
        if self._zip is not None:
            raise self.Error(f"{self.describe(f)} is inside a zip; extract it or point at the folder")
        return Path(f.member)

    def read(self, f: SourceFile) -> bytes:
        try:
            if self._zip is not None:
                return self._zip.read(f.member)
            return Path(f.member).read_bytes()
        except (OSError, zipfile.BadZipFile, EOFError) as e:
            raise self.Error(f"cannot read {self.describe(f)}: {e}") from e

    def decode(self, f: SourceFile, flags: int) -> np.ndarray:
        """Decoded pixels; a corrupt or truncated file raises ``Error`` naming it."""
        data = self.read(f)
        if jpeg_truncated(data):
            raise self.Error(f"{self.describe(f)} is truncated (no JPEG end marker): re-download it")
        with quiet_opencv():
            arr = cv2.imdecode(np.frombuffer(data, np.uint8), flags | cv2.IMREAD_IGNORE_ORIENTATION)
        if arr is None or arr.size == 0:
            raise self.Error(f"cannot decode {self.describe(f)}: the file is corrupt or not an image")
        return arr

    def read_image(self, f: SourceFile) -> np.ndarray:
        """BGR uint8; a corrupt or truncated file raises ``Error`` naming it."""
        return self.decode(f, cv2.IMREAD_COLOR)
