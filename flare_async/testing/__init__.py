"""Public testing helpers: the driver conformance suite every transport must pass, a
fault-injecting driver wrapper, a fault-injecting TCP proxy (``FaultProxy``), and throwaway
provisioned projects."""

from flare_async.testing._conformance import (
    CONFORMANCE_CHECKS,
    LinkPairFactory,
    check_cancel_mid_send,
    check_close_vs_broken,
    check_eof_wakes_receiver,
    check_frame_too_large,
    check_large_frames,
    check_link_conformance,
    check_ordering,
    check_try_send,
    driver_pair,
    run_check,
)
from flare_async.testing._faults import FaultyDriver, FramePredicate, flip_one_byte
from flare_async.testing._projects import free_ports, wss_edge_project
from flare_async.testing._proxy import (
    Direction,
    FaultCounters,
    FaultProxy,
    HeaderMatch,
    rst_close,
)

__all__ = [
    "CONFORMANCE_CHECKS",
    "Direction",
    "FaultCounters",
    "FaultProxy",
    "FaultyDriver",
    "FramePredicate",
    "HeaderMatch",
    "LinkPairFactory",
    "check_cancel_mid_send",
    "check_close_vs_broken",
    "check_eof_wakes_receiver",
    "check_frame_too_large",
    "check_large_frames",
    "check_link_conformance",
    "check_ordering",
    "check_try_send",
    "driver_pair",
    "flip_one_byte",
    "free_ports",
    "rst_close",
    "run_check",
    "wss_edge_project",
]
