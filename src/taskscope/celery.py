"""taskscope for Celery: the same metrics, spans and log events for tasks run by workers.

::

    from taskscope.celery import instrument_celery

    app = Celery("reports", broker="redis://localhost:6379/0")
    instrument_celery(app)  # in the web app and in the worker (e.g. where `app` is made)

Publishing stamps each message with its publish time and the W3C trace context (a
``publish {task}`` PRODUCER span); the worker runs each task in a ``background_task {task}``
CONSUMER span continuing that trace, and records one outcome per run into the same
``taskscope_*`` metrics as in-process tasks (wait = publish, or ETA, to start). With
``metrics_port`` the worker serves ``/metrics`` itself (in its main process). Prefork pools
need prometheus_client's multiprocess mode: ``PROMETHEUS_MULTIPROC_DIR`` set to an empty
directory of this worker node before the worker starts (see the README).

Moving a ``BackgroundTasks`` task to the queue keeps the call::

    background_tasks.add_task(queued(build_report), user_id, period="week")

publishes ``build_report`` (a Celery task) after the response is sent, and not at all if
the endpoint fails, as ``BackgroundTasks`` would have run it.
"""

from __future__ import annotations

import weakref
from typing import TYPE_CHECKING, Any

from taskscope._queues.celery_hooks import CeleryHooks
from taskscope._queues.multiproc import clean_dead_processes

if TYPE_CHECKING:
    from taskscope._config import Telemetry

__all__ = ("Queued", "clean_dead_processes", "instrument_celery", "queued", "uninstrument_celery")

_instrumented: weakref.WeakKeyDictionary[Any, CeleryHooks] = weakref.WeakKeyDictionary()


def instrument_celery(
    celery_app: Any,
    telemetry: Telemetry | None = None,
    *,
    metrics_port: int | None = None,
    metrics_addr: str = "127.0.0.1",
) -> CeleryHooks:
    """Instrument publishing and running the tasks of ``celery_app`` (idempotent).

    ``metrics_port``: a worker started from this app serves ``/metrics`` on
    ``metrics_addr:metrics_port`` from its main process (all pool processes merged in
    multiprocess mode). Undo with :func:`uninstrument_celery`.
    """
    hooks = _instrumented.get(celery_app)
    if hooks is None:
        hooks = CeleryHooks(celery_app, telemetry, metrics_port, metrics_addr)
        hooks.connect()
        _instrumented[celery_app] = hooks
    return hooks


def uninstrument_celery(celery_app: Any) -> None:
    """Disconnect taskscope's receivers and restore the app's task sender."""
    hooks = _instrumented.pop(celery_app, None)
    if hooks is not None:
        hooks.disconnect()


class Queued:
    """A callable for ``add_task`` that publishes a Celery task with the arguments given.

    Sync (publishing blocks on the broker), so ``BackgroundTasks`` runs it in the
    threadpool, after the response. Named ``publish:{task name}`` in taskscope's metrics,
    apart from the task run by the worker.
    """

    def __init__(self, task: Any, options: dict[str, Any]) -> None:
        self.task = task
        self.options = options
        self.__taskscope_name__ = f"publish:{task.name}"

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.task.apply_async(args, kwargs, **self.options)

    def __repr__(self) -> str:
        return f"queued({self.task.name!r})"


def queued(task: Any, **options: Any) -> Queued:
    """``add_task(queued(task), *args, **kwargs)``: publish after the response is sent.

    ``options`` are ``apply_async`` options (``countdown``, ``eta``, ``queue``, ...), kept
    apart from the task's own keyword arguments.
    """
    if not callable(getattr(task, "apply_async", None)):
        msg = f"queued() needs a Celery task (with apply_async), not {task!r}"
        raise TypeError(msg)
    return Queued(task, options)
