"""Small objects sent whole in one request (``cell/_inline.py``): the same handler, the same
bytes and digests as a stream, in two frames; refusals and damage named as for a stream."""

from __future__ import annotations

from contextlib import AsyncExitStack
from pathlib import Path

import anyio
import anyio.lowlevel
import blake3
import msgspec
import pytest

from flare_async import Cell, Context, HandlerTable, IncomingStream, MemoryNetwork, Payload
from flare_async.cell import INLINE_MAX, InlineStream
from flare_async.cell._inline import INLINE_HEADER, InlineInfo
from flare_async.cell._stream_api import LISTED_MAX, PARK_TOPIC, FanoutRequest
from flare_async.cell._system import PARKED_LISTS, PARKED_NAMES
from flare_async.errors import (
    BadRequest,
    ConfigError,
    NoHandler,
    Overloaded,
    StreamCorrupted,
    Unauthorized,
)
from flare_async.wire import Limits
from tests.streaming.test_streams import pattern

pytestmark = pytest.mark.anyio


@pytest.fixture(params=["asyncio", "trio"])
def anyio_backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)  # real clocks: save() writes in a worker thread


class Seen:
    def __init__(self) -> None:
        self.streams: list[IncomingStream] = []
        self.data: list[bytes] = []
        self.hold = anyio.Event()
        self.hold.set()
        self.entered = 0


def table(seen: Seen, tmp: Path | None = None) -> HandlerTable:
    t = HandlerTable("inline tests")

    @t.stream("t", "sink")
    async def sink(ctx: Context, stream: IncomingStream) -> bytes:
        seen.entered += 1
        await seen.hold.wait()
        seen.streams.append(stream)
        data = bytes(await stream.read_joined())
        seen.data.append(data)
        return f"{len(data)} {stream.digest} {stream.origin}".encode()

    @t.stream("t", "save")
    async def save(ctx: Context, stream: IncomingStream) -> bytes:
        assert tmp is not None
        n = await stream.save(tmp / "obj.bin", durable=True)
        return str(n).encode()

    @t.stream("t", "signed")
    async def signed(ctx: Context, stream: IncomingStream) -> bytes:
        await stream.read_all()
        return msgspec.json.encode([stream.digest, stream.digest_computed, stream.trailer])

    @t.request("t", "plain")
    async def plain(ctx: Context, msg: Payload) -> bytes:
        return b"request"

    return t


async def pair(
    stack: AsyncExitStack, net: MemoryNetwork, seen: Seen, **edge: object
) -> tuple[Cell, Cell]:
    server = await stack.enter_async_context(
        Cell("server", listen=["memory://server"], drivers=[net])
    )
    site = await stack.enter_async_context(
        Cell(
            "server.site",
            parent="memory://server",
            drivers=[net],
            handlers=[table(seen, edge.pop("tmp", None))],  # type: ignore[arg-type]
            **edge,  # type: ignore[arg-type]
        )
    )
    await site.wait_parent()
    return server, site


async def test_a_small_object_travels_in_two_frames_and_reads_as_a_stream() -> None:
    net, seen = MemoryNetwork(), Seen()
    data = pattern(1000, seed=1)
    async with AsyncExitStack() as stack:
        server, site = await pair(stack, net, seen)
        before = net.statistics().frames_sent
        reply = await server.stream(
            "server.site", "t", "sink", [data[:10], data[10:]], headers={"sig.value": "app's"}
        )
        assert net.statistics().frames_sent - before == 2  # the request and its reply
        stream = seen.streams[0]
        assert isinstance(stream, InlineStream)
        assert seen.data == [data]
        assert stream.headers == {"sig.value": "app's"}  # the object's, apart from the request's
        assert stream.size == stream.received == len(data)
        assert stream.finished
        assert stream.digest.startswith("crc32c:")  # the default
        assert stream.digest_computed
        assert reply.tobytes() == f"{len(data)} {stream.digest} server".encode()
        assert server.statistics().streams.inline_sent == 1
        assert site.statistics().streams.inline_received == 1
        assert server.statistics().streams.sent == 0


