"""Writing outputs so that a half-written one is never taken for a finished one.

Every file and folder the project writes goes through here:

* one file: :func:`write_bytes`, :func:`write_text`, :func:`write_json` and :func:`write_image`
  write beside the target under a temporary name and rename it into place (:func:`atomic_path`,
  also usable directly for a file another library writes, e.g. a download or a Caffe model);
* a folder of many files: :func:`building_dir` builds it in ``<out>.partial-<pid>`` and swaps it
  in only when finished (:func:`replace_dir`); a folder that must say it was finished carries the
  completion stamp ``.complete``, written last (:func:`mark_complete`, :func:`is_complete`).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # OpenCV and numpy load only when an image is written: setup and the BLAS hook
    import numpy as np  # import this module before those packages are needed

COMPLETE = ".complete"  # the completion stamp of a finished folder (a prepared set)


@contextmanager
def atomic_path(out: str | os.PathLike) -> Iterator[Path]:
    """A temporary name beside ``out`` to write (and check) a file at; renamed to ``out`` on success.

    The temporary name is in the same folder, so the final rename is atomic: a reader sees either
    the old ``out`` or the finished new one. If the block raises (a failed download, a check that
    refuses the file, Ctrl-C), the temporary file is removed and ``out`` is left as it was.
    """
    out = Path(out)
    tmp = out.with_name(f".{out.name}.part-{os.getpid()}")
    try:
        yield tmp
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)


def write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically; returns ``path``."""
    path = Path(path)
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)
    return path


def write_text(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically; returns ``path``."""
    return write_bytes(path, text.encode())


def write_json(path: str | os.PathLike, obj, indent: int | None = 1) -> Path:
    """``obj`` as JSON with a final newline, atomically; returns ``path``."""
    return write_text(path, json.dumps(obj, indent=indent) + "\n")


def read_json_object(path: str | os.PathLike) -> dict | None:
    """The JSON object in ``path``, or None when the file is missing, unreadable or holds no object
    (how an output's own marker is read before deciding whether to keep it)."""
    try:
        d = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None
    return d if isinstance(d, dict) else None


def write_image(path: str | os.PathLike, img: np.ndarray, params: Sequence[int] = ()) -> Path:
    """Encode ``img`` in the format of ``path``'s suffix (OpenCV, ``params`` as cv2.imwrite's) and
    write it atomically; returns ``path``. Raises OSError when OpenCV cannot encode it."""
    import cv2

    path = Path(path)
    try:
        ok, buf = cv2.imencode(path.suffix, img, list(params))
    except cv2.error as e:  # e.g. a suffix OpenCV has no encoder for
        raise OSError(f"cannot encode {path}: {e}") from e
    if not ok:
        raise OSError(f"cannot encode {path}")
    return write_bytes(path, buf.tobytes())


def replace_dir(work: Path, out: Path) -> None:
    """Move the finished folder ``work`` to ``out``, replacing an old ``out`` only at the very end.

    Both renames are atomic on one file system; the old folder is deleted only once the new one
    is in place, so an interruption leaves either the old output or the new one, never a mix.
    """
    if out.exists():
        old = out.parent / f"{out.name}.old-{os.getpid()}"
        out.rename(old)
        work.rename(out)
        shutil.rmtree(old)
    else:
        work.rename(out)


def partial_dir(out: Path, pid: int | None = None) -> Path:
    """The work folder in which ``out`` is built: ``<out>.partial-<pid>`` beside it."""
    return out.parent / f"{out.name}.partial-{os.getpid() if pid is None else pid}"


@contextmanager
def building_dir(out: str | os.PathLike) -> Iterator[Path]:
    """Build the folder ``out`` in a fresh work folder (:func:`partial_dir`), swapped in on success.

    The block fills the yielded folder; when it returns, the folder replaces ``out``
    (:func:`replace_dir`); when it raises (a bad input file, Ctrl-C), the work folder is deleted
    and ``out`` is left as it was.
    """
    out = Path(out)
    work = partial_dir(out)
    if work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True)
    try:
        yield work
        replace_dir(work, out)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise


def mark_complete(folder: Path, text: str = "") -> None:
    """Write ``folder``'s completion stamp: the last file of a finished folder."""
    write_text(Path(folder) / COMPLETE, text)


def is_complete(folder: Path) -> bool:
    """Whether ``folder`` carries its completion stamp (was finished, not interrupted)."""
    return (Path(folder) / COMPLETE).is_file()


def cache_root() -> Path:
    """The project's cache outside the repository, as tools/setup.sh places it:
    ``${REDSEG_CACHE:-${XDG_CACHE_HOME:-~/.cache}/redseg}`` (Caffe builds, the VGG16 conversion)."""
    base = os.environ.get("REDSEG_CACHE")
    if base:
        return Path(base)
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "redseg"


def file_digest(path: str | os.PathLike, algorithm: str = "sha256") -> str:
    """Hex digest of a file's bytes, read in 1 MiB chunks (a 528 MB model never sits in memory)."""
    h = hashlib.new(algorithm)
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()
