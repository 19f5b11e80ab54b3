"""Pure parts of the client: exception rebuilding, the session lock, option checks."""
import asyncio
import math

import pytest

from taskd import App, protocol
from taskd.exceptions import OptionError, RemoteError


@pytest.mark.parametrize("exc_type, exc_module", [
    ("SystemExit", "builtins"), ("KeyboardInterrupt", "builtins"),
    ("GeneratorExit", "builtins"), ("CancelledError", "asyncio.exceptions"),
    ("CancelledError", "asyncio"),
])
def test_a_result_cannot_raise_what_except_exception_does_not_catch(exc_type, exc_module):
    exc = protocol.dict_to_exception({"exc_type": exc_type, "exc_module": exc_module,
                                      "exc_message": ["remote text"]})
    assert isinstance(exc, RemoteError) and isinstance(exc, Exception)
    assert type(exc).__name__ == exc_type and exc.remote_type == f"{exc_module}.{exc_type}"
    assert str(exc) == "remote text"
    # an unpickled instance is mapped the same way
    rebuilt = protocol.dict_to_exception(asyncio.CancelledError("x"))
    assert isinstance(rebuilt, RemoteError) and not isinstance(rebuilt, asyncio.CancelledError)
    # real exception classes are still rebuilt
    assert type(protocol.dict_to_exception({"exc_type": "ValueError", "exc_module": "builtins",
                                            "exc_message": ["v"]})) is ValueError


def test_synthetic_exception_classes_are_bounded():
    for i in range(protocol.SYNTHETIC_CLASSES_MAX * 3):
        protocol.dict_to_exception({"exc_type": f"E{i}", "exc_module": "not.imported",
                                    "exc_message": []})
    assert len(protocol._synthetic) <= protocol.SYNTHETIC_CLASSES_MAX


@pytest.mark.parametrize("option, value", [
    ("countdown", math.nan), ("countdown", math.inf), ("countdown", 1e300),
    ("countdown", -1e300), ("expires", math.nan), ("expires", -math.inf), ("expires", 1e20),
])
def test_unusable_countdown_or_expires_is_a_clear_error_naming_the_option(option, value):
    app = App("t", broker="amqp://guest:guest@127.0.0.1:1/", set_as_current=False)
    with pytest.raises(OptionError, match=option):
        app.send_task("tasks.add", [1, 1], **{option: value})
