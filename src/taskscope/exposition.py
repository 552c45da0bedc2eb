"""Prometheus exposition that does not stall the event loop.

``prometheus_client.make_asgi_app()`` renders on the event loop: with many series one
scrape holds every request for tens of milliseconds. :class:`MetricsApp` renders in a
worker thread instead (one at a time, coalescing concurrent scrapes)::

    from taskscope.exposition import MetricsApp

    app.add_route("/metrics", MetricsApp())  # or Route("/metrics", MetricsApp())

(``app.mount("/metrics", ...)`` works too, but answers ``/metrics`` with a redirect to
``/metrics/``.)

or, for apps that should not serve metrics on their public port::

    from taskscope.exposition import start_metrics_server

    server = start_metrics_server(port=9464)  # binds 127.0.0.1 by default
    ...
    server.close()

Both negotiate the format (OpenMetrics, with trace-id exemplars, when the scraper sends
``Accept: application/openmetrics-text``; text format 0.0.4 otherwise) and gzip.

Multiprocess servers (gunicorn, ``uvicorn --workers N``): set ``PROMETHEUS_MULTIPROC_DIR``
to an empty directory *before* the workers start (before ``prometheus_client`` creates
any metric). With ``registry=None`` every scrape then merges all workers' files; counters
and histograms sum, ``taskscope_tasks_in_progress`` is a ``livesum`` gauge (exemplars are
not supported by prometheus_client in this mode). Remove dead workers' live gauges with
gunicorn's ``child_exit`` hook::

    # gunicorn.conf.py
    from taskscope.exposition import mark_process_dead

    def child_exit(server, worker):
        mark_process_dead(worker.pid)

``uvicorn --workers`` has no such hook: a worker that dies while tasks run leaves its
in-progress count until the directory is wiped; wipe it at every deploy in any case.
"""

from __future__ import annotations

import os

from taskscope._exposition.asgi import MetricsApp
from taskscope._exposition.render import MULTIPROC_ENV
from taskscope._exposition.server import MetricsServer, start_metrics_server

__all__ = ("MetricsApp", "MetricsServer", "mark_process_dead", "start_metrics_server")


def mark_process_dead(pid: int, path: str | None = None) -> None:
    """Drop the live gauges of a dead worker (multiprocess mode; a no-op otherwise).

    ``path`` defaults to ``PROMETHEUS_MULTIPROC_DIR``, read now.
    """
    directory = path if path is not None else os.environ.get(MULTIPROC_ENV)
    if not directory:
        return
    from prometheus_client import multiprocess

    multiprocess.mark_process_dead(pid, directory)  # type: ignore[no-untyped-call]
