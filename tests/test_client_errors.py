"""`parley.client.errors`: every error's words are its class's docstring, one line, printed as they are."""

from __future__ import annotations

import copy
import inspect
import json
import string

import pytest

from parley.client import cli as client_cli
from parley.client import errors
from parley.client.events import FailureKind, HandshakeFailed

# Base classes that group errors and are never raised themselves.
GROUPS = {errors.ClientError, errors.NotDelivered, errors.HandshakeError, errors.NoSuchSession,
          errors.AmbiguousSession, errors.BadRelayURL}
# Worded signals between layers (shown as a reason, by click, or not at all), and the family itself.
WORDED = (errors.ClientError, errors.BadRelayURL, errors.LinkDead, errors.OutputClosed)


def raised_classes() -> list[type[Exception]]:
    found = [c for _, c in inspect.getmembers(errors, inspect.isclass) if issubclass(c, WORDED)]
    return [c for c in found if c not in GROUPS]


def fields_of(cls: type) -> list[str]:
    return [name for _, name, _, _ in string.Formatter().parse(errors.wording(cls)) if name]


@pytest.mark.parametrize("cls", raised_classes(), ids=lambda c: c.__name__)
def test_every_error_reads_as_one_filled_line(cls):
    values = {name: ("1" if name in ("timeout", "size", "limit", "count") else "X") for name in fields_of(cls)}
    values = {k: (float(v) if k == "timeout" else v) for k, v in values.items()}
    exc = cls(**values)
    text = str(exc)
    assert text and "\n" not in text and "{" not in text and "}" not in text
    assert not text.endswith(".") or text.endswith("...")  # a line, not a paragraph
    for name, value in values.items():
        assert getattr(exc, name) == value  # the fields stay on the error for the code that catches it
    again = copy.copy(exc)
    assert type(again) is cls and str(again) == text and again.__dict__ == exc.__dict__


def test_every_handshake_ending_has_its_own_error():
    classes = {kind: type(errors.handshake_error(HandshakeFailed(kind))) for kind in FailureKind}
    assert len(set(classes.values())) == len(FailureKind)
    assert classes[FailureKind.INVALID_CODE] is errors.InvalidCode
    failure = HandshakeFailed(FailureKind.JOINER_LEFT, "while you were disconnected")
    exc = errors.handshake_error(failure)
    assert exc.failure is failure and "left while you were disconnected;" in str(exc)
    assert "left before you answered;" in errors.failure_message(HandshakeFailed(FailureKind.JOINER_LEFT))


def test_the_cli_prints_the_docstring(tmp_path, capsys):
    (tmp_path / "state-bob.json").write_text(json.dumps({}))
    with pytest.raises(SystemExit) as exit_:
        client_cli.main.main(["--name", "bob", "--state-dir", str(tmp_path), "chat"])
    assert exit_.value.code == 1
    expected = errors.wording(errors.NoKeyedSession).format(path=tmp_path / "state-bob.json")
    assert capsys.readouterr().err == f"parley: {expected}\n"
