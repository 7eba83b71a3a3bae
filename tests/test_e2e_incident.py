"""The incident bundle end to end: a real Alertmanager, with deploy/alertmanager/alertmanager.yml (the sidecar
receiver pointed at the sidecar under test, its token from a file), routes an alert labelled as the shipped rules
label it to a real `moe-monitor serve`, whose capture goes through the real profiler path against a stand-in for
vLLM's /start_profile writing a real trace (tests/test_capture.py's); `moe-monitor traces pull` then yields the
bundle with the alert in it. Alertmanager's repeats and Prometheus-style re-sends of the same firing make no
second capture, nor does the same alert about another instance (--alert-instances)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request

import pytest
from conftest import free_port, samples, scrape
from test_capture import FakeProfiler

from moe_monitor.demo import launch, promstack
from moe_monitor.demo.alert_sink import AlertSink

pytestmark = [pytest.mark.e2e, pytest.mark.slow]
TOKEN = "incident-token"
STARTS = "2026-12-07T03:00:00Z"  # Prometheus sends an alert's activeAt as startsAt with every re-send


def am_post(base: str, alerts: list[dict]) -> None:
    req = urllib.request.Request(base + "/api/v2/alerts", data=json.dumps(alerts).encode(), method="POST",
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=10) as r:
        assert r.status == 200


def api(url: str) -> dict:
    req = urllib.request.Request(url, headers={"Authorization": f"Bearer {TOKEN}"})
    with urllib.request.urlopen(req, timeout=10) as r:
        return json.load(r)


def alert_outcomes(sidecar_url: str) -> dict[str, float]:
    return {dict(k)["outcome"]: v for k, v in samples(scrape(sidecar_url + "/metrics"),
                                                      "moe_capture_alerts_total").items()}


def wait(what: str, predicate, timeout: float, log=lambda: ""):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.3)
    raise AssertionError(f"{what}: not within {timeout:g} s\n{log()}")


@pytest.fixture
def stack(tmp_path):
    promstack.check_available()
    profiles, store = tmp_path / "profiles", tmp_path / "store"
    profiles.mkdir()
    token_file = tmp_path / "api-token"
    token_file.write_text(TOKEN)
    token_file.chmod(0o600)
    with FakeProfiler(str(profiles)) as vllm:
        port = free_port()
        sidecar = launch.start_sidecar(str(tmp_path / "seg"), port, str(tmp_path / "sidecar.log"), [
            "--profile-dir", str(profiles), "--vllm-url", vllm.url, "--capture-dir", str(store),
            "--capture-timeout", "20", "--capture-cooldown", "0", "--max-captures-per-hour", "10",
            "--alert-instances", f"127.0.0.1:{port}"],
            env={"MOE_MONITOR_API_TOKEN": TOKEN})
        sink = AlertSink()
        am = promstack.start_alertmanager(str(tmp_path), free_port(), sink.url,
                                          promstack.Timing(group_wait="1s", group_interval="1s",
                                                           repeat_interval="2s"),
                                          sidecar=(sidecar.url, str(token_file)))
        try:
            sidecar.wait_ready("/healthz", 30)
            am.wait_ready("/-/ready", 60)
            yield am, sidecar, sink, vllm, tmp_path
        finally:
            sink.close()
            am.stop()
            sidecar.stop()


def test_an_alert_routed_by_alertmanager_becomes_one_pulled_bundle(stack):
    am, sidecar, sink, vllm, tmp_path = stack
    labels = {"alertname": "MoeHotExpert", "severity": "warning", "job": "moe-monitor",
              "instance": sidecar.url.removeprefix("http://"), "layer": "1"}
    firing = {"labels": labels, "annotations": {"summary": "Hot expert in MoE layer 1", "description": "expert 3"},
              "startsAt": STARTS, "generatorURL": "http://prometheus.example/graph"}
    started = time.monotonic()
    am_post(am.url, [firing])
    logs = lambda: sidecar.log_tail(30) + "\n" + am.log_tail(30)  # noqa: E731

    listed = wait("an alert capture in the sidecar's catalog", lambda: [
        c for c in api(sidecar.url + "/api/captures")["captures"]
        if c["reason"] == "alert" and c["outcome"] != "running"], 60, logs)
    (capture,) = listed
    took = time.monotonic() - started
    assert capture["outcome"] == "ok", capture
    # the team's receiver got it too: the sidecar route continues to the others
    assert any(a["labels"]["alertname"] == "MoeHotExpert" for a in sink.alerts()), sink.notifications

    # the same alert about another sidecar (routed here by mistake) is refused: --alert-instances names this one
    am_post(am.url, [{**firing, "labels": {**labels, "instance": "10.9.9.9:9464"}}])
    wait("the other instance's alert refused", lambda: alert_outcomes(sidecar.url).get("other_instance", 0) >= 1,
         30, logs)

    # Alertmanager repeats the notification (repeat_interval 2 s here, 4 h as shipped) and Prometheus re-sends the
    # active alert every evaluation: the sidecar sees the same firing again and again, and captures nothing more
    for _ in range(3):
        am_post(am.url, [firing])
        time.sleep(1)
    wait("two repeats deduplicated", lambda: alert_outcomes(sidecar.url).get("deduplicated", 0) >= 2, 30, logs)
    outcomes = alert_outcomes(sidecar.url)
    assert outcomes["captured"] == 1 and outcomes["cooldown"] == outcomes["over_budget"] == 0, outcomes
    assert [c for c, _ in vllm.calls].count("start") == 1
    assert [c["id"] for c in api(sidecar.url + "/api/captures")["captures"]] == [capture["id"]]

    out = tmp_path / "pulled"
    cli = [sys.executable, "-m", "moe_monitor.cli", "traces", "--url", sidecar.url]
    env = {**os.environ, "MOE_MONITOR_API_TOKEN": TOKEN}
    pulled = subprocess.run(cli + ["pull", capture["id"], "--out", str(out)], capture_output=True, text=True,
                            timeout=60, env=env)
    assert pulled.returncode == 0, pulled.stderr
    bundle = out / capture["id"]
    names = set(os.listdir(bundle))
    assert {"alert.json", "breakdown.json", "flight.json.gz", "metadata.json"} <= names, names
    assert any(n.endswith(".pt.trace.json.gz") for n in names), names
    stored = json.loads((bundle / "alert.json").read_text())
    (got,) = stored["alerts"]
    (am_alert,) = [a for a in json.loads(urllib.request.urlopen(am.url + "/api/v2/alerts", timeout=10).read())
                   if a["labels"] == labels]
    assert stored["receiver"] == "moe-sidecar" and stored["externalURL"]
    assert got["labels"] == labels and got["annotations"] == firing["annotations"]
    assert got["startsAt"] == STARTS and got["fingerprint"] == am_alert["fingerprint"] and got["status"] == "firing"
    meta = json.loads((bundle / "metadata.json").read_text())
    assert meta["reason"] == "alert" and meta["evidence"]["alertname"] == "MoeHotExpert"
    shown = subprocess.run(cli + ["show", capture["id"]], capture_output=True, text=True, timeout=60, env=env)
    assert f"alert: MoeHotExpert firing since {STARTS}" in shown.stdout, shown.stdout + shown.stderr
    print(f"\nalert posted to Alertmanager -> capture stored in the sidecar: {took:.1f} s; "
          f"bundle: {', '.join(sorted(names))}")


@pytest.fixture
def pair(tmp_path):
    """Two sidecars (A, B) on loopback, each naming its own instance and both as peers, and a real Alertmanager
    whose moe-sidecar receiver points at A: as two pods behind one Kubernetes Service, the alert reaches one."""
    promstack.check_available()
    token_file = tmp_path / "api-token"
    token_file.write_text(TOKEN)
    token_file.chmod(0o600)
    ports = {"a": free_port(), "b": free_port()}
    peers = f"localhost:{ports['a']},localhost:{ports['b']}"
    with FakeProfiler(str(tmp_path / "profiles-a")) as vllm_a, FakeProfiler(str(tmp_path / "profiles-b")) as vllm_b:
        sidecars = {}
        for name, vllm in (("a", vllm_a), ("b", vllm_b)):
            os.makedirs(vllm.profile_dir, exist_ok=True)
            sidecars[name] = launch.start_sidecar(str(tmp_path / f"seg-{name}"), ports[name],
                                                  str(tmp_path / f"sidecar-{name}.log"), [
                "--profile-dir", vllm.profile_dir, "--vllm-url", vllm.url, "--capture-dir", str(tmp_path / name),
                "--capture-timeout", "20", "--capture-cooldown", "0", "--max-captures-per-hour", "10",
                "--window", "1", "--alert-instances", f"127.0.0.1:{ports[name]}", "--alert-peers", peers],
                env={"MOE_MONITOR_API_TOKEN": TOKEN})
        sink = AlertSink()
        am = promstack.start_alertmanager(str(tmp_path), free_port(), sink.url,
                                          promstack.Timing(group_wait="1s", group_interval="1s",
                                                           repeat_interval="2s"),
                                          sidecar=(sidecars["a"].url, str(token_file)))
        try:
            for s in sidecars.values():
                s.wait_ready("/healthz", 30)
            am.wait_ready("/-/ready", 60)
            yield am, sidecars["a"], sidecars["b"], vllm_a, vllm_b
        finally:
            sink.close()
            am.stop()
            for s in sidecars.values():
                s.stop()


def test_an_alert_about_another_pod_is_sent_on_to_its_sidecar(pair):
    am, a, b, vllm_a, vllm_b = pair
    labels = {"alertname": "MoeHotExpert", "severity": "warning", "job": "moe-monitor",
              "instance": b.url.removeprefix("http://"), "layer": "1"}
    started = time.monotonic()
    am_post(am.url, [{"labels": labels, "annotations": {"summary": "Hot expert"}, "startsAt": STARTS}])
    logs = lambda: a.log_tail(30) + "\n" + b.log_tail(30) + "\n" + am.log_tail(30)  # noqa: E731

    (capture,) = wait("an alert capture on B", lambda: [c for c in api(b.url + "/api/captures")["captures"]
                                                       if c["reason"] == "alert" and c["outcome"] != "running"],
                      60, logs)
    took = time.monotonic() - started
    assert capture["outcome"] == "ok", capture
    stored = api(f"{b.url}/api/captures/{capture['id']}/files/alert.json")
    assert stored["receiver"] == "moe-sidecar" and [x["labels"] for x in stored["alerts"]] == [labels], stored
    wait("A counts it forwarded", lambda: alert_outcomes(a.url)["forwarded"] >= 1, 10, logs)

    # Alertmanager repeats the notification to A (repeat_interval 2 s): A sends it on again, B captures nothing more
    wait("two repeats deduplicated on B", lambda: alert_outcomes(b.url).get("deduplicated", 0) >= 2, 30, logs)
    wait("A's forwards all answered by B", lambda: alert_outcomes(a.url)["forwarded"] == sum(
        alert_outcomes(b.url)[o] for o in ("captured", "deduplicated")), 20, logs)
    on_a, on_b = alert_outcomes(a.url), alert_outcomes(b.url)
    assert on_a["captured"] == on_a["forward_failed"] == on_a["other_instance"] == 0, on_a
    assert on_b["captured"] == 1 and on_b["other_instance"] == on_b["forwarded"] == 0, on_b
    assert [c for c, _ in vllm_b.calls].count("start") == 1 and vllm_a.calls == []
    assert api(a.url + "/api/captures")["captures"] == []

    # B down: A answers 502 (Alertmanager sends the notification again) and counts forward_failed
    b.stop()
    n = {"version": "4", "receiver": "moe-sidecar", "status": "firing", "groupLabels": {}, "commonLabels": {},
         "commonAnnotations": {}, "externalURL": "", "groupKey": "k", "truncatedAlerts": 0,
         "alerts": [{"status": "firing", "labels": {**labels, "layer": "2"}, "annotations": {}, "startsAt": STARTS,
                     "endsAt": "", "generatorURL": "", "fingerprint": "ab12"}]}
    req = urllib.request.Request(a.url + "/api/alerts", data=json.dumps(n).encode(), method="POST",
                                 headers={"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/json"})
    with pytest.raises(urllib.error.HTTPError) as failed:
        urllib.request.urlopen(req, timeout=30)
    assert failed.value.code == 502
    assert [x["outcome"] for x in json.load(failed.value)["alerts"]] == ["forward_failed"]
    wait("A counts it forward_failed", lambda: alert_outcomes(a.url)["forward_failed"] >= 1, 10, logs)
    print(f"\nalert posted to Alertmanager -> sent on by sidecar A -> capture stored on sidecar B: {took:.1f} s")
