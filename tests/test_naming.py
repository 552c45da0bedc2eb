"""Task names: module.qualname, unwrapped, distinguishable and bounded."""

from __future__ import annotations

import functools
from typing import Any

from taskscope import task_name
from taskscope._naming import (
    MAX_NAME_LENGTH,
    OTHER,
    ErrorTypeLimiter,
    NameLimiter,
    callable_name,
)
from tests.hostile_types import RaisingMeta


def plain() -> None: ...


async def coroutine_function() -> None: ...


class Mailer:
    def send(self) -> None: ...

    async def asend(self) -> None: ...

    @staticmethod
    def static() -> None: ...

    @classmethod
    def klass(cls) -> None: ...


class CallableObject:
    def __call__(self) -> None: ...


def test_functions_and_coroutine_functions() -> None:
    """Plain and async functions: module.qualname."""
    assert callable_name(plain) == "tests.test_naming.plain"
    assert callable_name(coroutine_function) == "tests.test_naming.coroutine_function"


def test_partials_are_unwrapped() -> None:
    """functools.partial (nested too) is named after the wrapped function."""
    assert callable_name(functools.partial(plain)) == "tests.test_naming.plain"
    nested = functools.partial(functools.partial(Mailer().send))
    assert callable_name(nested) == "tests.test_naming.Mailer.send"


def test_methods_and_callable_objects() -> None:
    """Bound, static and class methods; callable objects by their class."""
    assert callable_name(Mailer().asend) == "tests.test_naming.Mailer.asend"
    assert callable_name(Mailer.static) == "tests.test_naming.Mailer.static"
    assert callable_name(Mailer.klass) == "tests.test_naming.Mailer.klass"
    assert callable_name(CallableObject()) == "tests.test_naming.CallableObject"


def test_lambdas_are_distinguishable() -> None:
    """Two lambdas get different names (their line numbers)."""
    first = lambda: None  # noqa: E731
    second = lambda: None  # noqa: E731
    a, b = callable_name(first), callable_name(second)
    assert a != b
    assert a.startswith("tests.test_naming.test_lambdas_are_distinguishable.<locals>.<lambda>@")


def test_explicit_name_wins() -> None:
    """@task_name overrides the derived name, also through partials and methods."""

    @task_name("emails.welcome")
    def send() -> None: ...

    assert callable_name(send) == "emails.welcome"
    assert callable_name(functools.partial(send)) == "emails.welcome"


def test_builtins_and_odd_objects_never_raise() -> None:
    """Builtins, classes and objects with hostile __getattr__ still get a name."""

    class Hostile:
        def __getattribute__(self, name: str) -> Any:
            raise RuntimeError("no attributes")

        def __call__(self) -> None: ...

    assert callable_name(print) == "builtins.print"
    assert callable_name(CallableObject) == "tests.test_naming.CallableObject"
    assert (
        callable_name(Hostile())
        == "tests.test_naming.test_builtins_and_odd_objects_never_raise.<locals>.Hostile"
    )


def test_name_cap_overflows_to_other() -> None:
    """Past the cap, new names become __other__; known names stay."""
    limiter = NameLimiter(2)
    assert limiter.admit("a") == "a"
    assert limiter.admit("b") == "b"
    assert limiter.admit("c") == OTHER
    assert limiter.admit("a") == "a"
    assert len(limiter) == 2


class HostileCallable(metaclass=RaisingMeta):
    def __call__(self) -> None: ...


class EvilStr(str):
    def __hash__(self) -> int:
        raise RuntimeError("hash")

    def __eq__(self, other: object) -> bool:
        raise RuntimeError("eq")


def test_hostile_names_fall_back_to_the_type_slots() -> None:
    """__qualname__/__module__ that raise or are not strings never raise; a name is found."""
    assert callable_name(HostileCallable()) == "tests.test_naming.HostileCallable"
    assert callable_name(HostileCallable) == "tests.test_naming.HostileCallable"

    def func() -> None: ...

    func.__module__ = 42  # type: ignore[assignment]
    assert callable_name(func).startswith("<unknown>.")
    func.__module__ = EvilStr("evil")
    assert callable_name(func).startswith("evil.")
    assert type(callable_name(func)) is str

    class NoStrModule:
        __module__ = None  # type: ignore[assignment]

        def __call__(self) -> None: ...

    assert callable_name(NoStrModule()).startswith("<unknown>.")


def test_explicit_name_of_a_hostile_str_subclass() -> None:
    """A str subclass given to task_name is read as a plain str (no hostile hash/eq runs)."""

    @task_name(EvilStr("emails.welcome"))
    def send() -> None: ...

    name = callable_name(send)
    assert type(name) is str
    assert name == "emails.welcome"
    assert NameLimiter(5).admit(EvilStr("x.y")) == "x.y"


def test_names_are_cleaned_and_redacted_at_admission() -> None:
    """Control characters and lone surrogates escaped, secrets masked, length bounded."""
    from taskscope import redact_secrets

    limiter = NameLimiter(10, redact=redact_secrets)
    assert limiter.admit("files.\udcff\x00bad\nname") == "files.\\udcff\\x00bad\\x0aname"
    assert limiter.admit("report?token=s3cr3tvalue") == "report?token=***"
    long = limiter.admit("x" * 5000)
    assert len(long) < MAX_NAME_LENGTH + 20
    assert limiter.admit("") == "<unnamed>"

    def failing(text: str) -> str:
        raise ValueError(text)

    assert NameLimiter(1, redact=failing).admit("password=abc") == "<redaction failed>"


def test_overflow_is_counted_per_task() -> None:
    """Every task named __other__ calls on_overflow, also for raw names seen before."""
    calls: list[None] = []
    limiter = NameLimiter(1, on_overflow=lambda: calls.append(None))
    assert limiter.admit("a") == "a"
    assert limiter.admit("b") == OTHER
    assert limiter.admit("b") == OTHER
    assert limiter.admit("a") == "a"
    assert len(calls) == 2
    assert limiter.overflows == 2


def test_the_raw_name_cache_is_bounded() -> None:
    """100,000 distinct raw names (user data) keep memory bounded."""
    limiter = NameLimiter(3)
    for i in range(100_000):
        limiter.admit(f"name-{i}")
    assert len(limiter) == 3
    assert len(limiter._known) <= 1024


def test_error_types_are_bounded_per_task_and_overall() -> None:
    """Past the per-task or the overall cap, new error types are __other__ and counted."""
    overflowed: list[str] = []
    limiter = ErrorTypeLimiter(2, 3, on_overflow=overflowed.append)
    assert limiter.admit("t1", "A") == "A"
    assert limiter.admit("t1", "B") == "B"
    assert limiter.admit("t1", "C") == OTHER  # per task
    assert limiter.admit("t1", "A") == "A"
    assert limiter.admit("t2", "A") == "A"
    assert limiter.admit("t2", "B") == OTHER  # overall (3 pairs)
    assert limiter.admit("t3", "Bad\udcff\nType") == OTHER
    assert overflowed == ["t1", "t2", "t3"]
    assert len(limiter) == 3
    assert ErrorTypeLimiter(5, 5).admit("t", "Bad\udcff\nType") == "Bad\\udcff\\x0aType"
