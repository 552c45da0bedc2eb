"""The never-raising helpers that name user types and make any text safe to export."""

from __future__ import annotations

from typing import Any, NoReturn

import pytest
from opentelemetry.exporter.otlp.proto.common._internal import _encode_value

from taskscope import Telemetry
from taskscope._safe import (
    MAX_CHAIN,
    MAX_FRAMES,
    TRUNCATED,
    qualified_type_name,
    safe_message,
    safe_stacktrace,
    safe_text,
    type_name,
)

CANARY = "zq81CANARYx7"


class RaisingMeta(type):
    """A metaclass whose classes raise when asked for their name or module."""

    def __getattribute__(cls, name: str) -> Any:
        if name in ("__module__", "__qualname__", "__name__"):
            raise RuntimeError(f"no {name} for you")
        return super().__getattribute__(name)


class MetaError(Exception, metaclass=RaisingMeta):
    pass


class EvilStr(str):
    """A str subclass whose comparisons, hashing and formatting raise."""

    def __eq__(self, other: object) -> bool:
        raise RuntimeError("eq")

    def __hash__(self) -> int:
        raise RuntimeError("hash")

    def __str__(self) -> str:
        raise RuntimeError("str")

    def __format__(self, spec: str) -> str:
        raise RuntimeError("format")

    def __getitem__(self, key: Any) -> str:
        raise RuntimeError("getitem")


def encodes(text: str) -> bool:
    """What the OTLP encoder and Prometheus both need: UTF-8 encodable text."""
    try:
        text.encode("utf-8")
        _encode_value(text)
    except Exception:
        return False
    return True


def test_type_names_never_run_metaclass_properties() -> None:
    """Names come from the type's own slots: a metaclass property that raises is never run."""
    with pytest.raises(RuntimeError):
        _ = MetaError.__module__
    assert qualified_type_name(MetaError("x")) == "tests.test_safe.MetaError"
    assert qualified_type_name(MetaError) == "tests.test_safe.MetaError"
    assert type_name(MetaError()) == "MetaError"


def test_builtins_are_bare_and_others_qualified() -> None:
    """OTel's error.type convention: ValueError bare, others module.QualName."""
    assert qualified_type_name(ValueError("x")) == "ValueError"
    assert qualified_type_name(KeyError) == "KeyError"
    assert qualified_type_name(MetaError()) == "tests.test_safe.MetaError"
    assert type_name(ValueError) == "ValueError"


def test_non_string_and_hostile_modules() -> None:
    """A __module__ that is not a string is <unknown>; a str subclass is read as plain text."""
    weird = type("Weird", (Exception,), {"__module__": 42})
    assert qualified_type_name(weird()) == "<unknown>.Weird"
    evil = type("Evil", (Exception,), {"__module__": EvilStr("evil.module")})
    assert qualified_type_name(evil()) == "evil.module.Evil"
    evil.__qualname__ = EvilStr("Q.Evil")
    assert qualified_type_name(evil) == "evil.module.Q.Evil"
    assert type(qualified_type_name(evil)) is str


def test_unencodable_type_names_are_escaped_on_one_line() -> None:
    """Lone surrogates, NUL and newlines in a class name become visible escapes."""
    cls = type("Bad\x1bName", (Exception,), {"__module__": "m\ud800"})
    assert type_name(cls) == "Bad\\x1bName"
    cls.__qualname__ = "Bad\udcff\x00\nName"  # a qualname may be any str
    assert qualified_type_name(cls()) == "m\\ud800.Bad\\udcff\\x00\\x0aName"
    assert encodes(qualified_type_name(cls))


def test_long_type_names_are_bounded() -> None:
    """A generated 10,000-character class name is truncated."""
    cls = type("E" * 10_000, (Exception,), {})
    assert len(type_name(cls)) < 250
    assert type_name(cls).endswith(TRUNCATED)


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("plain text", "plain text"),
        ("multi\nline\ttab", "multi\nline\ttab"),
        ("nul\x00 bell\x07 del\x7f c1\x85", "nul\\x00 bell\\x07 del\\x7f c1\\x85"),
        ("surrogate \udcff and pair \ud83d\ude00", "surrogate \\udcff and pair \\ud83d\\ude00"),
        ("emoji 😀 and accents é", "emoji 😀 and accents é"),
        (b"bytes \xff ok", "bytes \\xff ok"),
        (12, "12"),
    ],
)
def test_safe_text_escapes_only_what_cannot_be_exported(value: object, expected: str) -> None:
    """Everything else is kept: only unencodable and control characters are escaped."""
    assert safe_text(value) == expected
    assert encodes(safe_text(value))