@pytest.mark.parametrize(
    ("size", "inline", "inlined"),
    [
        (0, None, True),  # an empty object goes whole too
        (INLINE_MAX, None, True),  # the default limit is inclusive
        (INLINE_MAX + 1, None, False),
        (100, 0, False),  # 0: always stream
        (100, 99, False),
        (100, 100, True),
    ],
)
async def test_the_limit_is_chosen_per_call_and_both_paths_deliver_the_same(
    size: int, inline: int | None, inlined: bool
) -> None:
    net, seen = MemoryNetwork(), Seen()
    data = pattern(size, seed=size)
    async with AsyncExitStack() as stack:
        server, _ = await pair(stack, net, seen)
        before = net.statistics().frames_sent
        reply = await server.stream("server.site", "t", "sink", data, inline=inline)
        frames = net.statistics().frames_sent - before
        assert isinstance(seen.streams[0], InlineStream) is inlined
        assert (frames == 2) is inlined
        assert frames >= 2
        assert seen.data == [data]
        # the same digest either way: the whole object's CRC-32C
        assert reply.tobytes().split()[1].decode() == seen.streams[0].digest
        assert server.statistics().streams.inline_sent == int(inlined)


async def test_the_cell_default_can_change_while_it_runs_and_is_checked() -> None:
    net, seen = MemoryNetwork(), Seen()
    async with AsyncExitStack() as stack:
        server, _ = await pair(stack, net, seen)
        server.inline_max = 0
        await server.stream("server.site", "t", "sink", b"tiny")
        assert not isinstance(seen.streams[0], InlineStream)
    with pytest.raises(ConfigError, match="inline_max"):
        Cell("x", inline_max=-1)


async def test_save_writes_an_inline_object_to_its_file(tmp_path: Path) -> None:
    net, seen = MemoryNetwork(), Seen()
    async with AsyncExitStack() as stack:
        server, _ = await pair(stack, net, seen, tmp=tmp_path)
        reply = await server.stream("server.site", "t", "save", [b"abc", b"def"])
    assert reply.tobytes() == b"6"
    assert (tmp_path / "obj.bin").read_bytes() == b"abcdef"
    assert not (tmp_path / "obj.bin.part").exists()


async def test_a_seal_and_a_known_digest_travel_and_are_checked() -> None:
    net, seen = MemoryNetwork(), Seen()
    data = b"model bytes"
    want = "blake3:" + blake3.blake3(data).hexdigest()
    async with AsyncExitStack() as stack:
        server, _ = await pair(stack, net, seen)
        reply = await server.stream(
            "server.site", "t", "signed", data, seal=lambda dst, sha: {"sig": f"{dst}|{sha}"}
        )
        assert msgspec.json.decode(reply.tobytes()) == [
            want,
            True,
            {"sig": f"server.site|{want}"},
        ]
        reply = await server.stream("server.site", "t", "signed", data, sha256=want)
        assert msgspec.json.decode(reply.tobytes())[:2] == [want, True]
        wrong = "blake3:" + blake3.blake3(b"other").hexdigest()
        with pytest.raises(StreamCorrupted, match="does not match its digest"):
            await server.stream("server.site", "t", "signed", data, sha256=wrong)


async def raw(server: Cell, info: object, topic: str = "signed", data: bytes = b"x") -> Payload:
    """An inline request made by hand, as a client written from the wire spec would."""
    value = info if isinstance(info, str) else msgspec.json.encode(info).decode()
    return await server.request("server.site", "t", topic, data, headers={INLINE_HEADER: value})


async def test_hand_made_inline_requests_are_judged_by_name() -> None:
    net, seen = MemoryNetwork(), Seen()
    async with AsyncExitStack() as stack:
        server, site = await pair(stack, net, seen)
        with pytest.raises(BadRequest, match="bad inline stream"):
            await raw(server, "{not json")
        with pytest.raises(BadRequest, match="bad inline stream"):
            await raw(server, InlineInfo(sha256="md5:00"))
        with pytest.raises(BadRequest, match="bad inline stream"):
            await raw(server, InlineInfo(sha256="crc32c:0000000G"))
        with pytest.raises(StreamCorrupted):
            await raw(server, InlineInfo(sha256="crc32c:00000000"))
        with pytest.raises(NoHandler, match="no stream handler"):
            await raw(server, InlineInfo(), topic="plain")  # a request handler is not a stream's
        # no digest announced: none computed (a stream without one is the same)
        got = msgspec.json.decode((await raw(server, InlineInfo())).tobytes())
        assert got[:2] == ["", False]
        # a topic that requires a digest: a CRC is refused, none gets BLAKE3 computed here
        site.require_digest("t", "signed")
        with pytest.raises(BadRequest, match="requires a cryptographic digest"):
            await raw(server, InlineInfo(sha256="crc32c:00000000"))
        got = msgspec.json.decode((await raw(server, InlineInfo())).tobytes())
        assert got[:2] == ["blake3:" + blake3.blake3(b"x").hexdigest(), True]
        # the marker on a plain request handler's address is still a stream: refused above;
        # without it, the request handler answers
        assert (await server.request("server.site", "t", "plain", b"")).tobytes() == b"request"


