"""Captures and the trace API over real HTTP: the sidecar's own aiohttp app, and a stand-in for vLLM's
profiler endpoints (404 / slow / down / writing a real trace) for the failure modes a real vLLM CPU server
cannot be made to show on demand. The real-vLLM captures are in tests/test_e2e_capture.py."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request

import pytest
from aiohttp import web
from conftest import free_port

from moe_monitor.capture.capturer import CaptureConfig, Capturer
from moe_monitor.capture.catalog import Catalog, QuotaError, Retention
from moe_monitor.detect.detector import DetectorConfig
from moe_monitor.sidecar.config import SidecarConfig
from moe_monitor.sidecar.server import build_app
from moe_monitor.sidecar.wiring import build

TRACE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures", "traces", "gpu_graph.pt.trace.json.gz")


class FakeProfiler:
    """vLLM's /start_profile and /stop_profile: mode ok (writes a rank trace after a delay), 404, slow, stuck
    (never writes until /stop_profile)."""

    def __init__(self, profile_dir: str, mode: str = "ok", api_key: str | None = None):
        self.profile_dir, self.mode, self.api_key = profile_dir, mode, api_key
        self.calls: list[tuple[str, dict]] = []
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self._prefix = None
        self.active = False
        self.secret = None  # mode symlink: the outside file the link points to

    def _write(self, delay: float) -> None:
        def later():
            time.sleep(delay)
            name = f"{self._prefix}dp0_pp0_tp0_dcp0_ep0_rank0.{time.time_ns()}.pt.trace.json.gz"
            shutil.copy(TRACE, os.path.join(self.profile_dir, name + ".tmp"))
            os.replace(os.path.join(self.profile_dir, name + ".tmp"), os.path.join(self.profile_dir, name))
        threading.Thread(target=later, daemon=True).start()

    async def start(self, request):
        if self.api_key and request.headers.get("Authorization") != f"Bearer {self.api_key}":
            return web.Response(status=401)
        body = await request.json() if request.can_read_body else {}
        self.calls.append(("start", body))
        if self.mode == "404":
            return web.Response(status=404)
        if self.active:  # like vLLM: a session stays active, even after max_iterations, until /stop_profile
            return web.json_response({"error": {"message": "A profiling session is already active."}}, status=409)
        self.active = True
        if self.mode == "slow":
            await asyncio.sleep(5)
        self._prefix = "" if self.mode == "v026" else body["profile_prefix"]
        if self.mode == "symlink":  # a rank "trace" that is a link to a file outside the profile directory
            name = f"{self._prefix}dp0_pp0_tp0_dcp0_ep0_rank0.{time.time_ns()}.pt.trace.json.gz"
            os.symlink(self.secret, os.path.join(self.profile_dir, name))
        if self.mode == "ok":
            self._write(0.5)
        return web.Response(status=200)

    async def stop(self, request):
        self.calls.append(("stop", {}))
        self.active = False
        if (self.mode == "stuck" and self._prefix) or (self.mode == "v026" and self._prefix is not None):
            self._write(0.2)
        return web.Response(status=200)

    def __enter__(self):
        app = web.Application()
        app.router.add_post("/start_profile", self.start)
        app.router.add_post("/stop_profile", self.stop)
        self._loop = asyncio.new_event_loop()
        self._runner = web.AppRunner(app)
        self._loop.run_until_complete(self._runner.setup())
        self._loop.run_until_complete(web.TCPSite(self._runner, "127.0.0.1", self.port).start())
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        asyncio.run_coroutine_threadsafe(self._runner.cleanup(), self._loop).result(5)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)


def capturer(tmp_path, url, **kw):
    profiles, store = tmp_path / "profiles", tmp_path / "store"
    profiles.mkdir(exist_ok=True)
    cfg = CaptureConfig(url, str(profiles), timeout_s=kw.pop("timeout_s", 10), stop_grace_s=5, http_timeout_s=2,
                        api_key=kw.pop("api_key", None), run_s=kw.pop("run_s", 10))
    return Capturer(cfg, Catalog(str(store), kw.pop("retention", Retention()))), profiles


@pytest.mark.slow
def test_capture_lands_in_the_catalog_with_reason_evidence_and_breakdown(tmp_path):
    with FakeProfiler(str(tmp_path / "profiles"), api_key="k3y") as vllm:
        os.makedirs(vllm.profile_dir, exist_ok=True)
        c, profiles = capturer(tmp_path, vllm.url, api_key="k3y")
        outcome = c.run("20261123T120000Z-imbalance-abcdef", "imbalance", {"signal": "worst", "current": 6.0}, {})
        second = c.run("20261123T120100Z-imbalance-abcdef", "imbalance", {}, {})  # the session was closed
        vllm.active = True  # a session someone else left open: stopped, then started
        third = c.run("20261123T120200Z-imbalance-abcdef", "imbalance", {}, {})
    assert (outcome, second, third) == ("ok", "ok", "ok")
    assert vllm.calls[0] == ("start", {"profile_prefix": "20261123T120000Z-imbalance-abcdef_", "max_iterations": 5})
    assert [k for k, _ in vllm.calls] == ["start", "stop", "start", "stop", "start", "stop", "start", "stop"]
    meta = c.catalog.get("20261123T120000Z-imbalance-abcdef")
    assert meta["reason"] == "imbalance" and meta["evidence"]["current"] == 6.0 and meta["outcome"] == "ok"
    names = [f["name"] for f in meta["files"]]
    assert any(n.endswith(".pt.trace.json.gz") for n in names) and "breakdown.json" in names
    assert meta["breakdown"]["experts"] > 0.3
    assert os.listdir(profiles) == []  # moved into the store
    assert c.outcomes[("imbalance", "ok")] == 3


@pytest.mark.slow
def test_vllm_that_ignores_prefix_and_max_iterations_is_stopped_and_its_new_files_collected(tmp_path):
    """vLLM 0.26 ignores /start_profile's body: no prefix in the file names, no end after max_iterations. The
    capture stops the profile after run_s, takes the rank files that appeared since it started, and leaves
    older files alone."""
    with FakeProfiler(str(tmp_path / "profiles"), mode="v026") as vllm:
        os.makedirs(vllm.profile_dir, exist_ok=True)
        c, profiles = capturer(tmp_path, vllm.url, run_s=1.5, timeout_s=30)
        old = profiles / "dp0_pp0_tp0_dcp0_ep0_rank0.1.pt.trace.json.gz"
        shutil.copy(TRACE, old)
        began = time.monotonic()
        outcome = c.run("20261123T120000Z-manual-abcdef", "manual", {}, {})
        took = time.monotonic() - began
    assert outcome == "ok" and 1.5 <= took < 10, (outcome, took)
    meta = c.catalog.get("20261123T120000Z-manual-abcdef")
    assert meta["stopped_by_sidecar"] is True
    assert [f["name"] for f in meta["files"] if f["name"] != "breakdown.json"] != [old.name]
    assert os.listdir(profiles) == [old.name], "a file older than the capture is not taken"


@pytest.mark.slow
@pytest.mark.parametrize("mode, outcome", [("404", "profiler_disabled"), ("slow", "start_failed")])
def test_profiler_disabled_or_slow_is_a_clear_outcome(tmp_path, mode, outcome):
    with FakeProfiler(str(tmp_path / "profiles"), mode=mode) as vllm:
        c, _ = capturer(tmp_path, vllm.url)
        assert c.run("20261123T120000Z-manual-abcdef", "manual", {}, {}) == outcome
    assert c.profiler_enabled is (False if mode == "404" else None)
    (record,) = c.catalog.list()  # listed with its outcome and why, no file (issue #26)
    assert (record["outcome"], record["files"], record["total_bytes"]) == (outcome, [], 0)
    assert record["error"].startswith("/start_profile answered 404" if mode == "404" else "/start_profile: ")


def test_vllm_down_is_start_failed_and_leaks_no_thread(tmp_path):
    before = threading.active_count()
    c, _ = capturer(tmp_path, f"http://127.0.0.1:{free_port()}")
    capture_id = c.trigger("manual", {})
    c.wait(20)
    assert capture_id and c.outcomes[("manual", "start_failed")] == 1 and not c.busy
    assert threading.active_count() <= before


@pytest.mark.slow
def test_stuck_capture_is_stopped_by_the_sidecar(tmp_path):
    with FakeProfiler(str(tmp_path / "profiles"), mode="stuck") as vllm:
        c, _ = capturer(tmp_path, vllm.url, timeout_s=2)
        assert c.run("20261123T120000Z-step_time-abcdef", "step_time", {}, {}) == "ok"
    assert [k for k, _ in vllm.calls] == ["start", "stop"]  # stopped once, by the timeout path
    assert c.catalog.get("20261123T120000Z-step_time-abcdef")["stopped_by_sidecar"] is True


def test_retention_and_quota(tmp_path):
    size = os.path.getsize(TRACE)
    cat = Catalog(str(tmp_path / "store"), Retention(max_count=2, max_bytes=int(2.5 * size), max_age_s=3600))
    ids = [f"20261123T12000{i}Z-manual-abcde{i}" for i in range(4)]
    for i, capture_id in enumerate(ids[:3]):
        f = tmp_path / f"t{i}.pt.trace.json.gz"
        shutil.copy(TRACE, f)
        cat.store(capture_id, [str(f)], {"created": time.time() + i, "reason": "manual"})
        assert cat.used_bytes() <= int(2.5 * size)
    assert [m["id"] for m in cat.list()] == [ids[2], ids[1]]  # oldest evicted by count
    big = tmp_path / "big.json"
    big.write_bytes(b"x" * (3 * size))
    with pytest.raises(QuotaError):
        cat.store(ids[3], [str(big)], {"created": time.time(), "reason": "manual"})
    assert [m["id"] for m in cat.list()] == [ids[2], ids[1]]  # nothing else deleted
    assert cat.file_path(ids[2], "../../etc/passwd") is None and cat.file_path("../x", "metadata.json") is None


@pytest.fixture
def api(tmp_path):
    """The sidecar's real HTTP app on a port, with one stored capture and a token."""
    with FakeProfiler(str(tmp_path / "profiles")) as vllm:
        os.makedirs(vllm.profile_dir, exist_ok=True)
        cfg = SidecarConfig(segment_dir=str(tmp_path / "seg"), profile_dir=vllm.profile_dir, vllm_url=vllm.url,
                            capture_dir=str(tmp_path / "store"), api_token="s3cret",
                            detector=DetectorConfig(max_per_hour=2, cooldown_s=0))
        exporter = build(cfg, process_metrics=False)
        exporter.capturer.run("20261123T120000Z-imbalance-abcdef", "imbalance", {"signal": "x"}, {})
        with serve_app(exporter) as url:
            yield url, exporter


