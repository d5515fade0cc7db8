"""The hello exchange (check_hello / make_hello) and header schema evolution."""

from __future__ import annotations

import math

import msgspec
import pytest

from flare_async.errors import IdentityError, ProtocolError, VersionMismatch
from flare_async.wire import (
    MIN_PROTOCOL_VERSION,
    PROTOCOL_VERSION,
    Bye,
    Error,
    Event,
    Hello,
    Limits,
    Ping,
    Pong,
    Reply,
    Request,
    Session,
    check_hello,
    decode_header,
    encode_header,
    make_hello,
)

LIMITS = Limits()


def hello(name: str, role: str, **changes: object) -> Hello:
    """A hello as ``make_hello`` builds it, with fields replaced (to forge a peer's)."""
    base = make_hello(name, "peer", LIMITS)
    return msgspec.structs.replace(base, role=role, **changes)


# ---------------------------------------------------------------- make_hello


def test_make_hello_fills_every_field() -> None:
    limits = Limits(max_header=1024, max_frame=4096, max_route=8)
    h = make_hello("server.eu", "child", limits, frozenset({"zstd", "stream", "b"}), 2.5)
    assert h == Hello(
        name="server.eu",
        version=PROTOCOL_VERSION,
        min_version=MIN_PROTOCOL_VERSION,
        role="child",
        capabilities=["b", "stream", "zstd"],  # sorted: deterministic on the wire
        max_header=1024,
        max_frame=4096,
        heartbeat=2.5,
    )
    assert MIN_PROTOCOL_VERSION <= PROTOCOL_VERSION


def test_make_hello_round_trips_through_the_wire() -> None:
    h = make_hello("server", "parent", LIMITS, frozenset({"x"}), 1.0)
    assert decode_header(encode_header(h), LIMITS) == h


# ---------------------------------------------------------------- accepted hellos


def test_child_connects_to_parent_both_directions() -> None:
    child_limits = Limits(max_header=2048, max_frame=1 << 20)
    parent_limits = Limits(max_header=4096, max_frame=1 << 24)
    child_hello = make_hello("server.eu", "child", child_limits, frozenset({"a", "b"}), 5.0)
    parent_hello = make_hello("server", "parent", parent_limits, frozenset({"b", "c"}), 3.0)

    at_parent = check_hello(parent_hello, child_hello, expect="child")
    assert at_parent == Session(
        peer="server.eu",
        role="child",
        version=PROTOCOL_VERSION,
        capabilities=frozenset({"b"}),
        peer_limits=Limits(max_header=2048, max_frame=1 << 20, max_route=1024),
        peer_heartbeat=5.0,
    )
    at_child = check_hello(child_hello, parent_hello, expect="parent")
    assert at_child.peer == "server"
    assert at_child.role == "parent"
    assert at_child.capabilities == frozenset({"b"})
    assert at_child.peer_limits.max_header == 4096
    assert at_child.peer_limits.max_frame == 1 << 24
    assert at_child.peer_heartbeat == 3.0


def test_deep_child_below_its_parent_is_accepted() -> None:
    local = make_hello("server.eu", "parent", LIMITS)
    session = check_hello(local, hello("server.eu.site-3.job-7", "child"), expect="child")
    assert session.peer == "server.eu.site-3.job-7"


def test_peers_in_different_branches_are_accepted() -> None:
    local = make_hello("server.eu.site-3", "peer", LIMITS)
    session = check_hello(local, hello("server.us.site-1", "peer"), expect="peer")
    assert session.role == "peer"
    # A sibling whose name merely starts with ours (as a string) is another branch.
    assert check_hello(local, hello("server.eu.site-30", "peer"), expect="peer").peer == (
        "server.eu.site-30"
    )
    assert check_hello(local, hello("other", "peer"), expect="peer").peer == "other"


