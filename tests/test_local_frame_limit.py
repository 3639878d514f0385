"""The frame size limit in front of aiohttp's parser (local/gateway.py), whatever
way TCP cuts the byte stream into reads."""

from __future__ import annotations

import itertools
import os
from typing import Any

from aiohttp import WSCloseCode
from hypothesis import given, settings
from hypothesis import strategies as st

from local.gateway import _FrameSizeGuard

LIMIT = 200


def client_frame(size: int, opcode: int = 0x1, fin: bool = True) -> bytes:
    """A masked frame as a client sends it, with a payload of `size` bytes."""
    first = (0x80 if fin else 0) | opcode
    if size < 126:
        header = bytes([first, 0x80 | size])
    elif size < 1 << 16:
        header = bytes([first, 0x80 | 126]) + size.to_bytes(2, "big")
    else:
        header = bytes([first, 0x80 | 127]) + size.to_bytes(8, "big")
    return header + os.urandom(4) + b"x" * size


class Parser:
    def __init__(self) -> None:
        self.received = b""

    def feed_data(self, data: bytes) -> tuple[bool, bytes]:
        self.received += data
        return False, b""

    def feed_eof(self) -> None:
        pass


class Queue:
    def __init__(self) -> None:
        self.exception: Any = None

    def set_exception(self, exception: Any) -> None:
        self.exception = exception


def feed(stream: bytes, cuts: list[int]) -> tuple[Parser, Queue]:
    parser, queue = Parser(), Queue()
    guard = _FrameSizeGuard(parser, queue, LIMIT)
    points = sorted({0, len(stream), *(cut % (len(stream) + 1) for cut in cuts)})
    for start, end in itertools.pairwise(points):
        guard.feed_data(stream[start:end])
    return parser, queue


sizes = st.lists(st.sampled_from([0, 1, 125, 126, 200, 65535, 65536]), max_size=6)
cuts = st.lists(st.integers(min_value=0, max_value=1 << 20), max_size=12)


@settings(max_examples=150, deadline=None)
@given(sizes=sizes, cuts=cuts)
def test_frames_within_the_limit_pass_through_unchanged(sizes: list[int], cuts: list[int]) -> None:
    frames = [client_frame(min(size, LIMIT)) for size in sizes]
    frames.append(client_frame(0, opcode=0x9))  # a ping in between changes nothing
    stream = b"".join(frames)
    parser, queue = feed(stream, cuts)
    assert parser.received == stream
    assert queue.exception is None


@settings(max_examples=150, deadline=None)
@given(before=sizes, oversized=st.sampled_from([LIMIT + 1, 300, 65536]), cuts=cuts)
def test_an_oversized_data_frame_stops_the_stream_where_it_starts(
    before: list[int], oversized: int, cuts: list[int]
) -> None:
    accepted = b"".join(client_frame(min(size, LIMIT)) for size in before)
    stream = accepted + client_frame(oversized, opcode=0x0, fin=False) + client_frame(5)
    parser, queue = feed(stream, cuts)
    # Everything before it, and at most the start of its own header (split across reads).
    assert stream.startswith(parser.received)
    assert len(accepted) <= len(parser.received) < len(accepted) + 14
    assert queue.exception is not None and queue.exception.code == WSCloseCode.MESSAGE_TOO_BIG
