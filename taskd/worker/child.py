"""A child process: import the task modules, then run jobs from the pipe.

Runs after ``fork`` in the child only. It never touches the broker: it
reads a job frame from its pipe, runs the task, and writes back the outcome
with the result already encoded, so the supervisor only has to publish
bytes. It leaves with ``os._exit`` so that nothing inherited from the
supervisor (atexit handlers, buffered files, the broker socket) runs twice.

A child never outlives its supervisor: right after fork it asks the kernel
for SIGKILL when its parent dies (``PR_SET_PDEATHSIG``), then checks that the
parent did not die before that request. Otherwise a busy child whose
supervisor was killed would run its task to the end beside the copy the
broker redelivers to another worker.

Memory is reported for ``worker.max_memory_per_child`` as the RSS, or, once the
RSS exceeds the limit, as the USS (the pages only this child holds): pages
inherited from the supervisor through fork count in the RSS of every child,
and would recycle each one after every task. USS costs a walk of
``/proc/self/smaps``, so it is measured only when the cheap RSS is over.

The frames on the pipes hold the records of :mod:`taskd.worker.framing`: a
:class:`~taskd.worker.framing.Job` comes down, :class:`~taskd.worker.framing.Ready`
(or :class:`~taskd.worker.framing.ImportFailed`) and one
:class:`~taskd.worker.framing.Outcome` per job go up.
"""
from __future__ import annotations

import ctypes
import importlib
import logging
import os
import signal
import sys
import time
import traceback
from datetime import datetime, timedelta, timezone
from typing import Any, Container, Iterable, NoReturn, Optional

from setproctitle import setproctitle

from .. import protocol, signals, stores, task as task_mod
from ..exceptions import NotRegistered, Retry, SoftTimeLimitExceeded
from . import aiochild, framing
from .framing import ImportFailed, Outcome, Ready, RetryMessage

log = logging.getLogger("taskd.child")

EXIT_IMPORT_FAILED = 3
#: After a STARTED write fails, the seconds during which no other is tried.
STARTED_PAUSE = 10.0
_started_failed_at = -STARTED_PAUSE


def _on_soft_limit(signum: int, frame: Any) -> None:
    raise SoftTimeLimitExceeded("soft time limit exceeded")


def _reset_signals() -> None:
    for sig in (signal.SIGTERM, signal.SIGHUP, signal.SIGUSR1, signal.SIGUSR2,
                signal.SIGTTIN, signal.SIGTTOU, signal.SIGCHLD, signal.SIGQUIT):
        signal.signal(sig, signal.SIG_DFL)
    # Ctrl-C in a terminal reaches the whole process group: the supervisor
    # decides what happens to running tasks, so children ignore SIGINT.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGALRM, _on_soft_limit)
    try:
        signal.set_wakeup_fd(-1)
    except ValueError:
        pass


def close_inherited_fds(keep: Container[int]) -> None:
    """Close every fd but stdio and ``keep``: the broker sockets, siblings' pipes."""
    for name in os.listdir("/proc/self/fd"):
        fd = int(name)
        if fd > 2 and fd not in keep:
            try:
                os.close(fd)
            except OSError:
                pass


PR_SET_PDEATHSIG = 1