@pytest.mark.parametrize(
    ("mine", "theirs", "expected"),
    [
        (frozenset(), frozenset({"a"}), frozenset()),
        (frozenset({"a"}), frozenset(), frozenset()),
        (frozenset({"a", "b"}), frozenset({"b", "a"}), frozenset({"a", "b"})),
        (frozenset({"zstd", "stream"}), frozenset({"stream", "torch"}), frozenset({"stream"})),
    ],
)
def test_capabilities_are_the_intersection(
    mine: frozenset[str], theirs: frozenset[str], expected: frozenset[str]
) -> None:
    local = make_hello("server", "parent", LIMITS, mine)
    remote = make_hello("server.eu", "child", LIMITS, theirs)
    session = check_hello(local, remote, expect="child")
    assert session.capabilities == expected
    assert isinstance(session.capabilities, frozenset)


def test_duplicate_capabilities_from_a_peer_are_harmless() -> None:
    local = make_hello("server", "parent", LIMITS, frozenset({"a"}))
    remote = hello("server.eu", "child", capabilities=["a", "a", "x"])
    assert check_hello(local, remote, expect="child").capabilities == frozenset({"a"})


def test_links_share_one_common_set_and_a_peers_long_list_is_not_kept() -> None:
    """Two links that agree on the same capabilities share one set object; a peer that sends
    10,000 names gets the same set (the cache is keyed by the intersection, bounded)."""
    from flare_async.wire._hello import _interned  # noqa: PLC0415

    local = make_hello("server", "parent", LIMITS, frozenset({"a", "b"}))
    first = check_hello(local, hello("server.s1", "child", capabilities=["a", "x"]), expect="child")
    flood = ["a", *(f"junk-{i}" for i in range(10_000))]
    second = check_hello(local, hello("server.s2", "child", capabilities=flood), expect="child")
    assert first.capabilities == second.capabilities == frozenset({"a"})
    assert first.capabilities is second.capabilities
    assert _interned.cache_info().currsize <= 64


def test_heartbeat_zero_and_default() -> None:
    local = make_hello("server", "parent", LIMITS)
    assert check_hello(local, hello("server.eu", "child"), expect="child").peer_heartbeat == 0.0


# ---------------------------------------------------------------- versions


@pytest.mark.parametrize(
    ("local_range", "remote_range", "agreed"),
    [
        ((1, 1), (1, 1), 1),
        ((1, 3), (1, 2), 2),
        ((1, 2), (1, 5), 2),
        ((2, 4), (3, 9), 4),
        ((2, 4), (1, 2), 2),
        ((1, 1), (1, 7), 1),
    ],
)
def test_version_negotiation_picks_the_highest_common(
    local_range: tuple[int, int], remote_range: tuple[int, int], agreed: int
) -> None:
    local = hello("server", "parent", min_version=local_range[0], version=local_range[1])
    remote = hello("server.eu", "child", min_version=remote_range[0], version=remote_range[1])
    assert check_hello(local, remote, expect="child").version == agreed
    # The decision is symmetric: both sides agree on the same version.
    back = check_hello(
        hello("server.eu", "child", min_version=remote_range[0], version=remote_range[1]),
        hello("server", "parent", min_version=local_range[0], version=local_range[1]),
        expect="parent",
    )
    assert back.version == agreed


@pytest.mark.parametrize(
    ("local_range", "remote_range"),
    [
        ((1, 1), (2, 2)),
        ((2, 3), (1, 1)),
        ((1, 2), (3, 7)),
        ((5, 9), (1, 4)),
        ((1, 1), (0, 0)),
    ],
)
def test_no_common_version_is_a_version_mismatch(
    local_range: tuple[int, int], remote_range: tuple[int, int]
) -> None:
    local = hello("server", "parent", min_version=local_range[0], version=local_range[1])
    remote = hello("server.eu", "child", min_version=remote_range[0], version=remote_range[1])
    with pytest.raises(VersionMismatch, match=r"server\.eu") as info:
        check_hello(local, remote, expect="child")
    assert isinstance(info.value, ProtocolError)


