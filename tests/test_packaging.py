"""What the published package says about itself: extras users need, no development tools."""

from __future__ import annotations

import tomllib
from importlib.metadata import metadata
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())


def test_extras_are_for_users_and_dev_tools_are_a_dependency_group() -> None:
    """`otlp`, `demo`, `celery` and `taskiq` are extras; pytest, mypy, ruff... are the
    PEP 735 `dev` group, never a published extra."""
    extras = {"otlp", "demo", "celery", "taskiq"}
    assert set(PYPROJECT["project"]["optional-dependencies"]) == extras
    group = PYPROJECT["dependency-groups"]["dev"]
    names = {requirement.split(">")[0].split("=")[0].split("[")[0] for requirement in group}
    assert {"pytest", "mypy", "ruff", "kubernetes-validate", "check-jsonschema"} <= names
    assert "taskscope" not in names  # pip cannot install the project itself from a group
    assert set(metadata("taskscope").get_all("Provides-Extra") or []) == extras


def test_metadata_has_classifiers_and_urls() -> None:
    """Classifiers (Python versions, frameworks, typed) and the project URLs are published."""
    meta = metadata("taskscope")
    classifiers = set(meta.get_all("Classifier") or [])
    assert "Typing :: Typed" in classifiers
    assert "Framework :: FastAPI" in classifiers
    assert "Programming Language :: Python :: 3.11" in classifiers
    urls = dict(url.split(", ", 1) for url in meta.get_all("Project-URL") or [])
    assert {"Homepage", "Source", "Changelog", "Issues"} <= set(urls)
    assert all(url.startswith("https://") for url in urls.values())


def test_setup_script_installs_the_group() -> None:
    """scripts/setup-venv installs the extras and `--group dev` with a pip that knows it."""
    script = (ROOT / "scripts" / "setup-venv").read_text()
    assert '-e ".[otlp,demo,celery,taskiq]" --group dev' in script
    assert '"pip>=25.1"' in script