@contextlib.contextmanager
def serve_app(exporter):
    """The sidecar's real HTTP app for `exporter`, on a free port, on its own event loop thread."""
    port = free_port()
    loop = asyncio.new_event_loop()
    runner = web.AppRunner(build_app(exporter))
    loop.run_until_complete(runner.setup())
    loop.run_until_complete(web.TCPSite(runner, "127.0.0.1", port).start())
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        asyncio.run_coroutine_threadsafe(runner.cleanup(), loop).result(5)
        loop.call_soon_threadsafe(loop.stop)


def http(url, method="GET", token=None, body=None):
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    data = json.dumps(body).encode() if body is not None else None
    try:
        with urllib.request.urlopen(urllib.request.Request(url, data=data, method=method, headers=headers)) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def test_api_list_show_download_and_auth(api):
    url, _ = api
    for path in ("/api/captures", "/api/captures/20261123T120000Z-imbalance-abcdef", "/api/flight",
                 "/api/captures/20261123T120000Z-imbalance-abcdef/flight"):  # one rule: the whole API needs it
        assert http(url + path)[0] == 401, path
        assert http(url + path, token="wrong")[0] == 401, path
    status, body = http(url + "/api/captures", token="s3cret")
    capture = json.loads(body)["captures"][0]
    assert status == 200 and capture["id"] == "20261123T120000Z-imbalance-abcdef"
    name = next(f["name"] for f in capture["files"] if f["name"].endswith(".gz"))
    assert http(f"{url}/api/captures/{capture['id']}/files/{name}")[0] == 401
    assert http(f"{url}/api/captures/{capture['id']}/files/{name}", token="wrong")[0] == 401
    status, data = http(f"{url}/api/captures/{capture['id']}/files/{name}", token="s3cret")
    assert status == 200 and data == open(TRACE, "rb").read()
    for bad in ("..%2F..%2F..%2Fetc%2Fpasswd", "metadata.json.tmp", "%2Fetc%2Fpasswd", "..", "nope.gz"):
        assert http(f"{url}/api/captures/{capture['id']}/files/{bad}", token="s3cret")[0] == 404, bad
    for bad_id in ("..%2F..%2Fetc", "20261123T120000Z-imbalance-zzzzzz", "x"):
        assert http(f"{url}/api/captures/{bad_id}", token="s3cret")[0] == 404


