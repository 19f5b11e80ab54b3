"""``send_task`` by name, as in ``from taskd.execute import send_task``."""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from .app import current_app
from .result import AsyncResult


def send_task(name: str, args: Sequence | None = None, kwargs: Mapping | None = None,
              **options: Any) -> AsyncResult:
    """Send the task ``name`` with the current app; no task code is needed here.

    A name no worker knows comes back as a FAILURE result
    (``taskd.exceptions.NotRegistered``) rather than a hang. ``options`` are
    those of ``apply_async`` (:class:`~taskd.options.SendOptions`).
    """
    return current_app().send_task(name, args, kwargs, **options)
