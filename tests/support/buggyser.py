"""A custom serializer with a bug: what it decodes raises when the worker looks at it.

Listed under serializer_modules, it makes the worker hit an internal error (not a
fault it can name in the message) on every delivery in its content type.
"""
import json

from taskd import serialization


class Treacherous(list):
    def __len__(self):
        raise RuntimeError("a bug in the custom serializer")


serialization.register(
    "buggy-json",
    json.dumps,
    lambda body: Treacherous(json.loads(body)),
    content_type="application/x-buggy-json",
    content_encoding="utf-8",
)
