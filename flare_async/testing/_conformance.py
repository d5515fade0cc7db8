"""The driver conformance suite: what every :class:`~flare_async.transport.Link` must do.

Modelled on trio's ``check_two_way_stream``. A driver's tests provide a factory of connected
link pairs and call :func:`check_link_conformance` (or the single checks, one test each)::

    @asynccontextmanager
    async def tcp_pair():
        ...
        yield client_link, server_link

    async def test_tcp_conformance():
        await check_link_conformance(tcp_pair, break_link=reset_connection)

The checks use no sleeps: blocking is detected with ``anyio.wait_all_tasks_blocked``.
"""

from __future__ import annotations

import struct
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager

import anyio
import anyio.lowlevel

from flare_async.errors import FrameTooLarge, LinkBroken, LinkClosed
from flare_async.transport import Driver, Link, PushDelivery
from flare_async.wire import Event, Frame, Limits

LinkPairFactory = Callable[[], AbstractAsyncContextManager[tuple[Link, Link]]]
BreakLink = Callable[[Link], Awaitable[None]]


def _frame(seq: int, payload: tuple[bytes | bytearray | memoryview, ...] = ()) -> Frame:
    header = Event(
        id=seq, src="a", dst="b", route=["a"], budget=None, headers={}, channel="c", topic="t"
    )
    return Frame(header, payload)