def die_with_parent(parent: int) -> None:
    """SIGKILL this process when ``parent`` (the supervisor) dies; exit now if it has."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    except (OSError, AttributeError):        # not Linux: the pipes' EOF/EPIPE still end it
        pass
    if os.getppid() != parent:  # it died between fork and prctl: nobody will signal us
        os._exit(1)


def memory_used(process: Any, limit: int) -> int:
    """Bytes this child uses for ``max_memory_per_child``: RSS, or USS once RSS > limit."""
    rss = process.memory_info().rss
    if rss <= limit:
        return rss
    try:
        return process.memory_full_info().uss
    except Exception:       # psutil.Error or OSError (smaps unreadable): keep the RSS
        return rss


def main(index: int, read_fd: int, write_fd: int, imports: Iterable[str], memory_limit: int,
         parent: int, async_concurrency: int = 1, block_warning: float = 1.0) -> NoReturn:
    """Entry point after fork; never returns."""
    code = 0
    try:
        die_with_parent(parent)
        _reset_signals()
        for key in ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID"):
            os.environ.pop(key, None)       # only the supervisor speaks to systemd
        close_inherited_fds({read_fd, write_fd})
        setproctitle(f"taskd: child {index} importing")
        try:
            for module in imports:
                importlib.import_module(module)
        except BaseException as exc:  # report any import failure, then leave
            message = f"cannot import task modules: {type(exc).__name__}: {exc}"
            framing.write_all(write_fd, framing.encode_record(ImportFailed(message,
                                                                   traceback.format_exc())))
            os._exit(EXIT_IMPORT_FAILED)
        if async_concurrency > 1 or any(map(aiochild.is_async, task_mod.registry.values())):
            aiochild.loop()     # before the hook, so that it can bind clients to this loop
        signals.worker_process_init.send(sender=None)
        limits = {name: (t.time_limit, t.soft_time_limit) for name, t in task_mod.registry.items()}
        framing.write_all(write_fd, framing.encode_record(Ready(os.getpid(), limits)))
        setproctitle(f"taskd: child {index} idle")
        aiochild.configure(block_warning)
        if async_concurrency > 1:
            aiochild.serve(index, read_fd, write_fd, memory_limit, async_concurrency)
        else:
            _serve(index, read_fd, write_fd, memory_limit)
        signals.worker_process_shutdown.send(sender=None, pid=os.getpid(), exitcode=0)
    except BaseException:  # anything escaping is a bug: say so, then exit non-zero
        traceback.print_exc()
        code = 1
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def _serve(index: int, read_fd: int, write_fd: int, memory_limit: int) -> None:
    process = memory_probe(memory_limit)
    for frame in framing.iter_frames(read_fd):   # ends when the supervisor closes the pipe
        job = framing.job(frame)
        setproctitle(f"taskd: child {index} {job.name}")
        started = time.monotonic()
        outcome = run_job(job.task_id, job.name, job.args, job.kwargs, job.meta)
        report(write_fd, job, outcome, started, process, memory_limit)
        setproctitle(f"taskd: child {index} idle")


def memory_probe(memory_limit: int) -> Any:
    """The psutil process to measure after each task, or None without a memory limit."""
    if not memory_limit:
        return None
    import psutil
    return psutil.Process()


def report(write_fd: int, job: framing.Job, outcome: tuple, started: float, process: Any,
           memory_limit: int) -> None:
    """Write ``job``'s outcome (what :func:`run_job` returned) up the pipe."""
    framing.write_all(write_fd, outcome_frame(job, outcome, started, process, memory_limit))


def outcome_frame(job: framing.Job, outcome: tuple, started: float, process: Any,
                  memory_limit: int) -> bytes:
    """The frame of ``job``'s outcome, with its runtime and the child's memory."""
    status, body, content_type, encoding, error, retry = outcome
    runtime = time.monotonic() - started
    rss = memory_used(process, memory_limit) if process is not None else 0
    return framing.encode_record(Outcome(job.seq, status, body, content_type, encoding,
                                         runtime, rss, error, retry))


def run_job(task_id: str, name: str, args: Any, kwargs: Any, meta: dict) -> tuple:
    """Run one task; returns ``(status, result_body, content_type, encoding, error, retry)``.

    ``retry`` is None, or the :class:`~taskd.worker.framing.RetryMessage` of a
    retried task. An ``async def`` task runs on this child's event loop
    (:mod:`taskd.worker.aiochild`).
    """
    task = task_mod.registry.get(name)
    if task is not None and aiochild.is_async(task):
        return aiochild.run_alone(task, task_id, name, args, kwargs, meta)
    soft = meta.get("soft_time_limit")
    try:
        try:
            task_mod._request.value = begin(task, task_id, name, args, kwargs, meta)
            if soft:
                signal.setitimer(signal.ITIMER_REAL, soft)
            try:
                value = task.run(*args, **kwargs)
            finally:
                if soft:
                    signal.setitimer(signal.ITIMER_REAL, 0)
        except Exception as exc:
            return finish(task, task_id, name, args, kwargs, meta, exc=autoretried(task, exc))
        return finish(task, task_id, name, args, kwargs, meta, value=value)
    finally:
        task_mod._request.value = None


def begin(task: Any, task_id: str, name: str, args: Any, kwargs: Any,
          meta: dict) -> task_mod.Request:
    """The request ``task`` is to run with (NotRegistered if there is no task); stores
    STARTED if the task is tracked; sends ``task_prerun``."""
    if task is None:
        raise NotRegistered(f"task {name!r} is not registered in this worker "
                            "(is its module listed under imports:?)")
    request = task_mod.Request(id=task_id, args=args, kwargs=kwargs, **meta.get("request", {}))
    _mark_started(task, task_id, meta)
    signals.task_prerun.send(sender=task, task_id=task_id, task=task, args=args, kwargs=kwargs)
    return request


def autoretried(task: Any, exc: Exception) -> Exception:
    """``exc``, or the Retry that ``autoretry_for`` turns it into (or what ``retry``
    raises past ``max_retries``). Call it while the task's request is current."""
    if task is None or isinstance(exc, Retry) or not task.autoretry_for \
            or not isinstance(exc, tuple(task.autoretry_for)):
        return exc
    try:
        raise task.retry(exc=exc, countdown=task.backoff_delay(task.request.retries))
    except Exception as retry:
        return retry


_UNSET: Any = object()


