"""Issue #26 item 4: a capture can be followed to its outcome. Before, `traces trigger` printed an id and a
capture that failed (vLLM without --profiler-config) was never listed: `traces show <id>` answered 404 and the
outcome was only in the sidecar's log and a counter. Now the real `moe-monitor serve` records every capture's
outcome in its catalog, and `traces trigger --wait` follows it and says how it ended (exit 0 once traces are
stored, 3 when none was, 4 when still running at --wait-timeout). vLLM's profiler endpoints are the stand-in of
tests/test_capture.py (404 exactly as vLLM without --profiler-config answers; a real trace; a profile that runs
until stopped); tests/test_e2e_capture.py has the same against a real vLLM without --profiler-config."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time

import pytest
from conftest import samples, scrape
from test_capture import TRACE, FakeProfiler
from test_sidecar_hostile import http, start

from moe_monitor.capture.catalog import Catalog, Retention
from moe_monitor.schema.capture_record import CaptureMeta

TOKEN = "s3cret"


def traces(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    """The real CLI; the sidecar's address and token after the subcommand (as every other client takes them)."""
    return subprocess.run([sys.executable, "-m", "moe_monitor.cli", "traces", *args], capture_output=True, text=True,
                          timeout=timeout)


@pytest.fixture
def sidecar_for(tmp_path):
    """start(mode, *flags): a real sidecar whose vLLM is a FakeProfiler in `mode`; (sidecar, host:port)."""
    started = []

    def run(mode: str, *flags: str):
        (tmp_path / "seg").mkdir(exist_ok=True)
        (tmp_path / "profiles").mkdir(exist_ok=True)
        vllm = FakeProfiler(str(tmp_path / "profiles"), mode=mode).__enter__()
        started.append(vllm)
        sidecar = start(tmp_path, ["--vllm-url", vllm.url, "--profile-dir", str(tmp_path / "profiles"),
                                   "--capture-dir", str(tmp_path / "store"), "--api-token", TOKEN, *flags])
        started.append(sidecar)
        return sidecar, sidecar.url.removeprefix("http://")
    yield run
    for thing in reversed(started):
        thing.__exit__() if isinstance(thing, FakeProfiler) else thing.stop()


@pytest.mark.slow
def test_a_trigger_against_vllm_without_profiler_is_listed_and_wait_says_why(sidecar_for, tmp_path):
    sidecar, where = sidecar_for("404")
    began = time.monotonic()
    r = traces("trigger", "--reason", "after deploy", "--wait", "--url", where, "--token", TOKEN)
    took = time.monotonic() - began
    capture_id = r.stdout.splitlines()[0] if r.stdout else ""
    print(f"\ntrigger --wait: exit {r.returncode} in {took:.1f} s\n{r.stdout}{r.stderr}")
    assert r.returncode == 3, (r.stdout, r.stderr)
    assert f"capture {capture_id}: manual, profiler_disabled" in r.stdout
    why = "no trace stored (profiler_disabled: /start_profile answered 404: vLLM was started without --profiler-config)"
    assert why in r.stdout.splitlines()
    assert r.stderr.strip().splitlines() == [f"Error: capture {capture_id}: {why}"]
    assert took < 30

    listed = traces("list", "--url", where, "--token", TOKEN)
    assert listed.returncode == 0 and capture_id in listed.stdout and "profiler_disabled" in listed.stdout, listed
    shown = traces("show", capture_id, "--url", where, "--token", TOKEN)
    assert shown.returncode == 0 and why in shown.stdout.splitlines(), shown
    meta = json.loads(traces("show", capture_id, "--json", "--url", where, "--token", TOKEN).stdout)
    assert meta["outcome"] == "profiler_disabled" and meta["files"] == [] and meta["evidence"]["note"] == "after deploy"
    pulled = traces("pull", capture_id, "--url", where, "--token", TOKEN, "--out", str(tmp_path / "pulled"))
    assert pulled.returncode == 1 and f"{why}; nothing to pull" in pulled.stderr
    assert not (tmp_path / "pulled").exists(), "nothing is written for a capture without traces"
    metrics = scrape(sidecar.url + "/metrics")
    assert samples(metrics, "moe_captures_total")[(("outcome", "profiler_disabled"), ("reason", "manual"))] == 1
    assert samples(metrics, "moe_capture_catalog_captures") == {(): 0.0}, "a record is not a capture with traces"


