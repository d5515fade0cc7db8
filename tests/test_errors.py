"""The exception tree and the wire status mapping (flare_async.errors)."""

from __future__ import annotations

import inspect
import pickle

import pytest

from flare_async import errors
from flare_async.errors import (
    BadRequest,
    CellClosed,
    CodecError,
    ConfigError,
    ConnectError,
    DeadlineExceeded,
    DecodeError,
    FlareError,
    FrameTooLarge,
    IdentityError,
    IntegrityError,
    InternalError,
    InvalidName,
    LinkBroken,
    LinkClosed,
    NoHandler,
    Overloaded,
    ProtocolError,
    RemoteError,
    RoutingError,
    Status,
    StreamAborted,
    StreamCorrupted,
    StreamError,
    StreamStalled,
    TransportError,
    Unauthorized,
    Unreachable,
    UnsupportedScheme,
    VersionMismatch,
    error_for_status,
    status_for_error,
)

EXPECTED_MAPPING: dict[Status, type[FlareError]] = {
    Status.UNREACHABLE: Unreachable,
    Status.NO_HANDLER: NoHandler,
    Status.DEADLINE_EXCEEDED: DeadlineExceeded,
    Status.INTERNAL: InternalError,
    Status.BAD_REQUEST: BadRequest,
    Status.UNAUTHORIZED: Unauthorized,
    Status.OVERLOADED: Overloaded,
    Status.LINK_BROKEN: LinkBroken,
    Status.STREAM_CORRUPTED: StreamCorrupted,
    Status.STREAM_STALLED: StreamStalled,
    Status.STREAM_ABORTED: StreamAborted,
    Status.INTEGRITY: IntegrityError,
}

# The tree as drawn in the module docstring: class -> its direct parent(s) in the tree.
EXPECTED_TREE: dict[type[Exception], tuple[type[BaseException], ...]] = {
    FlareError: (Exception,),
    ConfigError: (FlareError, ValueError),
    InvalidName: (ConfigError,),
    UnsupportedScheme: (ConfigError,),
    CodecError: (FlareError,),
    DecodeError: (CodecError,),
    ProtocolError: (FlareError,),
    FrameTooLarge: (ProtocolError,),
    VersionMismatch: (ProtocolError,),
    IdentityError: (ProtocolError,),
    TransportError: (FlareError,),
    ConnectError: (TransportError,),
    LinkClosed: (TransportError,),
    LinkBroken: (TransportError,),
    RoutingError: (FlareError,),
    Unreachable: (RoutingError,),
    DeadlineExceeded: (FlareError, TimeoutError),
    CellClosed: (FlareError,),
    StreamError: (FlareError,),
    StreamCorrupted: (StreamError,),
    StreamStalled: (StreamError, TimeoutError),
    StreamAborted: (StreamError,),
    RemoteError: (FlareError,),
    NoHandler: (RemoteError,),
    BadRequest: (RemoteError,),
    Unauthorized: (RemoteError,),
    IntegrityError: (RemoteError,),
    Overloaded: (RemoteError,),
    InternalError: (RemoteError,),
}


def test_status_values_are_frozen() -> None:
    # Values travel on the wire: renumbering one would break every older peer.
    assert {s.name: int(s) for s in Status} == {
        "UNREACHABLE": 1,
        "NO_HANDLER": 2,
        "DEADLINE_EXCEEDED": 3,
        "INTERNAL": 4,
        "BAD_REQUEST": 5,
        "UNAUTHORIZED": 6,
        "OVERLOADED": 7,
        "LINK_BROKEN": 8,
        "STREAM_CORRUPTED": 9,
        "STREAM_STALLED": 10,
        "STREAM_ABORTED": 11,
        "INTEGRITY": 12,
    }


def test_every_status_has_an_expected_class() -> None:
    assert set(EXPECTED_MAPPING) == set(Status)


@pytest.mark.parametrize("status", list(Status), ids=lambda s: s.name)
def test_error_for_status_builds_the_matching_class(status: Status) -> None:
    exc = error_for_status(status, "boom", "server.eu")
    assert type(exc) is EXPECTED_MAPPING[status]
    assert exc.reported_by == "server.eu"
    assert exc.args[0] == "boom"
    assert str(exc) == "boom (reported by server.eu)"


