"""Coverage-guided fuzzing of the wire decoders with atheris (issue 18).

Targets, each fed arbitrary bytes:

* ``wire``: :class:`~flare_async.wire.Connection` (``receive_data``, or ``get_buffer`` /
  ``buffer_updated`` the way a transport reads, with ``pass_through`` taking large frames) and
  ``next_event``, the bytes split at random points; before-hello limits widened after the first
  frame, small limits or the defaults; optionally an EOF at the end.
* ``hello``: the first frame of a link as an accepting and a connecting cell read it (header or
  whole frame under ``HELLO_LIMITS``, or a hello built field by field from values of any type),
  then ``check_hello`` for each role.
* ``stream``: stream headers (tags 20-25) as the cell decodes them (``decode_header`` into the
  ``Envelope`` union), raw or built field by field, then the flow control the cell applies to
  them (``negotiate``, ``ReceiverFlow``, ``SenderFlow``).
* ``wsframe``: the WebSocket frame-header check (``transport._ws_admit._FrameCheck``), checked
  against a reference reading of the same bytes.

Only :class:`~flare_async.errors.ProtocolError` (and its subclasses) may escape a decoder
(``LinkBroken`` from an EOF fed mid-frame, ``StreamCorrupted`` from the flow control: both
documented). Anything else, or a broken invariant, is a finding: its input (minimized) is written
to ``--crashes`` (default ``/tmp/flare-fuzz/crashes``) and counted; fuzzing goes on. Memory is
bounded: the bytes a connection holds stay within its limits on every input, a sampled input's
``tracemalloc`` peak and the process's max RSS growth stay under ``--memory-mib`` (256).

Each target runs in its own process (libFuzzer ends the process when its time is up).
``--seconds N``: seconds per target (default: 600 split across the targets; ``--quick``: 60).
Needs ``pip install -e '.[fuzz]'`` (atheris). Output: JSON lines (shared/BENCHMARKS.md).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import re
import resource
import subprocess
import sys
import time
import traceback
import tracemalloc
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

from _report import line, log, parser

TARGETS = ("wire", "hello", "stream", "wsframe")
TOTAL_SECONDS = 600
QUICK_SECONDS = 60
WORK = Path("/tmp/flare-fuzz")
MiB = 1 << 20


class Finding(Exception):
    """An invariant the decoder must keep was broken (not an exception it raised)."""


# ============================================================================ child: targets
def _child(target: str, seconds: int, crashes: Path, memory_mib: int) -> None:
    import atheris  # type: ignore[import-untyped,import-not-found,unused-ignore]  # noqa: PLC0415

    with atheris.instrument_imports(include=["flare_async"]):
        import msgspec  # noqa: PLC0415

        from flare_async.errors import (  # noqa: PLC0415
            LinkBroken,
            ProtocolError,
            StreamCorrupted,
        )
        from flare_async.streaming import ReceiverFlow, SenderFlow, negotiate  # noqa: PLC0415
        from flare_async.streaming._flow import MAX_WINDOW, MIN_CHUNK  # noqa: PLC0415
        from flare_async.transport import _ws_admit  # noqa: PLC0415
        from flare_async.wire import (  # noqa: PLC0415
            HELLO_BUFFER,
            HELLO_LIMITS,
            PREFIX_SIZE,
            STREAM_KINDS,
            Bye,
            Connection,
            Frame,
            Hello,
            Limits,
            Passing,
            Ping,
            Request,
            Routed,
            StreamAck,
            StreamData,
            StreamEnd,
            StreamOpen,
            check_hello,
            decode_frame,
            decode_header,
            encode_head,
            make_hello,
        )
        from flare_async.wire._envelope import Envelope  # noqa: PLC0415

    envelope_types = tuple(t for t in Envelope.__args__)
    small = Limits(max_header=1024, max_frame=64 * 1024, max_route=8)

    # ------------------------------------------------------------------ wire
    def wire(data: bytes) -> None:
        if len(data) < 2:
            return
        conf, seed, stream = data[0], data[1], data[2:]
        rng = random.Random(seed)
        kind = conf % 3
        limits = (HELLO_LIMITS, small, Limits())[kind]
        conn = Connection(limits, staging_size=HELLO_BUFFER if kind == 0 else 4096)
        use_buffer = bool(conf & 4)
        if conf & 8:
            use_buffer = True
            conn.pass_through = lambda _h, _n: True
        widened = kind != 0

        def drain() -> None:
            nonlocal widened
            lim = conn.limits
            while True:
                ev = conn.next_event()
                if not isinstance(ev, Frame):
                    break
                if not isinstance(ev.header, envelope_types):
                    raise Finding(f"header of type {type(ev.header).__name__}")
                size = ev.payload_len
                if size > lim.max_frame:
                    raise Finding(f"frame of {size} B past max_frame {lim.max_frame}")
                if isinstance(ev, Passing) and ev.owed < 0:
                    raise Finding("negative owed")
                h = ev.header
                if isinstance(h, Routed) and len(h.route) > lim.max_route:
                    raise Finding("route longer than max_route")
                if not widened:  # the cell widens after the hello
                    widened = True
                    conn.widen(small, 4096)
            bound = PREFIX_SIZE + conn.limits.max_header + conn.limits.max_frame
            if conn.statistics().buffered > max(bound, conn.buffer_size):
                raise Finding(f"{conn.statistics().buffered} B buffered, bound {bound}")

        pos = 0
        n = len(stream)
        while pos < n:
            if conn.passing:  # the transport moves the passing payload on itself
                take = min(conn.owed, n - pos)
                conn.passed(take)
                pos += take
                continue
            chunk = min(n - pos, rng.choice((1, 2, 3, 7, 16, 100, 4096, n)))
            if use_buffer:
                buf = conn.get_buffer()
                take = min(len(buf), chunk)
                buf[:take] = stream[pos : pos + take]
                conn.buffer_updated(take)
            else:
                take = chunk
                conn.receive_data(stream[pos : pos + take])
            pos += take
            drain()
        if conf & 16 and not conn.passing:
            try:
                conn.receive_data(b"")
            except LinkBroken:
                return
            drain()

    # ------------------------------------------------------------------ values
    def value(fdp: Any, want: str, depth: int = 0) -> object:
        """A value of the expected type most of the time, of any msgpack type otherwise."""
        pick = fdp.ConsumeIntInRange(0, 15)
        if pick >= 10:
            pick = {"int": 0, "float": 2, "str": 3, "list": 6, "bool": 5, "dict": 7, "opt": 8}[want]
        if pick == 0:
            return fdp.ConsumeIntInRange(-(2**63), 2**64 - 1)
        if pick == 1:
            return fdp.PickValueInList([0, -1, 1, 2**31, 2**63 - 1, 2**64 - 1, -(2**63)])
        if pick == 2:
            return fdp.ConsumeFloat()
        if pick == 3:
            return fdp.ConsumeUnicodeNoSurrogates(fdp.ConsumeIntInRange(0, 80))
        if pick == 4:
            return fdp.ConsumeBytes(fdp.ConsumeIntInRange(0, 16))
        if pick == 5:
            return fdp.ConsumeBool()
        if pick == 6 and depth < 3:
            return [value(fdp, "str", depth + 1) for _ in range(fdp.ConsumeIntInRange(0, 12))]
        if pick == 7 and depth < 3:
            k = fdp.ConsumeIntInRange(0, 4)
            return {
                fdp.ConsumeUnicodeNoSurrogates(8): value(fdp, "str", depth + 1) for _ in range(k)
            }
        if pick == 8 and want == "opt":
            return fdp.ConsumeFloat() if fdp.ConsumeBool() else None
        return None

    def build(fdp: Any, tag: int, fields: list[str]) -> bytes:
        items: list[object] = [tag if fdp.ConsumeIntInRange(0, 31) else value(fdp, "int")]
        items += [value(fdp, want) for want in fields]
        del items[len(items) - fdp.ConsumeIntInRange(0, 2) if fdp.ConsumeBool() else len(items) :]
        return msgspec.msgpack.encode(items)

    routed = ["int", "str", "str", "list", "opt", "dict"]

    # ------------------------------------------------------------------ hello
    hello_fields = ["str", "int", "int", "str", "list", "int", "int", "float"]
    locals_ = {
        "child": make_hello("server.eu", "parent", Limits()),
        "parent": make_hello("server.eu.site-1", "child", Limits()),
        "peer": make_hello("client.x", "peer", Limits()),
    }

    def hello(data: bytes) -> None:
        if not data:
            return
        mode, body = data[0] % 4, data[1:]
        if mode == 0:
            header = decode_header(body, HELLO_LIMITS)
        elif mode == 1:
            header, start = decode_frame(body, HELLO_LIMITS)
            if start != len(body):
                raise Finding("a hello frame with a payload passed HELLO_LIMITS")
        elif mode == 2:
            conn = Connection(HELLO_LIMITS, staging_size=HELLO_BUFFER)
            conn.receive_data(body)
            ev = conn.next_event()
            if not isinstance(ev, Frame):
                return
            header = ev.header
        else:
            fdp = atheris.FuzzedDataProvider(body)
            raw = build(fdp, 10, hello_fields)
            header = decode_header(raw, HELLO_LIMITS)
            if isinstance(header, Hello) and fdp.ConsumeBool():  # the same, framed
                frame = encode_head(header, 0, HELLO_LIMITS)
                if decode_frame(frame, HELLO_LIMITS)[0] != header:
                    raise Finding("a hello does not survive encode/decode")
        for expect, local in locals_.items():
            try:
                session = check_hello(local, header, expect=expect)  # type: ignore[arg-type,unused-ignore]
            except ProtocolError:
                continue
            if not session.peer_heartbeat >= 0 or session.peer_heartbeat == float("inf"):
                raise Finding(f"accepted heartbeat {session.peer_heartbeat}")
            if session.version < 1:
                raise Finding(f"accepted version {session.version}")

    # ------------------------------------------------------------------ stream
    stream_fields = {
        20: ["str", "str", "int", "int", "str", "str", "int", "int", "bool", "bool", "float"],
        21: ["int", "int", "int"],
        22: ["int", "int", "int", "int", "bool"],
        23: ["int", "int", "str"],
        24: ["int", "int", "str", "str"],
        25: ["int", "str", "int", "str"],
    }
    cell_limits = Limits()

    def stream(data: bytes) -> None:
        if not data:
            return
        fdp = atheris.FuzzedDataProvider(data)
        raw_mode = fdp.ConsumeIntInRange(0, 3) == 0
        receiver: Any = None
        sender = SenderFlow()
        sender.sent(fdp.ConsumeIntInRange(0, 1 << 20))
        sender.high = sender.next_offset
        for _ in range(16):
            if not fdp.remaining_bytes():
                return
            if raw_mode:
                raw = fdp.ConsumeBytes(fdp.ConsumeIntInRange(1, 400))
            else:
                tag = fdp.ConsumeIntInRange(20, 25)
                raw = build(fdp, tag, routed + stream_fields[tag])
            try:
                h = decode_header(raw, cell_limits)
            except ProtocolError:
                continue
            if not isinstance(h, STREAM_KINDS):
                continue
            try:
                if isinstance(h, StreamOpen):
                    chunk, window = negotiate(h.chunk, h.window, cell_limits.max_frame)
                    if not MIN_CHUNK <= chunk <= max(MIN_CHUNK, cell_limits.max_frame):
                        raise Finding(f"negotiated chunk {chunk}")
                    if not 2 * chunk <= window <= max(MAX_WINDOW, 2 * chunk):
                        raise Finding(f"negotiated window {window} for chunk {chunk}")
                    receiver = ReceiverFlow(window)
                elif isinstance(h, StreamData) and receiver is not None:
                    payload = fdp.ConsumeBytes(fdp.ConsumeIntInRange(0, 64))
                    receiver.on_data(h.offset, len(payload), zlib.crc32(payload) == h.crc)
                    if receiver.committed > receiver.limit:
                        raise Finding("receiver committed past its credit")
                elif isinstance(h, StreamEnd) and receiver is not None:
                    receiver.on_end(h.size)
                elif isinstance(h, StreamAck):
                    sender.on_ack(
                        h.committed, h.limit, chunk=h.chunk, window=h.window, resend=h.resend
                    )
                    if not 0 <= sender.committed <= sender.high:
                        raise Finding("sender committed past what it sent")
            except (ProtocolError, StreamCorrupted):
                continue

    # ------------------------------------------------------------------ wsframe
    class _Parser:
        def __init__(self) -> None:
            self.fed = bytearray()

        def feed_data(self, data: bytes) -> tuple[bool, bytes]:
            self.fed += data
            return False, b""

        def feed_eof(self) -> None:
            pass

    class _Admitted:
        def __init__(self, max_message: int | None) -> None:
            self.max_message = max_message
            self.violation: str | None = None

    def reference(buf: bytes, limit: int | None) -> tuple[int, bytes] | None:
        """Where the check must refuse (offset of the frame, the stand-in), by a plain read."""
        i, n, message = 0, len(buf), 0
        while i + 2 <= n:
            first, second = buf[i], buf[i + 1]
            short = second & 0x7F
            extra = {126: 2, 127: 8}.get(short, 0)
            size = 2 + extra + (4 if second & 0x80 else 0)
            if i + size > n:
                return None
            length = int.from_bytes(buf[i + 2 : i + 2 + extra], "big") if extra else short
            if not second & 0x80:
                return i, _ws_admit._UNMASKED
            if limit is not None and (first & 0x0F) <= 2:
                message += length
                if message > limit:
                    return i, _ws_admit._TOO_BIG
                if first & 0x80:
                    message = 0
            i += size + length
        return None

    def wsframe(data: bytes) -> None:
        if len(data) < 2:
            return
        limit = None if data[0] & 1 else (data[0] >> 1) * 64
        rng = random.Random(data[1])
        buf = data[2:]
        parser_ = _Parser()
        admitted = _Admitted(limit)
        check = _ws_admit._FrameCheck(parser_, admitted)  # type: ignore[arg-type,unused-ignore]
        pos = 0
        while pos < len(buf):
            take = rng.choice((1, 2, 3, 5, 9, 14, 64, len(buf)))
            check.feed_data(buf[pos : pos + take])
            pos += take
            if len(check._held) >= 14:
                raise Finding(f"{len(check._held)} B held for a frame header")
        check.feed_eof()
        want = reference(buf, limit)
        fed = bytes(parser_.fed)
        if want is None:
            if check._failed or admitted.violation is not None:
                raise Finding("refused a stream the reference accepts")
            if fed + check._held != buf:
                raise Finding("forwarded bytes differ from the input")
        else:
            at, refusal = want
            if not check._failed or admitted.violation is None:
                raise Finding(f"did not refuse at {at}")
            if not fed.startswith(buf[:at] + refusal):
                raise Finding(f"refusal not at the frame boundary {at}")

    funcs: dict[str, Callable[[bytes], None]] = {
        "wire": wire,
        "hello": hello,
        "stream": stream,
        "wsframe": wsframe,
    }
    fn = funcs[target]
    allowed: tuple[type[BaseException], ...] = (ProtocolError,)
    if target == "wire":
        allowed = (ProtocolError,)  # LinkBroken is caught at the EOF itself

    # ------------------------------------------------------------------ seeds
    corpus = WORK / "corpus" / target
    corpus.mkdir(parents=True, exist_ok=True)
    seeds: list[bytes] = []
    if target in ("wire", "hello"):
        envs: list[Any] = [
            make_hello("server.eu.site-1", "child", Limits(), heartbeat=5.0),
            Ping(seq=1),
            Bye(reason="bye"),
            Request(1, "a.b", "a", ["a.b"], 3.0, {"k": "v"}, "ch", "t"),
            StreamData(2, "a.b", "a", ["a.b"], None, {}, sid=1, offset=0, crc=0),
        ]
        frames = [encode_head(e, 0, Limits()) for e in envs]
        payload_frame = encode_head(envs[3], 300, Limits()) + bytes(range(256)) + bytes(44)
        for conf in range(32):
            seeds.append(bytes([conf, conf * 7 % 256]) + b"".join(frames) + payload_frame)
        if target == "hello":
            seeds = [bytes([m]) + f for m in range(4) for f in (frames[0], frames[0][PREFIX_SIZE:])]
    elif target == "stream":
        msgs: list[Any] = [
            StreamOpen(1, "a", "b", ["a"], None, {}, "c", "t", 1, 100, "", "", 4096, 8192),
            StreamData(2, "a", "b", ["a"], None, {}, sid=1, offset=0, crc=0),
            StreamEnd(3, "a", "b", ["a"], None, {}, sid=1, size=100, sha256=""),
        ]
        seeds = [b"\x00" + b"".join(bytes([len(m)]) + m for m in map(msgspec.msgpack.encode, msgs))]
    else:
        masked = b"\x82\x85" + b"\x01\x02\x03\x04" + b"hello"
        seeds = [bytes([c, 3]) + masked * 3 + b"\x89\x80abcd" for c in (0, 1, 5, 255)]
    for seed in seeds:
        (corpus / hashlib.sha1(seed).hexdigest()).write_bytes(seed)

    # ------------------------------------------------------------------ the loop
    stats: dict[str, Any] = {"execs": 0, "findings": 0, "kinds": {}, "tracemalloc_peak": 0}
    stats_path = WORK / f"{target}.stats.json"
    state = {"rss0": 0}
    deadline = time.monotonic() + seconds

    def key_of(exc: BaseException) -> str:
        tb = traceback.extract_tb(exc.__traceback__)
        where = f"{Path(tb[-1].filename).name}:{tb[-1].lineno}" if tb else "?"
        return f"{type(exc).__name__}@{where}"

    def run(data: bytes) -> str | None:
        try:
            fn(data)
        except allowed:
            return None
        except Exception as exc:
            return key_of(exc)
        return None

    def minimize(data: bytes, key: str) -> bytes:
        """Drop chunks while the same finding reproduces (at most 4,000 tries)."""
        tries, size = 0, max(1, len(data) // 2)
        while size >= 1 and tries < 4000:
            i, shrunk = 0, False
            while i < len(data) and tries < 4000:
                cand = data[:i] + data[i + size :]
                tries += 1
                if cand and run(cand) == key:
                    data, shrunk = cand, True
                else:
                    i += size
            if not shrunk:
                size //= 2
        return data

    def save() -> None:
        stats["max_rss"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        stats["rss_growth"] = stats["max_rss"] - state["rss0"] if state["rss0"] else 0
        stats_path.write_text(json.dumps(stats))

    def one_input(data: bytes) -> None:
        n = stats["execs"] = stats["execs"] + 1
        sample = n % 1000 == 0
        if sample:
            tracemalloc.start()
        key = run(data)
        if sample:
            peak = tracemalloc.get_traced_memory()[1]
            tracemalloc.stop()
            stats["tracemalloc_peak"] = max(stats["tracemalloc_peak"], peak)
            if peak > memory_mib * MiB:
                key = f"memory: tracemalloc peak {peak} B"
        if key is not None:
            stats["findings"] += 1
            kinds = stats["kinds"]
            if key not in kinds:
                small_input = minimize(data, key) if not key.startswith("memory") else data
                path = crashes / f"{target}-{hashlib.sha1(small_input).hexdigest()[:12]}"
                path.write_bytes(small_input)
                kinds[key] = {"count": 0, "input": str(path), "hex": small_input.hex()[:400]}
                log(f"[{target}] finding {key}: {path} ({len(small_input)} B)")
            kinds[key]["count"] += 1
        if n == 2000:
            state["rss0"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        if n % 4096 == 0:
            save()
            if stats["rss_growth"] > memory_mib * MiB:
                stats["kinds"]["memory: max RSS growth"] = {"count": 1, "input": ""}
                stats["findings"] += 1
                save()
                raise Finding(f"max RSS grew by {stats['rss_growth']} B")
            if time.monotonic() > deadline + 30:  # libFuzzer's own limit should have ended it
                save()
                os._exit(0)

    save()
    atheris.Setup(
        [
            sys.argv[0],
            f"-max_total_time={seconds}",
            "-print_final_stats=1",
            "-max_len=4096",
            "-timeout=20",
            "-rss_limit_mb=2048",
            f"-artifact_prefix={crashes}/{target}-libfuzzer-",
            str(corpus),
        ],
        one_input,
    )
    try:
        atheris.Fuzz()
    finally:
        save()


# ============================================================================ parent
def _run_target(target: str, seconds: int, crashes: Path, memory_mib: int) -> dict[str, Any]:
    log_path = WORK / f"{target}.log"
    stats_path = WORK / f"{target}.stats.json"
    stats_path.unlink(missing_ok=True)
    cmd = [sys.executable, __file__, "--child", target, "--seconds", str(seconds)]
    cmd += ["--crashes", str(crashes), "--memory-mib", str(memory_mib)]
    log(f"fuzz {target}: {seconds} s, log {log_path}")
    start = time.monotonic()
    with log_path.open("wb") as out:
        rc = subprocess.run(cmd, stdout=out, stderr=subprocess.STDOUT, check=False).returncode
    wall = time.monotonic() - start
    text = log_path.read_text(errors="replace")
    stats: dict[str, Any] = json.loads(stats_path.read_text()) if stats_path.exists() else {}
    result: dict[str, Any] = {"rc": rc, "wall": wall, **stats}
    if m := re.search(r"stat::number_of_executed_units:\s+(\d+)", text):
        result["execs"] = int(m.group(1))
    if m := re.search(r"stat::peak_rss_mb:\s+(\d+)", text):
        result["peak_rss"] = int(m.group(1)) * MiB
    covs = re.findall(r"#\d+\s+\w+\s+cov: (\d+) ft: (\d+)", text)
    if covs:
        result["cov"], result["ft"] = int(covs[-1][0]), int(covs[-1][1])
    if rc != 0 and not stats.get("findings"):
        result["findings"] = 1
        result.setdefault("kinds", {})[f"process exited {rc}"] = {"count": 1, "input": ""}
    return result


def main() -> int:
    p = parser(__doc__.splitlines()[0] if __doc__ else "fuzz")
    p.add_argument("--seconds", type=int, help="seconds per target")
    p.add_argument("--targets", default=",".join(TARGETS), help="comma-separated subset")
    p.add_argument("--crashes", type=Path, default=WORK / "crashes")
    p.add_argument("--memory-mib", type=int, default=256, help="memory bound per target")
    p.add_argument("--child", choices=TARGETS, help=argparse.SUPPRESS)
    args = p.parse_args()
    args.crashes.mkdir(parents=True, exist_ok=True)
    WORK.mkdir(parents=True, exist_ok=True)
    targets = [t for t in args.targets.split(",") if t]
    seconds = args.seconds or max(
        1, (QUICK_SECONDS if args.quick else TOTAL_SECONDS) // len(targets)
    )
    if args.child:
        _child(args.child, seconds, args.crashes, args.memory_mib)
        return 0
    try:
        import atheris  # type: ignore[import-untyped,import-not-found,unused-ignore]  # noqa: F401, PLC0415
    except ImportError:
        log("atheris is not installed: pip install -e '.[fuzz]'")
        return 2
    total = 0
    for target in targets:
        r = _run_target(target, seconds, args.crashes, args.memory_mib)
        findings = int(r.get("findings", 0))
        total += findings
        extra = {"seconds": seconds, "findings": findings, "cov": r.get("cov"), "ft": r.get("ft")}
        line(bench="fuzz", case=target, metric="execs", value=r.get("execs", 0), unit="execs",
             **extra)  # fmt: skip
        line(bench="fuzz", case=target, metric="findings", value=findings, unit="inputs",
             kinds=r.get("kinds", {}))  # fmt: skip
        if "cov" in r:
            line(bench="fuzz", case=target, metric="coverage", value=r["cov"], unit="edges",
                 features=r.get("ft"))  # fmt: skip
        if "peak_rss" in r:  # the whole process, imports included (unbounded here)
            line(bench="fuzz", case=target, metric="peak_rss", value=r["peak_rss"], unit="B")
        for metric in ("rss_growth", "tracemalloc_peak"):  # bounded by --memory-mib
            if metric in r:
                line(bench="fuzz", case=target, metric=metric, value=r[metric], unit="B",
                     bound=args.memory_mib * MiB)  # fmt: skip
    log(f"fuzz: {total} finding(s); inputs under {args.crashes}")
    return 1 if total else 0


if __name__ == "__main__":
    sys.exit(main())
