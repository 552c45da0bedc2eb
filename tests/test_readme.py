"""Every Python snippet in the README runs (in a subprocess, so none leaks state)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SNIPPET = re.compile(r"```python\n(.*?)```", re.DOTALL)
RUNNER = """
import sys, pathlib
source = pathlib.Path(sys.argv[1]).read_text()
exec(compile(source, "README-snippet", "exec"), {"__name__": "readme_snippet"})
print("ok")
"""


def snippets(path: Path) -> list[str]:
    return SNIPPET.findall(path.read_text())


def test_readme_has_snippets() -> None:
    """The README shows code (the drop-in, FastAPI, Starlette, configuration...)."""
    assert len(snippets(ROOT / "README.md")) >= 5


@pytest.mark.parametrize("index", range(len(snippets(ROOT / "README.md"))))
def test_readme_snippet_runs(index: int, tmp_path: Path) -> None:
    """README snippet number `index` executes without error."""
    source = snippets(ROOT / "README.md")[index]
    script = tmp_path / "snippet.py"
    script.write_text(source)
    result = subprocess.run(
        [sys.executable, "-W", "error", "-c", RUNNER, str(script)],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
        check=False,
    )
    assert result.returncode == 0, f"snippet {index}:\n{source}\n{result.stderr}"
    assert result.stdout.strip().endswith("ok")


WHOLE_APP_CHECK = """
from starlette.testclient import TestClient

with TestClient(app) as client:
    assert client.post("/signup", params={"address": "a@example.com"}).json() == {"status": "ok"}
    body = client.get("/metrics").text
expected = 'taskscope_tasks_total{outcome="success",task="readme_snippet.send_welcome"} 1.0'
assert expected in body, body
assert 'taskscope_task_wait_seconds_count{task="readme_snippet.send_welcome"} 1.0' in body, body
"""


def test_the_whole_app_serves_its_task_metrics(tmp_path: Path) -> None:
    """The README's first snippet (the whole app) records its task and serves it on
    /metrics, as the text after it says."""
    source = next(s for s in snippets(ROOT / "README.md") if "MetricsApp()" in s)
    assert snippets(ROOT / "README.md").index(source) == 0  # shown first
    script = tmp_path / "snippet.py"
    script.write_text(source + WHOLE_APP_CHECK)
    result = subprocess.run(
        [sys.executable, "-W", "error", "-c", RUNNER, str(script)],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
        check=False,
    )
    assert result.returncode == 0, result.stderr