@pytest.mark.parametrize("status", list(Status), ids=lambda s: s.name)
def test_error_for_status_accepts_a_plain_int(status: Status) -> None:
    # The wire carries an int, not the enum member.
    exc = error_for_status(int(status), "x", "a")
    assert type(exc) is EXPECTED_MAPPING[status]


@pytest.mark.parametrize("status", list(Status), ids=lambda s: s.name)
def test_status_round_trips_through_the_error(status: Status) -> None:
    assert status_for_error(error_for_status(status, "m", "c")) is status
    assert status_for_error(EXPECTED_MAPPING[status]("local")) is status


@pytest.mark.parametrize("status", [0, 13, 99, 2**31, -1])
def test_unknown_status_becomes_remote_error(status: int) -> None:
    exc = error_for_status(status, "from the future", "server")
    assert type(exc) is RemoteError
    assert exc.reported_by == "server"
    assert "from the future" in str(exc)
    assert "server" in str(exc)


def test_status_for_error_uses_the_nearest_mapped_base() -> None:
    class CustomUnreachable(Unreachable):
        pass

    class CustomOverloaded(Overloaded):
        pass

    assert status_for_error(CustomUnreachable("x")) is Status.UNREACHABLE
    assert status_for_error(CustomOverloaded("x")) is Status.OVERLOADED


@pytest.mark.parametrize(
    "exc",
    [
        FlareError("x"),
        RemoteError("x"),
        ProtocolError("x"),
        ConfigError("x"),
        CellClosed("x"),
        LinkClosed("x"),
        ConnectError("x"),
        RoutingError("x"),
        TransportError("x"),
    ],
    ids=lambda e: type(e).__name__,
)
def test_unmapped_errors_report_internal(exc: FlareError) -> None:
    assert status_for_error(exc) is Status.INTERNAL


@pytest.mark.parametrize(("cls", "bases"), list(EXPECTED_TREE.items()), ids=str)
def test_tree_matches_the_docstring(
    cls: type[Exception], bases: tuple[type[BaseException], ...]
) -> None:
    assert cls.__bases__ == bases
    assert cls.__name__ in (errors.__doc__ or "")


def test_every_exported_exception_is_in_the_tree() -> None:
    exported = {
        obj
        for name in errors.__all__
        if inspect.isclass(obj := getattr(errors, name)) and issubclass(obj, BaseException)
    }
    assert exported == set(EXPECTED_TREE)
    assert all(issubclass(cls, FlareError) for cls in exported)


def test_deadline_exceeded_is_a_timeout_error() -> None:
    with pytest.raises(TimeoutError):
        raise DeadlineExceeded("too late")
    exc = error_for_status(Status.DEADLINE_EXCEEDED, "late", "relay")
    assert isinstance(exc, TimeoutError)
    assert str(exc) == "late (reported by relay)"


def test_config_error_is_a_value_error() -> None:
    with pytest.raises(ValueError):
        raise InvalidName("bad")
    with pytest.raises(ValueError):
        raise UnsupportedScheme("gopher://")
    assert not issubclass(ProtocolError, ValueError)


def test_reported_by_appears_in_str_only_when_set() -> None:
    assert str(Unreachable("no route")) == "no route"
    assert Unreachable("no route").reported_by is None
    exc = Unreachable("no route", reported_by="server.eu")
    assert str(exc) == "no route (reported by server.eu)"
    assert exc.reported_by == "server.eu"
    assert str(FlareError(reported_by="x")) == " (reported by x)"


def test_protocol_error_names_the_peer() -> None:
    exc = FrameTooLarge("too big", peer="tcp://10.0.0.1:8002")
    assert exc.peer == "tcp://10.0.0.1:8002"
    assert "too big" in str(exc)
    assert "tcp://10.0.0.1:8002" in str(exc)
    assert ProtocolError("bad").peer is None
    assert str(ProtocolError("bad")) == "bad"


def test_errors_survive_pickling() -> None:
    # Errors may cross process boundaries; their attributes must come along.
    exc = error_for_status(Status.OVERLOADED, "full", "server")
    back = pickle.loads(pickle.dumps(exc))
    assert type(back) is Overloaded
    assert back.reported_by == "server"
    assert str(back) == str(exc)
    perr = pickle.loads(pickle.dumps(ProtocolError("bad", peer="p")))
    assert type(perr) is ProtocolError
    assert perr.peer == "p"