def test_a_future_peer_that_still_speaks_ours_is_accepted() -> None:
    local = make_hello("server", "parent", LIMITS)
    remote = hello("server.eu", "child", version=PROTOCOL_VERSION + 5)
    assert check_hello(local, remote, expect="child").version == PROTOCOL_VERSION


def test_a_future_peer_that_dropped_ours_is_refused() -> None:
    local = make_hello("server", "parent", LIMITS)
    remote = hello(
        "server.eu", "child", version=PROTOCOL_VERSION + 5, min_version=PROTOCOL_VERSION + 1
    )
    with pytest.raises(VersionMismatch):
        check_hello(local, remote, expect="child")


# ---------------------------------------------------------------- identity


@pytest.mark.parametrize(
    ("me", "them"),
    [
        ("server", "other.eu"),  # another tree
        ("server.eu", "server.us.site-1"),  # another branch
        ("server.eu", "server"),  # above me
        ("server.eu", "server.europe"),  # string prefix, not a tree prefix
        ("server.eu", "server.europe.x"),
    ],
)
def test_child_must_be_below_me(me: str, them: str) -> None:
    with pytest.raises(IdentityError, match="not below"):
        check_hello(make_hello(me, "parent", LIMITS), hello(them, "child"), expect="child")


@pytest.mark.parametrize(
    ("me", "them"),
    [
        ("server.eu", "other"),
        ("server.eu", "server.eu.site-1"),  # below me, not above
        ("server.eu", "server.us"),
        ("server.europe", "server.eu"),  # string prefix, not a tree prefix
        ("server", "root"),
    ],
)
def test_parent_must_be_above_me(me: str, them: str) -> None:
    with pytest.raises(IdentityError, match="not below"):
        check_hello(make_hello(me, "child", LIMITS), hello(them, "parent"), expect="parent")


@pytest.mark.parametrize("expect", ["child", "parent", "peer"])
def test_peer_may_not_claim_my_own_name(expect: str) -> None:
    with pytest.raises(IdentityError, match="own name"):
        check_hello(
            make_hello("server.eu", "peer", LIMITS),
            hello("server.eu", expect),
            expect=expect,  # type: ignore[arg-type]
        )


@pytest.mark.parametrize(
    ("me", "them"),
    [
        ("server.eu", "server.eu.site-1"),
        ("server.eu.site-1", "server.eu"),
        ("server.eu.site-1", "server"),
        ("server", "server.eu.site-1.job"),
    ],
)
def test_peers_may_not_be_in_one_branch(me: str, them: str) -> None:
    with pytest.raises(IdentityError, match="one branch"):
        check_hello(make_hello(me, "peer", LIMITS), hello(them, "peer"), expect="peer")


@pytest.mark.parametrize(
    "name",
    ["", "server..eu", "server.eu ", "server/eu", "x" * 65, ".".join(["a"] * 17), "sérver"],
    ids=repr,
)
def test_invalid_name_in_hello_is_an_identity_error(name: str) -> None:
    with pytest.raises(IdentityError, match="invalid name"):
        check_hello(make_hello("server", "parent", LIMITS), hello(name, "child"), expect="child")


@pytest.mark.parametrize(
    ("role", "expect"),
    [
        ("peer", "child"),
        ("parent", "child"),
        ("child", "peer"),
        ("parent", "peer"),
        ("child", "parent"),
        ("peer", "parent"),
        ("CHILD", "child"),
        ("", "child"),
        ("root", "child"),
    ],
)
def test_wrong_role_is_an_identity_error(role: str, expect: str) -> None:
    # The names fit the expected relation; only the claimed role is wrong.
    names = {"child": ("server", "server.eu"), "parent": ("server.eu", "server")}
    me, them = names.get(expect, ("server.eu", "server.us"))
    with pytest.raises(IdentityError, match="expected"):
        check_hello(make_hello(me, "peer", LIMITS), hello(them, role), expect=expect)  # type: ignore[arg-type]


def test_identity_error_is_a_protocol_error() -> None:
    assert issubclass(IdentityError, ProtocolError)
    assert issubclass(VersionMismatch, ProtocolError)


