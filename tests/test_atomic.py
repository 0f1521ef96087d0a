"""storage.atomic: a write either lands whole under its final name or leaves the old file and no temp behind.
Trade-off: a crash cannot be simulated in-process; an exception mid-write stands in for it."""
from __future__ import annotations

import pytest

from storage.atomic import atomic_open, atomic_write_text, publish, tmp_path_for


def test_a_failed_write_keeps_the_old_file_and_leaves_no_temp(tmp_path):
    final = tmp_path / "sub" / "config.json"
    atomic_write_text(final, "old")
    with pytest.raises(RuntimeError), atomic_open(final) as f:
        f.write(b"half of the new")
        raise RuntimeError("disk full")
    assert final.read_text() == "old"
    assert sorted(p.name for p in final.parent.iterdir()) == ["config.json"]
    atomic_write_text(final, "new")
    assert final.read_text() == "new" and len(list(final.parent.iterdir())) == 1


def test_publish_moves_a_written_folder_under_its_final_name(tmp_path):
    final = tmp_path / "snap"
    tmp = tmp_path_for(final)
    tmp.mkdir()
    (tmp / "catalog.duckdb").write_bytes(b"x" * 10)
    publish(tmp, final, sync=tmp / "catalog.duckdb")
    assert (final / "catalog.duckdb").read_bytes() == b"x" * 10 and not tmp.exists()
    other = tmp_path / "plain.bin"
    t2 = tmp_path_for(other)
    t2.write_bytes(b"y")
    publish(t2, other, durable=False)
    assert other.read_bytes() == b"y" and not t2.exists()
