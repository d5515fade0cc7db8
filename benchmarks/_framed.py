"""The framed ceiling of ``stream.py``: the stream's bytes and integrity check in the plainest code.

Run as ``python _framed.py CONFIG_JSON``. A transfer is a run of frames, each an 8-byte header
(payload length and the payload's CRC-32C, little-endian ``u32`` each) and then the payload: the
one thing a stream adds on the wire that the raw-socket baseline lacks and no implementation may
drop (the issue asks for a per-chunk checksum). Blocking sockets, ``TCP_NODELAY``, no event
loop, no flow control, routing, headers or Python beyond a loop per frame: what this machine
allows for the stream's work itself, so that ``stream.py`` can tell how far the library is
from it. ``stream.py`` (``Ceiling``) starts them, and the raw relay below (``Baseline``).

Roles (``config["role"]``):

- ``framed_send``: the sending end. Makes ``min(size, 256 MiB)`` random bytes, then for each
  line ``go`` on its stdin dials ``port`` and sends ``size`` bytes as views of them in frames
  of ``chunk`` bytes (the CRC-32C of each chunk, then its header and the chunk in one
  ``sendmsg``), waits for the answer and prints ``{"seconds": S}``. A child rather than the
  benchmark process, so that the benchmark process stays small: a child inherits its
  parent's peak RSS (``ru_maxrss`` survives ``exec``), which would spoil every ``peak_rss``.

The three below serve one connection after another until they are killed:

- ``framed_recv``: reads frames until ``size`` payload bytes came, each payload into a fresh
  ``numpy.empty`` buffer as the library's receiver does, checks each CRC-32C, then answers one
  byte. Prints ``{"port": P}``.
- ``framed_relay``: for each inbound connection, dials ``next`` (a ``framed_recv`` port) and
  forwards each frame: the header read and written, the payload spliced socket -> pipe ->
  socket unread (as the library's relays do), then passes the receiver's answer back.
  Prints ``{"port": P}``.
- ``raw_relay``: the raw relay baseline, no frames at all: for each inbound connection, dials
  ``next`` (the baseline's ``raw_recv`` port, see ``_streambench.py``) and splices ``size``
  bytes socket -> pipe -> socket as they come (each ``splice`` takes what the 1 MiB pipe holds),
  then passes the receiver's answer back. With ``stream.py`` sending, three processes: the
  most a relay can do with these sockets on this machine. Prints ``{"port": P}``.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import socket
import struct
import sys
import time

import numpy as np
from _report import line

from flare_async.streaming import checksum

HEADER = struct.Struct("<II")


def fill(sock: socket.socket, view: memoryview) -> None:
    got = 0
    while got < len(view):
        n = sock.recv_into(view[got:])
        if not n:
            raise EOFError("peer closed the connection in the middle of a frame")
        got += n


def listen() -> socket.socket:
    srv = socket.create_server(("127.0.0.1", 0))
    line(port=srv.getsockname()[1])
    return srv


def nodelay(sock: socket.socket) -> socket.socket:
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def framed_recv(size: int) -> None:
    head = memoryview(bytearray(HEADER.size))
    with listen() as srv:
        while True:
            conn, _ = srv.accept()
            with nodelay(conn):
                got = 0
                while got < size:
                    fill(conn, head)
                    n, crc = HEADER.unpack(head)
                    payload = memoryview(np.empty(n, dtype=np.uint8))
                    fill(conn, payload)
                    if checksum(payload) != crc:
                        raise RuntimeError(f"CRC mismatch in the frame at {got}")
                    got += n
                conn.sendall(b"k")


def framed_relay(size: int, next_port: int) -> None:
    head = memoryview(bytearray(HEADER.size))
    r, w = pipe_pair()
    with listen() as srv:
        while True:
            up, _ = srv.accept()
            with nodelay(up), nodelay(socket.create_connection(("127.0.0.1", next_port))) as down:
                got = 0
                while got < size:
                    fill(up, head)
                    down.sendall(head)
                    n, _ = HEADER.unpack(head)
                    left = n
                    while left:
                        moved = os.splice(up.fileno(), w, left)
                        if not moved:
                            raise EOFError("sender closed the connection in a frame")
                        left -= moved
                        while moved:
                            moved -= os.splice(r, down.fileno(), moved)
                    got += n
                up.sendall(down.recv(1))


def pipe_pair() -> tuple[int, int]:
    """A blocking pipe as large as the system allows an unprivileged process (1 MiB)."""
    r, w = os.pipe()
    with contextlib.suppress(OSError):
        fcntl.fcntl(w, fcntl.F_SETPIPE_SZ, 1 << 20)
    return r, w


def raw_relay(size: int, next_port: int) -> None:
    r, w = pipe_pair()
    most = fcntl.fcntl(w, fcntl.F_GETPIPE_SZ)
    with listen() as srv:
        while True:
            up, _ = srv.accept()
            with nodelay(up), nodelay(socket.create_connection(("127.0.0.1", next_port))) as down:
                left = size
                while left:
                    moved = os.splice(up.fileno(), w, min(left, most))
                    if not moved:
                        raise EOFError("sender closed the connection early")
                    left -= moved
                    while moved:
                        moved -= os.splice(r, down.fileno(), moved)
                up.sendall(down.recv(1))


def framed_send(size: int, chunk: int, port: int) -> None:
    block = memoryview(np.random.default_rng(3).bytes(min(size, 256 << 20)))
    for command in sys.stdin:
        if command.strip() != "go":
            break
        with nodelay(socket.create_connection(("127.0.0.1", port))) as s:
            start = time.perf_counter()
            sent = 0
            while sent < size:
                off = sent % block.nbytes
                part = block[off : off + min(chunk, size - sent)]
                segments = [memoryview(HEADER.pack(part.nbytes, checksum(part))), part]
                while segments:  # a blocking sendmsg takes it all unless interrupted
                    n = s.sendmsg(segments)
                    while segments and n >= segments[0].nbytes:
                        n -= segments.pop(0).nbytes
                    if n:
                        segments[0] = segments[0][n:]
                sent += part.nbytes
            if s.recv(1) != b"k":
                raise RuntimeError("framed receiver did not answer")
            line(seconds=time.perf_counter() - start)


def main(argv: list[str]) -> int:
    cfg = json.loads(argv[1])
    role = cfg["role"]
    if role == "framed_send":
        framed_send(cfg["size"], cfg["chunk"], cfg["port"])
    elif role == "framed_relay":
        framed_relay(cfg["size"], cfg["next"])
    elif role == "raw_relay":
        raw_relay(cfg["size"], cfg["next"])
    else:
        framed_recv(cfg["size"])
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
