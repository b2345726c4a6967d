"""Atomic writes: a file is replaced whole or left as it was."""

from __future__ import annotations

import json

import pytest

from ldm.files import atomic_write, write_json


def test_a_finished_write_replaces_the_file_and_leaves_no_temporary(tmp_path):
    path = tmp_path / "metrics.json"
    path.write_text("old")
    write_json(path, {"psnr": 30.5})
    assert json.loads(path.read_text()) == {"psnr": 30.5}
    assert [p.name for p in tmp_path.iterdir()] == ["metrics.json"]


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path):
    path = tmp_path / "grid.png"
    path.write_text("old")
    with pytest.raises(KeyboardInterrupt), atomic_write(path) as tmp:
        tmp.write_text("half of a ne")
        raise KeyboardInterrupt  # e.g. Ctrl-C in the middle of writing
    assert path.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["grid.png"]