@pytest.mark.slow
def test_api_trigger_auth_validation_busy_and_budget(api):
    url, exporter = api
    assert http(url + "/api/captures", "POST", body={"reason": "x"})[0] == 401
    assert http(url + "/api/captures", "POST", token="s3cret", body={"nope": 1})[0] == 400
    status, body = http(url + "/api/captures", "POST", token="s3cret", body={"reason": "on-call check"})
    assert status == 202 and json.loads(body)["id"].endswith(tuple("0123456789abcdef"))
    assert http(url + "/api/captures", "POST", token="s3cret", body={"reason": "again"})[0] in (409, 429)
    exporter.capturer.wait(20)
    assert http(url + "/api/captures", "POST", token="s3cret", body={"reason": "second"})[0] == 202
    exporter.capturer.wait(20)
    assert http(url + "/api/captures", "POST", token="s3cret", body={"reason": "third"})[0] == 429  # 2 per hour
    assert len(exporter.catalog.list()) == 3


@pytest.mark.slow
def test_cli_traces_list_show_pull(api, tmp_path):
    url, _ = api
    cli = [sys.executable, "-m", "moe_monitor.cli", "traces", "--url", url, "--token", "s3cret"]
    out = subprocess.run(cli + ["list"], capture_output=True, text=True, check=True, timeout=60).stdout
    assert "20261123T120000Z-imbalance-abcdef" in out and "imbalance" in out
    subprocess.run(cli + ["pull", "20261123T120000Z-imbalance-abcdef", "--out", str(tmp_path / "pulled")],
                   capture_output=True, text=True, check=True, timeout=60)
    pulled = os.listdir(tmp_path / "pulled" / "20261123T120000Z-imbalance-abcdef")
    assert "metadata.json" in pulled and "breakdown.json" in pulled and any(p.endswith(".gz") for p in pulled)
    bad = subprocess.run(cli[:-2] + ["pull", "20261123T120000Z-imbalance-abcdef"], capture_output=True, text=True,
                         timeout=60, cwd=tmp_path)
    assert bad.returncode != 0 and "401" in bad.stderr


