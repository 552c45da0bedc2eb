"""Task names: module.qualname, unwrapped, distinguishable and bounded."""

from __future__ import annotations

import functools
from typing import Any

from taskscope import task_name
from taskscope._naming import OTHER, NameLimiter, callable_name


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
