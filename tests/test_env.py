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


@pytest.mark.parametrize("raw, expected", [("0.5", 0.5), ("2", 2.0), ("nan", 1.0), ("-1", 1.0), ("soon", 1.0),
                                           ("0.001", 1.0)])
def test_publish_interval_takes_a_number_of_at_least_its_minimum(monkeypatch, caplog, raw, expected):
    monkeypatch.setenv(env.PUBLISH_INTERVAL, raw)
    with caplog.at_level("WARNING"):
        assert env.env_float(env.PUBLISH_INTERVAL, env.DEFAULT_PUBLISH_INTERVAL, minimum=0.01) == expected
    assert ("expected a number >= 0.01; using 1.0" in caplog.text) == (expected == 1.0)
