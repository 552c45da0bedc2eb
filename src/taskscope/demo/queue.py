"""The demo's Celery app: the slow report task, run by a worker instead of the web app.

The web side (``taskscope demo --scale-out`` or ``--broker URL``) publishes
``render_report`` through :func:`taskscope.celery.queued`; ``taskscope.demo.worker`` is the
worker's app module. ``TASKSCOPE_DEMO_BROKER`` (default ``redis://localhost:6379/0``) is
read when this module is imported.
"""

from __future__ import annotations

import os

from celery import Celery

from taskscope.demo.app import render_report as _render_report

DEFAULT_BROKER = "redis://localhost:6379/0"

celery_app = Celery(
    "taskscope_demo", broker=os.environ.get("TASKSCOPE_DEMO_BROKER", DEFAULT_BROKER)
)
celery_app.conf.update(
    task_ignore_result=True,
    worker_prefetch_multiplier=1,
    broker_connection_retry_on_startup=True,
)
# The same function and name as the in-process task: the dashboard's task label stays.
render_report = celery_app.task(name="taskscope.demo.app.render_report")(_render_report)
