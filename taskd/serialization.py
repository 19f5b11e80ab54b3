"""The serializer registry: names, content types and the codecs behind them.

A serializer is a name (what ``serializer=`` takes), a content type and
encoding (what travels in the AMQP properties), and a pair of functions
``dumps(obj) -> bytes|str`` and ``loads(bytes) -> obj``. The worker decodes
a body by its content type, and only if that type is in ``accept_content``.

Built in:

========  ==============================  ===========================================
name      content type                    notes
========  ==============================  ===========================================
json      application/json                default; extra types as kombu encodes them
pickle    application/x-python-serialize  code execution on decode: opt in on both sides
yaml      application/x-yaml              safe loader only; aliases refused
msgpack   application/x-msgpack           when the ``msgpack`` package is installed
========  ==============================  ===========================================

JSON carries ``datetime``, ``date``, ``time``, ``Decimal``, ``UUID`` and
``bytes`` as ``{"__type__": ..., "__value__": ...}`` objects, exactly as kombu
(Celery's messaging library) does, so Celery peers decode them too. ``set``
and ``frozenset`` use the same envelope with the marker ``set``; taskd decodes
them back into a ``set``, but a stock Celery peer rejects that marker.
"""
from __future__ import annotations

import base64
import importlib
import json
import pickle
import uuid
from dataclasses import dataclass
from datetime import date, datetime, time
from decimal import Decimal
from typing import Any, Callable

import yaml

from .exceptions import ContentDisallowed, DecodeError, EncodeError, UnknownSerializer


@dataclass(frozen=True, slots=True)
class Serializer:
    name: str
    content_type: str
    content_encoding: str
    dumps: Callable[[Any], bytes | str]
    loads: Callable[[bytes], Any]


_by_name: dict[str, Serializer] = {}
_by_type: dict[str, Serializer] = {}


def register(name: str, dumps: Callable[[Any], bytes | str], loads: Callable[[bytes], Any],
             content_type: str, content_encoding: str = "utf-8") -> Serializer:
    """Register a serializer under ``name`` and ``content_type``.

    Register it in the client *and* in the worker: the worker learns custom
    serializers by importing the modules listed under ``serializer_modules``
    in its configuration, and decodes only the types listed in
    ``accept_content`` (by name or by content type).
    """
    entry = Serializer(name, content_type, content_encoding, dumps, loads)
    _by_name[name] = entry
    _by_type[content_type] = entry
    return entry


def unregister(name: str) -> None:
    entry = _by_name.pop(name, None)
    if entry is not None:
        _by_type.pop(entry.content_type, None)


def get(name: str) -> Serializer:
    try:
        return _by_name[name]
    except KeyError:
        raise UnknownSerializer(
            f"no serializer named {name!r}; known: {', '.join(sorted(_by_name))}"
        ) from None


def name_of(content_type: str | None, default: str = "json") -> str:
    """The name of the serializer registered for ``content_type`` (else ``default``)."""
    entry = _by_type.get(content_type)
    return entry.name if entry else default


def names():
    return sorted(_by_name)


def content_type_of(name_or_type):
    """Map a serializer name or a content type to its content type."""
    if name_or_type in _by_name:
        return _by_name[name_or_type].content_type
    if name_or_type in _by_type:
        return name_or_type
    raise UnknownSerializer(f"no serializer named {name_or_type!r}")


def dumps(obj: Any, name: str = "json") -> tuple[bytes, str, str]:
    """Encode ``obj``; returns ``(body_bytes, content_type, content_encoding)``."""
    entry = get(name)
    try:
        body = entry.dumps(obj)
    except Exception as exc:
        raise EncodeError(f"cannot encode with {name}: {exc}") from exc
    if isinstance(body, str):
        body = body.encode(entry.content_encoding or "utf-8")
    return body, entry.content_type, entry.content_encoding


def loads(body: bytes, content_type: str | None, content_encoding: str | None = None,
          accept: set[str] | None = None) -> Any:
    """Decode ``body`` by its content type.

    ``accept`` is a set of content types; a type outside it raises
    :class:`ContentDisallowed` without touching the body.
    """
    content_type = content_type or "application/json"
    if accept is not None and content_type not in accept:
        raise ContentDisallowed(
            f"content type {content_type!r} is not accepted "
            f"(accept_content allows: {', '.join(sorted(accept))})"
        )
    entry = _by_type.get(content_type)
    if entry is None:
        raise ContentDisallowed(f"no serializer is registered for content type {content_type!r}")
    try:
        return entry.loads(bytes(body))
    except Exception as exc:
        raise DecodeError(f"body is not valid {entry.name}: {exc}") from exc


# --- JSON, compatible with kombu's envelope ----------------------------------

def _envelope(marker, value):
    return {"__type__": marker, "__value__": value}


