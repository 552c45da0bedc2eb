"""OTLP collector faults against a real uvicorn process: nothing lost, nothing slowed.

The app exports spans and metrics through ``taskscope.otlp.setup_otlp`` to a collector that
is healthy (the baseline), closed, answering 503, accepting but never replying, or slow.
Each run sends 4,000 tasks at 200 concurrent requests (fills the span queue, counts exact),
then a paced 50 requests/s phase where lag and latency are compared with the healthy run.
"""

from __future__ import annotations

from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any

import pytest

from tests.otlp_receiver import OtlpReceiver
from tests.reliability.collectors import ClosedCollector, SlowCollector
from tests.reliability.harness import lag_ms, load, mb, paced, report, running, settled

pytestmark = pytest.mark.slow  # real uvicorn processes: make test, not make check

TASKS = 4_000
PER_REQUEST = 8
CONCURRENCY = 200
PACED_RATE = 50.0  # requests/s in the measuring phase (below saturation on 2 CPUs)
PACED_COUNT = 200
SHUTDOWN_TIMEOUT = 3.0  # setup_otlp's default bound for OtlpHandle.shutdown()


def _collector(mode: str) -> AbstractContextManager[Any]:
    if mode == "ok":
        return OtlpReceiver("ok")
    if mode == "unavailable":
        return OtlpReceiver("unavailable")
    if mode == "hang":
        return OtlpReceiver("hang", hang_limit=60)
    if mode == "slow":
        return SlowCollector(delay=1.0)  # under the 2 s export timeout
    return ClosedCollector()


def _run(tmp_path: Path, mode: str) -> dict[str, Any]:
    with _collector(mode) as collector:
        env = {"TS_OTLP_ENDPOINT": collector.endpoint}
        with running(tmp_path, env=env, name=f"otlp-{mode}") as server:
            before = server.stats(reset=True)
            result = load(
                server.base, [f"/work?n={PER_REQUEST}"] * (TASKS // PER_REQUEST), CONCURRENCY
            )
            after = settled(server)
            server.stats(reset=True)
            probe = paced(server.base, "/work?n=8&fail_every=0", PACED_RATE, PACED_COUNT)
            measured = settled(server)
            exit_seconds = server.terminate(timeout=30)
        final = server.final_state("otlp_shutdown")
    return {
        "mode": mode,
        "before": before,
        "after": after,
        "result": result,
        "measured": measured,
        "probe": probe,
        "exit_s": exit_seconds,
        "otlp_shutdown_s": final["otlp_shutdown_s"] if final else None,
    }


@pytest.fixture(scope="module")
def baseline(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    return _run(tmp_path_factory.mktemp("otlp-ok"), "ok")


@pytest.mark.parametrize("mode", ["ok", "closed", "unavailable", "hang", "slow"])
def test_collector_faults_lose_nothing_and_slow_nothing(
    tmp_path: Path, mode: str, baseline: dict[str, Any]
) -> None:
    """Every task accounted for; lag and latency near the healthy run; memory bounded;
    failed exports counted; shutdown within its bound even with a hung collector."""
    run = baseline if mode == "ok" else _run(tmp_path, mode)
    after, before, result = run["after"], run["before"], run["result"]
    assert result.statuses == {200: TASKS // PER_REQUEST}
    assert after["outcomes"] == after["expected"]
    assert sum(after["outcomes"].values()) == after["added"] >= TASKS
    failures = run["measured"]["otlp_failures"]  # ~4 s later: hung exports have timed out
    exported_failures = failures.get("traces", 0) + failures.get("metrics", 0)
    if mode in ("closed", "unavailable", "hang"):
        assert exported_failures > 0
    else:
        assert exported_failures == 0
    # Measured in the paced phase (the collector still failing, spans still dropped):
    # below saturation, so a slowdown would show instead of hiding in queueing.
    measured, probe = run["measured"], run["probe"]
    base_lag = baseline["measured"]["lag"]
    base_probe = baseline["probe"]
    assert probe.statuses == {200: PACED_COUNT}
    assert measured["lag"]["p99"] <= 3 * base_lag["p99"] + 0.05
    assert probe.quantile(0.5) <= 3 * base_probe.quantile(0.5) + 0.02
    assert after["rss"] - before["rss"] < 150 * 2**20
    assert run["otlp_shutdown_s"] is not None
    assert run["otlp_shutdown_s"] <= SHUTDOWN_TIMEOUT + 0.5
    assert run["exit_s"] <= SHUTDOWN_TIMEOUT + 5
    report(
        f"otlp/{mode}",
        outcomes=after["outcomes"],
        load_lag_ms=lag_ms(after),
        load_latency_ms=_ms(result),
        paced_lag_ms=lag_ms(measured),
        paced_latency_ms=_ms(probe),
        paced_p99_lag_vs_baseline=round(measured["lag"]["p99"] / max(base_lag["p99"], 1e-3), 2),
        paced_p50_latency_vs_baseline=round(probe.quantile(0.5) / base_probe.quantile(0.5), 2),
        rss_mb={"before": mb(before["rss"]), "after": mb(after["rss"])},
        export_failures=failures,
        otlp_shutdown_s=round(run["otlp_shutdown_s"], 2),
        exit_s=round(run["exit_s"], 2),
    )


def _ms(result: Any) -> dict[str, float]:
    return {q: round(result.quantile(v) * 1e3, 1) for q, v in (("p50", 0.5), ("p99", 0.99))}
