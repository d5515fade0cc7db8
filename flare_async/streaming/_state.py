"""The stream protocol as explicit state machines: what both ends share.

The two ends live in :mod:`~flare_async.streaming._send_state` (:class:`SenderMachine`) and
:mod:`~flare_async.streaming._recv_state` (:class:`ReceiverMachine`); each module holds its
states, its actions, its transition table and the map from each action to what the cell
(which executes them) does. Modelled on h11's ``_state.py``:

* **Pure.** No I/O, no clock, no randomness, no logging: time comes in as ``now`` (seconds on
  any monotonic clock), and what to do comes out as actions, small frozen dataclasses the
  driver (the cell) turns into frames, waits and errors. The machines hold offsets and sizes,
  never bytes: the chunk log and the consumer's queue stay with the driver.
* **One table per machine.** ``TRANSITIONS[state][event]`` is the set of states the event may
  lead to; an event missing from a state's row is illegal there. :func:`event` enforces the
  table on every call: before (the event is allowed) and after (the state it led to is listed).
* **Credit arithmetic is reused**, not copied: each machine drives the matching object of
  :mod:`~flare_async.streaming._flow` (:class:`~flare_async.streaming.SenderFlow`,
  :class:`~flare_async.streaming.ReceiverFlow`), which stays the one place that judges acks,
  chunks and credit.

Errors (all from :mod:`flare_async.errors`, nothing parallel):

* An event a state does not allow (``start()`` twice, a chunk before the stream was accepted,
  the consumer taking more than was delivered) raises :class:`~flare_async.errors.ProtocolError`
  and changes nothing.
* A peer that breaks the protocol (an ack committing bytes never sent, a chunk past the credit
  or the announced size) moves the machine to FAILED, then raises ``ProtocolError`` (as the
  cell's hub expects); :attr:`Machine.failure` then holds the :class:`StreamFail` to carry out.
* Ordinary failures (a stall, a chunk failing its CRC four times, the other end's abort) are
  not exceptions: they come back as a :class:`StreamFail` action.
"""

from __future__ import annotations

import enum
import functools
import inspect
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, ClassVar, Concatenate, Generic, ParamSpec, TypeVar

from flare_async.errors import ProtocolError, Status

S = TypeVar("S", bound="MachineState")
M = TypeVar("M", bound="Machine[Any]")
P = ParamSpec("P")
R = TypeVar("R")

Table = Mapping[S, Mapping[str, frozenset[S]]]
"""``state -> event -> the states that event may lead to``."""


@dataclass(frozen=True, slots=True)
class StreamWait:
    """Nothing to do until the next event, or until the clock reaches ``deadline``: then call
    the machine's ``on_tick(now)`` (``None``: no timer runs)."""

    deadline: float | None


@dataclass(frozen=True, slots=True)
class StreamFail:
    """The stream failed with ``error``. ``abort``: the status of the ``StreamAbort`` to send
    the other end with ``message`` (``None``: send none, the other end already knows)."""

    error: BaseException
    abort: Status | None
    message: str = ""


class MachineState(enum.Enum):
    """The base of both machines' states: hashed by identity (members compare by identity
    anyway), in C, since the table is consulted on every event, once per chunk and more."""

    __hash__ = object.__hash__


class Machine(Generic[S]):
    """What both machines share: the state, the table, the failure."""

    TRANSITIONS: ClassVar[Mapping[Any, Mapping[str, frozenset[Any]]]]
    state: S
    failure: StreamFail | None
    """The failure, once the machine is FAILED."""

    def _refused(self, name: str) -> ProtocolError:
        return ProtocolError(f"{self!r}: {name} is not allowed in state {self.state.name}")

    def _strayed(self, name: str, before: S) -> ProtocolError:
        """The code disagrees with the table: a bug here."""
        return ProtocolError(
            f"{self!r}: {name} led from {before.name} to {self.state.name}, "
            "which the transition table does not list"
        )


_CHECKED = """
def {name}({params}):
    _before = self.state
    _allowed = self.TRANSITIONS[_before].get(_event)
    if _allowed is None:
        raise self._refused(_event)
    try:
        _result = _method({args})
    except _ProtocolError:
        if self.state not in _allowed:
            raise self._strayed(_event, _before) from None
        raise
    if self.state not in _allowed:
        raise self._strayed(_event, _before)
    return _result
"""
"""The wrapper :func:`event` puts around a method, written with the method's own parameters
(as ``dataclasses`` writes ``__init__``): one taking ``*args, **kwargs`` costs ~0.25 us more a
call, and the cell calls a machine two or three times per chunk on each end."""


def event(
    name: str,
) -> Callable[[Callable[Concatenate[M, P], R]], Callable[Concatenate[M, P], R]]:
    """Make a method an event of the table: refused where its state's row lacks ``name``
    (:class:`~flare_async.errors.ProtocolError`, nothing changed), checked against the row
    once it returns or raises."""

    def wrap(method: Callable[Concatenate[M, P], R]) -> Callable[Concatenate[M, P], R]:
        params: list[str] = []
        args: list[str] = []
        scope: dict[str, Any] = {"_method": method, "_event": name, "_ProtocolError": ProtocolError}
        for i, p in enumerate(inspect.signature(method).parameters.values()):
            if p.name.startswith("_") or p.kind not in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY):
                raise TypeError(f"event {name}: parameter {p.name} ({p.kind.description})")
            if p.kind is p.KEYWORD_ONLY and "*" not in params:
                params.append("*")
            if p.default is p.empty:
                params.append(p.name)
            else:
                scope[f"_default_{i}"] = p.default
                params.append(f"{p.name}=_default_{i}")
            args.append(f"{p.name}={p.name}" if p.kind is p.KEYWORD_ONLY else p.name)
        fn = method.__name__
        exec(_CHECKED.format(name=fn, params=", ".join(params), args=", ".join(args)), scope)
        run: Callable[Concatenate[M, P], R] = functools.wraps(method)(scope[fn])
        return run

    return wrap


def events_of(table: Table[S]) -> frozenset[str]:
    """Every event a table names (for tests: the ones a state leaves out are illegal there)."""
    return frozenset(name for row in table.values() for name in row)


__all__ = ["Machine", "MachineState", "StreamFail", "StreamWait", "Table", "event", "events_of"]
