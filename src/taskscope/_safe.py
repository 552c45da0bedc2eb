"""Never-raising introspection and text cleaning for everything taskscope records.

User objects (callables, exceptions, their classes) can misbehave in every attribute taskscope
reads: ``__str__`` that raises, a metaclass whose ``__module__`` is a property that raises, a
``__qualname__`` that is a ``str`` subclass with a hostile ``__eq__``. And any text can hold
characters that no exporter can encode (lone surrogates from ``surrogateescape`` file names)
or that corrupt a line-based format (NUL, control characters). Every function here returns an
exact ``str`` that UTF-8 can encode, and never raises (``Exception``; ``KeyboardInterrupt``
and friends from user code are not taskscope's to swallow, except where noted).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from types import TracebackType

    from taskscope._config import Telemetry

UNKNOWN = "<unknown>"
MAX_TYPE_NAME_LENGTH = 200
TRUNCATED = "…[truncated]"

# Lone surrogates (cannot be encoded), C0 controls but tab/newline/CR, DEL and C1 controls.
_UNSAFE = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f\ud800-\udfff]")
# The same plus tab, newline and CR: for one-line values (names, labels).
_UNSAFE_LINE = re.compile("[\x00-\x1f\x7f-\x9f\ud800-\udfff]")

_TYPE_QUALNAME = type.__dict__["__qualname__"]
_TYPE_NAME = type.__dict__["__name__"]
_TYPE_MODULE = type.__dict__["__module__"]


def _escape(match: re.Match[str]) -> str:
    code = ord(match.group())
    if code <= 0xFF:
        return f"\\x{code:02x}"
    return f"\\u{code:04x}"


def exact_str(value: str) -> str:
    """An exact ``str`` with the same characters (a ``str`` subclass may override anything)."""
    if type(value) is str:
        return value
    return str.__str__(value)


def safe_text(value: object, *, single_line: bool = False, max_length: int | None = None) -> str:
    """``value`` as text that every exporter can encode, keeping everything else.

    Lone surrogates and control characters become visible escapes (``\\udcff``,
    ``\\x00``); ``single_line`` escapes tab, newline and CR too. Bytes are decoded as UTF-8
    (undecodable bytes escaped); other objects go through ``str()`` (a failing ``str()``
    gives ``<unprintable TypeName>``). ``max_length`` truncates (with a marker).
    """
    try:
        if isinstance(value, str):
            text = exact_str(value)
        elif isinstance(value, (bytes, bytearray, memoryview)):
            text = bytes(value).decode("utf-8", "backslashreplace")
        else:
            text = _str_or_placeholder(value)
        if not text.isprintable():  # fast path: most text has nothing to escape
            text = (_UNSAFE_LINE if single_line else _UNSAFE).sub(_escape, text)
        if max_length is not None and len(text) > max_length:
            text = text[:max_length] + TRUNCATED
        return text
    except Exception:  # pragma: no cover - defensive: every branch above is total
        return "<unprintable>"


def _str_or_placeholder(value: object) -> str:
    try:
        text = str(value)
        if isinstance(text, str):
            return exact_str(text)
    except Exception:  # noqa: S110 - a hostile __str__: the placeholder below says so
        pass
    return f"<unprintable {type_name(value)}>"


def _class_of(obj_or_cls: object) -> type:
    # type() and the MRO walk below read C slots only: no user code runs.
    cls = type(obj_or_cls)
    if type in cls.__mro__:  # obj_or_cls is itself a class
        return obj_or_cls  # type: ignore[return-value]
    return cls


def type_name(obj_or_cls: object) -> str:
    """The class's ``__name__`` (of ``obj_or_cls``, or of its class), safe to record.

    Read from the type's own slot, so a metaclass property named ``__name__`` never runs.
    The value the Prometheus ``error_type`` label and the ``error_type`` log field carry.
    """
    try:
        name = _TYPE_NAME.__get__(_class_of(obj_or_cls))
        return safe_text(name, single_line=True, max_length=MAX_TYPE_NAME_LENGTH)
    except Exception:  # pragma: no cover - the slot always holds a str
        return UNKNOWN


def qualified_type_name(obj_or_cls: object) -> str:
    """``module.QualName`` of an exception (or any object, or class): OTel's ``error.type``.

    ``builtins`` classes are bare (``ValueError``), as OpenTelemetry records them. Reads
    the type's own slots (no metaclass property, no ``__getattr__`` runs); a ``__module__``
    that is not a string is ``<unknown>``. Escaped and bounded like every recorded name.
    """
    try:
        cls = _class_of(obj_or_cls)
        qualname = exact_str(_TYPE_QUALNAME.__get__(cls))
        module = _TYPE_MODULE.__get__(cls)
        module = exact_str(module) if isinstance(module, str) else UNKNOWN
        text = qualname if module == "builtins" else f"{module}.{qualname}"
        return safe_text(text, single_line=True, max_length=MAX_TYPE_NAME_LENGTH)
    except Exception:  # pragma: no cover - both slots are readable on every class
        return UNKNOWN


def redact_text(text: str, redact: Callable[[str], str], limit: int) -> str:
    """Redact, then truncate to ``limit``; encodable whatever ``redact`` returns.

    Redaction runs before truncation (a cut could separate a secret from what marks it),
    on a bounded prefix (4 times ``limit``) so its cost stays bounded. A redactor that raises
    or returns a non-string gives ``<redaction failed>``: never the unredacted text.
    """
    text = exact_str(text)
    try:
        redacted = redact(text[: limit * 4])
    except Exception:
        return "<redaction failed>"
    if not isinstance(redacted, str):
        return "<redaction failed>"
    redacted = safe_text(redacted)
    if len(redacted) > limit or len(text) > limit * 4:
        redacted = redacted[:limit] + TRUNCATED
    return redacted


def safe_message(error: object, telemetry: Telemetry) -> str:
    """``str(error)``, redacted with ``telemetry.redact``, truncated, encodable; never raises.

    Even a ``BaseException`` raised by the exception's ``__str__`` is absorbed: this runs
    while the task's own exception is being recorded, and must not replace it.
    """
    try:
        text = str(error)
        if not isinstance(text, str):
            text = f"<unprintable {type_name(error)}>"
    except BaseException:  # see the docstring
        text = f"<unprintable {type_name(error)}>"
    try:
        return redact_text(text, telemetry.redact, telemetry.max_message_length)
    except Exception:  # pragma: no cover - redact_text is total
        return "<redaction failed>"


# Frames kept per exception, exceptions kept per chain: a stack trace stays bounded.
MAX_FRAMES = 32
MAX_CHAIN = 8


def safe_stacktrace(error: BaseException, telemetry: Telemetry) -> str:
    """The exception with its chain (causes, contexts) and notes, as Python prints it,
    redacted, bounded and encodable: for the ``exception.stacktrace`` attribute.

    Frames are ``File "path", line N, in function`` without source lines: reading source
    files would be blocking I/O on the event loop. Bounded to 16 times ``max_message_length``
    characters, :data:`MAX_FRAMES` frames per exception and :data:`MAX_CHAIN` exceptions.
    """
    limit = telemetry.max_message_length * 16
    try:
        lines: list[str] = []
        _format_chain(error, lines, set())
        text = "".join(lines)
    except BaseException:  # as in safe_message: never replace the task's error
        text = f"{qualified_type_name(error)}: <stack trace unavailable>"
    try:
        return redact_text(text, telemetry.redact, limit)
    except Exception:  # pragma: no cover - redact_text is total
        return "<redaction failed>"


def _format_chain(error: BaseException, lines: list[str], seen: set[int]) -> None:
    # (exception, how it relates to the one after it in the chain), newest first.
    chain: list[tuple[BaseException, str | None]] = []
    current: object = error
    link: str | None = None
    while isinstance(current, BaseException) and id(current) not in seen:
        if len(chain) >= MAX_CHAIN:
            break
        seen.add(id(current))
        chain.append((current, link))
        cause = _read(current, "__cause__")
        if isinstance(cause, BaseException):
            current, link = cause, _CAUSE
            continue
        context = _read(current, "__context__")
        if isinstance(context, BaseException) and not _read(current, "__suppress_context__"):
            current, link = context, _CONTEXT
            continue
        current = None
    if isinstance(current, BaseException) and id(current) not in seen:
        lines.append("[... earlier exceptions of the chain omitted]\n\n")
    for exc, relation in reversed(chain):  # oldest first, as Python prints them
        _format_one(exc, lines)
        if relation is not None:
            lines.append(f"\n{relation}\n\n")


_CAUSE = "The above exception was the direct cause of the following exception:"
_CONTEXT = "During handling of the above exception, another exception occurred:"


def _read(obj: object, name: str) -> Any:
    try:
        return object.__getattribute__(obj, name)
    except Exception:
        return None


def _format_one(exc: BaseException, lines: list[str]) -> None:
    tb: TracebackType | None = _read(exc, "__traceback__")
    entries: list[TracebackType] = []
    while tb is not None:
        entries.append(tb)
        tb = tb.tb_next
    if entries:
        lines.append("Traceback (most recent call last):\n")
        if len(entries) > MAX_FRAMES:  # the innermost frames are kept
            lines.append(f"  [... {len(entries) - MAX_FRAMES} frames omitted]\n")
            entries = entries[-MAX_FRAMES:]
        for entry in entries:
            code = entry.tb_frame.f_code
            lines.append(
                f'  File "{code.co_filename}", line {entry.tb_lineno}, in {code.co_name}\n'
            )
    message = _str_or_placeholder(exc)
    head = qualified_type_name(exc)
    lines.append(f"{head}: {message}\n" if message else f"{head}\n")
    notes = _read(exc, "__notes__")
    if isinstance(notes, (list, tuple)):
        for note in notes[:MAX_CHAIN]:
            lines.append(f"{safe_text(note)}\n")


def code_location_attributes(location: str) -> dict[str, str | int]:
    """``path:line`` as the semantic-convention attributes ``code.file.path`` and
    ``code.line.number`` (the path made encodable); ``{}`` for anything else."""
    try:
        path, _, line = location.rpartition(":")
        if path and line.isdigit():
            return {"code.file.path": safe_text(path), "code.line.number": int(line)}
    except Exception:  # noqa: S110 - a location is text taskscope built: nothing to record
        pass
    return {}
