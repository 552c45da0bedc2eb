"""A web app that moved its background work to Celery (run by the queue e2e test).

``GET /publish`` publishes one task of each kind through ``queued()`` after its response;
``/metrics`` serves the web process's own taskscope metrics. ``main()`` runs it under
uvicorn on ``--port``; the broker comes from ``TASKSCOPE_TEST_BROKER``.
"""

from __future__ import annotations

import argparse

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse
from starlette.routing import Route

from taskscope import BackgroundTasks
from taskscope.celery import instrument_celery, queued
from taskscope.exposition import MetricsApp
from tests import celeryapp

# The tasks /publish sends, in order, and what the worker records for each per request.
PUBLISHED = (celeryapp.ok, celeryapp.fails, celeryapp.retry_once, celeryapp.ignored)
WORKER_OUTCOMES_PER_REQUEST = {
    ("tests.celeryapp.ok", "success"): 1,
    ("tests.celeryapp.fails", "failure"): 1,
    ("tests.celeryapp.retry_once", "retry"): 1,
    ("tests.celeryapp.retry_once", "success"): 1,
    ("tests.celeryapp.ignored", "skipped"): 1,
}


async def publish(request: Request) -> PlainTextResponse:
    tasks = BackgroundTasks()
    tasks.add_task(queued(celeryapp.ok), 1)
    for task in PUBLISHED[1:]:
        tasks.add_task(queued(task))
    return PlainTextResponse("ok", background=tasks)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args()

    import uvicorn

    instrument_celery(celeryapp.app)
    app = Starlette(routes=[Route("/publish", publish), Route("/metrics", MetricsApp())])
    uvicorn.run(app, host="127.0.0.1", port=args.port, log_level="warning", access_log=False)
