"""What TLS can carry on this machine: the ceiling for a stream over mutual TLS, without the
library.

Issue 20 asks a default stream over mTLS for 0.60 of raw tcp. This measures, in one run and
interleaved, two processes on loopback moving ``--size`` bytes in 4 MiB writes:

- ``raw``: blocking sockets, ``sendall`` / ``recv_into`` (the baseline);
- ``tls-socket``: Python's :class:`ssl.SSLSocket` on the same sockets (OpenSSL writes each
  16 KiB record to the socket itself: no copies in Python, one system call per record);
- ``tls-bio``: :class:`ssl.SSLObject` on memory BIOs, 256 KiB sealed per write and read per
  wakeup, as the library's ``tls://`` link does;

and, in this process, the cipher alone: AES-256-GCM (TLS 1.3's first suite, which Python 3.11's
``ssl`` cannot change) and AES-128-GCM (OpenSSL through ``cryptography``).

Each case reports its throughput against ``raw`` of the same round, and the CPU seconds per GiB
each end spent (``:sender``/``:receiver``, ``metric="cpu_per_gib"``). ``case:ceiling`` is what
TLS could reach with no copy beyond raw tcp's: each end's raw CPU plus one pass of the cipher,
the slower end setting the pace (both ends run at once, one core each).

    python benchmarks/tls_ceiling.py [--quick] [--size 1GiB] [--repeat 5]
"""

from __future__ import annotations

import datetime
import multiprocessing as mp
import os
import socket
import ssl
import tempfile
import time
from multiprocessing.connection import Connection
from pathlib import Path

from _report import emit, log, median, parser
from stream import parse_size, size_name

from flare_async.security import create_ca, issue_certificate, write_private_key

MODES = ("raw", "tls-socket", "tls-bio")
WRITE = 4 << 20
SEAL = 256 << 10
BLOCK = 1 << 20
"""Plaintext per cipher call: the bulk speed, without the per-call setup of ``cryptography``'s
API (a TLS record of 16 KiB costs OpenSSL no key setup of its own)."""


def make_cert(folder: Path) -> tuple[Path, Path]:
    """A server certificate for ``localhost`` from a throwaway project CA (the project's own
    PKI), written as a chain (certificate, then the CA: what clients trust) and its key."""
    now = datetime.datetime.now(datetime.UTC)
    ca = create_ca("tls_ceiling CA", now=now)
    server = issue_certificate(ca, "server", "server", now=now, hosts=["localhost"])
    chain, key = folder / "chain.pem", folder / "key.pem"
    chain.write_bytes(server.certificate_pem() + ca.certificate_pem())
    write_private_key(key, server.private_key)
    return chain, key


def _bio_handshake(
    sock: socket.socket, tls: ssl.SSLObject, inc: ssl.MemoryBIO, out: ssl.MemoryBIO
) -> None:
    while True:
        try:
            tls.do_handshake()
            break
        except ssl.SSLWantReadError:
            if out.pending:
                sock.sendall(out.read())
            data = sock.recv(65536)
            if not data:
                raise ConnectionError("peer closed during the handshake") from None
            inc.write(data)
    if out.pending:
        sock.sendall(out.read())


def receiver(mode: str, size: int, cert: Path, key: Path, pipe: Connection) -> None:
    """Accept one connection, take ``size`` bytes, answer one byte; report CPU seconds."""
    listener = socket.create_server(("127.0.0.1", 0))
    pipe.send(listener.getsockname()[1])
    sock, _ = listener.accept()
    listener.close()
    buf = memoryview(bytearray(WRITE))
    got = 0
    start = 0.0
    if mode in {"tls-socket", "tls-bio"}:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(cert, key)
    if mode == "raw":
        start = time.process_time()
        while got < size:
            got += sock.recv_into(buf)
        sock.sendall(b"k")
    elif mode == "tls-socket":
        tsock = ctx.wrap_socket(sock, server_side=True)
        start = time.process_time()
        while got < size:
            got += tsock.recv_into(buf)
        tsock.sendall(b"k")
        sock = tsock
    else:
        inc, out = ssl.MemoryBIO(), ssl.MemoryBIO()
        tls = ctx.wrap_bio(inc, out, server_side=True)
        _bio_handshake(sock, tls, inc, out)
        read = memoryview(bytearray(SEAL))
        start = time.process_time()
        while got < size:
            n = sock.recv_into(read)
            if not n:
                raise ConnectionError("peer closed early")
            inc.write(read[:n])
            try:
                while got < size:
                    got += tls.read(WRITE, buf)
            except ssl.SSLWantReadError:
                pass
        tls.write(b"k")
        sock.sendall(out.read())
    cpu = time.process_time() - start
    pipe.send(cpu)
    sock.close()


