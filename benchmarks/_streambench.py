"""The processes of ``stream.py``: run as ``python _streambench.py CONFIG_JSON``.

Roles (``config["role"]``):

- ``sender``: the root cell ``server`` (``tcp://127.0.0.1:0``). Prints ``{"port": P}``, waits
  until every target answers ``sys/ping`` and prints ``{"linked": true}``, then, for each line
  ``go`` read on its stdin (``repeat`` times), sends the object once (one ``Cell.stream``, or one
  ``Cell.stream_many`` for fan-out) and prints one line per run:
  ``{"seconds": ..., "sent": B}`` (``sent``: bytes this process put on its links during the
  run). The object: ``mem``: a buffer of ``min(size, 256 MiB)`` random bytes, streamed as many
  views of it as the size needs (nothing copied); ``file``: a file of random bytes written
  before the first run (not timed).
- ``relay``: a relay cell (``system_handlers()``, so it can fan out); prints ``{"port": P}``
  once linked to its parent.
- ``receiver``: an edge cell with the stream handler ``bench/put``: ``mem`` takes every chunk
  and drops it (the bytes arrive in this process's memory and are checked, CRC-32C and, unless
  disabled, SHA-256); ``file`` saves the object (``IncomingStream.save``) and deletes it after.
  Prints ``{"ready": true}`` once linked.
- With ``config["tls"]`` (a folder of startup kits), ``sender`` and ``receiver`` link over
  mutual TLS (``tls://``, the kits' certificates) instead of ``tcp://``.
- ``raw_recv``: the baseline's receiving end: a blocking socket that ``recv_into``'s a
  preallocated 1 MiB buffer until ``size`` bytes came, then answers one byte; once per
  connection, until it is killed.

Every role except ``raw_recv`` prints ``{"peak_rss": B}`` when its stdin closes
(``ru_maxrss``; ``relay`` and ``receiver`` add ``cpu_seconds``, user + system, since linked);
``stream.py`` closes the receivers' first, then the relay's, then the sender's, so that no
cell outlives its parent (it would try to reconnect).
"""

from __future__ import annotations

import json
import resource
import socket
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import anyio
import numpy as np
from _report import line

from flare_async import Cell, Context, HandlerTable, IncomingStream, system_handlers
from flare_async.security import (
    SignatureVerifier,
    Signer,
    client_context,
    load_kit,
    server_context,
)
from flare_async.transport import TcpDriver

_BLOCK = 256 << 20


def transport(cfg: dict[str, Any], name: str, *, serve: bool) -> tuple[str, list[TcpDriver]]:
    """The scheme and drivers of cell ``name`` (``serve``: it listens): ``tls`` with its kit's
    certificates when ``cfg["tls"]`` names the kits (``stream.py``'s ``tls-`` cases), else
    ``tcp``."""
    if not cfg.get("tls"):
        return "tcp", [TcpDriver()]
    kit = load_kit(Path(cfg["tls"]) / name)
    server_tls = server_context(kit) if serve else None
    return "tls", [TcpDriver(server_tls=server_tls, client_tls=client_context(kit))]


