"""Writing outputs so that a half-written one is never taken for a finished one."""

from __future__ import annotations

import os
import shutil
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