@pytest.mark.slow
def test_symlinked_trace_in_the_profile_dir_is_neither_stored_nor_served(tmp_path):
    """Defect: a symlink named like a rank trace was moved into the catalog and served by the download API,
    exposing any file the sidecar can read. Links are never taken, stored or served."""
    secret = tmp_path / "outside" / "secret.pt.trace.json.gz"
    secret.parent.mkdir()
    shutil.copy(TRACE, secret)
    with FakeProfiler(str(tmp_path / "profiles"), mode="symlink") as vllm:
        vllm.secret = str(secret)
        os.makedirs(vllm.profile_dir, exist_ok=True)
        c, profiles = capturer(tmp_path, vllm.url, run_s=1, timeout_s=3)
        outcome = c.run("20261123T120000Z-manual-abcdef", "manual", {}, {})
    assert outcome == "no_trace" and [(m["outcome"], m["files"]) for m in c.catalog.list()] == [("no_trace", [])]
    assert [os.path.islink(profiles / n) for n in os.listdir(profiles)] == [True], "the link is left where it was"
    # a link planted inside a stored capture is not served either
    store = Catalog(str(tmp_path / "store2"))
    real = tmp_path / "dp0_pp0_tp0_dcp0_ep0_rank0.1.pt.trace.json.gz"
    shutil.copy(TRACE, real)
    meta = store.store("20261123T120100Z-manual-abcdef", [str(real)], {"created": time.time()})
    name = meta.files[0].name
    planted = os.path.join(store.root, meta.id, name)
    assert store.file_path(meta.id, name) == planted
    os.unlink(planted)
    os.symlink(secret, planted)
    assert store.file_path(meta.id, name) is None
    link = tmp_path / "link.pt.trace.json.gz"
    os.symlink(secret, link)
    meta = store.store("20261123T120200Z-manual-abcdef", [str(link)], {"created": time.time()})
    assert meta.files == () and os.path.islink(link), "store() refuses the link and leaves it alone"