def _pattern(seq: int, size: int) -> bytes:
    """Bytes that differ per frame and per position, so corruption or mixing shows."""
    stamp = struct.pack(">Q", seq)
    return (stamp * (size // 8 + 1))[:size]


def _body(frame: Frame) -> bytes:
    return b"".join(bytes(p) for p in frame.parts)


def _seq(frame: Frame) -> int:
    header = frame.header
    assert isinstance(header, Event), f"unexpected header {header!r}"
    return header.id


async def check_ordering(make_pair: LinkPairFactory, count: int = 300) -> None:
    """Frames arrive in order and intact, in both directions at once."""
    async with make_pair() as (a, b):

        async def pump(src: Link, dst: Link) -> None:
            async def send_all() -> None:
                for i in range(count):
                    await src.send(_frame(i, (_pattern(i, i % 97),)))

            async with anyio.create_task_group() as tg:
                tg.start_soon(send_all)
                for i in range(count):
                    frame = await dst.receive()
                    assert _seq(frame) == i, f"frame {_seq(frame)} arrived where {i} was due"
                    assert _body(frame) == _pattern(i, i % 97), f"frame {i} payload corrupted"

        async with anyio.create_task_group() as tg:
            tg.start_soon(pump, a, b)
            tg.start_soon(pump, b, a)


async def check_large_frames(make_pair: LinkPairFactory, size: int = 8 * 1024 * 1024) -> None:
    """A multi-part payload of ``size`` bytes and an empty one both arrive intact."""
    async with make_pair() as (a, b):
        data = _pattern(7, size)
        third = size // 3
        parts = (memoryview(data)[:third], data[third : 2 * third], bytearray(data[2 * third :]))

        async with anyio.create_task_group() as tg:
            tg.start_soon(a.send, _frame(1, parts))
            big = await b.receive()
        assert _seq(big) == 1
        assert _body(big) == data, "large payload corrupted"
        await b.send(_frame(2))
        empty = await a.receive()
        assert _seq(empty) == 2
        assert _body(empty) == b""


async def check_frame_too_large(make_pair: LinkPairFactory) -> None:
    """A frame over the peer's limit is refused before sending; the link stays usable."""
    async with make_pair() as (a, b):
        a.peer_limits = Limits(max_frame=1024)
        try:
            await a.send(_frame(1, (bytes(2048),)))
        except FrameTooLarge:
            pass
        else:
            raise AssertionError("an oversize frame was sent")
        await a.send(_frame(2, (bytes(1024),)))
        frame = await b.receive()
        assert _seq(frame) == 2, "the refused frame reached the peer"


async def check_close_vs_broken(
    make_pair: LinkPairFactory, break_link: BreakLink | None = None
) -> None:
    """An orderly close delivers what was sent, then ``LinkClosed``; a break is ``LinkBroken``."""
    async with make_pair() as (a, b):
        for i in range(3):
            await a.send(_frame(i, (_pattern(i, 100),)))
        await a.aclose()
        await a.aclose()  # idempotent
        for i in range(3):
            assert _seq(await b.receive()) == i, "frames sent before close were lost"
        for op in (b.receive, a.receive):
            try:
                await op()
            except LinkClosed:
                pass
            else:
                raise AssertionError("receive after close did not raise LinkClosed")
        try:
            await a.send(_frame(9))
        except LinkClosed:
            pass
        else:
            raise AssertionError("send after our own close did not raise LinkClosed")
    if break_link is None:
        return
    async with make_pair() as (a, b):
        await break_link(a)
        try:
            while True:
                await b.receive()
        except LinkBroken:
            pass
        except LinkClosed as exc:
            raise AssertionError("a broken link was reported as closed on purpose") from exc


async def check_eof_wakes_receiver(make_pair: LinkPairFactory) -> None:
    """A receiver blocked on an idle link wakes with ``LinkClosed`` when the peer closes."""
    async with make_pair() as (a, b):
        outcome: list[BaseException] = []

        async def wait_for_frame() -> None:
            try:
                await b.receive()
            except LinkClosed as exc:
                outcome.append(exc)

        async with anyio.create_task_group() as tg:
            tg.start_soon(wait_for_frame)
            await anyio.wait_all_tasks_blocked()
            await a.aclose()
        assert outcome, "the blocked receiver did not see LinkClosed"


async def check_cancel_mid_send(make_pair: LinkPairFactory, frame_size: int = 256 * 1024) -> None:
    """Cancelling a send blocked on backpressure never corrupts the stream of frames, and
    never breaks the link: the frame goes whole or not at all, and the link carries on (one
    task giving up its send must not take the link away from every other task using it)."""
    async with make_pair() as (a, b):
        sent = 0
        flood_over = anyio.Event()

        async def flood(scope_ready: anyio.Event, holder: list[anyio.CancelScope]) -> None:
            nonlocal sent
            with anyio.CancelScope() as scope:
                holder.append(scope)
                scope_ready.set()
                while True:
                    await a.send(_frame(sent, (_pattern(sent, frame_size),)))
                    sent += 1
                    await anyio.lowlevel.checkpoint()  # a send with room may not be one
            flood_over.set()

        expected = 0

        async def read_until_marker() -> None:
            nonlocal expected
            while True:
                frame = await b.receive()
                seq = _seq(frame)
                if seq == 1_000_000:
                    assert _body(frame) == _pattern(1_000_000, frame_size), "marker corrupted"
                    return
                assert seq == expected, f"frame {seq} arrived where {expected} was due"
                assert _body(frame) == _pattern(seq, frame_size), f"frame {seq} corrupted"
                expected += 1

        holder: list[anyio.CancelScope] = []
        ready = anyio.Event()
        async with anyio.create_task_group() as tg:
            tg.start_soon(flood, ready, holder)
            await ready.wait()
            await anyio.wait_all_tasks_blocked()  # the flood is stuck on backpressure
            holder[0].cancel()
            tg.start_soon(read_until_marker)  # the peer reads on, as peers do
            await flood_over.wait()
            assert sent > 0, "the link accepted no frame at all"
            # A marker as big as the flood's frames, so that it must wait for room too: a
            # driver whose cancelled send left shared state broken fails here.
            await a.send(_frame(1_000_000, (_pattern(1_000_000, frame_size),)))
        # The cancelled frame was delivered whole or not at all.
        assert expected in (sent, sent + 1), f"{expected} frames arrived, {sent} were sent"


async def check_try_send(make_pair: LinkPairFactory, count: int = 200) -> None:
    """``try_send`` never blocks and never reorders: frames sent by ``try_send`` (when it
    returns True) and by ``send`` (otherwise) arrive in order and intact; on a closed link it
    never claims to have sent (it raises ``LinkClosed`` or returns False, and ``send`` raises)."""
    async with make_pair() as (a, b):

        async def send_all() -> None:
            for i in range(count):
                frame = _frame(i, (_pattern(i, (i * 37) % 3000),))
                if not a.try_send(frame):
                    await a.send(frame)

        async with anyio.create_task_group() as tg:
            tg.start_soon(send_all)
            for i in range(count):
                frame = await b.receive()
                assert _seq(frame) == i, f"frame {_seq(frame)} arrived where {i} was due"
                assert _body(frame) == _pattern(i, (i * 37) % 3000), f"frame {i} corrupted"
        await a.aclose()
        try:
            sent = a.try_send(_frame(count))
        except LinkClosed:
            sent = False
        assert not sent, "try_send on a closed link claimed to have sent a frame"


async def check_deliver_to(make_pair: LinkPairFactory, count: int = 400) -> None:
    """A link that hands frames to a callback (``PushDelivery.deliver_to``) keeps them in order and
    hands each out once: a declined frame and those after it come from ``receive()`` until
    nothing is queued, then the callback gets frames again. An exception from the callback
    ends the link: ``receive()`` raises it. (Passes at once for links that never deliver so.)"""
    async with make_pair() as (a, b):
        log: list[tuple[str, int]] = []
        all_seen = anyio.Event()

        def note(how: str, frame: Frame) -> None:
            log.append((how, _seq(frame)))
            assert _body(frame) == _pattern(_seq(frame), _seq(frame) % 200), "payload corrupted"
            if len(log) == count:
                all_seen.set()

        def on_frame(frame: Frame) -> bool:
            if _seq(frame) % 7 == 3:
                return False  # e.g. a frame that must wait to be forwarded
            note("push", frame)
            return True

        if not isinstance(b, PushDelivery) or not b.deliver_to(on_frame):
            return

        async def send_all() -> None:
            for i in range(count):
                await a.send(_frame(i, (_pattern(i, i % 200),)))
                await anyio.lowlevel.checkpoint()  # a few frames per read, not all in one

        async def receive_all() -> None:
            while True:
                frame = await b.receive()
                if _seq(frame) % 7 == 3:
                    # Handling a declined frame takes a while (a forward waiting for room):
                    # the link's read callback runs meanwhile and must push nothing before
                    # this one is done.
                    for _ in range(5):
                        await anyio.lowlevel.checkpoint()
                note("receive", frame)

        async with anyio.create_task_group() as tg:
            tg.start_soon(send_all)
            tg.start_soon(receive_all)
            await all_seen.wait()
            tg.cancel_scope.cancel()
        assert [seq for _, seq in log] == list(range(count)), "frames reordered or repeated"
        assert all(how == "receive" for how, seq in log if seq % 7 == 3)
        assert any(how == "push" for how, _ in log), "deliver_to returned True but never pushed"

        class Boom(Exception):
            pass

        def explode(frame: Frame) -> bool:
            raise Boom

        b.deliver_to(explode)
        await a.send(_frame(count))
        try:
            await b.receive()
        except Boom:
            pass
        else:
            raise AssertionError("an exception from the callback did not end receive()")


CONFORMANCE_CHECKS = (
    check_ordering,
    check_large_frames,
    check_frame_too_large,
    check_close_vs_broken,
    check_eof_wakes_receiver,
    check_cancel_mid_send,
    check_try_send,
    check_deliver_to,
)


async def run_check(
    check: Callable[..., Awaitable[None]],
    make_pair: LinkPairFactory,
    break_link: BreakLink | None = None,
) -> None:
    """Run one check of :data:`CONFORMANCE_CHECKS` (giving ``break_link`` to the one that
    needs it)."""
    if check is check_close_vs_broken:
        await check_close_vs_broken(make_pair, break_link)
    else:
        await check(make_pair)


async def check_link_conformance(
    make_pair: LinkPairFactory, *, break_link: BreakLink | None = None
) -> None:
    """Run every check against ``make_pair``'s links."""
    for check in CONFORMANCE_CHECKS:
        await run_check(check, make_pair, break_link)


def driver_pair(
    driver: Driver,
    listen_url: str,
    *,
    limits: Limits | None = None,
    connector: Driver | None = None,
    server_first: bool = False,
) -> LinkPairFactory:
    """A factory of connected link pairs made by a real driver: it listens on ``listen_url``,
    connects to the URL the listener reports (so ``:0`` ports work) while accepting, and closes
    both links and the listener afterwards.

    Args:
        connector: the driver that connects, when it is not ``driver`` (other TLS settings).
        server_first: yield ``(accepted, connected)`` instead of ``(connected, accepted)``.
    """
    lim = limits or Limits()

    @asynccontextmanager
    async def make_pair() -> AsyncIterator[tuple[Link, Link]]:
        listener = await driver.listen(listen_url, limits=lim)
        try:
            accepted: list[Link] = []

            async def accept() -> None:
                accepted.append(await listener.accept())

            async with anyio.create_task_group() as tg:
                tg.start_soon(accept)
                client = await (connector or driver).connect(listener.url, limits=lim)
            server = accepted[0]
            try:
                yield (server, client) if server_first else (client, server)
            finally:
                # Close both before waiting: a closing handshake may need the other's close.
                await client.aclose()
                await server.aclose()
                for link in (client, server):
                    wait_closed = getattr(link, "wait_closed", None)
                    if wait_closed is not None:
                        await wait_closed()
        finally:
            await listener.aclose()

    return make_pair
