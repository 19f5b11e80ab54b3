"""``send_task`` by name, as in ``from taskd.execute import send_task``."""
from .app import current_app


def send_task(name, args=None, kwargs=None, **options):
    """Send the task ``name`` with the current app; no task code is needed here.

    A name no worker knows comes back as a FAILURE result
    (``taskd.exceptions.NotRegistered``) rather than a hang.
    """
    return current_app().send_task(name, args, kwargs, **options)
