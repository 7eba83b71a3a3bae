"""POST /api/alerts on the sidecar's real HTTP app, with a stand-in for vLLM's profiler writing a real trace
(tests/test_capture.py's): hostile requests refused with a JSON error and nothing changed, a firing alert of ours
captured once, its bundle listed, shown and pulled by the real CLI. The real Alertmanager in front of a real
`moe-monitor serve`: tests/test_e2e_incident.py."""

from __future__ import annotations

import http.client
import json
import os
import subprocess
import sys
import urllib.request

import pytest
from conftest import parse_exposition, samples
from test_alert_intake import alert, note
from test_capture import FakeProfiler, serve_app

from moe_monitor.capture.alerts import MAX_BODY_BYTES
from moe_monitor.detect.detector import DetectorConfig
from moe_monitor.sidecar.config import SidecarConfig
from moe_monitor.sidecar.wiring import build

TOKEN = "s3cret"


def post(url: str, body: bytes | None, token: str | None = TOKEN, method: str = "POST") -> tuple[int, dict]:
    headers = {"Content-Type": "application/json", **({"Authorization": f"Bearer {token}"} if token else {})}
    req = urllib.request.Request(url + "/api/alerts", data=body, method=method, headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def chunked(url: str, pieces) -> tuple[int, dict]:
    """A POST whose body comes in chunks, without a Content-Length: bounded by reading, not by the header."""
    host, port = url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=30)
    try:
        conn.request("POST", "/api/alerts", body=pieces, encode_chunked=True,
                     headers={"Authorization": f"Bearer {TOKEN}", "Transfer-Encoding": "chunked"})
        r = conn.getresponse()
        return r.status, json.loads(r.read())
    finally:
        conn.close()


@pytest.fixture
def sidecar(tmp_path):
    with FakeProfiler(str(tmp_path / "profiles")) as vllm:
        os.makedirs(vllm.profile_dir, exist_ok=True)
        cfg = SidecarConfig(segment_dir=str(tmp_path / "seg"), profile_dir=vllm.profile_dir, vllm_url=vllm.url,
                            capture_dir=str(tmp_path / "store"), api_token=TOKEN,
                            detector=DetectorConfig(max_per_hour=4, cooldown_s=0))
        exporter = build(cfg, process_metrics=False)
        with serve_app(exporter) as url:
            yield url, exporter, vllm


def metric(exporter, name: str) -> dict:
    exporter.tick()
    return samples(parse_exposition(exporter.latest().body.decode()), name)


@pytest.mark.slow
def test_hostile_requests_get_a_json_error_and_change_nothing(sidecar):
    url, exporter, vllm = sidecar
    good = json.dumps(note(alert())).encode()
    cases = [(post(url, good, token=None), 401), (post(url, good, token="wrong"), 401),
             (post(url, None, method="GET"), 405), (post(url, b"not json"), 400),
             (post(url, json.dumps({"status": "firing"}).encode()), 400),
             (post(url, json.dumps(note(alert(fingerprint="../x"))).encode()), 400),
             (post(url, b"[" * 100_000), 400), (post(url, b" " * (MAX_BODY_BYTES + 1)), 413)]
    # no Content-Length: bounded by reading (exactly one byte over, so that nothing is left unread to reset the
    # connection before the answer is read)
    cases.append((chunked(url, iter([b" " * MAX_BODY_BYTES, b" "])), 413))
    for (status, body), expected in cases:
        assert status == expected and isinstance(body.get("error"), str) and body["error"], (status, body)
    assert vllm.calls == [] and exporter.catalog.list() == [] and len(exporter.control.seen) == 0
    refused = metric(exporter, "moe_monitor_http_refused_total")
    assert refused[(("reason", "unauthorized"),)] == 2 and refused[(("reason", "bad_request"),)] == 6
    assert set(metric(exporter, "moe_capture_alerts_total").values()) == {0}


@pytest.mark.slow
def test_a_firing_alert_becomes_one_bundle_that_the_cli_pulls(sidecar, tmp_path):
    url, exporter, vllm = sidecar
    firing = note(alert(layer="1", fingerprint="aa"), alert("MoeSidecarDown", fingerprint="bb"))
    status, body = post(url, json.dumps(firing).encode())
    assert status == 200 and [a["outcome"] for a in body["alerts"]] == ["captured", "not_ours"], body
    capture_id = body["alerts"][0]["id"]
    exporter.capturer.wait(30)
    # Alertmanager's repeat of the same firing, and its resolve, start nothing
    assert [a["outcome"] for a in post(url, json.dumps(firing).encode())[1]["alerts"]] == ["deduplicated",
                                                                                           "not_ours"]
    resolved = note(alert(layer="1", fingerprint="aa", status="resolved"), status="resolved")
    assert [a["outcome"] for a in post(url, json.dumps(resolved).encode())[1]["alerts"]] == ["resolved"]
    assert [c for c, _ in vllm.calls].count("start") == 1 and len(exporter.catalog.list()) == 1
    counts = {dict(k)["outcome"]: v for k, v in metric(exporter, "moe_capture_alerts_total").items()}
    assert counts == {"captured": 1, "deduplicated": 1, "cooldown": 0, "over_budget": 0, "busy": 0, "not_ours": 2,
                      "other_instance": 0, "resolved": 1, "forwarded": 0, "forward_failed": 0}

    cli = [sys.executable, "-m", "moe_monitor.cli", "traces", "--url", url, "--token", TOKEN]
    listed = subprocess.run(cli + ["list"], capture_output=True, text=True, check=True, timeout=60).stdout
    assert capture_id in listed and "alert" in listed and "MoeHotExpert" in listed, listed
    shown = subprocess.run(cli + ["show", capture_id], capture_output=True, text=True, check=True, timeout=60).stdout
    assert "alert: MoeHotExpert firing since 2026-12-07T03:00:00Z, fingerprint aa" in shown and "layer=1" in shown
    assert "summary: MoeHotExpert summary" in shown and "breakdown:" in shown, shown
    subprocess.run(cli + ["pull", capture_id, "--out", str(tmp_path / "pulled")], capture_output=True, text=True,
                   check=True, timeout=60)
    bundle = tmp_path / "pulled" / capture_id
    names = set(os.listdir(bundle))
    assert {"alert.json", "breakdown.json", "flight.json.gz", "metadata.json"} <= names, names
    assert any(n.endswith(".pt.trace.json.gz") for n in names)
    stored = json.loads((bundle / "alert.json").read_text())
    assert stored["receiver"] == "moe-sidecar" and [a["fingerprint"] for a in stored["alerts"]] == ["aa"]
    meta = json.loads((bundle / "metadata.json").read_text())
    assert meta["reason"] == "alert" and meta["evidence"]["alertname"] == "MoeHotExpert"
    assert meta["alert_keys"] == [["aa", "2026-12-07T03:00:00Z"]]


@pytest.mark.slow
def test_without_captures_the_endpoint_says_so(tmp_path):
    cfg = SidecarConfig(segment_dir=str(tmp_path / "seg"), api_token=TOKEN)
    with serve_app(build(cfg, process_metrics=False)) as url:
        status, body = post(url, json.dumps(note(alert())).encode())
        assert status == 503 and "--vllm-url" in body["error"]
        assert post(url, b"junk")[0] == 400
