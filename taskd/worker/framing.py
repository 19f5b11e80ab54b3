"""Frames on the pipes between the supervisor and its children.

A frame is a 4-byte big-endian length followed by that many bytes of
pickle. Only the supervisor and its own children speak on these pipes, so
pickle is safe here (it never carries bytes from the broker undecoded).

The supervisor never blocks on a pipe: its ends are non-blocking, a
:class:`FrameReader` takes whatever bytes are there, and a
:class:`FrameWriter` keeps what a pipe could not take until the loop says
it is writable again. A child, which does one thing at a time, reads and
writes blocking (:func:`iter_frames`, :func:`write_all`).

A stream that breaks the framing (a frame over the reader's limit, bytes that
do not unpickle) cannot be resynchronised: the reader keeps the frames it
decoded before the fault, then reports it in ``error`` and reads no more.
"""
from __future__ import annotations

import collections
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

    __slots__ = ("_buf", "max_frame", "error")

    def __init__(self, max_frame=MAX_FRAME):
        self._buf = bytearray()
        self.max_frame = max_frame
        self.error = None       # why the stream broke; nothing more is decoded

    def feed(self, data) -> list:
        """The whole frames completed by ``data``; none once ``error`` is set."""
        if self.error is not None:
            return []
        self._buf += data
        frames = []
        buf = self._buf
        offset = 0
        while len(buf) - offset >= HEADER.size:
            (size,) = HEADER.unpack_from(buf, offset)
            if size > self.max_frame:
                self._broken(f"a frame of {size} bytes exceeds the limit of "
                             f"{self.max_frame} bytes")
                break
            end = offset + HEADER.size + size
            if len(buf) < end:
                break
            try:
                frames.append(pickle.loads(buf[offset + HEADER.size:end]))
            except Exception as exc:
                self._broken(f"a frame does not unpickle: {type(exc).__name__}: {exc}")
                break
            offset = end
        if self.error is None and offset:
            del buf[:offset]
        return frames

    def _broken(self, reason):
        self.error = reason
        self._buf = bytearray()

    @property
    def pending(self) -> int:
        return len(self._buf)


class FrameWriter:
    """Bytes on their way down a non-blocking pipe, in order.

    :meth:`send` writes at once what the pipe takes and keeps the rest;
    :meth:`flush` writes more of it when the pipe is writable again. Both
    return True when nothing is left, and raise OSError (EPIPE) when the
    reader is gone. Kept bytes are a queue of chunks, so a large frame is not
    copied again for every partial write.
    """

    __slots__ = ("fd", "_chunks", "_offset", "_write")

    def __init__(self, fd, write=os.write):
        self.fd = fd
        self._chunks = collections.deque()
        self._offset = 0            # bytes of _chunks[0] already written
        self._write = write

    def send(self, data) -> bool:
        if self._chunks:
            self._chunks.append(data)
            return False
        try:
            written = self._write(self.fd, data)
        except BlockingIOError:
            written = 0
        if written == len(data):
            return True
        self._chunks.append(data)
        self._offset = written
        return False

    def flush(self) -> bool:
        while self._chunks:
            view = memoryview(self._chunks[0])[self._offset:]
            try:
                written = self._write(self.fd, view)
            except BlockingIOError:
                return False
            if written < len(view):
                self._offset += written
                return False
            self._chunks.popleft()
            self._offset = 0
        return True

    @property
    def pending(self) -> int:
        """Bytes not yet written."""
        return sum(map(len, self._chunks)) - self._offset


def iter_frames(fd, read=os.read, chunk=1 << 16):
    """Blocking: yield each frame read from ``fd`` until end of file. Reads
    ``chunk`` bytes at a time, so frames written together cost one read."""
    reader = FrameReader()
    while True:
        data = read(fd, chunk)
        if not data:
            return
        yield from reader.feed(data)
        if reader.error is not None:
            raise ValueError(f"broken job stream: {reader.error}")


def write_all(fd, data, _write=os.write):
    written = _write(fd, data)
    if written == len(data):
        return
    view = memoryview(data)[written:]
    while view:
        view = view[_write(fd, view):]
