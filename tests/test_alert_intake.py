"""Alertmanager's webhook read and judged (capture/alerts.py) and the captures it causes (capture/control.py):
hostile payloads refused whole, our alerts recognised, repeats deduplicated, the budget, cooldown and one capture
at a time kept. Pure code and a fake capturer; the real HTTP edge is in tests/test_alert_webhook.py."""

from __future__ import annotations

import json

import pytest

from moe_monitor.capture import alerts as am
from moe_monitor.capture.control import CaptureControl
from moe_monitor.detect.detector import Detector, DetectorConfig
from moe_monitor.mixin.config import MixinConfig
from moe_monitor.mixin.rules import rules_document
from moe_monitor.schema.capture_record import CaptureMeta
from moe_monitor.schema.vocabulary import ALERT_OUTCOMES


def alert(name="MoeHotExpert", status="firing", fingerprint="0a1b2c3d4e5f6a7b", starts="2026-12-07T03:00:00Z",
          **labels) -> dict:
    return {"status": status, "labels": {"alertname": name, "job": "moe-monitor", "instance": "10.0.0.1:9464",
                                         "severity": "warning", **labels},
            "annotations": {"summary": f"{name} summary"}, "startsAt": starts,
            "endsAt": "0001-01-01T00:00:00Z", "generatorURL": "http://prometheus/graph", "fingerprint": fingerprint}


def note(*alerts: dict, status="firing") -> dict:
    return {"version": "4", "receiver": "moe-sidecar", "status": status, "alerts": list(alerts),
            "groupLabels": {"alertname": alerts[0]["labels"].get("alertname", "")}, "commonLabels": {},
            "commonAnnotations": {}, "externalURL": "http://alertmanager:9093", "groupKey": "{}:{alertname=\"x\"}",
            "truncatedAlerts": 0}


def raw(doc) -> bytes:
    return json.dumps(doc).encode()


def test_a_real_payload_is_read_whole():
    n = am.parse(raw(note(alert(layer="3"), alert("MoeSidecarDown", fingerprint="ff"))))
    assert n.receiver == "moe-sidecar" and n.status == "firing" and len(n.alerts) == 2
    a = n.alerts[0]
    assert a.name == "MoeHotExpert" and a.labels["layer"] == "3" and a.key == ("0a1b2c3d4e5f6a7b",
                                                                             "2026-12-07T03:00:00Z")
    assert a.to_json()["annotations"] == {"summary": "MoeHotExpert summary"}
    assert am.parse(raw({**note(alert()), "commonAnnotations": {"summary": "s"}})).envelope()["commonAnnotations"] \
        == {"summary": "s"}


HOSTILE = {
    "not json": b"\x00\xffnot json",
    "a list": raw([alert()]),
    "nested past the recursion limit": b"[" * 100_000 + b"]" * 100_000,
    "another version": raw({**note(alert()), "version": "3"}),
    "no alerts": raw({**note(alert()), "alerts": []}),
    "alerts not a list": raw({**note(alert()), "alerts": {"a": 1}}),
    "an alert that is a string": raw({**note(alert()), "alerts": ["x"]}),
    "no alertname": raw(note({**alert(), "labels": {"job": "x"}})),
    "a label that is a number": raw(note({**alert(), "labels": {"alertname": "MoeHotExpert", "layer": 3}})),
    "a label name with a space": raw(note({**alert(), "labels": {"alertname": "MoeHotExpert", "a b": "c"}})),
    "status unknown": raw(note(alert(status="pending"))),
    "fingerprint not hex": raw(note(alert(fingerprint="../../etc"))),
    "startsAt not a time": raw(note(alert(starts="yesterday"))),
    "truncatedAlerts negative": raw({**note(alert()), "truncatedAlerts": -1}),
    "too many alerts": raw(note(*[alert(fingerprint=f"{i:x}") for i in range(am.MAX_ALERTS + 1)])),
    "a huge label": raw(note(alert(layer="x" * (am.MAX_TEXT + 1)))),
    "too many labels": raw(note(alert(**{f"l{i}": "v" for i in range(am.MAX_LABELS)}))),
    "over the size bound": b" " * (am.MAX_BODY_BYTES + 1),
}


@pytest.mark.parametrize("what", HOSTILE)
def test_hostile_payloads_are_refused_with_a_reason(what):
    with pytest.raises(am.PayloadError) as e:
        am.parse(HOSTILE[what])
    assert str(e.value) and len(str(e.value)) < 300


def test_ours_are_the_shipped_routing_and_step_time_alerts():
    """Every alert the shipped rules generate is either captured or a health alert of the monitoring itself."""
    names = {r["alert"] for g in rules_document(MixinConfig())["groups"] for r in g["rules"] if "alert" in r}
    assert am.CAPTURE_ALERTS | am.HEALTH_ALERTS == names and not am.CAPTURE_ALERTS & am.HEALTH_ALERTS



class FakeCapturer:
    def __init__(self):
        self.started, self.busy = [], False
        self.alert_outcomes = {o: 0 for o in ALERT_OUTCOMES}
        self.catalog = type("C", (), {"list": staticmethod(lambda: [])})()

    def trigger(self, reason, evidence, context=None, extra=None):
        if self.busy:
            return None
        capture_id = f"20261207T030000Z-alert-{len(self.started):06x}"
        self.started.append((capture_id, reason, evidence, context, extra))
        return capture_id


@pytest.fixture()
def control():
    clock = [1_000_000.0]
    capturer = FakeCapturer()
    ctl = CaptureControl(Detector(DetectorConfig(max_per_hour=2, cooldown_s=60)), capturer, "http://vllm",
                         clock=lambda: clock[0])
    return ctl, capturer, clock


def outcomes(answer: list[dict]) -> list[str]:
    return [a["outcome"] for a in answer]


