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


def iter_frames(fd, read=os.read, chunk=1 << 16):
    """Blocking: yield each frame read from ``fd`` until end of file. Reads
    ``chunk`` bytes at a time, so frames written together cost one read."""
    reader = FrameReader()
    while True:
        data = read(fd, chunk)
        if not data:
            return
        yield from reader.feed(data)


def write_all(fd, data, _write=os.write):
    written = _write(fd, data)
    if written == len(data):
        return
    view = memoryview(data)[written:]
    while view:
        view = view[_write(fd, view):]
