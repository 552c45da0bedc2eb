"""Reading settings from environment variables (when asked, never at import)."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any


def read_variables(
    environ: Mapping[str, str], table: Mapping[str, tuple[str, Callable[[str], Any]]]
) -> dict[str, Any]:
    """``{argument: parse(value)}`` for each variable of ``table`` that is set and not blank.

    ``table`` maps a variable to its argument name and parser; a parser's ``ValueError``
    is re-raised naming the variable (not its value: it may be a credential).
    """
    options: dict[str, Any] = {}
    for variable, (name, parse) in table.items():
        raw = environ.get(variable)
        if raw is None or not raw.strip():
            continue
        try:
            options[name] = parse(raw)
        except ValueError as exc:
            msg = f"{variable}: {exc}"
            raise ValueError(msg) from None
    return options
