"""Floating-point values in AMQP field tables, which pika gets wrong.

pika 1.3/1.4 decode the field types ``d`` (double) and ``f`` (float) with
``long()``: a Celery client's ``soft_time_limit=1.5`` reaches the worker as
``1`` and ``time_limit=0.5`` as ``0``. pika also cannot encode a Python
``float`` at all (``UnsupportedAMQPFieldException``), so a message whose
headers carry one cannot be published or re-published.

:func:`install` fixes both, once per process, when ``taskd.broker`` is
imported: it wraps ``pika.data.decode_value`` and ``pika.data.encode_value``,
handling ``d``/``f`` and ``float`` itself and passing everything else to
pika. This works because pika looks both functions up as module globals at
every call (``decode_table``/``encode_table`` and the array branches call
them by name; ``pika.spec`` calls ``data.decode_table``). Floats are encoded
as ``d``, as Celery's py-amqp does; RabbitMQ carries ``d`` unchanged. NaN and
infinities are refused before sending (:class:`NonFiniteHeaderValue`, a
pika ``UnsupportedAMQPFieldException``): RabbitMQ would close the whole
connection over them (541 INTERNAL_ERROR).

The wrappers depend on pika's private layout: :func:`check_pika` says what
changed when it no longer matches, and a unit test runs it.
"""
from __future__ import annotations

import inspect
import math
import struct

import pika
import pika.data
import pika.exceptions

_FLOATS = {b"d": (">d", 8), b"f": (">f", 4)}
_installed = False


class NonFiniteHeaderValue(pika.exceptions.UnsupportedAMQPFieldException):
    """A NaN or infinite float in a header or argument table: RabbitMQ refuses those."""

    def __str__(self):
        return (f"header value {self.args[1]!r}: RabbitMQ refuses NaN and infinite numbers "
                "(it would close the connection)")


def check_pika():
    """The reasons the wrappers would not fit the installed pika (empty: they fit)."""
    problems = []
    for name, params in (("decode_value", ["encoded", "offset"]),
                         ("encode_value", ["pieces", "value"])):
        fn = getattr(pika.data, name, None)
        if fn is None:
            problems.append(f"pika.data.{name} is gone")
            continue
        fn = inspect.unwrap(fn)         # pika's own, also once install() wrapped it
        if list(inspect.signature(fn).parameters) != params:
            problems.append(f"pika.data.{name} now takes {inspect.signature(fn)}, not {params}")
    for name in ("decode_table", "encode_table"):
        fn = getattr(pika.data, name, None)
        callee = name.replace("table", "value")
        if fn is None or callee not in fn.__code__.co_names:
            problems.append(f"pika.data.{name} no longer calls {callee} by name")
    return problems


def install():
    """Wrap pika's field decoder and encoder (idempotent); raises if pika changed."""
    global _installed
    if _installed:
        return
    problems = check_pika()
    if problems:
        raise ImportError(f"taskd cannot fix float headers for pika {pika.__version__}: "
                          + "; ".join(problems))
    decode, encode = pika.data.decode_value, pika.data.encode_value

    def decode_value(encoded, offset):
        kind = encoded[offset:offset + 1]
        if kind in _FLOATS:
            fmt, size = _FLOATS[kind]
            return struct.unpack_from(fmt, encoded, offset + 1)[0], offset + 1 + size
        return decode(encoded, offset)

    def encode_value(pieces, value):
        if isinstance(value, float):
            if not math.isfinite(value):
                raise NonFiniteHeaderValue(pieces, value)
            pieces.append(struct.pack(">cd", b"d", value))
            return 9
        return encode(pieces, value)

    decode_value.__wrapped__, encode_value.__wrapped__ = decode, encode   # pika's own
    pika.data.decode_value, pika.data.encode_value = decode_value, encode_value
    _installed = True
