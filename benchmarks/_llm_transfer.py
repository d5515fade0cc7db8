"""The processes of ``llm.py`` part (a): run as ``python _llm_transfer.py CONFIG_JSON``.

The relay is ``_streambench.py``'s own ``relay`` role (a cell with ``system_handlers()``, so it
fans the checkpoint's streams out to the sites). Roles here (``config["role"]``):

- ``sender``: the root cell ``server`` (``tcp://127.0.0.1:0``). Prints ``{"port": P}``, waits
  until every site answers ``sys/ping`` and prints ``{"linked": true}``. Then, for each line
  ``go NAME`` read on its stdin: times :func:`~flare_async.checkpoints.scan` of the folder
  alone (the SHA-256 of every file; not part of the transfer's time), then times one
  ``send_checkpoint(cell, folder, sites, name=NAME, quantize=config["quantize"])`` (which
  scans again: its time includes the hashing), then asks every site to check what it got
  (``bench/verify``, not timed) and prints ``{"seconds", "scan_seconds", "sent", "verified",
  "details", "cpu", "site_cpu"}`` (``sent``: bytes this process put on its links during the
  send; ``cpu``: its CPU seconds during the send, ``site_cpu``: the four sites' together).
- ``site``: an edge cell with ``system_handlers()``, ``checkpoint_handlers(inbox)`` (fsync'd,
  as ``flare-async run`` mounts it, unless ``config["durable"]`` is false) and ``bench/verify``:
  given the generator's list of files (``{path: [size, sha256]}``), it checks the folder
  received under ``NAME`` (the same paths; every size; the SHA-256 of every file that
  travelled byte for byte, i.e. all of them in a lossless run and the non-``.safetensors``
  ones in a quantized run), then deletes it and answers ``{"ok", "detail", "cpu"}`` (its CPU
  seconds since it last answered, before the check: the transfer's), so that the
  sites' disks hold one checkpoint at a time. Prints ``{"ready": true}`` once linked.

Every role prints ``{"peak_rss": B}`` (``ru_maxrss``) when its stdin closes; ``llm.py`` closes
the sites' first, then the relay's, then the sender's.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import anyio
from _report import line
from _streambench import (
    cpu_seconds,
    link_bytes_sent,
    peak_rss,
    transport,
    wait_reachable,
    wait_stdin_eof,
)

from flare_async import Cell, Context, HandlerTable, Payload, system_handlers
from flare_async.checkpoints import StoredCheckpoint, checkpoint_handlers, scan, send_checkpoint

VERIFY_TIMEOUT = 1800.0


async def sender(cfg: dict[str, Any]) -> None:
    folder, sites, quantize = Path(cfg["folder"]), cfg["sites"], cfg["quantize"]
    files = json.loads(await anyio.Path(cfg["expected"]).read_text())["files"]
    scheme, drivers = transport(cfg, "server", serve=True)
    async with Cell("server", listen=[f"{scheme}://127.0.0.1:0"], drivers=drivers) as cell:
        line(port=int(cell.listen_urls[0].rsplit(":", 1)[1]))
        await wait_reachable(cell, sites)
        line(linked=True)
        while True:
            command = (await anyio.to_thread.run_sync(sys.stdin.readline)).split()
            if not command or command[0] != "go":
                break  # stdin closed: the sites and the relay have stopped
            name = command[1]
            start = time.perf_counter()
            await anyio.to_thread.run_sync(lambda: scan(folder, quantize=quantize))
            scan_seconds = time.perf_counter() - start
            before, cpu = link_bytes_sent(cell), cpu_seconds()
            start = time.perf_counter()
            outcomes = await send_checkpoint(
                cell, folder, sites, name=name, quantize=quantize, window=cfg["window"]
            )
            seconds = time.perf_counter() - start
            sent, cpu = link_bytes_sent(cell) - before, cpu_seconds() - cpu
            failed = {
                d: repr(o) for d, o in outcomes.items() if not isinstance(o, StoredCheckpoint)
            }
            if failed:
                line(error=f"send_checkpoint failed: {failed}")
                continue
            request = json.dumps({"name": name, "files": files, "lossless": not quantize})
            verdicts = await verify_all(cell, sites, request.encode())
            line(
                seconds=seconds,
                scan_seconds=scan_seconds,
                sent=sent,
                cpu=cpu,
                site_cpu=sum(v["cpu"] for v in verdicts.values()),
                verified=all(v["ok"] for v in verdicts.values()),
                details={s: v["detail"] for s, v in sorted(verdicts.items())},
            )
    line(peak_rss=peak_rss())


async def verify_all(cell: Cell, sites: list[str], request: bytes) -> dict[str, dict[str, Any]]:
    """Every site's answer to ``bench/verify`` (asked together)."""
    verdicts: dict[str, dict[str, Any]] = {}

    async def verify(site: str) -> None:
        reply = await cell.request(site, "bench", "verify", request, timeout=VERIFY_TIMEOUT)
        verdicts[site] = json.loads(reply.tobytes())

    async with anyio.create_task_group() as tg:
        for site in sites:
            tg.start_soon(verify, site)
    return verdicts