def peak_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def cpu_seconds() -> float:
    """User and system CPU seconds of this process so far (all its threads)."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


async def wait_stdin_eof() -> None:
    await anyio.to_thread.run_sync(sys.stdin.read, abandon_on_cancel=True)


async def wait_reachable(cell: Cell, targets: list[str], timeout: float = 120) -> None:
    """Until every target answers ``sys/ping`` (``TimeoutError`` after ``timeout`` s)."""
    with anyio.fail_after(timeout):
        for dst in targets:
            while True:
                try:
                    await cell.request(dst, "sys", "ping", b"", timeout=2)
                    break
                except Exception:  # not linked yet
                    await anyio.sleep(0.05)


def link_bytes_sent(cell: Cell) -> int:
    peers = [
        *cell._router.children.values(),
        *([cell._router.parent] if cell._router.parent else []),
    ]
    return sum(p.link.statistics().bytes_sent for p in peers)


def make_object(size: int) -> list[memoryview]:
    block = memoryview(np.random.default_rng(1).bytes(min(size, _BLOCK)))
    parts, left = [], size
    while left > 0:
        parts.append(block[: min(left, block.nbytes)])
        left -= parts[-1].nbytes
    return parts


def make_file(path: Path, size: int) -> None:
    block = np.random.default_rng(2).bytes(min(size, 4 << 20))  # small: not in peak_rss
    with path.open("wb") as f:
        left = size
        while left > 0:
            n = min(left, len(block))
            f.write(block[:n])
            left -= n


async def sender(cfg: dict[str, Any]) -> None:
    size, mode, targets = cfg["size"], cfg["mode"], cfg["targets"]
    scheme, drivers = transport(cfg, "server", serve=True)
    async with Cell("server", listen=[f"{scheme}://127.0.0.1:0"], drivers=drivers) as cell:
        line(port=int(cell.listen_urls[0].rsplit(":", 1)[1]))
        await wait_reachable(cell, targets)
        line(linked=True)
        with tempfile.TemporaryDirectory(dir=cfg.get("tmp")) as tmp:
            if mode == "file":
                path = Path(tmp) / "object.bin"
                make_file(path, size)
                source: Any = path
            else:
                source = make_object(size)
            chunk, window = cfg["chunk"], cfg["window"]  # chunk None: the library picks
            seal = None
            if cfg.get("kits"):  # sign the digest at the end (see stream.py --sign)
                signer = Signer(load_kit(Path(cfg["kits"]) / "server"))

                def seal(dst: str, sha: str) -> dict[str, str]:
                    return signer.sign({"src": "server", "dst": dst, "sha256": sha})

            for _ in range(cfg["repeat"]):
                # One run per "go": stream.py measures the baseline between runs.
                if (await anyio.to_thread.run_sync(sys.stdin.readline)).strip() != "go":
                    break
                before = link_bytes_sent(cell)
                start = time.perf_counter()
                if cfg["fanout"]:
                    results = await cell.stream_many(
                        targets,
                        "bench",
                        "put",
                        source,
                        digest=cfg["digest"],
                        chunk=chunk,
                        window=window,
                    )
                    failed = {d: r for d, r in results.items() if isinstance(r, Exception)}
                    if failed:
                        raise RuntimeError(f"fan-out failed: {failed}")
                    replies = list(results.values())
                else:
                    replies = [
                        await cell.stream(
                            targets[0],
                            "bench",
                            "put",
                            source,
                            digest=cfg["digest"],
                            chunk=chunk,
                            window=window,
                            seal=seal,
                        )
                    ]
                seconds = time.perf_counter() - start
                for reply in replies:
                    if int(bytes(reply)) != size:  # type: ignore[call-overload]
                        raise RuntimeError(f"receiver took {bytes(reply)!r} of {size} B")
                line(seconds=seconds, sent=link_bytes_sent(cell) - before)
            await wait_stdin_eof()  # the cells below stop first (they would reconnect)
    line(peak_rss=peak_rss())


def receiver_table(mode: str, tmp: str, verifier: SignatureVerifier | None) -> HandlerTable:
    table = HandlerTable("bench")

    @table.stream("bench", "put")
    async def put(ctx: Context, stream: IncomingStream) -> bytes:
        if mode == "file":
            path = Path(tmp) / f"received-{stream.sid}.bin"
            n = await stream.save(path)
            path.unlink()
        else:
            n = 0
            async for chunk in stream:
                n += chunk.nbytes
        if verifier is not None:  # the end-to-end signature over the digest we computed
            verifier.verify(
                stream.trailer,
                src=stream.src,
                expect={"dst": ctx.cell.name, "sha256": stream.sha256},
                now=datetime.now(UTC),
            )
        return str(n).encode()

    return table


async def member(cfg: dict[str, Any]) -> None:
    with tempfile.TemporaryDirectory(dir=cfg.get("tmp")) as tmp:
        relay = cfg["role"] == "relay"
        handlers = [system_handlers()]
        if not relay:
            verifier = (
                SignatureVerifier.from_kit(load_kit(Path(cfg["kits"]) / cfg["name"]))
                if cfg.get("kits")
                else None
            )
            handlers.append(receiver_table(cfg["mode"], tmp, verifier))
        scheme, drivers = transport(cfg, cfg["name"], serve=relay)
        cell = Cell(
            cfg["name"],
            parent=cfg["parent"],
            listen=[f"{scheme}://127.0.0.1:0"] if relay else [],
            drivers=drivers,
            handlers=handlers,
        )
        async with cell:
            with anyio.fail_after(60):
                await cell.wait_parent()
            if relay:
                line(port=int(cell.listen_urls[0].rsplit(":", 1)[1]))
            else:
                line(ready=True)
            linked = cpu_seconds()
            await wait_stdin_eof()
            cpu = cpu_seconds() - linked
    line(peak_rss=peak_rss(), cpu_seconds=cpu)


def raw_recv(cfg: dict[str, Any]) -> None:
    size = cfg["size"]
    with socket.create_server(("127.0.0.1", 0)) as srv:
        line(port=srv.getsockname()[1])
        buf = bytearray(1 << 20)
        view = memoryview(buf)
        while True:
            conn, _ = srv.accept()
            with conn:
                got = 0
                while got < size:
                    n = conn.recv_into(view, min(len(buf), size - got))
                    if not n:
                        raise RuntimeError("baseline sender went away")
                    got += n
                conn.sendall(b"k")


def main(argv: list[str]) -> int:
    cfg = json.loads(argv[1])
    role = cfg["role"]
    if role == "raw_recv":
        raw_recv(cfg)
        return 0
    fn = sender if role == "sender" else member
    anyio.run(fn, cfg, backend="asyncio", backend_options={"use_uvloop": True})
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
