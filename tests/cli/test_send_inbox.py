"""The inbox's side of ``flare-async send`` (``files/put``), in process: a name already there
is refused unless the sender says overwrite, also when it appears while the file arrives."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from flare_async import Cell, MemoryNetwork
from flare_async.cli import _send
from flare_async.cli._send import INBOX_CHANNEL, INBOX_TOPIC, inbox_handlers
from flare_async.errors import BadRequest, Unauthorized

pytestmark = pytest.mark.anyio
CHUNK = 64 << 10


async def put(
    folder: Path, name: str, data: bytes, *, accepts: Any = None, **headers: str
) -> bytes:
    net = MemoryNetwork()
    async with (
        Cell("server", listen=["memory://server"], drivers=[net]) as server,
        Cell(
            "server.site-1",
            parent="memory://server",
            drivers=[net],
            handlers=[inbox_handlers(folder, accepts=accepts)],
        ) as site,
    ):
        await site.wait_parent()
        reply = await server.stream(
            "server.site-1",
            INBOX_CHANNEL,
            INBOX_TOPIC,
            data,
            headers={"name": name, **headers},
            chunk=CHUNK,
            idle=10,
        )
        return reply.tobytes()


async def test_a_name_in_the_inbox_is_refused_unless_overwrite(tmp_path: Path) -> None:
    inbox = tmp_path / "inbox"
    await put(inbox, "model.bin", b"a" * 3 * CHUNK)
    with pytest.raises(BadRequest) as refused:
        await put(inbox, "model.bin", b"b" * 3 * CHUNK)
    assert "model.bin is already in server.site-1's inbox" in str(refused.value)
    assert "--overwrite" in str(refused.value)
    assert (inbox / "model.bin").read_bytes() == b"a" * 3 * CHUNK
    assert b'"name":"model.bin"' in await put(inbox, "model.bin", b"c" * 3 * CHUNK, overwrite="1")
    assert (inbox / "model.bin").read_bytes() == b"c" * 3 * CHUNK
    assert sorted(p.name for p in inbox.iterdir()) == ["model.bin"]  # nothing left behind


def someone_takes_the_name_first(monkeypatch: pytest.MonkeyPatch) -> None:
    """The name appears after the check at the stream's open, right before the arrived file
    is put in place (the window a second sender of the name would hit)."""
    place = _send._place

    def taken_first(incoming: Path, final: Path, overwrite: bool) -> bool:
        final.write_bytes(b"theirs")
        return place(incoming, final, overwrite)

    monkeypatch.setattr(_send, "_place", taken_first)


async def test_a_name_taken_while_the_file_arrives_is_not_overwritten(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    inbox = tmp_path / "inbox"
    someone_takes_the_name_first(monkeypatch)
    with pytest.raises(BadRequest, match=r"already in server\.site-1's inbox"):
        await put(inbox, "model.bin", b"x" * 3 * CHUNK)
    assert (inbox / "model.bin").read_bytes() == b"theirs"
    assert sorted(p.name for p in inbox.iterdir()) == ["model.bin"]


async def test_overwrite_replaces_a_name_taken_while_the_file_arrives(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    inbox = tmp_path / "inbox"
    someone_takes_the_name_first(monkeypatch)
    await put(inbox, "model.bin", b"x" * 3 * CHUNK, overwrite="1")
    assert (inbox / "model.bin").read_bytes() == b"x" * 3 * CHUNK
    assert sorted(p.name for p in inbox.iterdir()) == ["model.bin"]


async def test_the_inbox_asks_the_sites_policy(tmp_path: Path) -> None:
    asked: list[tuple[str, str, str]] = []

    def only_admins(src: str, channel: str, topic: str) -> bool:
        asked.append((src, channel, topic))
        return src.startswith("server._admin-")

    with pytest.raises(Unauthorized, match=r"policy does not accept files from server \(reported"):
        await put(tmp_path / "inbox", "model.bin", b"x" * CHUNK, accepts=only_admins)
    assert asked == [("server", "files", "put")]
    assert list((tmp_path / "inbox").iterdir()) == []