def test_one_capture_per_notification_with_the_alert_as_its_reason(control):
    ctl, capturer, _ = control
    n = am.parse(raw(note(alert(layer="0", fingerprint="aa"), alert(layer="1", fingerprint="bb"),
                          alert("MoeSegmentsStale", fingerprint="cc"), alert(status="resolved", fingerprint="dd"))))
    answer = ctl.alerts(n)
    assert outcomes(answer) == ["captured", "captured", "not_ours", "resolved"]
    ((capture_id, reason, evidence, context, extra),) = capturer.started
    assert answer[0]["id"] == answer[1]["id"] == capture_id and "id" not in answer[2]
    assert reason == "alert" and evidence["alertname"] == evidence["signal"] == "MoeHotExpert"
    assert evidence["fingerprint"] == "aa" and evidence["startsAt"] == "2026-12-07T03:00:00Z"
    assert evidence["labels"]["layer"] == "0" and evidence["annotations"]["summary"] == "MoeHotExpert summary"
    assert context["alert_keys"] == [["aa", "2026-12-07T03:00:00Z"], ["bb", "2026-12-07T03:00:00Z"]]
    stored = json.loads(extra[am.FILE])
    assert [a["fingerprint"] for a in stored["alerts"]] == ["aa", "bb"] and stored["receiver"] == "moe-sidecar"
    assert capturer.alert_outcomes == {**dict.fromkeys(ALERT_OUTCOMES, 0), "captured": 2, "not_ours": 1,
                                       "resolved": 1}


def test_repeats_and_group_updates_of_a_captured_firing_are_deduplicated(control):
    ctl, capturer, clock = control
    first = ctl.alerts(am.parse(raw(note(alert(fingerprint="aa")))))
    clock[0] += 4 * 3600  # Alertmanager's repeat_interval: budget and cooldown have long recovered
    again = ctl.alerts(am.parse(raw(note(alert(fingerprint="aa"), alert(fingerprint="aa")))))
    assert outcomes(again) == ["deduplicated", "deduplicated"] and again[0]["id"] == first[0]["id"]
    assert len(capturer.started) == 1
    # the same alert firing again after a resolve is a new firing (new startsAt)
    assert outcomes(ctl.alerts(am.parse(raw(note(alert(fingerprint="aa", starts="2026-12-07T09:00:00Z")))))) == \
        ["captured"]


def test_a_storm_never_exceeds_the_budget_and_cooldown(control):
    ctl, capturer, clock = control
    seen = []
    for i in range(110):  # 110 different alerts, one every 30 s (55 min): cooldown 60 s, budget 2 an hour
        seen += outcomes(ctl.alerts(am.parse(raw(note(alert(fingerprint=f"{i:x}"))))))
        clock[0] += 30
    assert len(capturer.started) == 2 and seen.count("captured") == 2
    assert {"cooldown", "over_budget"} <= set(seen)


def test_busy_capturer_burns_no_budget_and_the_firing_may_be_captured_later(control):
    ctl, capturer, clock = control
    capturer.busy = True
    assert outcomes(ctl.alerts(am.parse(raw(note(alert(fingerprint="aa")))))) == ["busy"]
    capturer.busy = False
    clock[0] += 300
    assert outcomes(ctl.alerts(am.parse(raw(note(alert(fingerprint="aa")))))) == ["captured"]


def test_resolved_notifications_cause_no_capture(control):
    ctl, capturer, _ = control
    answer = ctl.alerts(am.parse(raw(note(alert(status="resolved"), status="resolved"))))
    assert outcomes(answer) == ["resolved"] and capturer.started == []


def test_a_restarted_sidecar_deduplicates_against_its_catalog(control):
    ctl, capturer, _ = control
    stored = {"id": "20261207T030000Z-alert-abcdef", "created": 1.0, "total_bytes": 0, "files": [], "reason": "alert",
              "alert_keys": [["aa", "2026-12-07T03:00:00Z"]]}
    manual = {"id": "20261207T020000Z-manual-abcdef", "created": 0.0, "total_bytes": 0, "files": [],
              "reason": "manual"}
    capturer.catalog.metas = lambda: [CaptureMeta.from_json(stored), CaptureMeta.from_json(manual)]
    answer = ctl.alerts(am.parse(raw(note(alert(fingerprint="aa")))))
    assert outcomes(answer) == ["deduplicated"] and answer[0]["id"] == stored["id"] and capturer.started == []


def test_seen_is_bounded():
    seen = am.Seen(limit=3)
    for i in range(5):
        seen.add((str(i), "t"), f"id{i}")
    assert len(seen) == 3 and seen.get(("0", "t")) is None and seen.get(("4", "t")) == "id4"


def test_alerts_about_another_instance_are_refused_when_the_sidecar_names_its_own(control):
    ctl, capturer, _ = control
    mine, theirs = "10.0.0.1:9464", "10.0.0.2:9464"
    n = am.parse(raw(note(alert(fingerprint="aa", instance=theirs), alert(fingerprint="bb", instance=mine))))
    answer = ctl.alerts(n, frozenset({mine}))
    assert outcomes(answer) == ["other_instance", "captured"] and len(capturer.started) == 1
    # a deployment-wide alert carries no instance: still this sidecar's
    deployment = {**alert("MoeDeploymentEPRankImbalance", fingerprint="cc"), "labels": {
        "alertname": "MoeDeploymentEPRankImbalance", "job": "moe-monitor", "deployment": "ns/vllm-moe-ep-0"}}
    ctl.detector.last_capture = None
    assert outcomes(ctl.alerts(am.parse(raw(note(deployment))), frozenset({mine}))) == ["captured"]
    assert capturer.alert_outcomes["other_instance"] == 1
