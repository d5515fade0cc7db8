"""Cell names and the per-hop routing rule (flare_async.routing)."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from flare_async.errors import ConfigError, InvalidName, Unreachable
from flare_async.routing import (
    LOCAL,
    MAX_DEPTH,
    MAX_PART,
    PARENT,
    CellName,
    check_route,
    next_hop,
    validate_name,
)

# ---------------------------------------------------------------- names

VALID_NAMES = [
    "server",
    "s",
    "server.eu",
    "server.eu.site-3",
    "server.eu.site-3.job-7",
    "A_b-9.0.Z",
    "x" * MAX_PART,
    ".".join(["p"] * MAX_DEPTH),
    ".".join(["y" * MAX_PART] * MAX_DEPTH),
    "-",
    "_",
    "0.1.2",
]

INVALID_NAMES = [
    "",
    ".",
    "server.",
    ".server",
    "server..eu",
    "server eu",
    "server/eu",
    "server:8002",
    "x" * (MAX_PART + 1),
    "server." + "x" * (MAX_PART + 1),
    ".".join(["p"] * (MAX_DEPTH + 1)),
    "séver",  # non-ASCII letters are not allowed
    "server\n",
    "server.eu\n",
    "\nserver",
    "a\x00b",
    "a*",
    "ser ver.eu",
    "١٢٣",  # Arabic-Indic digits: not [0-9]
]


@pytest.mark.parametrize("name", VALID_NAMES)
def test_valid_names_are_returned_unchanged(name: str) -> None:
    assert validate_name(name) == name
    assert str(CellName(name)) == name


@pytest.mark.parametrize("name", INVALID_NAMES, ids=repr)
def test_invalid_names_are_refused(name: str) -> None:
    with pytest.raises(InvalidName):
        validate_name(name)
    with pytest.raises(InvalidName):
        CellName(name)


@pytest.mark.parametrize("value", [None, 3, 3.5, b"server", ("server",), ["server"], {}], ids=repr)
def test_non_strings_are_refused(value: object) -> None:
    with pytest.raises(InvalidName):
        validate_name(value)  # type: ignore[arg-type]


def test_invalid_name_is_a_config_error() -> None:
    with pytest.raises(ConfigError):
        validate_name("bad name")
    with pytest.raises(ValueError):
        validate_name("bad name")


def test_invalid_name_message_is_bounded() -> None:
    # A hostile name must not be echoed whole into logs and error replies.
    with pytest.raises(InvalidName) as info:
        validate_name("x" * 100_000 + "!")
    assert len(str(info.value)) < 400


def test_depth_limit_is_exactly_max_depth() -> None:
    assert MAX_DEPTH == 16
    assert MAX_PART == 64
    validate_name(".".join(["a"] * MAX_DEPTH))
    with pytest.raises(InvalidName, match="deeper"):
        validate_name(".".join(["a"] * (MAX_DEPTH + 1)))


@given(st.lists(st.from_regex(r"[A-Za-z0-9_-]{1,64}", fullmatch=True), min_size=1, max_size=16))
def test_any_well_formed_name_is_valid(parts: list[str]) -> None:
    name = ".".join(parts)
    assert validate_name(name) == name
    cell = CellName(name)
    assert cell.parts == tuple(parts)
    assert cell.depth == len(parts)
    assert cell.leaf == parts[-1]


@given(st.text(max_size=80))
def test_validate_name_agrees_with_the_grammar(text: str) -> None:
    parts = text.split(".")
    ok = (
        bool(text)
        and len(parts) <= MAX_DEPTH
        and all(
            1 <= len(p) <= MAX_PART and all(c.isascii() and (c.isalnum() or c in "_-") for c in p)
            for p in parts
        )
    )
    if ok:
        assert validate_name(text) == text
    else:
        with pytest.raises(InvalidName):
            validate_name(text)


class TestCellName:
    def test_parts_depth_leaf(self) -> None:
        n = CellName("server.eu.site-3")
        assert n.parts == ("server", "eu", "site-3")
        assert n.depth == 3
        assert n.leaf == "site-3"
        root = CellName("server")
        assert root.parts == ("server",)
        assert root.depth == 1
        assert root.leaf == "server"

    def test_parent(self) -> None:
        assert CellName("server.eu.site-3").parent == CellName("server.eu")
        assert CellName("server.eu").parent == "server"
        assert CellName("server").parent is None
        parent = CellName("a.b").parent
        assert isinstance(parent, CellName)

    def test_ancestors_nearest_first(self) -> None:
        assert CellName("a.b.c.d").ancestors() == [
            CellName("a.b.c"),
            CellName("a.b"),
            CellName("a"),
        ]
        assert CellName("a").ancestors() == []

    def test_child(self) -> None:
        child = CellName("server.eu").child("site-3")
        assert child == CellName("server.eu.site-3")
        assert child.parent == CellName("server.eu")
        with pytest.raises(InvalidName):
            CellName("server").child("bad part")
        with pytest.raises(InvalidName):
            CellName("server").child("a.")
        with pytest.raises(InvalidName):
            CellName(".".join(["a"] * MAX_DEPTH)).child("b")

    def test_is_ancestor_of_is_strict_and_part_aware(self) -> None:
        eu = CellName("server.eu")
        assert eu.is_ancestor_of("server.eu.site-3")
        assert eu.is_ancestor_of(CellName("server.eu.site-3.job"))
        assert not eu.is_ancestor_of("server.eu")  # strictly below
        assert not eu.is_ancestor_of("server.europe")  # a string prefix is not a tree prefix
        assert not eu.is_ancestor_of("server")
        assert not eu.is_ancestor_of("server.us.site-1")
        assert CellName("server").is_ancestor_of("server.eu")

    def test_common_prefix(self) -> None:
        a = CellName("server.eu.site-3")
        assert a.common_prefix("server.eu.site-4") == CellName("server.eu")
        assert a.common_prefix("server.us.site-1") == CellName("server")
        assert a.common_prefix("server.eu.site-3.job") == a
        assert a.common_prefix(a) == a
        assert a.common_prefix("server") == CellName("server")
        assert a.common_prefix("other.eu.site-3") is None
        # Parts compare whole: "site-3" and "site-30" share no part.
        assert a.common_prefix("server.eu.site-30") == CellName("server.eu")
        with pytest.raises(InvalidName):
            a.common_prefix("not valid")

    def test_equality_and_hash_match_the_string(self) -> None:
        n = CellName("server.eu")
        assert n == "server.eu"
        assert n == CellName("server.eu")
        assert CellName(n) == n
        assert n != "server"
        assert n != CellName("server")
        assert n != 42
        assert hash(n) == hash("server.eu")
        assert len({n, CellName("server.eu"), "server.eu"}) == 1
        assert repr(n) == "CellName('server.eu')"

    def test_immutable(self) -> None:
        n = CellName("server")
        with pytest.raises(AttributeError):
            n.other = 1  # type: ignore[attr-defined]


# ---------------------------------------------------------------- next_hop


def test_local_delivery() -> None:
    assert next_hop("server.eu", "server.eu", set(), has_parent=True) == LOCAL
    assert next_hop("server", "server", {"server.eu"}, has_parent=False) == LOCAL


def test_down_to_a_direct_child() -> None:
    kids = {"server.eu", "server.us"}
    assert next_hop("server", "server.eu", kids, has_parent=False) == "server.eu"
    assert next_hop("server", "server.us.site-1", kids, has_parent=False) == "server.us"
    assert next_hop("server", "server.eu.site-3.job-7", kids, has_parent=False) == "server.eu"


def test_longest_connected_prefix_wins() -> None:
    # A job cell connected directly to the server beside its site's relay.
    connected = {"server.eu", "server.eu.site-3", "server.eu.site-3.job-7"}
    assert next_hop("server", "server.eu.site-3.job-7.x", connected, True) == (
        "server.eu.site-3.job-7"
    )
    assert next_hop("server", "server.eu.site-3.job-8", connected, True) == "server.eu.site-3"
    assert next_hop("server", "server.eu.site-4", connected, True) == "server.eu"


def test_prefix_match_is_per_part_not_per_character() -> None:
    # "server.eu" is a string prefix of "server.europe", not a tree prefix.
    with pytest.raises(Unreachable):
        next_hop("server", "server.europe.x", {"server.eu"}, has_parent=False)
    assert next_hop("server", "server.europe.x", {"server.eu", "server.europe"}, False) == (
        "server.europe"
    )


def test_below_me_but_unknown_is_unreachable_even_with_a_parent() -> None:
    with pytest.raises(Unreachable, match=r"server\.eu\.site-9"):
        next_hop("server.eu", "server.eu.site-9", {"server.eu.site-3"}, has_parent=True)
    with pytest.raises(Unreachable):
        next_hop("server.eu", "server.eu.site-9.job", set(), has_parent=True)


def test_not_below_me_goes_to_the_parent() -> None:
    kids = {"server.eu.site-3"}
    assert next_hop("server.eu", "server.us.site-1", kids, has_parent=True) == PARENT
    assert next_hop("server.eu", "server", kids, has_parent=True) == PARENT
    # A sibling whose name starts with mine (string-wise) is not below me.
    assert next_hop("server.eu", "server.europe", kids, has_parent=True) == PARENT
    assert next_hop("server.eu", "other.tree", kids, has_parent=True) == PARENT


def test_root_without_a_route_is_unreachable() -> None:
    with pytest.raises(Unreachable, match="root"):
        next_hop("server", "other.x", {"server.eu"}, has_parent=False)
    with pytest.raises(Unreachable):
        next_hop("server.eu", "server.us", set(), has_parent=False)


def test_peer_links_are_used_for_their_subtree() -> None:
    me = "server.eu.site-3"
    connected = {"server.eu.site-3.job", "server.us.site-1"}
    assert next_hop(me, "server.us.site-1", connected, True) == "server.us.site-1"
    assert next_hop(me, "server.us.site-1.job-2", connected, True) == "server.us.site-1"
    # The peer is not an ancestor of server.us.site-2: up we go.
    assert next_hop(me, "server.us.site-2", connected, True) == PARENT
    assert next_hop(me, "server.us", connected, True) == PARENT
    # A peer link works without a parent, too.
    assert next_hop(me, "server.us.site-1", connected, False) == "server.us.site-1"


def test_connected_ancestor_is_never_used_to_go_down() -> None:
    me = "server.eu.site-3"
    connected = {"server", "server.eu", me, "server.eu.site-3.job"}
    # The destination is below me: only names strictly below me may carry it.
    assert next_hop(me, "server.eu.site-3.job.x", connected, True) == "server.eu.site-3.job"
    with pytest.raises(Unreachable):
        next_hop(me, "server.eu.site-3.other", connected, True)
    with pytest.raises(Unreachable):
        next_hop(me, "server.eu.site-3.other.deep", connected, has_parent=False)


def test_next_hop_accepts_any_container() -> None:
    assert next_hop("a", "a.b.c", ["a.b"], has_parent=False) == "a.b"
    assert next_hop("a", "a.b.c", {"a.b": object()}, has_parent=False) == "a.b"
    assert next_hop("a", "a.b.c", frozenset({"a.b"}), has_parent=False) == "a.b"


# ---------------------------------------------------------------- check_route


def test_check_route_accepts_a_fresh_hop() -> None:
    check_route("server", ["server.eu.site-3", "server.eu"], max_route=4)
    check_route("server", [], max_route=2)


def test_check_route_detects_a_loop() -> None:
    with pytest.raises(Unreachable, match="loop"):
        check_route("server.eu", ["server.eu.site-3", "server.eu", "server"], max_route=32)
    # Only a whole-name match is a loop.
    check_route("server.eu", ["server.eu.site-3", "server.europe", "server"], max_route=32)


def test_check_route_hop_limit() -> None:
    route = [f"c{i}" for i in range(4)]
    check_route("me", route[:3], max_route=4)
    with pytest.raises(Unreachable, match="hop limit"):
        check_route("me", route, max_route=4)
    with pytest.raises(Unreachable, match="hop limit"):
        check_route("me", [*route, "c4"], max_route=4)


def test_check_route_accepts_tuples() -> None:
    with pytest.raises(Unreachable):
        check_route("a", ("b", "a"), max_route=8)


# ---------------------------------------------------------------- trees (property)

PART = st.sampled_from(["a", "b", "c", "d", "site-1", "x_2"])


@st.composite
def trees(draw: st.DrawFn) -> tuple[str, list[str]]:
    """A root and the names of a random tree below it (all distinct, parents first)."""
    root = draw(st.sampled_from(["server", "root", "a"]))
    nodes = [root]
    for _ in range(draw(st.integers(0, 25))):
        parent = draw(st.sampled_from(nodes))
        if parent.count(".") + 1 >= 7:
            continue
        name = f"{parent}.{draw(PART)}"
        if name not in nodes:
            nodes.append(name)
    return root, nodes


def _children(nodes: list[str]) -> dict[str, set[str]]:
    out: dict[str, set[str]] = {n: set() for n in nodes}
    for n in nodes:
        head, dot, _ = n.rpartition(".")
        if dot:
            out[head].add(n)
    return out


def _depth(name: str) -> int:
    return name.count(".") + 1


def _lca_depth(a: str, b: str) -> int:
    common = 0
    for x, y in zip(a.split("."), b.split("."), strict=False):
        if x != y:
            break
        common += 1
    return common


def _walk(
    src: str,
    dst: str,
    links: dict[str, set[str]],
    root: str,
    max_route: int,
) -> list[str]:
    """Forward a message hop by hop as cells do; return the route (origin first, dst last)."""
    route: list[str] = []
    here = src
    while True:
        check_route(here, route, max_route)
        route.append(here)
        hop = next_hop(here, dst, links[here], has_parent=here != root)
        if hop == LOCAL:
            return route
        if hop == PARENT:
            here = here.rpartition(".")[0]
        else:
            assert hop in links[here]
            here = hop


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(trees(), st.data())
def test_hop_by_hop_follows_the_tree_path(tree: tuple[str, list[str]], data: st.DataObject) -> None:
    root, nodes = tree
    links = _children(nodes)
    src = data.draw(st.sampled_from(nodes), label="src")
    dst = data.draw(st.sampled_from(nodes), label="dst")
    route = _walk(src, dst, links, root, max_route=32)
    lca = _lca_depth(src, dst)
    assert route[0] == src
    assert route[-1] == dst
    assert len(set(route)) == len(route)  # no cell visited twice
    # Exactly the tree path: up to the common ancestor, then down.
    assert len(route) - 1 == (_depth(src) - lca) + (_depth(dst) - lca)
    for a, b in itertools.pairwise(route):
        assert b in links[a] or a in links[b]


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(trees(), st.data())
def test_unknown_destinations_fail_fast(tree: tuple[str, list[str]], data: st.DataObject) -> None:
    root, nodes = tree
    links = _children(nodes)
    src = data.draw(st.sampled_from(nodes), label="src")
    base = data.draw(st.sampled_from(nodes), label="base")
    dst = f"{base}.{data.draw(st.sampled_from(['zz', 'missing', 'q-1']), label='leaf')}"
    if data.draw(st.booleans(), label="deeper"):
        dst += ".deeper"
    with pytest.raises(Unreachable):
        _walk(src, dst, links, root, max_route=32)
    # It also fails within the hops of the path to the nearest existing ancestor: walking
    # to ``base`` takes that many, and one more decision at ``base`` raises.
    lca = _lca_depth(src, base)
    limit = (_depth(src) - lca) + (_depth(base) - lca) + 1
    with pytest.raises(Unreachable):
        _walk(src, dst, links, root, max_route=max(2, limit))


@st.composite
def trees_with_peers(draw: st.DrawFn) -> tuple[str, list[str], dict[str, set[str]]]:
    root, nodes = draw(trees())
    links = _children(nodes)
    for _ in range(draw(st.integers(0, 6))):
        a = draw(st.sampled_from(nodes))
        b = draw(st.sampled_from(nodes))
        # Peers are cells of different branches (the hello refuses anything else).
        if a == b or a.startswith(b + ".") or b.startswith(a + "."):
            continue
        links[a].add(b)
        links[b].add(a)
    return root, nodes, links


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(trees_with_peers(), st.data())
def test_peer_links_never_loop_or_lengthen_the_path(
    tree: tuple[str, list[str], dict[str, set[str]]], data: st.DataObject
) -> None:
    root, nodes, links = tree
    src = data.draw(st.sampled_from(nodes), label="src")
    dst = data.draw(st.sampled_from(nodes), label="dst")
    route = _walk(src, dst, links, root, max_route=32)
    lca = _lca_depth(src, dst)
    assert route[-1] == dst
    assert len(set(route)) == len(route)
    # A peer link can only shorten the tree path, never lengthen it.
    assert len(route) - 1 <= (_depth(src) - lca) + (_depth(dst) - lca)
