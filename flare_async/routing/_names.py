"""Hierarchical cell names.

A name is the cell's place in the tree: the dot-joined path from the root, for example
``server``, ``server.eu`` or ``server.eu.site-3``. Each part matches ``[A-Za-z0-9_-]{1,64}``
and a name has at most :data:`MAX_DEPTH` parts. Names compare as strings; the routing core works
on plain ``str`` for speed and uses :class:`CellName` where a value object reads better.
"""

from __future__ import annotations

import functools
import re
from typing import Final

from flare_async.errors import InvalidName

MAX_PART: Final = 64
MAX_DEPTH: Final = 16
_PART = re.compile(r"[A-Za-z0-9_-]{1,64}")


def validate_name(name: str) -> str:
    """Return ``name`` if it is a valid cell name.

    Raises:
        InvalidName: the name is empty, too deep, or has a part outside ``[A-Za-z0-9_-]{1,64}``.
    """
    # Checked before the cache: an unhashable value would otherwise fail in the cache lookup
    # with a TypeError instead of InvalidName.
    if not isinstance(name, str) or not name:
        raise InvalidName(f"cell name must be a non-empty string, got {name!r:.80}")
    return _validate_str(name)


@functools.lru_cache(maxsize=65536)
def _validate_str(name: str) -> str:
    parts = name.split(".")
    if len(parts) > MAX_DEPTH:
        raise InvalidName(f"cell name {name[:80]!r} is deeper than {MAX_DEPTH} parts")
    for part in parts:
        if not _PART.fullmatch(part):
            raise InvalidName(
                f"cell name {name[:80]!r}: part {part[:80]!r} must match [A-Za-z0-9_-]{{1,64}}"
            )
    return name


class CellName:
    """A validated cell name with tree helpers. Immutable and hashable like the string."""

    __slots__ = ("_name",)

    def __init__(self, name: str | CellName) -> None:
        self._name = validate_name(str(name))

    def __str__(self) -> str:
        return self._name

    def __repr__(self) -> str:
        return f"CellName({self._name!r})"

    def __eq__(self, other: object) -> bool:
        if isinstance(other, CellName):
            return self._name == other._name
        if isinstance(other, str):
            return self._name == other
        return NotImplemented

    def __hash__(self) -> int:
        return hash(self._name)

    @property
    def parts(self) -> tuple[str, ...]:
        return tuple(self._name.split("."))

    @property
    def depth(self) -> int:
        return self._name.count(".") + 1

    @property
    def leaf(self) -> str:
        """The last part: ``site-3`` for ``server.eu.site-3``."""
        return self._name.rpartition(".")[2]

    @property
    def parent(self) -> CellName | None:
        """The name one level up, or ``None`` for a root."""
        head, dot, _ = self._name.rpartition(".")
        return CellName(head) if dot else None

    def ancestors(self) -> list[CellName]:
        """Every name above this one, nearest first."""
        out: list[CellName] = []
        node = self.parent
        while node is not None:
            out.append(node)
            node = node.parent
        return out

    def child(self, part: str) -> CellName:
        """The name of a child of this cell called ``part``."""
        return CellName(f"{self._name}.{part}")

    def is_ancestor_of(self, other: str | CellName) -> bool:
        """True when ``other`` lies strictly below this name in the tree."""
        return str(other).startswith(self._name + ".")

    def common_prefix(self, other: str | CellName) -> CellName | None:
        """The deepest name that is this name or an ancestor of both; ``None`` if none."""
        shared: list[str] = []
        for a, b in zip(self.parts, CellName(other).parts, strict=False):
            if a != b:
                break
            shared.append(a)
        return CellName(".".join(shared)) if shared else None
