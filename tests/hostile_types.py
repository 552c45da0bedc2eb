"""Hostile objects shared by the tests of names and of hostile input."""

from __future__ import annotations

from typing import Any


class RaisingMeta(type):
    """Classes of this metaclass raise when asked for their name or module."""

    def __getattribute__(cls, name: str) -> Any:
        if name in ("__module__", "__qualname__", "__name__"):
            raise RuntimeError(f"no {name}")
        return super().__getattribute__(name)
