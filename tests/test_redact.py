"""redact_secrets masks secrets in every shape a message can carry them."""

from __future__ import annotations

import json

import pytest

from taskscope import redact_secrets

CANARY = "zq81CANARYx7"


@pytest.mark.parametrize(
    "text",
    [
        f"password={CANARY}",
        f"login failed: password = '{CANARY}' for user bob",
        f'{{"token": "{CANARY}", "user": "bob"}}',  # JSON
        f"{{'password': b'{CANARY}'}}",  # bytes value in a dict repr
        f"{{b'password': rb'{CANARY}'}}",  # bytes key and raw bytes value
        "{'api_key': 739112345678}",  # a number
        f"Config(secret_key='{CANARY}', debug=True)",  # key=value repr
        f"Config(password='it\\'s {CANARY}')",  # escaped quote inside the value
        f"{{'credentials': {{'user': 'bob', 'pw': '{CANARY}'}}}}",  # nested dict
        f"{{'auth': ['{CANARY}', 'x']}}",  # list value
        json.dumps({"outer": json.dumps({"password": CANARY})}),  # JSON inside JSON
        json.dumps(json.dumps(json.dumps({"password": CANARY}))),  # escaped three times
        repr(json.dumps({"outer": json.dumps({"token": CANARY})})),  # KeyError's str(): a repr
        f"[('token', '{CANARY}')]",  # pairs
        f"postgres://user:{CANARY}@db:5432/app",  # connection URL
        f"redis://:{CANARY}/x@cache:6379",  # password with "/"
        f"mysql://root:p@{CANARY}@host/db",  # password with "@"
        f"https://api.example.com/v1?api_key={CANARY}&page=2",  # query string
        f"Authorization: Bearer {CANARY}",
        f"headers={{'X-Api-Key': '{CANARY}'}}",
        f"cookie: session={CANARY}; path=/",
        f"secret => {CANARY}",
        f"password: '{CANARY} (truncated",  # unterminated quote: masked to the end
        f"bob+{CANARY}@example.com",  # e-mail
        "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiIxIn0.c2lnbmF0dXJl" + CANARY,  # JWT
    ],
)
def test_secret_never_survives(text: str) -> None:
    """The canary is gone, whatever shape carried it."""
    redacted = redact_secrets(text)
    assert CANARY not in redacted, redacted


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("{'password': b'x', 'user': 'bob'}", "{'password': ***, 'user': 'bob'}"),
        ("{'api_key': 7391, 'n': 2}", "{'api_key': ***, 'n': 2}"),
        ("https://h/p?token=abc&page=2", "https://h/p?token=***&page=2"),
        ("postgres://u:pw@db/app", "postgres://u:***@db/app"),
        ("timeout after 3 retries (user=bob)", "timeout after 3 retries (user=bob)"),
        ("KeyError: 'missing'", "KeyError: 'missing'"),
    ],
)
def test_only_the_secret_is_masked(text: str, expected: str) -> None:
    """The rest of the message is kept as it was."""
    assert redact_secrets(text) == expected


def test_output_is_encodable() -> None:
    """The default redactor's output can be exported: lone surrogates and NUL escaped."""
    assert redact_secrets("bad \udcff\x00 password=x") == "bad \\udcff\\x00 password=***"


def test_stack_trace_lines_are_left_alone() -> None:
    """A file named like a secret key is not a key: its line number stays readable."""
    line = 'File "/app/auth/session.py", line 3, in refresh_token'
    assert redact_secrets(line) == line


def test_values_quoted_with_escaped_quotes_after_a_literal_prefix() -> None:
    """The repr of a repr (a KeyError of a dict holding bytes): ``b\\'x\\'`` is masked whole."""
    secret = "zq81CANARYx7"
    for text in (
        str(KeyError(str({"api_key": secret.encode()}))),
        repr(KeyError(str({"api_key": secret.encode()}))),
        repr(repr({"password": secret})),
    ):
        assert secret not in redact_secrets(text), text