def sender(mode: str, size: int, port: int, cert: Path) -> tuple[float, float]:
    """Send ``size`` bytes to the receiver on ``port``: (seconds, CPU seconds)."""
    sock = socket.create_connection(("127.0.0.1", port))
    data = memoryview(os.urandom(WRITE))
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.load_verify_locations(cert)
    sent = 0
    if mode == "raw":
        t0, c0 = time.perf_counter(), time.process_time()
        while sent < size:
            sock.sendall(data)
            sent += WRITE
        assert sock.recv(1) == b"k"
    elif mode == "tls-socket":
        tsock = ctx.wrap_socket(sock, server_hostname="localhost")
        t0, c0 = time.perf_counter(), time.process_time()
        while sent < size:
            tsock.sendall(data)
            sent += WRITE
        assert tsock.recv(1) == b"k"
        sock = tsock
    else:
        inc, out = ssl.MemoryBIO(), ssl.MemoryBIO()
        tls = ctx.wrap_bio(inc, out, server_hostname="localhost")
        _bio_handshake(sock, tls, inc, out)
        t0, c0 = time.perf_counter(), time.process_time()
        while sent < size:
            for i in range(0, WRITE, SEAL):
                tls.write(data[i : i + SEAL])
                sock.sendall(out.read())
            sent += WRITE
        while True:
            try:
                assert tls.read(1) == b"k"
                break
            except ssl.SSLWantReadError:
                inc.write(sock.recv(65536))
    elapsed, cpu = time.perf_counter() - t0, time.process_time() - c0
    sock.close()
    return elapsed, cpu


def one(mode: str, size: int, cert: Path, key: Path) -> tuple[float, float, float]:
    """One transfer: (B/s, sender CPU s, receiver CPU s)."""
    mine, theirs = mp.Pipe()
    proc = mp.Process(target=receiver, args=(mode, size, cert, key, theirs))
    proc.start()
    try:
        elapsed, cpu = sender(mode, size, mine.recv(), cert)
        their_cpu = mine.recv()
    finally:
        proc.join(30)
    return size / elapsed, cpu, their_cpu


def cipher_seconds_per_gib(bits: int, total: int) -> float:
    """CPU seconds AES-GCM takes to seal one GiB (OpenSSL through ``cryptography``, one core)."""
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM  # noqa: PLC0415

    aead = AESGCM(os.urandom(bits // 8))
    block = os.urandom(BLOCK)
    nonce = os.urandom(12)
    sealed = bytearray(BLOCK + 16)  # the block and its tag, written in place
    start = time.process_time()
    for _ in range(total // BLOCK):
        aead.encrypt_into(nonce, block, None, sealed)
    return (time.process_time() - start) * (1 << 30) / total


def main() -> None:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--size", type=parse_size, default=1 << 30, help="bytes per transfer")
    args = p.parse_args()
    size = 128 << 20 if args.quick else args.size
    repeat = 2 if args.quick else args.repeat
    mp.set_start_method("spawn", force=True)
    with tempfile.TemporaryDirectory() as tmp:
        cert, key = make_cert(Path(tmp))
        runs: dict[str, list[tuple[float, float, float]]] = {m: [] for m in MODES}
        loads = [os.getloadavg()[0]]
        for i in range(repeat):
            for mode in MODES:
                runs[mode].append(one(mode, size, cert, key))
                log(f"round {i + 1}/{repeat} {mode}: {runs[mode][-1][0] / 1e9:.2f} GB/s")
            loads.append(os.getloadavg()[0])
    aes256 = median([cipher_seconds_per_gib(256, 256 << 20) for _ in range(5)])
    aes128 = median([cipher_seconds_per_gib(128, 256 << 20) for _ in range(5)])
    gib = (1 << 30) / size
    raw = median([r[0] for r in runs["raw"]])
    tag = size_name(size)
    for mode in MODES:
        rate = median([r[0] for r in runs[mode]])
        emit("tls_ceiling", f"{mode}-{tag}", "throughput", rate, "B/s", baseline=raw)
        for end, k in (("sender", 1), ("receiver", 2)):
            cpu = median([r[k] for r in runs[mode]]) * gib
            emit("tls_ceiling", f"{mode}-{tag}:{end}", "cpu_per_gib", cpu, "s")
    raw_send = median([r[1] for r in runs["raw"]]) * gib
    raw_recv = median([r[2] for r in runs["raw"]]) * gib
    for bits, cipher in ((256, aes256), (128, aes128)):
        emit("tls_ceiling", f"aes{bits}gcm", "cpu_per_gib", cipher, "s")
        # Each end on its own core: the slower end (raw CPU + one cipher pass) sets the pace,
        # and no more than raw's own rate.
        ceiling = min(raw, (1 << 30) / (max(raw_send, raw_recv) + cipher))
        emit("tls_ceiling", f"ceiling-aes{bits}-{tag}", "throughput", ceiling, "B/s", baseline=raw)
    emit("tls_ceiling", "load", "loadavg_1m", max(loads), "procs")


if __name__ == "__main__":
    main()