def finish(task: Any, task_id: str, name: str, args: Any, kwargs: Any, meta: dict,
           value: Any = _UNSET, exc: Optional[Exception] = None) -> tuple:
    """The outcome of a task that returned ``value`` or raised ``exc`` (see
    :func:`run_job`); sends the task's signals. Call it while its request is current."""
    serializer = meta.get("serializer", "json")
    parent_id = meta.get("parent_id")
    retry = None
    if isinstance(exc, Retry):
        retry = _retry_message(task, task_id, name, args, kwargs, meta, exc)
        cause = exc.exc if exc.exc is not None else exc
        log.info("task %s[%s] retrying (%d) in %s: %r", name, task_id,
                 retry.retries, exc.when, cause)
        status, body, ctype, enc = protocol.encode_result(
            task_id, protocol.RETRY, cause, protocol.format_traceback(cause),
            serializer=serializer, parent_id=parent_id)
        status, error, retval = protocol.RETRY, f"retry: {cause!r}", cause
        signals.task_retry.send(sender=task, request=task.request, reason=cause,
                                einfo=protocol.format_traceback(cause))
    elif exc is not None:
        log.error("task %s[%s] raised %s: %s", name, task_id, type(exc).__name__, exc)
        formatted = protocol.format_traceback(exc)
        status, body, ctype, enc = protocol.encode_result(
            task_id, protocol.FAILURE, exc, formatted, serializer=serializer,
            parent_id=parent_id)
        error, retval = f"{type(exc).__name__}: {exc}", exc
        if task is not None:
            signals.task_failure.send(sender=task, task_id=task_id, exception=exc, args=args,
                                      kwargs=kwargs, traceback=exc.__traceback__,
                                      einfo=formatted)
    else:
        status, body, ctype, enc = protocol.encode_result(
            task_id, protocol.SUCCESS, value, serializer=serializer, parent_id=parent_id)
        error = None if status == protocol.SUCCESS else "result not encodable"
        retval = value
        if status == protocol.SUCCESS:
            signals.task_success.send(sender=task, result=value)
    if task is not None:
        signals.task_postrun.send(sender=task, task_id=task_id, task=task, args=args,
                                  kwargs=kwargs, retval=retval, state=status)
    return status, body, ctype, enc, error, retry


def _mark_started(task: Any, task_id: str, meta: dict) -> None:
    """Store STARTED (the worker's name, this child's pid) if the task is tracked. Written
    here, in the child, before the task runs (as Celery does): the supervisor's final write
    always comes after it. A store that fails here does not stop the task (logged): the
    final state is what the supervisor guarantees."""
    global _started_failed_at
    track = task.track_started
    if track is None:
        track = stores.worker_tracks_started()
    if not track or (meta.get("request", {}).get("headers") or {}).get("ignore_result"):
        return
    if time.monotonic() - _started_failed_at < STARTED_PAUSE:
        return          # the store failed just now: tasks do not wait for it again
    try:
        store = stores.worker_store()
        if store is not None:
            store.store(task_id, {"status": protocol.STARTED, "result": {
                "pid": os.getpid(), "hostname": stores.node_name()}, "traceback": None,
                "children": [], "date_done": None})
    except Exception as exc:
        _started_failed_at = time.monotonic()
        log.warning("task %s[%s]: STARTED not stored (%s); not tried again for %gs",
                    task.name, task_id, exc, STARTED_PAUSE)


def _retry_message(task: Any, task_id: str, name: str, args: Any, kwargs: Any, meta: dict,
                   retry: Retry) -> RetryMessage:
    """The copy of the message that carries a retry: retries + 1, a new ETA."""
    req = meta.get("request", {})
    when = retry.when
    if isinstance(when, datetime):
        eta = when
    else:
        eta = datetime.now(timezone.utc) + timedelta(seconds=float(when or 0))
    retries = (req.get("retries") or 0) + 1
    original = {k: v for k, v in (req.get("headers") or {}).items()
                if not k.startswith("x-death") and k not in ("x-delivery-count",)}
    message = protocol.encode_task(
        task_id, name, retry.new_args if retry.new_args is not None else args,
        retry.new_kwargs if retry.new_kwargs is not None else kwargs,
        serializer=meta.get("serializer", "json"), eta=eta, expires=req.get("expires"),
        retries=retries, time_limit=req.get("time_limit"),
        soft_time_limit=req.get("soft_time_limit"), reply_to=req.get("reply_to"),
        root_id=req.get("root_id"), parent_id=req.get("parent_id"),
        embed=meta.get("embed"), group=(meta.get("group") or (None, None))[0],
        group_index=(meta.get("group") or (None, None))[1],
        extra_headers={k: v for k, v in original.items() if k.startswith("x-")
                       and not k.startswith("x-taskd-")})
    return RetryMessage(message.body, message.content_type, message.content_encoding,
                        message.headers, retries)
