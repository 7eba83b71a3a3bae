"""The plugin's environment variables: a bad value is logged and the default used, never raised into vLLM."""

from __future__ import annotations

import pytest

from moe_monitor import env


@pytest.mark.parametrize("raw, expected, warned", [
    ("", 16, False), ("  ", 16, False), ("1", 1, False), (" 8 ", 8, False), ("64", 64, False),
    ("0", 16, True), ("-3", 16, True), ("2.5", 16, True), ("sixteen", 16, True), ("1e3", 16, True),
])
def test_step_time_every_takes_a_whole_number_of_at_least_one(monkeypatch, caplog, raw, expected, warned):
    monkeypatch.setenv(env.STEP_TIME_EVERY, raw)
    with caplog.at_level("WARNING"):
        assert env.env_int(env.STEP_TIME_EVERY, env.DEFAULT_STEP_TIME_EVERY_CUDA, minimum=1) == expected
    assert (env.STEP_TIME_EVERY in caplog.text) == warned, caplog.text
    if warned:
        assert "expected a whole number >= 1; using 16" in caplog.text


def test_an_unset_variable_is_the_default(monkeypatch):
    monkeypatch.delenv(env.STEP_TIME_EVERY, raising=False)
    assert env.env_int(env.STEP_TIME_EVERY, 1, minimum=1) == 1