# ---------------------------------------------------------------- not a hello / bad limits

ROUTED = {
    "id": 1,
    "src": "server.eu",
    "dst": "server",
    "route": ["server.eu"],
    "budget": None,
    "headers": {},
}


@pytest.mark.parametrize(
    "first",
    [
        Request(**ROUTED, channel="c", topic="t"),  # type: ignore[arg-type]
        Event(**ROUTED, channel="c", topic="t"),  # type: ignore[arg-type]
        Reply(**ROUTED, corr=1),  # type: ignore[arg-type]
        Error(**ROUTED, corr=1, status=1, message="m"),  # type: ignore[arg-type]
        Ping(seq=1),
        Pong(seq=1),
        Bye(reason="bye"),
        None,
        b"hello",
        {"name": "server.eu"},
    ],
    ids=lambda v: type(v).__name__,
)
def test_first_frame_must_be_a_hello(first: object) -> None:
    with pytest.raises(ProtocolError, match="expected a hello") as info:
        check_hello(make_hello("server", "parent", LIMITS), first, expect="child")
    assert type(info.value) is ProtocolError


@pytest.mark.parametrize(
    "changes",
    [
        {"max_header": 0},
        {"max_header": 255},
        {"max_header": -1},
        {"max_header": 16 * 1024 * 1024 + 1},
        {"max_frame": -1},
        {"max_frame": 2**63},
    ],
    ids=repr,
)
def test_unusable_limits_are_a_protocol_error(changes: dict[str, int]) -> None:
    with pytest.raises(ProtocolError, match="unusable limits") as info:
        check_hello(
            make_hello("server", "parent", LIMITS),
            hello("server.eu", "child", **changes),
            expect="child",
        )
    assert type(info.value) is ProtocolError


@pytest.mark.parametrize("changes", [{"max_header": 256}, {"max_frame": 0}], ids=repr)
def test_extreme_but_valid_limits_are_accepted(changes: dict[str, int]) -> None:
    session = check_hello(
        make_hello("server", "parent", LIMITS),
        hello("server.eu", "child", **changes),
        expect="child",
    )
    for key, value in changes.items():
        assert getattr(session.peer_limits, key) == value


@pytest.mark.parametrize("heartbeat", [-1.0, -1e-9, math.nan, -math.inf], ids=repr)
def test_bad_heartbeat_is_a_protocol_error(heartbeat: float) -> None:
    with pytest.raises(ProtocolError, match="heartbeat") as info:
        check_hello(
            make_hello("server", "parent", LIMITS),
            hello("server.eu", "child", heartbeat=heartbeat),
            expect="child",
        )
    assert type(info.value) is ProtocolError


def test_bad_hello_decoded_from_the_wire_is_refused() -> None:
    # A NaN heartbeat is refused as early as decoding; a negative one by check_hello.
    raw = msgspec.msgpack.encode([10, "server.eu", 1, 1, "child", [], 1024, 4096, math.nan])
    with pytest.raises(ProtocolError, match="heartbeat"):
        decode_header(raw, LIMITS)
    raw = msgspec.msgpack.encode([10, "server.eu", 1, 1, "child", [], 1024, 4096, -1.0])
    remote = decode_header(raw, LIMITS)
    with pytest.raises(ProtocolError, match="heartbeat"):
        check_hello(make_hello("server", "parent", LIMITS), remote, expect="child")


# ---------------------------------------------------------------- schema evolution
#
# Headers are msgpack arrays ``[tag, field, ...]``. Old peers omit trailing defaulted fields;
# newer peers may append fields we do not know. Both must decode.


def test_header_layout_is_tag_then_fields_in_order() -> None:
    req = Request(
        id=7,
        src="a.b",
        dst="a",
        route=["a.b"],
        budget=1.5,
        headers={"k": "v"},
        channel="ch",
        topic="tp",
        codec="np",
    )
    assert msgspec.msgpack.decode(encode_header(req)) == [
        1,
        7,
        "a.b",
        "a",
        ["a.b"],
        1.5,
        {"k": "v"},
        "ch",
        "tp",
        "np",
    ]
    assert msgspec.msgpack.decode(encode_header(Hello("a", 1, 1, "peer", [], 256, 0, 0.5))) == [
        10,
        "a",
        1,
        1,
        "peer",
        [],
        256,
        0,
        0.5,
    ]


