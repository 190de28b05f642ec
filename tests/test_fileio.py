"""redseg.fileio: a half-written file or folder never carries the final name."""

from __future__ import annotations

import numpy as np
import pytest

from redseg.fileio import (
    building_dir,
    is_complete,
    mark_complete,
    read_json_object,
    write_image,
    write_json,
    write_text,
)


def test_atomic_writes_leave_nothing_else(tmp_path):
    write_text(tmp_path / "a.txt", "one\n")
    write_json(tmp_path / "b.json", {"x": [1, 2]})
    write_image(tmp_path / "c.png", np.zeros((4, 5), np.uint8))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.txt", "b.json", "c.png"]
    assert (tmp_path / "b.json").read_text() == '{\n "x": [\n  1,\n  2\n ]\n}\n'
    assert read_json_object(tmp_path / "b.json") == {"x": [1, 2]}
    assert read_json_object(tmp_path / "a.txt") is None and read_json_object(tmp_path / "none") is None
    with pytest.raises(OSError, match="cannot encode"):
        write_image(tmp_path / "d.unknown", np.zeros((4, 5), np.uint8))
    assert not (tmp_path / "d.unknown").exists() and len(list(tmp_path.iterdir())) == 3


def test_building_dir_swaps_in_only_a_finished_folder(tmp_path):
    out = tmp_path / "out"
    with building_dir(out) as work:
        write_text(work / "f.txt", "old")
        mark_complete(work)
    assert is_complete(out) and (out / ".complete").is_file()
    with pytest.raises(RuntimeError), building_dir(out) as work:
        write_text(work / "f.txt", "new")
        raise RuntimeError("interrupted")
    assert (out / "f.txt").read_text() == "old"  # the old folder, untouched
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no partial folder left
    with building_dir(out) as work:
        write_text(work / "f.txt", "new")
    assert (out / "f.txt").read_text() == "new" and not is_complete(out)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
