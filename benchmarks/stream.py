"""Streaming throughput and memory: one object from one process to another over tcp on loopback.

Cases are named ``tcp-<path>-<size>-<mode>[-nodigest|-signed]``, and
``tls-direct-<size>-mem[-nodigest]``: the direct in-memory case over mutual TLS (``tls://``,
certificates from startup kits provisioned in a temporary folder), against the same raw tcp
baseline (blocking sockets, no TLS):

- ``path``: ``direct`` (sender ``server`` -> receiver ``server.e``, two processes) or
  ``relay`` (``server`` -> relay ``server.r`` -> receiver ``server.r.e``, three processes);
  ``fanout8-relay``: one object to 8 receivers behind one relay (``Cell.stream_many``: the
  relay feeds one upstream stream to its children; ten processes).
- ``mode``: ``mem`` (the sender streams views of a buffer in memory; the receiver takes each
  chunk in memory and drops it) or ``file`` (file to file: the sender reads a file a chunk at a
  time, the receiver writes ``<path>.part`` and renames it once verified).
- no suffix: the default whole-object digest (``digest=True``: ``crc32c``, combined from the
  chunk CRCs at no extra pass); ``-nodigest``: none (``digest=False``; chunks still carry
  their CRC-32C); ``-blake3`` / ``-sha256`` (``--digest all``): that hash on both ends, in a
  worker thread beside the transfer.
- ``-signed`` (with ``--sign``): the digest signed end to end as the FL layer signs results
  (``seal``: the sender signs the BLAKE3 digest it computed while streaming, with a
  provisioned kit, in the stream's end message; the receiver checks it against the CA and its
  own digest). Compare with the same case with the digest and no signature.

Per case: ``throughput`` (B/s, median of ``--repeat`` runs; from the start of ``stream`` to
the receiver's answer), with ``baseline``: the honest ceiling measured in the same run, two
processes with blocking sockets, ``sendall`` of 1 MiB buffers into ``recv_into`` of a
preallocated 1 MiB buffer (this process sends; a child receives), one baseline transfer just
before each run of the case, median of those. ``peak_rss`` (B) of every
process, one line per role (``case:sender``, ``case:relay``, ``case:receiver``; the fan-out
case reports the largest receiver). File cases also report ``write_throughput`` of this
machine's disk (``case:disk``: 1 MiB writes into a file, measured in the same run), the other
ceiling a file-to-file transfer meets. The fan-out case also reports ``upstream_bytes``: bytes
the sender put on its link per run, with the object's size as ``baseline`` (ratio 1.0 means
the object crossed the sender's link once, not once per receiver).

Cases through one relay (``relay-mem``, ``relay-file``) have a second baseline, the raw
relay: the same blocking sockets between three processes (this process sends, a ``raw_relay``
child of ``_framed.py`` splices socket -> pipe -> socket as the bytes come, the baseline's
receiver takes them), measured just after the two-process baseline before each run, median of
those. It is reported as ``case:raw-relay`` (``baseline`` the two-process one) and as
``baseline_relay`` and ``ratio_relay`` (``value / baseline_relay``) on the case's throughput
line and its ``framed-ceiling`` line, beside ``baseline`` and ``ratio``.

``mem`` cases with the default digest or none (direct and relay) also report
``case:framed-ceiling``: the throughput of the same frames in the plainest code
(``_framed.py``: blocking sockets, each chunk's CRC-32C computed by the sender and checked by
the receiver, a splicing relay for relay cases; no event loop, flow control, routing or
headers), with the same ``baseline``, measured once after each run of the case. Its ratio is
what any implementation keeping the per-chunk checksum can reach on this machine; the case's
``value`` over it is how far the library is from that.

Run: ``python benchmarks/stream.py [--quick] [--repeat N] [--size BYTES] [--cases ...]``.
Full size: 1 GiB objects (``--size 8GiB`` for the large run); ``--quick``: 64 MiB.
"""

from __future__ import annotations

import json
import re
import socket
import subprocess
import sys
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path
from typing import Any

from _report import emit, line, log, median, parser

from flare_async.streaming import pick_chunk

CHILD = str(Path(__file__).with_name("_streambench.py"))
FRAMED = str(Path(__file__).with_name("_framed.py"))
FULL_SIZE = 1 << 30
QUICK_SIZE = 64 << 20
CASES = (
    "direct-mem",
    "direct-file",
    "relay-mem",
    "relay-file",
    "fanout8-relay-mem",
    "tls-direct-mem",
)
_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30}


