"""A custom serializer, registered on import (listed under serializer_modules)."""
import json

from taskd import serialization

serialization.register(
    "reversed-json",
    lambda obj: json.dumps(obj)[::-1],
    lambda body: json.loads(body.decode("utf-8")[::-1]),
    content_type="application/x-reversed-json",
    content_encoding="utf-8",
)
