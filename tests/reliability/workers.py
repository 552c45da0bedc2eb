"""A gunicorn worker class for the multiprocess shutdown row: uvicorn's own graceful timeout
(1 s) shorter than gunicorn's ``--graceful-timeout``, so running tasks are cancelled and
recorded before the master kills the worker."""

from __future__ import annotations

from typing import Any, ClassVar

from uvicorn_worker import UvicornWorker  # type: ignore[import-untyped]


class ShortGraceWorker(UvicornWorker):  # type: ignore[misc]
    CONFIG_KWARGS: ClassVar[dict[str, Any]] = {
        **UvicornWorker.CONFIG_KWARGS,
        "timeout_graceful_shutdown": 1,
    }
