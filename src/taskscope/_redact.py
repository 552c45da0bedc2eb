"""Masking of secrets in exception messages before they are recorded anywhere."""

from __future__ import annotations

import re

_PATTERNS: tuple[tuple[re.Pattern[str], str], ...] = (
    # scheme://user:password@host -> scheme://user:***@host (connection URLs)
    # (up to the last "@": passwords may contain "/" or "@")
    (re.compile(r"(?i)\b([a-z][a-z0-9+.\-]*://[^\s:/@]*:)\S+@"), r"\1***@"),
    # Authorization headers and bearer/basic tokens
    (re.compile(r"(?i)\b(bearer|basic|token)\s+[A-Za-z0-9._~+/=\-]{6,}"), r"\1 ***"),
    # key=value and key: value for secret-looking keys
    (
        re.compile(
            r"(?i)\b([a-z0-9_\-]*(?:password|passwd|pwd|secret|token|api[_\-]?key|apikey"
            r"|access[_\-]?key|private[_\-]?key|auth|credential|session)[a-z0-9_\-]*)"
            r"(\s*[=:]\s*|\"\s*:\s*\"|'\s*:\s*')(\"[^\"]*\"|'[^']*'|[^\s,;&'\"}]+)"
        ),
        r"\1\2***",
    ),
    # e-mail addresses
    (re.compile(r"[A-Za-z0-9._%+\-]+@[A-Za-z0-9.\-]+\.[A-Za-z]{2,}"), "<email>"),
    # long hex/base64-ish tokens (JWTs, keys)
    (re.compile(r"\beyJ[A-Za-z0-9_\-]+\.[A-Za-z0-9_\-]+\.[A-Za-z0-9_\-]*"), "<jwt>"),
    (re.compile(r"\b[A-Fa-f0-9]{32,}\b"), "<hex>"),
)


def redact_secrets(message: str) -> str:
    """Mask passwords in URLs, tokens, ``secret=...`` pairs, e-mails and JWTs.

    The default ``Telemetry.redact``; pass your own callable to change it (it receives
    a bounded prefix of the message (truncated after) and must return a string).
    """
    for pattern, replacement in _PATTERNS:
        message = pattern.sub(replacement, message)
    return message
