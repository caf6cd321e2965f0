"""staged_dir: a directory appears whole, with ordinary permissions, or not at all."""

import os
import stat

import pytest

from blindsight.staging import staged_dir


def test_result_has_the_permissions_mkdir_gives(tmp_path):
    out = tmp_path / "out"
    with staged_dir(out) as tmp:
        (tmp / "a.txt").write_text("x")
    reference = tmp_path / "plain"
    reference.mkdir()
    assert stat.S_IMODE(out.stat().st_mode) == stat.S_IMODE(reference.stat().st_mode)
    assert (out / "a.txt").read_text() == "x"


def test_failure_leaves_nothing_and_keeps_the_old_folder(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("old")
    with pytest.raises(RuntimeError):
        with staged_dir(out) as tmp:
            (tmp / "half.txt").write_text("half")
            raise RuntimeError("boom")
    assert sorted(os.listdir(tmp_path)) == ["out"] and sorted(os.listdir(out)) == ["old.txt"]