@pytest.mark.slow
def test_wait_follows_a_running_capture_to_its_stored_traces(sidecar_for):
    """A profile that runs until the sidecar stops it (--capture-max-seconds 2): listed as running meanwhile,
    then ok with its breakdown, exit 0."""
    sidecar, where = sidecar_for("stuck", "--capture-max-seconds", "2")
    r = traces("trigger", "--reason", "check", "--url", where, "--token", TOKEN)
    capture_id = r.stdout.strip()
    assert r.returncode == 0, r.stderr
    status, body, _ = http(f"{sidecar.url}/api/captures/{capture_id}")
    assert status == 200 and json.loads(body)["outcome"] == "running"
    status, body, _ = http(f"{sidecar.url}/api/captures")
    assert [(c["id"], c["outcome"]) for c in json.loads(body)["captures"]] == [(capture_id, "running")]
    pulled = traces("pull", capture_id, "--url", where, "--token", TOKEN)
    assert pulled.returncode == 1 and "still running" in pulled.stderr and "nothing to pull" in pulled.stderr
    # --wait on the capture already running: the trigger is refused (409); follow it through show instead
    assert "a capture is already running" in traces("trigger", "--reason", "x", "--wait", "--url", where,
                                                    "--token", TOKEN).stderr
    deadline = time.monotonic() + 60
    while json.loads(http(f"{sidecar.url}/api/captures/{capture_id}")[1])["outcome"] == "running":
        assert time.monotonic() < deadline
        time.sleep(0.2)
    r = traces("trigger", "--reason", "again", "--wait", "--url", where, "--token", TOKEN)
    assert r.returncode == 0, (r.stdout, r.stderr)
    assert ", ok, " in r.stdout and "breakdown: experts" in r.stdout and "no trace stored" not in r.stdout, r.stdout


@pytest.mark.slow
def test_wait_gives_up_at_its_timeout_with_its_own_exit_status(sidecar_for):
    sidecar, where = sidecar_for("stuck", "--capture-max-seconds", "30", "--capture-timeout", "60")
    began = time.monotonic()
    r = traces("trigger", "--reason", "slow", "--wait", "--wait-timeout", "2", "--url", where, "--token", TOKEN)
    took = time.monotonic() - began
    capture_id = r.stdout.splitlines()[0]
    assert r.returncode == 4 and took < 20, (r.returncode, took, r.stderr)
    assert f"Error: capture {capture_id}: still running after 2 s" in r.stderr and ", running, " in r.stdout


def test_records_of_failed_captures_are_bounded_apart_and_never_evict_traces(tmp_path):
    """Retention keeps at most max_records captures without traces (the oldest go first) beside max_count
    captures with traces: a vLLM without a profiler, triggering all day, never pushes a stored trace out."""
    catalog = Catalog(str(tmp_path / "store"), Retention(max_count=2, max_records=3))
    now = time.time()
    for i in range(2):
        trace = tmp_path / f"dp0_pp0_tp0_dcp0_ep0_rank0.{i}.pt.trace.json.gz"
        shutil.copy(TRACE, trace)
        catalog.store(f"20261123T12000{i}Z-imbalance-00000{i}", [str(trace)], {"created": now + i, "outcome": "ok"})
    for i in range(10):
        catalog.store(f"20261123T1300{i:02d}Z-manual-00000{i}", [], {"created": now + 10 + i,
                                                                    "outcome": "profiler_disabled"})
    listed = [(m["id"], m["outcome"]) for m in catalog.list()]
    assert listed == [("20261123T130009Z-manual-000009", "profiler_disabled"),
                      ("20261123T130008Z-manual-000008", "profiler_disabled"),
                      ("20261123T130007Z-manual-000007", "profiler_disabled"),
                      ("20261123T120001Z-imbalance-000001", "ok"), ("20261123T120000Z-imbalance-000000", "ok")]
    assert (catalog.count, catalog.records) == (2, 3)
    assert sorted(os.listdir(catalog.root)) == sorted(i for i, _ in listed)


def test_show_prints_the_evidence_as_a_person_reads_it(capsys):
    """The detector's evidence holds raw floats (2.987654321..., unix times): `traces show` rounds them to 4
    significant digits, prints times as the time of day, and wraps the line at 80 columns."""
    from moe_monitor.cli import _print_capture

    _print_capture(CaptureMeta.from_json({
        "id": "20261207T081500Z-imbalance-abcdef", "reason": "imbalance", "outcome": "ok", "created": 0,
        "evidence": {"signal": "worst_layer_imbalance_ratio", "value": 2.987654321987, "baseline": 1.0234567891234,
                     "threshold": 2.75, "layer": 30, "windows": [3.01234567, 2.9876543, 3.1111111],
                     "at": 1796632060.25},
        "total_bytes": 0, "files": []}))
    out = capsys.readouterr().out
    rest = out[out.index("evidence: "):].split("\n")
    evidence = rest[:1] + [line for line in rest[1:len(rest)] if line.startswith("  ")][:5]
    assert len(evidence) >= 2  # wrapped
    assert "value=2.988" in out and "baseline=1.023" in out and "windows=[3.012, 2.988, 3.111]" in out
    assert "2.98765" not in out and "at=08:27:40Z" in out  # a unix time as the time of day, not 1.797e+09
    assert all(len(line) <= 80 for line in evidence)
