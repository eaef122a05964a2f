"""atomic_folder: a folder appears whole or not at all, and an old one survives a failed build."""

from __future__ import annotations

import pytest


def test_atomic_folder_swaps_in_whole_and_keeps_the_old_one_on_failure(tmp_path):
    from edgepeft.atomic import atomic_folder

    out = tmp_path / "out"
    with atomic_folder(out) as staging:
        (staging / "a.txt").write_text("first")
    assert (out / "a.txt").read_text() == "first"
    with pytest.raises(RuntimeError), atomic_folder(out) as staging:
        (staging / "a.txt").write_text("half")
        raise RuntimeError("the build failed")
    assert (out / "a.txt").read_text() == "first"
    with atomic_folder(out) as staging:
        (staging / "b.txt").write_text("second")
    assert sorted(p.name for p in out.iterdir()) == ["b.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no staging or old left
    with pytest.raises(FileExistsError, match="overwrite"), atomic_folder(out, replace=False):
        pass