def _json_default(o):
    if isinstance(o, datetime):
        return _envelope("datetime", o.isoformat())
    if isinstance(o, date):
        return _envelope("date", o.isoformat())
    if isinstance(o, time):
        return _envelope("time", o.isoformat())
    if isinstance(o, Decimal):
        return _envelope("decimal", str(o))
    if isinstance(o, uuid.UUID):
        return _envelope("uuid", {"hex": o.hex})
    if isinstance(o, (bytes, bytearray, memoryview)):
        raw = bytes(o)
        try:
            return _envelope("bytes", raw.decode("utf-8"))
        except UnicodeDecodeError:
            return _envelope("base64", base64.b64encode(raw).decode("ascii"))
    if isinstance(o, (set, frozenset)):
        return _envelope("set", list(o))
    reducer = getattr(o, "__json__", None)
    if reducer is not None:
        return reducer()
    raise TypeError(f"Object of type {type(o).__name__} is not JSON serializable")


_json_decoders = {
    "datetime": datetime.fromisoformat,
    "date": lambda v: datetime.fromisoformat(v).date(),
    "time": time.fromisoformat,
    "decimal": Decimal,
    "uuid": lambda v: uuid.UUID(**v),
    "bytes": lambda v: v.encode("utf-8"),
    "base64": lambda v: base64.b64decode(v.encode("ascii")),
    "set": set,
}


def _json_object_hook(o):
    if len(o) == 2 and "__type__" in o and "__value__" in o:
        decoder = _json_decoders.get(o["__type__"])
        if decoder is None:
            raise ValueError(f"unsupported __type__ {o['__type__']!r}")
        return decoder(o["__value__"])
    return o


_json_encoder = json.JSONEncoder(default=_json_default, separators=(",", ":"), ensure_ascii=False)
_json_decoder = json.JSONDecoder(object_hook=_json_object_hook)


def json_dumps(obj):
    return _json_encoder.encode(obj).encode("utf-8")


def json_loads(body):
    if isinstance(body, (bytes, bytearray, memoryview)):
        body = bytes(body).decode("utf-8")
    return _json_decoder.decode(body)


class _NoAliasDumper(yaml.SafeDumper):
    """Writes an object referenced twice twice, never as an alias (the worker
    refuses aliases)."""

    def ignore_aliases(self, data):
        return True


class _NoAliasLoader(yaml.SafeLoader):
    """The safe loader, refusing aliases: a few hundred bytes of nested aliases
    (a "billion laughs" document) expand into billions of references, which task
    code that walks or re-encodes its arguments would take minutes over."""

    def compose_node(self, parent, index):
        if self.check_event(yaml.events.AliasEvent):
            event = self.peek_event()
            raise yaml.composer.ComposerError(
                None, None, f"found alias *{event.anchor}: YAML aliases are not accepted "
                "(write the value out again)", event.start_mark)
        return super().compose_node(parent, index)


def _yaml_dumps(obj):
    return yaml.dump(obj, Dumper=_NoAliasDumper)


def _yaml_loads(body):
    return yaml.load(body, Loader=_NoAliasLoader)


def _pickle_dumps(obj):
    return pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)


register("json", json_dumps, json_loads, "application/json", "utf-8")
register("pickle", _pickle_dumps, pickle.loads, "application/x-python-serialize", "binary")
register("yaml", _yaml_dumps, _yaml_loads, "application/x-yaml", "utf-8")

try:  # optional
    import msgpack as _msgpack
except ImportError:  # pragma: no cover - depends on the environment
    _msgpack = None
else:
    register(
        "msgpack",
        lambda o: _msgpack.packb(o, use_bin_type=True),
        lambda b: _msgpack.unpackb(b, raw=False),
        "application/x-msgpack",
        "binary",
    )


def accept_set(accept_content):
    """Turn a list of names or content types into a set of content types."""
    result = set()
    for item in accept_content:
        try:
            result.add(content_type_of(item))
        except UnknownSerializer:
            # A content type whose serializer is registered later (custom
            # modules) is still accepted by its literal content type.
            if "/" in item:
                result.add(item)
            else:
                raise
    return result


def check_config(config):
    """Import ``serializer_modules`` and check the serializer names ``config`` uses;
    returns a list of errors (empty when all is well)."""
    errors = []
    for module in config["serializer_modules"]:
        try:
            importlib.import_module(module)
        except Exception as exc:
            errors.append(f"serializer_modules: cannot import {module!r}: "
                          f"{type(exc).__name__}: {exc}")
    if errors:
        return errors
    known = names()
    for key in ("accept_content", "result_accept_content"):
        for name in config[key] or ():
            if "/" not in name and name not in known:
                errors.append(f"{key}: no serializer named {name!r} "
                              f"(known: {', '.join(known)}; custom ones via serializer_modules)")
    if config["default_serializer"] not in known:
        errors.append(f"default_serializer: no serializer named "
                      f"{config['default_serializer']!r} (known: {', '.join(known)})")
    return errors
