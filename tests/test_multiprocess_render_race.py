"""Multiprocess exposition while a process is still writing its file (prefork pools).

A pool process that records its first metric extends its file before the key is written:
a scrape at that moment reads an unfinished key (``JSONDecodeError``). The render is tried
again a few milliseconds later instead of failing the scrape.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest
from prometheus_client.mmap_dict import MmapedDict

from taskscope._exposition import render as render_module
from taskscope._exposition.render import negotiate, render

KEY = '["taskscope_tasks_total", "taskscope_tasks_total", {"task": "t"}, "h"]'


def _half_written(path: Path) -> tuple[int, bytes]:
    """A real MmapedDict file whose key bytes are not written yet; (offset, the key)."""
    values = MmapedDict(str(path))  # type: ignore[no-untyped-call]
    values.write_value(KEY, 1.0, 0.0)  # type: ignore[no-untyped-call]
    values.close()  # type: ignore[no-untyped-call]
    data = bytearray(path.read_bytes())
    offset = data.index(KEY.encode())
    data[offset : offset + len(KEY)] = b"\x00" * len(KEY)
    path.write_bytes(bytes(data))
    return offset, KEY.encode()


def _finish_writing(path: Path, offset: int, key: bytes) -> None:
    time.sleep(0.002)
    with path.open("r+b") as file:
        file.seek(offset)
        file.write(key)


def test_render_retries_a_file_being_written(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The scrape succeeds once the writer finished (a few ms later), with its sample."""
    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(tmp_path))
    path = tmp_path / "counter_4242.db"
    offset, key = _half_written(path)
    writer = threading.Thread(target=_finish_writing, args=(path, offset, key))
    writer.start()
    try:
        rendered = render(negotiate("", ""), None)
    finally:
        writer.join()
    assert rendered.status == 200
    assert b'taskscope_tasks_total{task="t"} 1.0' in rendered.body


def test_render_gives_up_on_a_file_that_stays_broken(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A file that stays unreadable still fails the scrape, after the bounded retries."""
    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(tmp_path))
    _half_written(tmp_path / "counter_4243.db")
    started = time.monotonic()
    with pytest.raises(ValueError, match="Expecting value"):
        render(negotiate("", ""), None)
    assert time.monotonic() - started < 1.0
    assert render_module.MULTIPROCESS_ATTEMPTS > 1
