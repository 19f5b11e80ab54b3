"""taskd: a distributed task queue for Python on RabbitMQ.

A client library to send tasks (``delay``, ``apply_async``, ``send_task``)
and a prefork worker daemon (``taskd worker``) that runs them. Messages
follow Celery's task protocol v2, so Celery clients and workers interoperate.
"""
from .app import App, current_app
from .canvas import GroupResult, Signature, chain, chord, group, signature
from .result import AsyncResult
from .task import Task

__version__ = "0.1.0"
__all__ = ["App", "AsyncResult", "GroupResult", "Signature", "Task", "chain", "chord",
           "current_app", "group", "signature", "__version__"]