async def test_the_receivers_policy_judges_an_inline_object_as_a_stream() -> None:
    net, seen = MemoryNetwork(), Seen()
    asked: list[tuple[str, str, str]] = []

    def accept(origin: str, channel: str, topic: str) -> bool:
        asked.append((origin, channel, topic))
        return topic != "sink"

    async with AsyncExitStack() as stack:
        server, _ = await pair(stack, net, seen, accept=accept)
        with pytest.raises(Unauthorized):
            await server.stream("server.site", "t", "sink", b"no")
        assert asked == [("server", "t", "sink")]
        assert seen.entered == 0


async def server_and_relay(stack: AsyncExitStack, net: MemoryNetwork) -> tuple[Cell, Cell]:
    """``server`` and a relay ``server.r`` below it, listening on ``memory://r``."""
    server = await stack.enter_async_context(
        Cell("server", listen=["memory://server"], drivers=[net])
    )
    relay = await stack.enter_async_context(
        Cell("server.r", listen=["memory://r"], parent="memory://server", drivers=[net])
    )
    await relay.wait_parent()
    return server, relay


async def test_fan_out_through_a_relay_goes_inline_hop_by_hop() -> None:
    net = MemoryNetwork()
    seens = [Seen() for _ in range(3)]
    data = pattern(5000, seed=3)
    async with AsyncExitStack() as stack:
        server, relay = await server_and_relay(stack, net)
        for i, seen in enumerate(seens):
            site = await stack.enter_async_context(
                Cell(f"server.r.s{i}", parent="memory://r", drivers=[net], handlers=[table(seen)])
            )
            await site.wait_parent()
        before = net.statistics().frames_sent
        out = await server.stream_many([f"server.r.s{i}" for i in range(3)], "t", "sink", data)
        # server -> relay, relay -> each site, and the replies back: 2 + 2 * 3
        assert net.statistics().frames_sent - before == 8
        for seen, reply in zip(seens, out.values(), strict=True):
            assert seen.data == [data]
            assert isinstance(seen.streams[0], InlineStream)
            assert seen.streams[0].origin == "server"  # the relay reports where it came from
            assert isinstance(reply, Payload)
            assert reply.tobytes().endswith(b" server")
        assert relay.statistics().streams.inline_received == 1
        assert relay.statistics().streams.inline_sent == 3


async def test_an_overloaded_receiver_is_asked_again_within_the_idle_limit() -> None:
    net, seen = MemoryNetwork(), Seen()
    seen.hold = anyio.Event()
    async with AsyncExitStack() as stack:
        server, site = await pair(stack, net, seen, max_concurrency=1, queue_size=0)
        results: dict[str, object] = {}

        async def send(name: str, idle: float) -> None:
            try:
                results[name] = await server.stream("server.site", "t", "sink", b"x", idle=idle)
            except Overloaded as exc:
                results[name] = exc

        async with anyio.create_task_group() as tg:
            tg.start_soon(send, "first", 30.0)
            while seen.entered < 1:  # the first holds the only handler slot
                await anyio.lowlevel.checkpoint()
            tg.start_soon(send, "second", 30.0)
            while site.statistics().rejected_overloaded < 1:  # refused once, tries again
                await anyio.lowlevel.checkpoint()
            seen.hold.set()
        assert isinstance(results["first"], Payload)
        assert isinstance(results["second"], Payload)  # it got the slot on a later try
        assert seen.data == [b"x", b"x"]

        seen.hold = anyio.Event()
        async with anyio.create_task_group() as tg:
            tg.start_soon(send, "held", 30.0)
            while seen.entered < 3:
                await anyio.lowlevel.checkpoint()
            await send("refused", 0.2)  # never gets a slot within its idle limit
            seen.hold.set()
        assert isinstance(results["refused"], Overloaded)


