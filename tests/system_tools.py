"""The Debian tools the suite drives (prometheus, promtool, redis-server), and stopping
the processes the suite starts."""

from __future__ import annotations

import os
import shutil

import pytest

from taskscope.demo.scaleout import stop_process


def system_tool(name: str, package: str) -> str:
    """Path of ``name``. Missing: the test is skipped, or fails on CI, where
    ``scripts/ensure-system-tools`` must have installed Debian's ``package``."""
    found = shutil.which(name)
    if found is None:
        message = (
            f"{name} is not installed "
            f"(scripts/ensure-system-tools; Debian: apt-get install {package})"
        )
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    return found


# SIGTERM, then SIGKILL after 10 s; reaped either way (the demo's scale-out uses it too).
stop = stop_process
