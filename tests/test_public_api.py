"""The public surface: __all__ is accurate and importing taskscope has no side effects."""

from __future__ import annotations

import importlib
import inspect
import subprocess
import sys
import textwrap

import pytest

import taskscope


def test_all_names_resolve() -> None:
    """Every name in __all__ exists; __all__ is a sorted tuple."""
    assert isinstance(taskscope.__all__, tuple)
    assert list(taskscope.__all__) == sorted(taskscope.__all__)
    for name in taskscope.__all__:
        assert getattr(taskscope, name) is not None


def test_version_is_exposed() -> None:
    """__version__ comes from the package metadata."""
    assert isinstance(taskscope.__version__, str)
    assert taskscope.__version__[0].isdigit()


def test_import_has_no_side_effects() -> None:
    """`import taskscope` starts no thread, patches nothing, touches no registry."""
    code = textwrap.dedent(
        """
        import sys, threading
        import fastapi.dependencies.utils as utils, fastapi.background
        import prometheus_client
        meta_path = list(sys.meta_path)
        before = set(prometheus_client.REGISTRY._names_to_collectors)
        import taskscope, taskscope.testing, taskscope.exposition, taskscope.otlp
        assert threading.active_count() == 1, threading.enumerate()
        assert sys.meta_path == meta_path
        assert utils.BackgroundTasks is fastapi.background.BackgroundTasks
        assert set(prometheus_client.REGISTRY._names_to_collectors) == before
        from taskscope import BackgroundTasks  # the drop-in import: FastAPI now builds ours
        assert issubclass(utils.BackgroundTasks, BackgroundTasks)
        assert threading.active_count() == 1
        print("ok")
        """
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"


def test_drop_in_import_before_fastapi() -> None:
    """Importing taskscope's class before FastAPI still makes FastAPI build ours."""
    code = textwrap.dedent(
        """
        from taskscope import BackgroundTasks
        import fastapi.dependencies.utils as utils
        assert issubclass(utils.BackgroundTasks, BackgroundTasks), utils.BackgroundTasks
        print("ok")
        """
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 0, result.stderr


PUBLIC_MODULES = (
    "taskscope",
    "taskscope.exposition",
    "taskscope.otlp",
    "taskscope.testing",
    "taskscope.celery",
    "taskscope.taskiq",
)


@pytest.mark.parametrize("module_name", PUBLIC_MODULES)
def test_all_is_complete_both_ways(module_name: str) -> None:
    """Each public module's ``__all__`` names exactly what it defines for users: every name
    listed resolves, and every public class or function defined there is listed."""
    module = importlib.import_module(module_name)
    exported = module.__all__
    assert isinstance(exported, tuple)
    assert list(exported) == sorted(exported)
    for name in exported:
        assert getattr(module, name) is not None, name
    defined_here = {
        name
        for name, value in vars(module).items()
        if not name.startswith(("_", "pytest_"))  # pytest hooks are for pytest, not users
        and (inspect.isclass(value) or inspect.isfunction(value))
        and getattr(value, "__module__", "") == module_name
    }
    assert defined_here <= set(exported), sorted(defined_here - set(exported))