def test_safe_text_single_line_and_hostile_objects() -> None:
    """single_line escapes newlines; a str subclass or an unprintable object never raises."""
    assert safe_text("a\nb\r\tc", single_line=True) == "a\\x0ab\\x0d\\x09c"
    assert safe_text(EvilStr("evil")) == "evil"

    class Unprintable:
        def __str__(self) -> str:
            raise RuntimeError("no")

    assert safe_text(Unprintable()) == "<unprintable Unprintable>"
    assert safe_text("x" * 50, max_length=10) == "x" * 10 + TRUNCATED


class HostileStrError(Exception):
    def __init__(self, behaviour: str) -> None:
        super().__init__(behaviour)
        self.behaviour = behaviour

    def __str__(self) -> Any:
        if self.behaviour == "raise":
            raise RuntimeError("str failed")
        if self.behaviour == "interrupt":
            raise KeyboardInterrupt
        if self.behaviour == "evil":
            return EvilStr(f"password={CANARY}")
        return f"fine password={CANARY} \udcff"


@pytest.mark.parametrize(
    ("behaviour", "expected"),
    [
        ("raise", "<unprintable HostileStrError>"),
        ("interrupt", "<unprintable HostileStrError>"),
        ("evil", "password=***"),
        ("fine", "fine password=*** \\udcff"),
    ],
)
def test_safe_message_never_raises_and_redacts(behaviour: str, expected: str) -> None:
    """__str__ that raises (even KeyboardInterrupt) or returns a hostile str: never raises."""
    message = safe_message(HostileStrError(behaviour), Telemetry())
    assert message == expected
    assert CANARY not in message
    assert encodes(message)


def test_safe_message_with_a_failing_or_lying_redactor() -> None:
    """A redactor that raises or returns a non-string never lets the raw text through."""

    def raising(text: str) -> str:
        raise ValueError(text)

    def lying(text: str) -> Any:
        return 42

    for redact in (raising, lying):
        message = safe_message(ValueError(CANARY), Telemetry(redact=redact))
        assert message == "<redaction failed>"


def test_safe_message_is_truncated_after_redaction() -> None:
    """A URL straddling the limit is redacted first, then the text is cut."""
    telemetry = Telemetry(max_message_length=30)
    text = "x" * 20 + f" postgres://user:{CANARY}@db/x " + "y" * 500
    message = safe_message(RuntimeError(text), telemetry)
    assert CANARY not in message
    assert message.endswith(TRUNCATED)
    assert len(message) == 30 + len(TRUNCATED)


def _chained() -> BaseException:
    try:
        try:
            raise KeyError(f"token={CANARY}")
        except KeyError as inner:
            raise ValueError(f"{{'api_key': {CANARY!r}}}") from inner
    except ValueError as middle:
        middle.add_note(f"password: {CANARY}")
        try:
            raise RuntimeError("outer \udcff")
        except RuntimeError as outer:
            return outer
    raise AssertionError("unreachable")


def test_safe_stacktrace_covers_causes_contexts_and_notes() -> None:
    """The whole chain and its notes are formatted, redacted and encodable."""
    trace = safe_stacktrace(_chained(), Telemetry())
    assert "KeyError" in trace
    assert "ValueError" in trace
    assert "RuntimeError: outer \\udcff" in trace
    assert "The above exception was the direct cause" in trace
    assert "During handling of the above exception" in trace
    assert "password: ***" in trace
    assert f'File "{__file__}"' in trace
    assert CANARY not in trace
    assert encodes(trace)


def test_safe_stacktrace_is_bounded_and_survives_cycles_and_hostile_classes() -> None:
    """Deep recursion, long chains, cause cycles and metaclass traps: bounded, never raises."""

    def recurse(n: int) -> NoReturn:
        if n == 0:
            raise MetaError("deep")
        recurse(n - 1)

    with pytest.raises(MetaError) as info:
        recurse(200)
    trace = safe_stacktrace(info.value, Telemetry())
    assert trace.count('  File "') == MAX_FRAMES
    assert "frames omitted" in trace
    assert "tests.test_safe.MetaError: deep" in trace

    first, second = ValueError("a"), ValueError("b")
    first.__cause__, second.__cause__ = second, first
    assert safe_stacktrace(first, Telemetry()).count("ValueError") == 2

    chain = ValueError("0")
    for i in range(1, 50):
        new = ValueError(str(i))
        new.__cause__ = chain
        chain = new
    trace = safe_stacktrace(chain, Telemetry())
    assert trace.count("ValueError") == MAX_CHAIN
    assert "earlier exceptions of the chain omitted" in trace
    assert len(safe_stacktrace(ValueError("m" * 100_000), Telemetry())) < 16 * 256 + 20
