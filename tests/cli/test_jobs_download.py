"""`job download` against a server that names files to escape its folder (issue 18, defect
2): whatever the peer sends, the file lands inside ``-o`` or nowhere."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest

from flare_async import Cell, errors
from flare_async.cli._job import _download_handlers
from flare_async.fl import JOB_CHANNEL
from flare_async.transport import MemoryNetwork

pytestmark = pytest.mark.anyio


@pytest.fixture(params=["asyncio", "trio"])
def anyio_backend(request: pytest.FixtureRequest) -> str:
    # Real clocks: the download writes in worker threads, which a virtual clock that jumps
    # when every task waits would overtake (a small file comes whole in one request, whose
    # deadline the jump would pass).
    return str(request.param)


@asynccontextmanager
async def download_pair(out: Path) -> AsyncIterator[Cell]:
    """A "server" cell streaming files to an admin session that downloads into ``out``."""
    net = MemoryNetwork()
    server = Cell("server", listen=["memory://server"], drivers=[net])
    admin = Cell(
        "server._admin-x",
        parent="memory://server",
        drivers=[net],
        handlers=[_download_handlers(out)],
    )
    async with server, admin:
        await admin.wait_parent()
        yield server


@pytest.mark.parametrize(
    ("job", "name"),
    [
        ("..", "escaped"),
        (".", "escaped"),
        ("", "escaped"),
        ("..\\..", "escaped"),
        ("a\x00b", "escaped"),
        ("job", "../../escaped"),
        ("job", "/tmp/escaped"),
        ("job", ""),
        ("job", "."),
        ("job", "sub\\..\\..\\escaped"),
        ("job", "a\x00b"),
    ],
)
async def test_a_download_writes_only_inside_its_folder(
    tmp_path: Path, job: str, name: str
) -> None:
    out = tmp_path / "a" / "out"
    out.mkdir(parents=True)
    async with download_pair(out) as server:
        with pytest.raises(errors.BadRequest, match="refusing"):
            await server.stream(
                "server._admin-x", JOB_CHANNEL, "file", b"x", headers={"job": job, "name": name}
            )
        # a proper file still arrives
        await server.stream(
            "server._admin-x", JOB_CHANNEL, "file", b"ok", headers={"job": "j1", "name": "c/m.bin"}
        )
    assert files_under(tmp_path) == ["a/out/j1/c/m.bin"]


def files_under(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())


async def test_a_download_follows_no_symlink_out_of_its_folder(tmp_path: Path) -> None:
    out, outside = tmp_path / "out", tmp_path / "outside"
    out.mkdir()
    outside.mkdir()
    (out / "linked").symlink_to(outside, target_is_directory=True)  # a job folder
    (out / "j1").mkdir()
    (out / "j1" / "sub").symlink_to(outside, target_is_directory=True)  # a folder in a job
    (out / "j1" / "f").symlink_to(outside / "f")  # a file in a job
    async with download_pair(out) as server:
        for job, name in (("linked", "x"), ("j1", "sub/x"), ("j1", "f")):
            with pytest.raises(errors.BadRequest, match="refusing"):
                await server.stream(
                    "server._admin-x", JOB_CHANNEL, "file", b"x", headers={"job": job, "name": name}
                )
    assert list(outside.iterdir()) == []
