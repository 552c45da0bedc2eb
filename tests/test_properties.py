"""Property-based: whatever callables, arguments and exceptions, every task gets one outcome."""

from __future__ import annotations

import functools
from typing import Any

import anyio
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from taskscope import BackgroundTasks
from tests.conftest import make_observed

PROPERTY_SETTINGS = settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)


class WeirdError(Exception):
    def __init__(self, payload: Any) -> None:
        super().__init__(payload)
        self.payload = payload


class UnprintableError(Exception):
    def __str__(self) -> str:
        raise ValueError("cannot print")


exceptions = st.one_of(
    st.none(),
    st.builds(ValueError, st.text(max_size=3000)),
    st.builds(WeirdError, st.one_of(st.integers(), st.binary(max_size=50), st.text(max_size=50))),
    st.builds(UnprintableError),
    st.builds(KeyError, st.text(max_size=20)),
)
arguments = st.lists(
    st.one_of(st.integers(), st.text(max_size=20), st.none(), st.binary(max_size=10)), max_size=4
)


def make_callable(kind: str, error: BaseException | None) -> Any:
    def sync_fn(*args: Any, **kwargs: Any) -> None:
        if error is not None:
            raise error

    async def async_fn(*args: Any, **kwargs: Any) -> None:
        if error is not None:
            raise error

    class CallableObject:
        async def __call__(self, *args: Any, **kwargs: Any) -> None:
            if error is not None:
                raise error

        def method(self, *args: Any, **kwargs: Any) -> None:
            if error is not None:
                raise error

    options = {
        "sync": sync_fn,
        "async": async_fn,
        "partial": functools.partial(async_fn, "bound"),
        "object": CallableObject(),
        "method": CallableObject().method,
        "lambda": lambda *a, **k: sync_fn(*a, **k),
    }
    return options[kind]


task_specs = st.lists(
    st.tuples(
        st.sampled_from(["sync", "async", "partial", "object", "method", "lambda"]),
        exceptions,
        arguments,
        st.dictionaries(st.sampled_from(["a", "b", "password"]), st.text(max_size=10), max_size=2),
    ),
    min_size=1,
    max_size=6,
)


@PROPERTY_SETTINGS
@given(specs=task_specs, keep_going=st.booleans())
def test_every_task_ends_in_exactly_one_outcome(specs: list[Any], keep_going: bool) -> None:
    """Sum of outcomes == tasks added; the first error propagates as the same object."""
    observed = make_observed(continue_on_error=keep_going, loop_probe=False)
    tasks = BackgroundTasks(telemetry=observed.telemetry)
    errors: list[BaseException] = []
    for kind, error, args, kwargs in specs:
        tasks.add_task(make_callable(kind, error), *args, **kwargs)
        if error is not None:
            errors.append(error)

    async def main() -> BaseException | None:
        try:
            await tasks()
        except Exception as exc:
            return exc
        return None

    raised = anyio.run(main)
    outcomes = observed.outcomes()
    assert sum(outcomes.values()) == len(specs)
    if errors:
        assert raised is errors[0]
        failures = sum(v for (_, outcome), v in outcomes.items() if outcome == "failure")
        if keep_going:
            assert failures == len(errors)
        else:
            assert failures == 1
    else:
        assert raised is None
    dumped = repr(observed.logs.events)
    for _, _, _args, kwargs in specs:
        for value in kwargs.values():
            if len(value) >= 6:
                assert value not in dumped  # arguments are never recorded


@pytest.mark.parametrize("message_size", [0, 100, 100_000])
def test_messages_are_truncated(message_size: int) -> None:
    """Any message size: the recorded message stays under the limit (+ marker)."""
    observed = make_observed(loop_probe=False)

    async def fail() -> None:
        raise RuntimeError("m" * message_size)

    tasks = BackgroundTasks(telemetry=observed.telemetry)
    tasks.add_task(fail)

    async def main() -> None:
        with pytest.raises(RuntimeError):
            await tasks()

    anyio.run(main)
    (event,) = observed.logs.named("task.failed")
    assert len(event["error"]) <= observed.telemetry.max_message_length + len("…[truncated]")
