"""Writing outputs so that a half-written one is never taken for a finished one."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


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


@contextmanager
def atomic_path(out: Path) -> Iterator[Path]:
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
