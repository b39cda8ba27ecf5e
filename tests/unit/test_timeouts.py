"""Bounds of the trainer's waits come from environment variables; a bad value is refused naming it."""

from __future__ import annotations

from datetime import timedelta

import pytest

from resumable.async_save import collective_timeout, env_seconds
from resumable.errors import ConfigError


def test_an_unset_or_empty_variable_gives_the_default(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("RESUMABLE_RENDEZVOUS_TIMEOUT", raising=False)
    assert env_seconds("RESUMABLE_RENDEZVOUS_TIMEOUT", timedelta(minutes=10)) == timedelta(minutes=10)
    monkeypatch.setenv("RESUMABLE_COLLECTIVE_TIMEOUT", "")
    assert collective_timeout() == timedelta(minutes=30)


def test_a_number_of_seconds_is_taken(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RESUMABLE_RENDEZVOUS_TIMEOUT", "2.5")
    assert env_seconds("RESUMABLE_RENDEZVOUS_TIMEOUT", timedelta(minutes=10)) == timedelta(seconds=2.5)


@pytest.mark.parametrize("raw", ["abc", "0", "-3", "nan"])
def test_a_value_that_is_not_a_positive_number_is_refused_naming_the_variable(
        monkeypatch: pytest.MonkeyPatch, raw: str) -> None:
    monkeypatch.setenv("RESUMABLE_RENDEZVOUS_TIMEOUT", raw)
    with pytest.raises(ConfigError) as info:
        env_seconds("RESUMABLE_RENDEZVOUS_TIMEOUT", timedelta(minutes=10))
    assert str(info.value) == (f"RESUMABLE_RENDEZVOUS_TIMEOUT={raw!r}: expected a positive number of seconds, "
                               "e.g. 600")
