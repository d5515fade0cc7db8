"""Public testing helpers: the driver conformance suite every transport must pass."""

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

__all__ = [
    "CONFORMANCE_CHECKS",
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
    "run_check",
]
