"""``flare_async._files.write_atomic``: the old content or the new, never a mix."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from flare_async._files import write_atomic


def test_it_replaces_the_file_whole_and_leaves_nothing_beside_it(tmp_path: Path) -> None:
    path = tmp_path / "job.json"
    write_atomic(path, b"old")
    write_atomic(path, [b"n", memoryview(b"ew")])
    assert path.read_bytes() == b"new"
    assert [p.name for p in tmp_path.iterdir()] == ["job.json"]


def test_a_write_that_fails_half_way_keeps_the_old_content(tmp_path: Path) -> None:
    path = tmp_path / "job.json"
    write_atomic(path, b"old")

    def pieces() -> Iterator[bytes]:
        yield b"half of the new"
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        write_atomic(path, pieces())
    assert path.read_bytes() == b"old"