def parse_size(text: str) -> int:
    m = re.fullmatch(r"(\d+)\s*([kmg]?)i?b?", text.strip().lower())
    if not m:
        raise ValueError(f"not a size: {text!r} (e.g. 1GiB, 64MiB, 1048576)")
    return int(m.group(1)) * _UNITS[m.group(2)]


def size_name(size: int) -> str:
    for unit, n in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if size % n == 0:
            return f"{size // n}{unit}"
    return f"{size}B"


class Child:
    """One benchmark process; its JSON lines are read from its stdout."""

    def __init__(self, cfg: dict[str, Any], script: str = CHILD) -> None:
        self.role = cfg["role"]
        self.proc = subprocess.Popen(
            [sys.executable, script, json.dumps(cfg)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )

    def line(self, timeout: float = 600) -> dict[str, Any]:
        assert self.proc.stdout is not None
        text = self.proc.stdout.readline()
        if not text:
            raise RuntimeError(f"{self.role} process ended (exit {self.proc.wait(timeout)})")
        return dict(json.loads(text))

    def stop(self) -> None:
        if self.proc.stdin and not self.proc.stdin.closed:
            self.proc.stdin.close()

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()


class Baseline:
    """Blocking sockets between two processes: this one sends, a child receives.

    One child serves every measurement; ``once`` measures one transfer, so that a case can
    alternate baseline and case runs (the machine's speed drifts over a minute; a baseline
    measured in a block before the case compared badly with it).
    """

    def __init__(self, size: int) -> None:
        self.size = size
        self.child = Child({"role": "raw_recv", "size": size})
        self.port = self.child.line()["port"]
        self.block = memoryview(bytes(1 << 20))
        self.relay: Child | None = None  # started by the first relayed measurement
        self.relay_port = 0

    def once(self) -> float:
        return self._send(self.port)

    def once_relayed(self) -> float:
        """One transfer through the raw relay (``_framed.py``'s ``raw_relay``) to the same
        receiver: the relay cases' second baseline."""
        if self.relay is None:
            self.relay = Child({"role": "raw_relay", "size": self.size, "next": self.port}, FRAMED)
            self.relay_port = self.relay.line()["port"]
        return self._send(self.relay_port)

    def _send(self, port: int) -> float:
        with socket.create_connection(("127.0.0.1", port)) as s:
            start = time.perf_counter()
            left = self.size
            while left > 0:
                n = min(left, self.block.nbytes)
                s.sendall(self.block[:n])
                left -= n
            if s.recv(1) != b"k":
                raise RuntimeError("baseline receiver did not answer")
            return self.size / (time.perf_counter() - start)

    def close(self) -> None:
        if self.relay is not None:
            self.relay.kill()
        self.child.kill()


def emit_relayed(case: str, value: float, base: float, relay_base: float | None) -> None:
    """A throughput line with the two-process ``baseline`` and, for a case through one relay,
    the raw relay's too (``baseline_relay``, ``ratio_relay``)."""
    if relay_base is None:
        emit("stream", case, "throughput", value, "B/s", base)
        return
    line(
        bench="stream",
        case=case,
        metric="throughput",
        value=float(f"{value:.6g}"),
        unit="B/s",
        baseline=float(f"{base:.6g}"),
        ratio=round(value / base, 4),
        baseline_relay=float(f"{relay_base:.6g}"),
        ratio_relay=round(value / relay_base, 4),
    )


class Ceiling:
    """The framed ceiling (``_framed.py``): the stream's frames with their CRC-32C between
    blocking sockets, a sender child, a receiver child checking each CRC and, for relay cases,
    a splicing relay child between them. Measured like the baseline, once per run."""

    def __init__(self, size: int, chunk: int, relay: bool) -> None:
        self.size = size
        self.children = [Child({"role": "framed_recv", "size": size}, FRAMED)]
        port = self.children[0].line()["port"]
        if relay:
            cfg = {"role": "framed_relay", "size": size, "next": port}
            self.children.append(Child(cfg, FRAMED))
            port = self.children[-1].line()["port"]
        cfg = {"role": "framed_send", "size": size, "chunk": chunk, "port": port}
        self.sender = Child(cfg, FRAMED)
        self.children.append(self.sender)

    def once(self) -> float:
        stdin = self.sender.proc.stdin
        assert stdin is not None
        stdin.write("go\n")
        stdin.flush()
        return self.size / float(self.sender.line()["seconds"])

    def close(self) -> None:
        for c in self.children:
            c.kill()


def disk_write(tmp: str, size: int) -> float:
    """Bytes per second this machine writes a file in 1 MiB blocks (the page cache, as the
    receiver's ``save`` does): the other ceiling of file-to-file cases."""
    block = memoryview(bytes(1 << 20))
    path = Path(tmp) / "disk-probe.bin"
    start = time.perf_counter()
    with path.open("wb", buffering=0) as f:
        left = size
        while left > 0:
            left -= f.write(block[: min(left, block.nbytes)])
    rate = size / (time.perf_counter() - start)
    path.unlink()
    return rate


def make_kits(tmp: str, relay: bool) -> str:
    """Startup kits (a real CA and keys) for the signed and ``tls-`` cases: the sender is
    ``server``."""
    from datetime import UTC, datetime  # noqa: PLC0415

    from flare_async.security import provision  # noqa: PLC0415

    receiver = "server.r.e" if relay else "server.e"
    parent = "tls://127.0.0.1:19101" if relay else "tls://127.0.0.1:19100"
    spec = Path(tmp) / "sign.toml"
    spec.write_text(
        'project = "bench"\n[server]\nlisten = ["tls://127.0.0.1:19100"]\n'
        '[[relays]]\nname = "server.r"\nparent = "tls://127.0.0.1:19100"\n'
        'listen = ["tls://127.0.0.1:19101"]\n'
        f'[[clients]]\nname = "{receiver}"\nparent = "{parent}"\n'
    )
    out = Path(tmp) / f"kits-{'relay' if relay else 'direct'}"
    provision(spec, out, now=datetime.now(UTC), force=True)
    return str(out)


def run_case(
    case: str,
    path: str,
    mode: str,
    size: int,
    digest: bool | str,
    repeat: int,
    base: Baseline,
    tmp: str,
    chunk: int,
    kits: str = "",
    tls: str = "",
) -> None:
    """``kits``: sign the digest with these kits; ``tls``: link over mutual TLS with them
    (direct cases only)."""
    fanout = 8 if path.startswith("fanout") else 0
    relay = "relay" in path
    window = max(16 << 20, 4 * (chunk or 0))
    receivers = (
        [f"server.r.e{i}" for i in range(fanout)]
        if fanout
        else (["server.r.e"] if relay else ["server.e"])
    )
    common = {
        "mode": mode,
        "size": size,
        "repeat": repeat,
        "digest": digest,
        "tmp": tmp,
        "chunk": chunk,
        "window": window,
        "kits": kits,
        "tls": tls,
    }
    with ExitStack() as stack:
        ceiling = None
        if mode == "mem" and not isinstance(digest, str) and not fanout and not kits and not tls:
            picked = chunk or pick_chunk(size, window, in_memory=True)  # what the library picks
            ceiling = Ceiling(size, picked, relay)
            stack.callback(ceiling.close)
        sender = Child({**common, "role": "sender", "targets": receivers, "fanout": bool(fanout)})
        stack.callback(sender.kill)
        parent = f"{'tls' if tls else 'tcp'}://127.0.0.1:{sender.line()['port']}"
        members: list[Child] = []
        if relay:
            r = Child({**common, "role": "relay", "name": "server.r", "parent": parent})
            stack.callback(r.kill)
            members.append(r)
            parent = f"tcp://127.0.0.1:{r.line()['port']}"
        for name in receivers:
            c = Child({**common, "role": "receiver", "name": name, "parent": parent})
            stack.callback(c.kill)
            members.append(c)
        for c in members:
            if c.role == "receiver":
                c.line()
        sender.line()  # linked to every target
        runs, bases, ceilings, relay_bases = [], [], [], []
        for i in range(repeat):
            bases.append(base.once())
            if relay and not fanout:
                relay_bases.append(base.once_relayed())
            assert sender.proc.stdin is not None
            sender.proc.stdin.write("go\n")
            sender.proc.stdin.flush()
            rec = sender.line()
            runs.append(rec)
            rate = size / rec["seconds"]
            if ceiling is not None:
                ceilings.append(ceiling.once())
            log(
                f"{case} run {i + 1}/{repeat}: {rate / 1e9:.2f} GB/s"
                f" (baseline just before: {bases[-1] / 1e9:.2f}"
                + (f", raw relay: {relay_bases[-1] / 1e9:.2f}" if relay_bases else "")
                + (f", framed ceiling just after: {ceilings[-1] / 1e9:.2f})" if ceilings else ")")
            )
        # Leaves first, then the relay, then the sender: a cell whose parent went away
        # before it would try to reconnect (and say so on stderr).
        rss: dict[str, int] = {}
        for group in (
            [c for c in members if c.role == "receiver"],
            [r for r in members if r.role == "relay"],
        ):
            for c in group:
                c.stop()
            for c in group:
                rss[c.role] = max(rss.get(c.role, 0), c.line()["peak_rss"])
        sender.stop()
        rss = {"sender": sender.line()["peak_rss"], **rss}
    relay_base = median(relay_bases) if relay_bases else None
    emit_relayed(case, median([size / r["seconds"] for r in runs]), median(bases), relay_base)
    if ceilings:
        emit_relayed(f"{case}:framed-ceiling", median(ceilings), median(bases), relay_base)
    if relay_base is not None:
        emit("stream", f"{case}:raw-relay", "throughput", relay_base, "B/s", median(bases))
    for role, value in rss.items():
        emit("stream", f"{case}:{role}", "peak_rss", value, "B")
    if fanout:
        emit("stream", case, "upstream_bytes", median([r["sent"] for r in runs]), "B", size)


def main() -> None:
    p = parser(__doc__.split("\n\n", 1)[0])
    p.add_argument("--size", type=parse_size, default=None, help="object size (default 1GiB)")
    p.add_argument(
        "--cases",
        default=",".join(CASES),
        help=f"comma-separated cases among {','.join(CASES)} (default: all)",
    )
    p.add_argument(
        "--chunk",
        type=parse_size,
        default=None,
        help="stream chunk size (default: the library's, 4MiB for objects of 64MiB or more)",
    )
    p.add_argument(
        "--digest",
        choices=("both", "on", "off", "all"),
        default="both",
        help="run cases with the default whole-object digest (on: crc32c combined from the "
        "chunks'), without one (off), both, or all (both, and with BLAKE3 and SHA-256)",
    )
    p.add_argument(
        "--sign",
        action="store_true",
        help="also run each direct case with the digest signed end to end (-signed)",
    )
    args = p.parse_args()
    size = args.size or (QUICK_SIZE if args.quick else FULL_SIZE)
    cases = [c for c in args.cases.split(",") if c]
    for c in cases:
        if c not in CASES:
            p.error(f"unknown case {c!r}")
    digests: tuple[bool | str, ...] = {
        "both": (True, False),
        "on": (True,),
        "off": (False,),
        "all": (True, False, "blake3", "sha256"),
    }[args.digest]
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="stream-bench-") as tmp, ExitStack() as stack:
        base = Baseline(size)
        stack.callback(base.close)
        for c in cases:
            path, mode = c.rsplit("-", 1)
            scheme, tls = "tcp", ""
            if path.startswith("tls-"):  # a direct case over mutual TLS
                scheme, path, tls = "tls", path[4:], make_kits(tmp, relay=False)
            for digest in digests:
                suffix = f"-{digest}" if isinstance(digest, str) else "" if digest else "-nodigest"
                case = f"{scheme}-{path}-{size_name(size)}-{mode}{suffix}"
                log(f"{case}: {args.repeat} runs")
                run_case(
                    case, path, mode, size, digest, args.repeat, base, tmp, args.chunk, tls=tls
                )
                if args.sign and digest is True and not path.startswith("fanout") and not tls:
                    kits = make_kits(tmp, "relay" in path)
                    run_case(
                        f"{case}-signed",
                        path,
                        mode,
                        size,
                        True,
                        args.repeat,
                        base,
                        tmp,
                        args.chunk,
                        kits,
                    )
                if mode == "file":
                    disk = median([disk_write(tmp, min(size, 2 << 30)) for _ in range(3)])
                    emit("stream", f"{case}:disk", "write_throughput", disk, "B/s")
    log(f"done in {time.perf_counter() - started:.1f} s")


if __name__ == "__main__":
    main()
