"""The demo's and the tests' Alertmanager webhook receiver: records notifications, refuses what is not one."""

from __future__ import annotations

import json
import urllib.error
import urllib.request

import pytest

from moe_monitor.demo.alert_sink import AlertSink, describe


def post(url: str, body: bytes) -> int:
    req = urllib.request.Request(url, data=body, headers={"Content-Type": "application/json"}, method="POST")
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.status
    except urllib.error.HTTPError as e:
        return e.code


@pytest.fixture()
def sink():
    got = []
    s = AlertSink(on_alert=got.append)
    yield s, got
    s.close()


def test_records_alerts_and_filters_them(sink):
    s, got = sink
    note = {"status": "firing", "receiver": "moe-oncall", "alerts": [
        {"status": "firing", "labels": {"alertname": "MoeHotExpert", "layer": "3", "instance": "a:9464"},
         "annotations": {"summary": "Hot expert in MoE layer 3"}},
        {"status": "resolved", "labels": {"alertname": "MoeDeadExperts", "layer": "1"}}]}
    assert post(s.url, json.dumps(note).encode()) == 200
    assert [a["labels"]["alertname"] for a in got] == ["MoeHotExpert", "MoeDeadExperts"]
    assert len(s.alerts("MoeHotExpert", "firing")) == 1 and s.alerts("MoeHotExpert", "resolved") == []
    assert describe(got[0]) == "FIRING   MoeHotExpert [instance=a:9464, layer=3] Hot expert in MoE layer 3"


def test_refuses_bad_payloads_and_other_paths(sink):
    s, got = sink
    assert post(s.url, b"not json") == 400
    assert post(s.url, json.dumps({"status": "firing"}).encode()) == 400  # no alerts
    assert post(s.url.replace("/alerts", "/other"), b"{}") == 404
    assert got == [] and s.notifications == []
