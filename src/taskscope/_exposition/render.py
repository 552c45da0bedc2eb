"""Content negotiation and rendering of a registry: blocking work, run off the loop."""

from __future__ import annotations

import contextlib
import gc
import gzip
import os
import struct
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from prometheus_client import REGISTRY, CollectorRegistry
from prometheus_client.exposition import choose_encoder, gzip_accepted
from prometheus_client.metrics_core import Metric

from taskscope._safe import safe_text

if TYPE_CHECKING:
    from prometheus_client.registry import Collector

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
GZIP_LEVEL = 6  # level 9 (prometheus_client's) costs ~2x the CPU for a few % of bytes

SWITCH_INTERVAL = 0.001  # seconds; CPython's default is 0.005

_polite_lock = threading.Lock()
_polite_depth = 0
_saved_gc_enabled = False
_saved_switch_interval = 0.0


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


MULTIPROCESS_ATTEMPTS = 4
"""Multiprocess mode: renders tried before a scrape fails (see :func:`render`)."""
_FILE_RACES = (OSError, ValueError, struct.error)


def render(negotiated: Negotiated, registry: Collector | None, *, polite: bool = True) -> Rendered:
    """Render (and maybe gzip) the metrics. Blocking: call it from a worker thread.

    In multiprocess mode a process may be creating its file (a reader sees a half-written
    key: ``JSONDecodeError``) or another may be removing a dead process's file while the
    files are read; such a render is tried again a few milliseconds later instead of
    failing the scrape (prefork Celery pools replace processes often). ``polite``: see
    :func:`polite_rendering` (process-wide while the render runs; ``False`` leaves the
    garbage collector and the switch interval alone).
    """
    retry = registry is None and bool(os.environ.get(MULTIPROC_ENV))
    attempt = 1
    while True:
        try:
            return _render(negotiated, registry, polite)
        except _FILE_RACES:
            if not retry or attempt >= MULTIPROCESS_ATTEMPTS:
                raise
            time.sleep(0.005 * 2 ** (attempt - 1))  # 5, 10, 20 ms
            attempt += 1


def _render(negotiated: Negotiated, registry: Collector | None, polite: bool) -> Rendered:
    source = resolve_registry(registry)
    if negotiated.names and isinstance(source, CollectorRegistry):
        source = source.restricted_registry(negotiated.names)
    with polite_rendering() if polite else contextlib.nullcontext():
        body = encode(negotiated.encoder, source)
    headers = [("Content-Type", negotiated.content_type), ("Vary", "Accept, Accept-Encoding")]
    if negotiated.gzip:
        body = gzip.compress(body, compresslevel=GZIP_LEVEL)
        headers.append(("Content-Encoding", "gzip"))
    headers.append(("Content-Length", str(len(body))))
    return Rendered(200, body, tuple(headers))


def encode(encoder: Callable[[Collector], bytes], source: Collector) -> bytes:
    """Render ``source``; an unencodable value (a lone surrogate in a label value or a help
    text, from any collector of the registry) is escaped instead of failing every scrape."""
    try:
        return encoder(source)
    except UnicodeEncodeError:
        return encoder(_Escaped(source))


class _Escaped:
    """A collector that yields ``source``'s metrics with every text made encodable."""

    def __init__(self, source: Collector) -> None:
        self._source = source

    def collect(self) -> Iterator[Metric]:
        for metric in self._source.collect():
            copy = Metric(metric.name, safe_text(metric.documentation), metric.type, metric.unit)
            copy.samples = [
                sample._replace(
                    labels={k: safe_text(v) for k, v in sample.labels.items()},
                    exemplar=sample.exemplar
                    and sample.exemplar._replace(
                        labels={k: safe_text(v) for k, v in sample.exemplar.labels.items()}
                    ),
                )
                for sample in metric.samples
            ]
            yield copy


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
def polite_rendering() -> Iterator[None]:
    """Make a render in a worker thread cost the event loop thread as little as possible.

    Two process-wide settings are changed while any render runs, and restored after:

    * automatic garbage collection is paused: rendering allocates tens of thousands of
      short-lived containers (samples, label dicts) that trigger full collections, which
      hold the GIL for 20-30 ms; paused, the containers die by reference counting;
    * the GIL switch interval drops from 5 ms to 1 ms, so the loop thread waits at most
      about 1 ms for the GIL each time it wakes up.

    Nested and concurrent renders share one change; a setting someone else changed in
    the meantime is left as they set it.
    """
    global _polite_depth, _saved_gc_enabled, _saved_switch_interval  # noqa: PLW0603
    with _polite_lock:
        if _polite_depth == 0:
            _saved_gc_enabled = gc.isenabled()
            _saved_switch_interval = sys.getswitchinterval()
            gc.disable()
            sys.setswitchinterval(min(SWITCH_INTERVAL, _saved_switch_interval))
        _polite_depth += 1
    try:
        yield
    finally:
        with _polite_lock:
            _polite_depth -= 1
            if _polite_depth == 0:
                if _saved_gc_enabled and not gc.isenabled():
                    gc.enable()
                if sys.getswitchinterval() == min(SWITCH_INTERVAL, _saved_switch_interval):
                    sys.setswitchinterval(_saved_switch_interval)
