"""Every pika internal taskd relies on, in one place, each with a check for upgrades.

taskd uses pika's public API everywhere else. Two jobs need its private
layout (pika 1.3/1.4); :func:`check_pika` lists what no longer fits the
installed pika, and ``tests/unit/test_pikashim.py`` (and ``test_float_headers.py``) fails loudly with that
list after an upgrade.

**1. Floating-point values in AMQP field tables**, which pika gets wrong.
pika decodes the field types ``d`` (double) and ``f`` (float) with ``long()``:
a Celery client's ``soft_time_limit=1.5`` reaches the worker as ``1`` and
``time_limit=0.5`` as ``0``. pika also cannot encode a Python ``float`` at all
(``UnsupportedAMQPFieldException``), so a message whose headers carry one
cannot be published or re-published. :func:`install` fixes both, once per
process, when ``taskd.broker`` is imported: it wraps ``pika.data.decode_value``
and ``pika.data.encode_value``, handling ``d``/``f`` and ``float`` itself and
passing everything else to pika. This works because pika looks both functions
up as module globals at every call (``decode_table``/``encode_table`` and the
array branches call them by name; ``pika.spec`` calls ``data.decode_table``).
Floats are encoded as ``d``, as Celery's py-amqp does; RabbitMQ carries ``d``
unchanged. NaN and infinities are refused before sending
(:class:`NonFiniteHeaderValue`, a pika ``UnsupportedAMQPFieldException``):
RabbitMQ would close the whole connection over them (541 INTERNAL_ERROR).

**2. Pipelined publisher confirms on a BlockingConnection.** pika's blocking
channel waits for each confirm before the next publish. The client's
:class:`~taskd.broker.publisher.Publisher` keeps many publishes in flight, so
it takes confirms, returns and the channel's close on the blocking channel's
underlying channel (``channel._impl``: :func:`watch_channel`), and runs the
connection's I/O until a condition holds, bounded by a timer
(``connection._flush_output`` and ``_IoloopTimerContext``: :func:`pump_until`).
"""
from __future__ import annotations

import inspect
import math
import struct
from typing import Callable

import pika
import pika.data
import pika.exceptions
from pika.adapters import blocking_connection
from pika.channel import Channel

# --- 1. float fields -------------------------------------------------------------

_FLOATS = {b"d": (">d", 8), b"f": (">f", 4)}
_installed = False


class NonFiniteHeaderValue(pika.exceptions.UnsupportedAMQPFieldException):
    """A NaN or infinite float in a header or argument table: RabbitMQ refuses those."""

    def __str__(self):
        return (f"header value {self.args[1]!r}: RabbitMQ refuses NaN and infinite numbers "
                "(it would close the connection)")


def _field_problems() -> list[str]:
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


def install() -> None:
    """Wrap pika's field decoder and encoder (idempotent); raises if pika changed."""
    global _installed
    if _installed:
        return
    problems = _field_problems()
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


# --- 2. pipelined confirms on a BlockingConnection ----------------------------------

def watch_channel(channel: pika.adapters.blocking_connection.BlockingChannel, *,
                  on_confirm: Callable, on_return: Callable, on_close: Callable,
                  on_selected: Callable) -> None:
    """Put ``channel`` in confirm mode with taskd's callbacks on its underlying channel,
    so that several confirms can be outstanding at once. ``on_selected`` is called
    once the broker has answered ``confirm.select`` (see :func:`pump_until`)."""
    impl = channel._impl
    impl.add_on_close_callback(on_close)
    impl.confirm_delivery(ack_nack_callback=on_confirm, callback=on_selected)
    impl.add_on_return_callback(on_return)


def close_channel_nowait(channel: pika.adapters.blocking_connection.BlockingChannel) -> None:
    """Send ``channel.close`` without waiting for the broker's close-ok, which
    ``BlockingChannel.close()`` awaits with no time limit. The answer, if it comes, is
    read by a later pump of the connection."""
    impl = channel._impl
    try:
        if impl.is_open:
            impl.close()
    except (pika.exceptions.AMQPError, OSError):
        pass


def pump_until(connection: pika.BlockingConnection, timeout: float,
               *conditions: Callable[[], bool]) -> None:
    """Run ``connection``'s I/O until its output is flushed and one of ``conditions``
    holds, or ``timeout`` seconds pass (the caller checks which). A connection that
    closes meanwhile raises as pika raises it."""
    timer = blocking_connection._IoloopTimerContext(timeout, connection._impl)
    with timer:
        connection._flush_output(timer.is_ready, *conditions)


def _confirm_problems() -> list[str]:
    problems = []
    timer = getattr(blocking_connection, "_IoloopTimerContext", None)
    if timer is None:
        problems.append("pika.adapters.blocking_connection._IoloopTimerContext is gone")
    else:
        if list(inspect.signature(timer).parameters) != ["duration", "connection"]:
            problems.append(f"_IoloopTimerContext now takes {inspect.signature(timer)}")
        for name in ("__enter__", "__exit__", "is_ready"):
            if not hasattr(timer, name):
                problems.append(f"_IoloopTimerContext has no {name}")
    flush = getattr(pika.BlockingConnection, "_flush_output", None)
    if flush is None:
        problems.append("BlockingConnection._flush_output is gone")
    elif [p.kind for p in inspect.signature(flush).parameters.values()][1:] != \
            [inspect.Parameter.VAR_POSITIONAL]:
        problems.append(f"BlockingConnection._flush_output now takes {inspect.signature(flush)}")
    source = inspect.getsource(blocking_connection.BlockingChannel.__init__)
    if "self._impl = channel_impl" not in source:
        problems.append("BlockingChannel no longer keeps its channel as _impl")
    if "self._impl = " not in inspect.getsource(pika.BlockingConnection.__init__):
        problems.append("BlockingConnection no longer keeps its connection as _impl")
    wanted = {"confirm_delivery": ["ack_nack_callback", "callback"],
              "add_on_return_callback": ["callback"], "add_on_close_callback": ["callback"]}
    for name, params in wanted.items():
        fn = getattr(Channel, name, None)
        got = list(inspect.signature(fn).parameters)[1:] if fn else None
        if got != params:
            problems.append(f"pika.channel.Channel.{name} now takes {got}, not {params}")
    return problems


def check_pika() -> list[str]:
    """What no longer fits the installed pika (empty: everything fits)."""
    return _field_problems() + _confirm_problems()