ROUTED_FIELDS = [5, "a.b", "a", ["a.b"], None, {}]

OLD_AND_NEW = [
    # (array sent by an old peer without trailing defaults, the decoded value)
    ([1, *ROUTED_FIELDS, "ch", "tp"], Request(5, "a.b", "a", ["a.b"], None, {}, "ch", "tp", "")),
    ([2, *ROUTED_FIELDS, "ch", "tp"], Event(5, "a.b", "a", ["a.b"], None, {}, "ch", "tp", "")),
    ([3, *ROUTED_FIELDS, 4], Reply(5, "a.b", "a", ["a.b"], None, {}, 4, "")),
    ([10, "a", 1, 1, "peer", ["x"], 1024, 2048], Hello("a", 1, 1, "peer", ["x"], 1024, 2048, 0.0)),
]


@pytest.mark.parametrize(("array", "expected"), OLD_AND_NEW, ids=lambda v: str(v)[:30])
def test_old_peer_header_without_trailing_defaults_decodes(
    array: list[object], expected: object
) -> None:
    assert decode_header(msgspec.msgpack.encode(array), LIMITS) == expected


@pytest.mark.parametrize(("array", "expected"), OLD_AND_NEW, ids=lambda v: str(v)[:30])
def test_newer_peer_header_with_extra_trailing_fields_decodes(
    array: list[object], expected: object
) -> None:
    full = msgspec.msgpack.decode(encode_header(expected))  # type: ignore[arg-type]
    newer = [*full, "future", 42, {"nested": [1, 2, 3]}, None]
    assert decode_header(msgspec.msgpack.encode(newer), LIMITS) == expected


@pytest.mark.parametrize(
    ("array", "expected"),
    [
        ([11, 3, "later"], Ping(3)),
        ([12, 3, 1.5], Pong(3)),
        ([13, "done", 1], Bye("done")),
        (
            [4, *ROUTED_FIELDS, 9, 2, "no", "extra"],
            Error(5, "a.b", "a", ["a.b"], None, {}, 9, 2, "no"),
        ),
    ],
    ids=lambda v: str(v)[:20],
)
def test_control_and_error_headers_ignore_trailing_fields(
    array: list[object], expected: object
) -> None:
    assert decode_header(msgspec.msgpack.encode(array), LIMITS) == expected


@pytest.mark.parametrize(
    "array",
    [
        [1, *ROUTED_FIELDS, "ch"],  # a required field (topic) is missing
        [3, *ROUTED_FIELDS],  # corr missing
        [4, *ROUTED_FIELDS, 1, 2],  # message missing
        [10, "a", 1, 1, "peer", [], 1024],  # max_frame missing
        [11],
        [13],
        [],
    ],
    ids=lambda v: str(v)[:30],
)
def test_missing_required_fields_are_a_protocol_error(array: list[object]) -> None:
    with pytest.raises(ProtocolError, match="malformed"):
        decode_header(msgspec.msgpack.encode(array), LIMITS)


@pytest.mark.parametrize("tag", [0, 5, 9, 14, 20, 29, 255, -1, "1", None])
def test_unknown_tag_is_a_protocol_error(tag: object) -> None:
    with pytest.raises(ProtocolError, match="malformed"):
        decode_header(msgspec.msgpack.encode([tag, 1, "a", "b", [], None, {}, "c", "t"]), LIMITS)


def test_budget_may_be_sent_as_an_int() -> None:
    env = decode_header(msgspec.msgpack.encode([1, 5, "a", "b", [], 3, {}, "c", "t"]), LIMITS)
    assert isinstance(env, Request)
    assert env.budget == 3.0