def test_retention_never_deletes_a_path_that_metadata_names(tmp_path):
    """Defect: retention deleted os.path.join(store, metadata["id"]), so metadata naming '../victim' removed a
    directory outside the catalog. A capture is its directory; metadata that names another id is ignored."""
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "keep.txt").write_text("must survive")
    cat = Catalog(str(tmp_path / "store"), Retention(max_count=1, max_age_s=60))
    forged = tmp_path / "store" / "20261123T120000Z-manual-abcdef"
    forged.mkdir()
    (forged / "metadata.json").write_text(json.dumps({"id": "../victim", "created": 0, "total_bytes": 1,
                                                      "files": []}))
    assert cat.list() == [] and cat.get("20261123T120000Z-manual-abcdef") is None
    real = tmp_path / "dp0_pp0_tp0_dcp0_ep0_rank0.1.pt.trace.json.gz"
    shutil.copy(TRACE, real)
    cat.store("20261123T120100Z-manual-abcdef", [str(real)], {"created": time.time() - 3600})
    assert cat.enforce(time.time()) == ["20261123T120100Z-manual-abcdef"]  # too old: its own directory goes
    assert (victim / "keep.txt").read_text() == "must survive"


@pytest.mark.slow
@pytest.mark.parametrize("insecure", [False, True])
def test_serve_refuses_trigger_and_download_without_a_token_unless_told(tmp_path, insecure):
    """Defect: with no token configured anyone reaching the port could trigger captures and download traces,
    and nothing was logged. The real `moe-monitor serve`: without --api-token, every /api/ route answers 403
    (/metrics stays open; issue #24: one rule for the whole API); --captures-api-insecure opens them, with a loud
    log line and an audit trail of downloads and triggers."""
    from moe_monitor.demo import launch

    store = tmp_path / "store"
    cat = Catalog(str(store))
    real = tmp_path / "dp0_pp0_tp0_dcp0_ep0_rank0.1.pt.trace.json.gz"
    shutil.copy(TRACE, real)
    meta = cat.store("20261123T120000Z-manual-abcdef", [str(real)], {"created": time.time(), "reason": "manual",
                                                                     "evidence": {}, "outcome": "ok"})
    (tmp_path / "profiles").mkdir()
    sidecar = launch.start_sidecar(str(tmp_path / "seg"), free_port(), str(tmp_path / "sidecar.log"), [
        "--profile-dir", str(tmp_path / "profiles"), "--vllm-url", f"http://127.0.0.1:{free_port()}",
        "--capture-dir", str(store), *(["--captures-api-insecure"] if insecure else [])])
    try:
        sidecar.wait_ready("/healthz", 30)
        url = sidecar.url
        assert http(url + "/metrics")[0] == 200
        listing = http(url + "/api/captures")
        name = meta.files[0].name
        download = http(f"{url}/api/captures/{meta.id}/files/{name}")
        trigger = http(url + "/api/captures", "POST", body={"reason": "probe"})
        if insecure:
            assert listing[0] == 200
            assert download[0] == 200 and download[1] == open(TRACE, "rb").read()
            assert trigger[0] == 202
        else:
            assert listing[0] == download[0] == trigger[0] == 403 and b"--api-token" in download[1]
        time.sleep(0.3)
        log = sidecar.log_tail(200)
        assert ("INSECURE" in log) == insecure
        if insecure:  # the audit trail
            assert "127.0.0.1 POST /api/captures" in log and f"GET /api/captures/{meta.id}/files/{name}" in log
        else:
            assert "refused 127.0.0.1 GET /api/captures" in log and "answers 403 until --api-token is set" in log
    finally:
        sidecar.stop()
