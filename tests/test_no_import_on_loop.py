"""The first task imports nothing on the event loop (an import is blocking file I/O).

Blocking-call detectors (blockbuster, which Starlette's own test suite runs) fail a test
on it, and a cold import stalls every request on the worker for its duration.
"""

import subprocess
import sys
import textwrap

SCRIPT = """
import sys

import taskscope
from prometheus_client import CollectorRegistry
from starlette.applications import Starlette
from starlette.responses import Response
from starlette.routing import Route
from starlette.testclient import TestClient

imported = []
watching = [False]


def audit(event, args):
    if event == "import" and watching[0]:
        imported.append(args[0])


sys.addaudithook(audit)


async def job():
    return None


def failing():
    raise ValueError("boom")


async def endpoint(request):
    tasks = taskscope.BackgroundTasks()
    tasks.add_task(job)
    tasks.add_task(failing)
    tasks.add_task(job)
    watching[0] = True  # from here on the loop runs the tasks: the first ever
    return Response("ok", background=tasks)


app = Starlette(routes=[Route("/", endpoint)])
with TestClient(app, raise_server_exceptions=False) as client:
    client.get("/")
watching[0] = False
print(sorted(set(imported)))
"""


def test_first_tasks_import_nothing_on_the_loop() -> None:
    """First success, failure and skip in a fresh process: no module imported meanwhile."""
    result = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(SCRIPT)],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    )
    assert result.stdout.strip().splitlines()[-1] == "[]", result.stdout + result.stderr
