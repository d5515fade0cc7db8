"""A model crossing between a job's own process and the server (``flare_async.fl._jobproc``).

On a deployment each round's model goes from the job process to the server (the task) and its
sum comes back, over a socket pair in the job-process frames. Case ``model-<size>``: a child
process sends an ``FLModel`` of ``size`` (8 float32 tensors) as ``model_parts`` in one frame;
the parent reads it with ``Channel.receive`` and decodes it (``model_from_parts``). Time from
the child's first byte to the decoded model in the parent.

``baseline``: the same tensors' bytes from a child process over a socket pair with
``sendall``, read with blocking ``recv_into`` into one buffer allocated and written before the
clock starts (no framing, no decoding, no event loop; socket buffers sized before the clock
too), measured interleaved in the same run.

Run: ``python benchmarks/jobproc.py [--quick] [--repeat N]`` (1 GiB; ``--quick``: 128 MiB).
"""

from __future__ import annotations

import os
import socket
import sys
import time

import anyio
import anyio.abc
import numpy as np
from _report import emit, log, median, parser, run_async

from flare_async.fl import FLModel
from flare_async.fl._jobchannel import SOCKET_BUFFER, Channel
from flare_async.fl._jobproc import CODECS
from flare_async.fl._model import model_from_parts, model_parts

TENSORS = 8


def model_of(size: int) -> FLModel:
    n = size // 4 // TENSORS
    return FLModel(params={f"t{i}": np.full(n, i, np.float32) for i in range(TENSORS)})


def model_bytes(size: int) -> int:
    return size // 4 // TENSORS * 4 * TENSORS


async def child(fd: int, size: int, mode: str) -> None:
    sock = socket.socket(fileno=fd)
    model = model_of(size)  # real pages, written: neither side reads the shared zero page
    if mode == "raw":
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SOCKET_BUFFER)
    sock.sendall(b"r")  # ready: the parent starts its clock and says go
    if sock.recv(1) != b"g":
        raise SystemExit("no go")
    if mode == "raw":
        for array in model.params.values():
            sock.sendall(memoryview(array).cast("B"))
        sock.close()
        return
    channel = Channel(sock)
    await channel.send({"op": "round"}, model_parts(model, CODECS))
    await channel.aclose()


async def once(size: int, mode: str) -> float:
    ours, theirs = socket.socketpair()
    argv = [sys.executable, __file__, "--child", str(theirs.fileno()), str(size), mode]
    proc = await anyio.open_process(argv, pass_fds=[theirs.fileno()], stdout=None, stderr=None)
    theirs.close()
    try:
        if mode == "raw":  # set up before the clock starts: socket buffer, written buffer
            ours.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, SOCKET_BUFFER)
            buf = memoryview(bytearray(b"\1" * model_bytes(size)))
        if ours.recv(1) != b"r":  # the child has started and built its model
            raise SystemExit("the child did not start")
        start = time.perf_counter()
        ours.sendall(b"g")
        if mode == "raw":
            got = 0
            while got < buf.nbytes:
                got += ours.recv_into(buf[got:])
            elapsed = time.perf_counter() - start
            ours.close()
            if got != model_bytes(size):
                raise SystemExit("the raw bytes did not arrive whole")
        else:
            channel = Channel(ours)
            _, body = await channel.receive()
            model = model_from_parts(body)
            elapsed = time.perf_counter() - start
            if sum(np.asarray(v).nbytes for v in model.params.values()) != model_bytes(size):
                raise SystemExit("the model did not arrive whole")
            await channel.aclose()
    finally:
        await proc.wait()
    return model_bytes(size) / elapsed


async def main() -> None:
    args = parser(__doc__.split("\n\n")[0]).parse_args()
    size = 128 * 2**20 if args.quick else 2**30
    rates, bases = [], []
    for rep in range(args.repeat):
        bases.append(await once(size, "raw"))
        rates.append(await once(size, "channel"))
        log(f"#{rep}: {rates[-1] / 1e9:.2f} GB/s (raw socket pair {bases[-1] / 1e9:.2f} GB/s)")
    emit(
        "jobproc",
        f"model-{size >> 20}MiB",
        "throughput",
        median(rates),
        "B/s",
        baseline=median(bases),
    )
    log(f"load average (1 min): {os.getloadavg()[0]:.2f} on {os.cpu_count()} cores")


if __name__ == "__main__":
    if len(sys.argv) == 5 and sys.argv[1] == "--child":
        anyio.run(child, int(sys.argv[2]), int(sys.argv[3]), sys.argv[4])
    else:
        run_async(main)