async def test_a_target_list_too_long_for_a_header_is_parked_at_the_relay() -> None:
    """10,000 sites behind one relay would make a 360 KB fan-out header (64 KiB is the most a
    header may be): past ``LISTED_MAX`` the list is parked at the relay by a request first."""
    net = MemoryNetwork()
    n = 450
    names = [f"server.r.site-{i:04d}" for i in range(n)]
    assert len(msgspec.json.encode(names)) > LISTED_MAX
    got: list[str] = []
    sink = HandlerTable()

    @sink.stream("t", "sink")
    async def take(ctx: Context, stream: IncomingStream) -> bytes:
        got.append(ctx.cell.name)
        return bytes(await stream.read_joined())

    async with AsyncExitStack() as stack:
        server, relay = await server_and_relay(stack, net)
        for name in names:
            await stack.enter_async_context(
                Cell(name, parent="memory://r", drivers=[net], handlers=[sink])
            )
        with anyio.fail_after(30):
            while len(relay.children) < n:
                await anyio.lowlevel.checkpoint()
        for inline in (None, 0):  # whole in one request, and streamed
            got.clear()
            out = await server.stream_many(names, "t", "sink", b"model", inline=inline)
            assert sorted(got) == names
            assert all(isinstance(r, Payload) and r.tobytes() == b"model" for r in out.values())
        # a list is taken once, by the cell that parked it; refusals are named
        ref = await server.request("server.r", "sys", PARK_TOPIC, b'["server.r.site-0000"]')
        fanout = {
            "fanout": msgspec.json.encode(
                FanoutRequest([], "t", "sink", ref=ref.tobytes().decode())
            ).decode()
        }
        with pytest.raises(BadRequest, match="no target list"):
            await relay.stream("server.r", "sys", "fanout", b"x", headers=fanout)  # not its own
        await server.stream("server.r", "sys", "fanout", b"x", headers=fanout)
        with pytest.raises(BadRequest, match="no target list"):
            await server.stream("server.r", "sys", "fanout", b"x", headers=fanout)  # used up
        for bad in (b"[]", b"{}", b"not json"):
            with pytest.raises(BadRequest):
                await server.request("server.r", "sys", PARK_TOPIC, bad)


async def test_a_relay_keeps_64_parked_lists_and_a_million_names_at_most() -> None:
    """The parking's bounds at their edges: the 65th list drops the oldest; a list of
    1,000,000 names is taken and one more name is refused."""
    net = MemoryNetwork()
    async with AsyncExitStack() as stack:
        server, _ = await server_and_relay(stack, net)

        async def park(names: list[str]) -> str:
            reply = await server.request("server.r", "sys", PARK_TOPIC, msgspec.json.encode(names))
            return reply.tobytes().decode()

        refs = [await park([f"server.r.s{i}"]) for i in range(PARKED_LISTS + 1)]

        def fanout(ref: str) -> dict[str, str]:
            request = FanoutRequest([], "t", "sink", ref=ref)
            return {"fanout": msgspec.json.encode(request).decode()}

        with pytest.raises(BadRequest, match="no target list"):  # the oldest went first
            await server.stream("server.r", "sys", "fanout", b"x", headers=fanout(refs[0]))
        # the newest is there (its site is not: that target fails alone, the fan-out answers)
        reply = await server.stream("server.r", "sys", "fanout", b"x", headers=fanout(refs[-1]))
        assert f"server.r.s{PARKED_LISTS}".encode() in reply.tobytes()
        assert await park(["server.r.a"] * PARKED_NAMES)
        with pytest.raises(BadRequest, match="1 to 1000000 names"):
            await park(["server.r.a"] * (PARKED_NAMES + 1))


async def test_the_default_limit_the_frame_cap_and_a_negative_limit(tmp_path: Path) -> None:
    """A cell that signs streams its small objects by default; a limit past what one frame
    carries is capped by the frame; a negative limit is refused per call as per cell."""
    from flare_async.security import (  # noqa: PLC0415
        MessageSigning,
        SignatureVerifier,
        Signer,
        load_kit,
    )
    from tests.security.test_signatures import kits  # noqa: PLC0415

    kit = load_kit(kits(tmp_path) / "server")
    signing = MessageSigning(Signer(kit), SignatureVerifier.from_kit(kit))
    assert Cell("server", signing=signing).inline_max == 0
    assert Cell("server").inline_max == INLINE_MAX
    net, seen = MemoryNetwork(), Seen()
    async with AsyncExitStack() as stack:
        server = await stack.enter_async_context(
            Cell("server", listen=["memory://server"], drivers=[net], limits=Limits(max_frame=8192))
        )
        site = await stack.enter_async_context(
            Cell("server.site", parent="memory://server", drivers=[net], handlers=[table(seen)])
        )
        await site.wait_parent()
        with pytest.raises(ConfigError, match="inline must not be negative"):
            await server.stream("server.site", "t", "sink", b"x", inline=-1)
        await server.stream("server.site", "t", "sink", b"x" * 8193, inline=10**6)
        assert not isinstance(seen.streams[-1], InlineStream)  # one frame could not carry it
        await server.stream("server.site", "t", "sink", b"x" * 8192, inline=10**6)
        assert isinstance(seen.streams[-1], InlineStream)
        assert seen.data[-2:] == [b"x" * 8193, b"x" * 8192]
