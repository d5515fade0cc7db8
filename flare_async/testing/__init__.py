"""Public testing helpers: the driver conformance suite every transport must pass, and a
fault-injecting driver wrapper."""

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

__all__ = [
    "CONFORMANCE_CHECKS",
    "FaultyDriver",
    "FramePredicate",
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
    "run_check",
]
