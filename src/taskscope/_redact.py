"""Masking of secrets in text before it is recorded anywhere (messages, stack traces, names)."""

from __future__ import annotations

import re

from taskscope._safe import safe_text

MASK = "***"

# Words that mark the value after a key containing them as a secret ("x-api-key",
# "client_secret", "session_id"...). The regex starts at the word (a leading
# "[a-z0-9_.-]*" made it ~3x slower: backtracking at every position); what precedes it
# does not matter, only the value after the separator is masked.
_KEYWORDS = (
    "password", "passwd", "passphrase", "pwd", "secret", "token", "apikey", "api_key",
    "api-key", "access_key", "access-key", "accesskey", "private_key", "private-key",
    "privatekey", "auth", "credential", "session", "cookie", "signature",
)  # fmt: skip
# keyword, the rest of the key, then either a closing quote of the key (dict/JSON keys, also
# JSON escaped once or more inside strings) and a separator (a comma too: ("token", "x")
# pairs), or a bare separator; the value is found by _value_end().
_KEY_VALUE = re.compile(
    r"(?i)(?:" + "|".join(re.escape(k) for k in _KEYWORDS) + r")[a-z0-9_.\-]*"
    r"(?:(?P<quote>\\*[\"'])\s*(?P<sep>=>|[=:,])\s*|\s*(?:=>|[=:])\s*)",
)
_QUOTES = "\"'"
_QUOTED_START = re.compile(r"[bBrRuU]{0,2}\\*[\"']")
_OPEN = {"{": "}", "[": "]", "(": ")"}
# Where an unquoted value ends.
_BARE_END = set(" \t\r\n,;&'\"}])<>")

# (a substring without which the pattern cannot match, or None; pattern; replacement)
_PATTERNS: tuple[tuple[str | None, re.Pattern[str], str], ...] = (
    # scheme://user:password@host -> scheme://user:***@host (connection URLs)
    # (up to the last "@" of the URL: passwords may contain "/" or "@")
    ("://", re.compile(r"(?i)\b([a-z][a-z0-9+.\-]*://[^\s:/@]*:)[^\s'\"]+@"), r"\1***@"),
    # Authorization headers and bearer/basic tokens
    (None, re.compile(r"(?i)\b(bearer|basic|token)\s+[A-Za-z0-9._~+/=\-]{6,}"), r"\1 ***"),
    # e-mail addresses
    ("@", re.compile(r"[A-Za-z0-9._%+\-]+@[A-Za-z0-9.\-]+\.[A-Za-z]{2,}"), "<email>"),
    # long hex/base64-ish tokens (JWTs, keys)
    ("eyJ", re.compile(r"\beyJ[A-Za-z0-9_\-]+\.[A-Za-z0-9_\-]+\.[A-Za-z0-9_\-]*"), "<jwt>"),
    (None, re.compile(r"\b[A-Fa-f0-9]{32,}\b"), "<hex>"),
)


def redact_secrets(message: str) -> str:
    """Mask secrets in text: values of secret-looking keys, URL passwords, tokens, e-mails.

    A value after a key such as ``password``, ``token``, ``api_key``, ``secret``,
    ``auth``, ``cookie`` or ``session`` (``=``, ``:`` or ``=>``, the key quoted or not) is
    masked whatever its shape: quoted (``'x'``, ``"x"``, ``b'x'``, escaped JSON ``\\"x\\"``),
    a number or bare word, or a whole nested ``{...}``/``[...]``/``(...)``. Also: passwords
    of connection URLs, ``Bearer``/``Basic`` tokens, e-mail addresses, JWTs and long hex
    strings. The result is encodable (see :func:`taskscope._safe.safe_text`: lone
    surrogates and control characters escaped).

    The default ``Telemetry.redact``; pass your own callable to change it (it receives
    a bounded prefix of the text (truncated after) and must return a string).
    """
    for hint, pattern, replacement in _PATTERNS:
        if hint is None or hint in message:  # skip a regex pass that cannot match
            message = pattern.sub(replacement, message)
    lowered = message.lower()
    if any(keyword in lowered for keyword in _KEYWORDS):
        message = _mask_key_values(message)
    return safe_text(message)


def _mask_key_values(text: str) -> str:
    out: list[str] = []
    position = 0
    while True:
        match = _KEY_VALUE.search(text, position)
        if match is None:
            break
        start = match.end()
        end = _value_end(text, start)
        if match.group("sep") == "," and not _QUOTED_START.match(text, start):
            end = start  # ("token", "x") pairs only: not 'File "session.py", line 3'
        if end == start:  # nothing after the separator (or not a value)
            out.append(text[position:start])
            position = start
            continue
        out.append(text[position:start])
        out.append(MASK)
        position = end
    out.append(text[position:])
    return "".join(out)


def _value_end(text: str, start: int) -> int:
    """Index just past the value that starts at ``start``."""
    i = start
    n = len(text)
    # bytes/str literal prefixes: b'..', rb"..", u'..'
    prefix = 0
    while prefix < 2 and i + prefix < n and text[i + prefix] in "bBrRuU":
        prefix += 1
    if i + prefix < n and text[i + prefix] in _QUOTES:
        return _quoted_end(text, i + prefix)
    if i + prefix < n and text[i + prefix] == "\\":
        # a string inside a string (inside a string...): \"x\", \\\"x\\\", b\'x\' (the
        # repr of a repr, e.g. a KeyError of a dict) and so on
        j = i + prefix
        while j < n and text[j] == "\\":
            j += 1
        if j < n and text[j] in _QUOTES:
            opening = text[i + prefix : j + 1]
            closing = text.find(opening, j + 1)
            return n if closing < 0 else closing + len(opening)
    if i < n and text[i] in _OPEN:
        return _bracket_end(text, i)
    while i < n and text[i] not in _BARE_END:
        i += 1
    return i


def _quoted_end(text: str, i: int) -> int:
    quote = text[i]
    j = i + 1
    n = len(text)
    while j < n:
        char = text[j]
        if char == "\\":
            j += 2
            continue
        if char == quote:
            return j + 1
        j += 1
    return n  # unterminated (e.g. truncated): mask to the end


def _bracket_end(text: str, i: int) -> int:
    depth = 0
    j = i
    n = len(text)
    while j < n:
        char = text[j]
        if char in _QUOTES:
            j = _quoted_end(text, j)
            continue
        if char in _OPEN:
            depth += 1
        elif char in "}])":
            depth -= 1
            if depth == 0:
                return j + 1
        j += 1
    return n
