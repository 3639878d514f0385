"""The load test's own options, in one place: the locustfile adds them to locust's
command line, and `python -m loadtest.run` to its own (so its --help lists them,
which `locust --help` cannot: locust prints its help before it reads the locustfile)."""

from __future__ import annotations

import argparse
import re
from typing import Any

# Room names are 1 to 64 of these characters; the harness appends "-w<index>-<number>".
ROOM_PREFIX = re.compile(r"[A-Za-z0-9_.-]{1,40}")


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, not {text}")
    return value


def _count(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, not {text}")
    return value


def _seconds(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be more than 0 seconds, not {text}")
    return value


def _margin(text: str) -> float:
    value = float(text)
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more seconds, not {text}")
    return value


def _share(text: str) -> float:
    value = float(text)
    if not 0 <= value <= 1:
        raise argparse.ArgumentTypeError(f"must be between 0 and 1, not {text}")
    return value


def _room_prefix(text: str) -> str:
    if text and not ROOM_PREFIX.fullmatch(text):
        raise argparse.ArgumentTypeError("must be 1 to 40 characters of A-Z a-z 0-9 _ . -")
    return text


def add_arguments(parser: Any, *, report_file: bool = True) -> None:
    """Add the options to `parser` (locust's, or any argparse parser). `report_file`:
    also --summary-json, which `python -m loadtest.run` sets itself."""
    add = parser.add_argument
    add(
        "--rooms",
        type=_positive_int,
        default=10,
        help="rooms the users are spread over, round robin (default: %(default)s)",
    )
    add(
        "--room-size",
        type=_count,
        default=0,
        help="instead: fill each room to this many users, then the next, so the number "
        "of rooms follows from the users (default: 0, off)",
    )
    add(
        "--senders",
        type=_share,
        default=1.0,
        help="share of each room's users that send; the others only listen, like "
        "dashboards and lurkers (default: %(default)s)",
    )
    add(
        "--send-interval",
        type=_seconds,
        default=10.0,
        help="seconds between one sender's messages (default: %(default)s: 20 messages/s "
        "for 200 users, which a 2-core laptop running the local stack keeps up with)",
    )
    add(
        "--payload-bytes",
        type=_count,
        default=100,
        help="size of each messageBody, JSON-encoded (default: %(default)s)",
    )
    add(
        "--grace",
        type=_seconds,
        default=5.0,
        help="seconds a delivery may take before it counts as lost; sending stops this "
        "long (+1 s) before --run-time ends (default: %(default)s)",
    )
    add(
        "--join-margin",
        type=_margin,
        default=0.0,
        help="messages sent this soon after a user joined owe it nothing (default: "
        "%(default)s: the broadcast's Query is strongly consistent, so a completed "
        "handshake gets every later message; raise it for a handler that reads "
        "eventually consistently)",
    )
    add(
        "--churn-interval",
        type=_margin,
        default=0.0,
        help="mean seconds a connection lasts before its user leaves and comes back "
        "(exponentially distributed; default: %(default)s, no churn)",
    )
    add(
        "--abrupt-share",
        type=_share,
        default=0.0,
        help="share of those leaves that reset the TCP connection without a close frame "
        "(default: %(default)s)",
    )
    add(
        "--room-prefix",
        type=_room_prefix,
        default="",
        help="prefix of the room names (default: lt + random hex, new each run, so no "
        "other client shares the rooms)",
    )
    if not report_file:
        return
    add(
        "--summary-json",
        default="",
        metavar="FILE",
        help="write the delivery accounting and the latency percentiles here at the end",
    )