def sha256(path: Path) -> str:
    with path.open("rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def check(inbox: Path, name: str, files: dict[str, list[Any]], lossless: bool) -> tuple[bool, str]:
    """Whether ``inbox/name`` holds exactly ``files`` (see the module's docstring), and why
    not; then the folder is deleted, and nothing else may be left in the inbox."""
    folder = inbox / name
    try:
        ok, detail = compare(folder, files, lossless)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    left = sorted(p.name for p in inbox.iterdir())
    if left:  # a staging folder the transfer left behind would grow the disk run by run
        return False, f"{detail}; left in the inbox after the delete: {left}"
    return ok, detail


def compare(folder: Path, files: dict[str, list[Any]], lossless: bool) -> tuple[bool, str]:
    got = {p.relative_to(folder).as_posix(): p for p in sorted(folder.rglob("*")) if p.is_file()}
    if sorted(got) != sorted(files):
        return False, f"files {sorted(got)} != {sorted(files)}"
    hashed = 0
    for rel, (size, digest) in files.items():
        if got[rel].stat().st_size != size:
            return False, f"{rel}: {got[rel].stat().st_size} B, not {size}"
        if lossless or not rel.endswith(".safetensors"):
            hashed += 1
            if sha256(got[rel]) != digest:
                return False, f"{rel}: SHA-256 differs"
    what = "SHA-256" if lossless else "sizes, and SHA-256 of the files not quantized,"
    return True, f"{len(files)} files: {what} match ({hashed} hashed)"


def verify_table(inbox: Path) -> HandlerTable:
    table = HandlerTable("bench")
    mark = [cpu_seconds()]  # at the end of the last check: the transfer's CPU is since then

    @table.request("bench", "verify")
    async def verify(ctx: Context, msg: Payload) -> bytes:
        cpu = cpu_seconds() - mark[0]
        req = json.loads(msg.tobytes())
        ok, detail = await anyio.to_thread.run_sync(
            check, inbox, req["name"], req["files"], req["lossless"]
        )
        mark[0] = cpu_seconds()
        return json.dumps({"ok": ok, "detail": detail, "cpu": cpu}).encode()

    return table


async def site(cfg: dict[str, Any]) -> None:
    inbox = Path(cfg["inbox"])
    _, drivers = transport(cfg, cfg["name"], serve=False)
    cell = Cell(
        cfg["name"],
        parent=cfg["parent"],
        drivers=drivers,
        handlers=[
            system_handlers(),
            checkpoint_handlers(inbox, durable=cfg["durable"]),
            verify_table(inbox),
        ],
    )
    async with cell:
        with anyio.fail_after(60):
            await cell.wait_parent()
        line(ready=True)
        await wait_stdin_eof()
    line(peak_rss=peak_rss())


def main(argv: list[str]) -> int:
    cfg = json.loads(argv[1])
    fn = sender if cfg["role"] == "sender" else site
    anyio.run(fn, cfg, backend="asyncio", backend_options={"use_uvloop": True})
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
