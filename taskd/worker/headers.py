"""Headers of the copies the supervisor publishes: made encodable and made to fit (pure).

A copy (park, retry, redeliver, dead letter) carries the headers of the message
it replaces, and those came from any client. Two things can stop pika or the
broker from taking them back:

* **Values pika cannot encode.** pika decodes more than it encodes. With
  :mod:`taskd.broker.pikashim` installed, doubles decode as floats and finite
  floats encode as doubles, but NaN and infinities (from task code), tuples,
  negative timestamps and keys over 255 bytes still fail. :func:`sanitise`
  turns every value into one pika encodes: a float that cannot go out as a
  double becomes an int, a Decimal or its text; anything else that fails
  becomes its text. Nothing is dropped but keys AMQP cannot name.
* **A content header larger than the connection's frame_max.** The broker
  answers with ``FRAME_ERROR`` and closes the whole connection, and the
  original comes back to do the same again: a reconnect loop. The text of a
  dead-letter reason can echo anything the sender wrote, so
  :func:`bounded` caps it, and :func:`fit` checks the encoded properties
  against the negotiated ``frame_max`` and truncates the largest values first,
  naming them in ``x-taskd-truncated``.
"""
from __future__ import annotations

import decimal
from typing import Any

from pika import data as amqp_data

MAX_REASON = 1024                   # bytes of x-taskd-reason (and of a truncated value)
TRUNCATED = "x-taskd-truncated"
# Frame header (7) + end (1) + class id, weight, body size and property flags (14),
# and some room for what pika adds.
FRAME_OVERHEAD = 64


def _encodes(value: Any) -> bool:
    try:
        amqp_data.encode_value([], value)
        return True
    except Exception:       # struct.error, UnsupportedAMQPFieldException, TypeError ...
        return False


def _number(value: Any) -> Any:
    if value.is_integer() and -2 ** 63 <= value < 2 ** 63:
        return int(value)
    try:
        dec = decimal.Decimal(repr(value))
    except decimal.InvalidOperation:
        return repr(value)
    return dec if _encodes(dec) else repr(value)


def sanitise(value: Any) -> Any:
    """``value`` (a header table or any header value) as pika can encode it."""
    if isinstance(value, dict):
        return {k: sanitise(v) for k, v in value.items()
                if isinstance(k, str) and len(k.encode("utf-8", "replace")) <= 255}
    if isinstance(value, (list, tuple)):
        return [sanitise(v) for v in value]
    if isinstance(value, float):
        # Finite floats go out as doubles (taskd.broker.pikashim); NaN and infinities
        # cannot, and pika without that fix cannot encode any float.
        return value if _encodes(value) else _number(value)
    if isinstance(value, bytearray):
        value = bytes(value)
    if _encodes(value):
        return value
    return str(value)


def bounded(text: str, limit: int = MAX_REASON) -> str:
    """``text`` cut to at most ``limit`` bytes of UTF-8, saying how much was cut."""
    raw = text.encode("utf-8", "replace")
    if len(raw) <= limit:
        return text
    note = f"... [{len(raw) - limit} more bytes cut]"
    return raw[:limit - len(note)].decode("utf-8", "ignore") + note


def properties_size(properties: Any) -> int:
    """Bytes of the encoded properties (the content header frame's payload)."""
    return sum(len(piece) for piece in properties.encode())


def _value_size(key: str, value: Any) -> int:
    return amqp_data.encode_table([], {key: value})


def fit(properties: Any, frame_max: int) -> list:
    """Make ``properties`` (already sanitised) fit one content header frame of
    ``frame_max`` bytes (0: no limit): cut the largest header values to their
    first bytes, largest first, then drop them; returns the names touched."""
    if not frame_max:
        return []
    limit = frame_max - FRAME_OVERHEAD
    headers = properties.headers or {}
    touched = []
    while properties_size(properties) > limit:
        candidates = [k for k in headers if k not in touched and k != TRUNCATED]
        if candidates:
            key = max(candidates, key=lambda k: _value_size(k, headers[k]))
            headers[key] = bounded(str(headers[key]), MAX_REASON // 4)
        else:       # every value is already short: drop the largest
            key = max((k for k in headers if k != TRUNCATED),
                      key=lambda k: _value_size(k, headers[k]), default=None)
            if key is None:
                break
            del headers[key]
        if key not in touched:
            touched.append(key)
        headers[TRUNCATED] = bounded(",".join(touched))
        properties.headers = headers
    return touched
