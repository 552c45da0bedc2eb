"""Reading settings from environment variables (when asked, never at import).

An error names the variable and what is wrong with it, never the value: a value may be a
credential (``OTEL_EXPORTER_OTLP_HEADERS='Authorization=Bearer ...'``), and error messages
end up in logs and crash reports.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any


class InvalidValueError(ValueError):
    """Raised by a parser with a message that describes the problem without the value."""


def read_variables(
    environ: Mapping[str, str], table: Mapping[str, tuple[str, Callable[[str], Any]]]
) -> dict[str, Any]:
    """``{argument: parse(value)}`` for each variable of ``table`` that is set and not blank.

    ``table`` maps a variable to its argument name and parser. A parser's
    :class:`InvalidValueError` is re-raised as ``ValueError("VARIABLE: <its message>")``; any
    other ``ValueError`` (whose message may quote the value) as
    ``ValueError("VARIABLE: malformed value")``. Never chained: the original exception
    would carry the value too.
    """
    options: dict[str, Any] = {}
    for variable, (name, parse) in table.items():
        raw = environ.get(variable)
        if raw is None or not raw.strip():
            continue
        try:
            options[name] = parse(raw)
        except InvalidValueError as exc:
            msg = f"{variable}: {exc}"
        except (ValueError, TypeError, OverflowError):
            msg = f"{variable}: malformed value"
        else:
            continue
        raise ValueError(msg) from None
    return options


def parse_bool(raw: str) -> bool:
    value = raw.strip().lower()
    if value in {"1", "true", "yes", "on"}:
        return True
    if value in {"0", "false", "no", "off"}:
        return False
    msg = "expected true/false (also 1/0, yes/no, on/off)"
    raise InvalidValueError(msg)


def parse_int(raw: str) -> int:
    try:
        return int(raw.strip())
    except ValueError:
        msg = "expected an integer"
        raise InvalidValueError(msg) from None


def parse_float(raw: str) -> float:
    try:
        value = float(raw.strip())
    except ValueError:
        msg = "expected a number"
        raise InvalidValueError(msg) from None
    if not math.isfinite(value):
        msg = "expected a finite number"
        raise InvalidValueError(msg)
    return value


def parse_choice(*choices: str) -> Callable[[str], str]:
    def parse(raw: str) -> str:
        value = raw.strip()
        if value not in choices:
            msg = f"expected one of {', '.join(choices)}"
            raise InvalidValueError(msg)
        return value

    return parse
