"""Content negotiation and rendering of a registry: blocking work, run off the loop."""

from __future__ import annotations

import contextlib
import gc
import gzip
import os
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from prometheus_client import REGISTRY, CollectorRegistry
from prometheus_client.exposition import choose_encoder, gzip_accepted

if TYPE_CHECKING:
    from prometheus_client.registry import Collector

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
GZIP_LEVEL = 6  # level 9 (prometheus_client's) costs ~2x the CPU for a few % of bytes

_gc_lock = threading.Lock()
_gc_pausers = 0
_gc_was_enabled = False


@dataclass(frozen=True)
class Negotiated:
    """What one scrape asked for; equal requests can share one rendering."""

    content_type: str
    gzip: bool
    names: tuple[str, ...] = ()
    encoder: Callable[[Collector], bytes] = field(compare=False, repr=False, kw_only=True)

    @property
    def key(self) -> tuple[str, bool, tuple[str, ...]]:
        return (self.content_type, self.gzip, self.names)


@dataclass(frozen=True)
class Rendered:
    """A finished response body with its headers."""

    status: int
    body: bytes
    headers: tuple[tuple[str, str], ...]


def negotiate(
    accept: str, accept_encoding: str, names: tuple[str, ...] = (), *, allow_gzip: bool = True
) -> Negotiated:
    """OpenMetrics for ``Accept: application/openmetrics-text``, else text format 0.0.4."""
    encoder, content_type = choose_encoder(accept)
    use_gzip = allow_gzip and gzip_accepted(accept_encoding)
    return Negotiated(content_type, use_gzip, tuple(sorted(set(names))), encoder=encoder)


def resolve_registry(registry: Collector | None) -> Collector:
    """The explicit registry; else a multiprocess one per scrape; else the process one.

    ``PROMETHEUS_MULTIPROC_DIR`` is read now (never at import), so a server started
    before the variable was set still does the right thing.
    """
    if registry is not None:
        return registry
    path = os.environ.get(MULTIPROC_ENV)
    if path:
        from prometheus_client.multiprocess import MultiProcessCollector

        fresh = CollectorRegistry()
        MultiProcessCollector(fresh, path=path)  # type: ignore[no-untyped-call]
        return fresh
    return REGISTRY


def render(negotiated: Negotiated, registry: Collector | None) -> Rendered:
    """Render (and maybe gzip) the metrics. Blocking: call it from a worker thread."""
    source = resolve_registry(registry)
    if negotiated.names and isinstance(source, CollectorRegistry):
        source = source.restricted_registry(negotiated.names)
    with gc_paused():
        body = negotiated.encoder(source)
    headers = [("Content-Type", negotiated.content_type), ("Vary", "Accept, Accept-Encoding")]
    if negotiated.gzip:
        body = gzip.compress(body, compresslevel=GZIP_LEVEL)
        headers.append(("Content-Encoding", "gzip"))
    headers.append(("Content-Length", str(len(body))))
    return Rendered(200, body, tuple(headers))


def error_response(status: int, message: str, *extra: tuple[str, str]) -> Rendered:
    """A small plain-text response (404, 405, 500)."""
    body = message.encode()
    headers = (
        ("Content-Type", "text/plain; charset=utf-8"),
        ("Content-Length", str(len(body))),
        *extra,
    )
    return Rendered(status, body, headers)


@contextlib.contextmanager
def gc_paused() -> Iterator[None]:
    """Pause automatic garbage collection while a registry renders.

    Rendering allocates tens of thousands of short-lived containers (samples, label
    dicts); they trigger full collections that hold the GIL for 20-30 ms, and the event
    loop thread waits for the GIL that long. With collection paused the containers die by
    reference counting and nothing is promoted. Nested and concurrent renders share one
    pause; collection is re-enabled only if it was enabled when the first one started.
    """
    global _gc_pausers, _gc_was_enabled  # noqa: PLW0603 - one process-wide pause
    with _gc_lock:
        if _gc_pausers == 0:
            _gc_was_enabled = gc.isenabled()
            gc.disable()
        _gc_pausers += 1
    try:
        yield
    finally:
        with _gc_lock:
            _gc_pausers -= 1
            if _gc_pausers == 0 and _gc_was_enabled:
                gc.enable()
