"""Log lines that a sender cannot forge or garble.

Task names and ids, exception texts and dead-letter reasons are written by
whoever can publish a message. Logged as they are, a newline in them starts
what reads as a line of its own (a forged "task succeeded", a forged "stopped"),
and an ANSI escape sequence rewrites the operator's terminal or hides the rest
of the line. Escaping at each call site would miss the next one, so the log
formatter escapes every record once it is formatted (:func:`escape`): control
characters other than the newline (C0 and C1, DEL, Unicode line separators)
become ``\\xNN``/``\\uNNNN`` escapes, and every line after a record's first is
indented. A record's continuation (a traceback, a multi-line dump, an injected
newline) then never passes for a record of its own.
"""
from __future__ import annotations

import logging

_CODES = [*range(0x00, 0x0a), *range(0x0b, 0x20), 0x7f, *range(0x80, 0xa0)]
_TABLE = {code: f"\\x{code:02x}" for code in _CODES}
_TABLE.update({0x2028: "\\u2028", 0x2029: "\\u2029"})
_TABLE[0x0a] = "\n  "             # continuation lines are indented


def escape(text):
    """``text`` made safe for one log record (see the module's notes)."""
    return text.translate(_TABLE)


class Formatter(logging.Formatter):
    """A :class:`logging.Formatter` whose records pass through :func:`escape`."""

    def format(self, record):
        return escape(super().format(record))
