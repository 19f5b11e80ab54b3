"""Frames on the pipes between the supervisor and its children (pure).

A frame is a 4-byte big-endian length followed by that many bytes of
pickle. Only the supervisor and its own children speak on these pipes, so
pickle is safe here (it never carries bytes from the broker undecoded).
"""
from __future__ import annotations

import os
import pickle
import struct

HEADER = struct.Struct(">I")
MAX_FRAME = 1 << 30


def encode(obj) -> bytes:
    payload = pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)
    return HEADER.pack(len(payload)) + payload


class FrameReader:
    """Accumulates bytes read from a pipe and yields whole frames."""

    __slots__ = ("_buf",)

    def __init__(self):
        self._buf = bytearray()

    def feed(self, data) -> list:
        self._buf += data
        frames = []
        buf = self._buf
        offset = 0
        while len(buf) - offset >= HEADER.size:
            (size,) = HEADER.unpack_from(buf, offset)
            if size > MAX_FRAME:
                raise ValueError(f"frame of {size} bytes exceeds the limit")
            end = offset + HEADER.size + size
            if len(buf) < end:
                break
            frames.append(pickle.loads(buf[offset + HEADER.size:end]))
            offset = end
        if offset:
            del buf[:offset]
        return frames

    @property
    def pending(self) -> int:
        return len(self._buf)


def read_frame(fd, read=None):
    """Blocking read of one frame from ``fd``; ``None`` at end of file."""
    import os
    read = read or os.read
    header = _read_exactly(fd, HEADER.size, read)
    if header is None:
        return None
    (size,) = HEADER.unpack(header)
    payload = _read_exactly(fd, size, read)
    if payload is None:
        return None
    return pickle.loads(payload)


def _read_exactly(fd, n, read):
    chunks, remaining = [], n
    while remaining:
        chunk = read(fd, min(remaining, 1 << 20))
        if not chunk:
            return None
        chunks.append(chunk)
        remaining -= len(chunk)
    return b"".join(chunks)


def write_all(fd, data, _write=os.write):
    written = _write(fd, data)
    if written == len(data):
        return
    view = memoryview(data)[written:]
    while view:
        view = view[_write(fd, view):]
