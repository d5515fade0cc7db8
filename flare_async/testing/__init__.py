"""Public testing helpers: the driver conformance suite every transport must pass, a
fault-injecting driver wrapper, a fault-injecting TCP proxy (``FaultProxy``), and throwaway
provisioned projects.

The face for people who test their own drivers, codecs and deployments (see docs/design.md,
"Public faces"); the interfaces those drivers implement are in :mod:`flare_async.lowlevel`."""

from flare_async.testing._conformance import (
    CONFORMANCE_CHECKS,
    BreakLink,
    LinkPairFactory,
    check_cancel_mid_send,
    check_close_vs_broken,
    check_deliver_to,
    check_eof_wakes_receiver,
    check_frame_too_large,
    check_large_frames,
    check_link_conformance,
    check_ordering,
    check_try_send,
    driver_pair,
    run_check,
)
from flare_async.testing._faults import FaultyDriver, FramePredicate, FrameRewrite, flip_one_byte
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
    "BreakLink",
    "Direction",
    "FaultCounters",
    "FaultProxy",
    "FaultyDriver",
    "FramePredicate",
    "FrameRewrite",
    "HeaderMatch",
    "LinkPairFactory",
    "check_cancel_mid_send",
    "check_close_vs_broken",
    "check_deliver_to",
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
