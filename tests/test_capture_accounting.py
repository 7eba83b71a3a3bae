"""Every capture ends with exactly one recorded outcome and leaves nothing behind (issue #14, defect 9 and parts
of 11): an unexpected exception, a trace the analysis cannot read, a full disk or a kill while storing, vLLM's
own 409, and a vLLM call that hangs. Real capturer, real catalog on disk, a stand-in vLLM over real HTTP
(tests/test_capture.py's FakeProfiler) writing real trace fixtures."""

from __future__ import annotations

import asyncio
import errno
import gzip
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections import Counter

import numpy as np
import pytest
from aiohttp import web
from test_capture import TRACE, FakeProfiler

from moe_monitor.capture.capturer import CaptureConfig, Capturer
from moe_monitor.capture.catalog import Catalog

ID = "20261123T120000Z-manual-abcdef"


class Vllm(FakeProfiler):
    """FakeProfiler that writes `trace` for each of `ranks` ranks, can answer every /start_profile with 409
    (`busy`: a profile someone else runs), and can hang /start_profile or /stop_profile (`hang`)."""

    def __init__(self, profile_dir: str, mode: str = "ok", trace: str = TRACE, ranks: int = 1,
                 busy: bool = False, hang: str | None = None):
        os.makedirs(profile_dir, exist_ok=True)
        super().__init__(profile_dir, mode)
        self.trace, self.ranks, self.busy, self.hang = trace, ranks, busy, hang
        self.released = threading.Event()

    def _write(self, delay: float) -> None:
        def later():
            time.sleep(delay)
            for rank in range(self.ranks):
                name = f"{self._prefix}dp0_pp0_tp0_dcp0_ep{rank}_rank{rank}.{time.time_ns()}.pt.trace.json.gz"
                shutil.copy(self.trace, os.path.join(self.profile_dir, name + ".tmp"))
                os.replace(os.path.join(self.profile_dir, name + ".tmp"), os.path.join(self.profile_dir, name))
        threading.Thread(target=later, daemon=True).start()

    async def _hang(self):
        while not self.released.is_set():
            await asyncio.sleep(0.05)

    async def start(self, request):
        if self.busy:
            self.calls.append(("start", {}))
            return web.json_response({"error": {"message": "already active"}}, status=409)
        if self.hang == "start":
            await self._hang()
        return await super().start(request)

    async def stop(self, request):
        if self.hang == "stop":
            await self._hang()
        return await super().stop(request)

    def __exit__(self, *exc):
        self.released.set()
        super().__exit__(*exc)


def make(tmp_path, url, expected_ranks=lambda: 1, **kw) -> Capturer:
    cfg = dict(timeout_s=10, run_s=10, stop_grace_s=5, http_timeout_s=2) | kw
    return Capturer(CaptureConfig(url, str(tmp_path / "profiles"), **cfg), Catalog(str(tmp_path / "store")),
                    expected_ranks=expected_ranks)


def gz(path, data: bytes) -> str:
    with gzip.open(path, "wb") as f:
        f.write(data)
    return str(path)


def tid_list_trace(tmp_path) -> str:
    """A real trace in which one event's "tid" is a list (the reader once failed on it with a TypeError; it now
    skips such events)."""
    with gzip.open(TRACE) as f:
        doc = json.load(f)
    next(e for e in doc["traceEvents"] if e.get("ph") == "X")["tid"] = [1, 2]
    return gz(tmp_path / "tid_list.json.gz", json.dumps(doc).encode())


def real_trace(tmp_path) -> str:
    return shutil.copy(TRACE, tmp_path / os.path.basename(TRACE))


def corrupt_trace(tmp_path) -> str:
    """A complete gzip stream ending a JSON object (so the capture takes it), with invalid JSON inside."""
    return gz(tmp_path / "corrupt.json.gz", b'{"traceEvents": [{"ph": "X", "cat": "kernel", "ts": oops}]}')


def problems(caplog, capture_id: str) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.levelno >= logging.WARNING and capture_id in r.getMessage()]


def assert_ended(c: Capturer, outcome: str, reason: str = "manual"):
    assert c.outcomes == Counter({(reason, outcome): 1}), c.outcomes
    assert not c.busy and c.last_end is not None and c.last_duration_s is not None


@pytest.mark.parametrize("trace, unexpected", [(corrupt_trace, False), (real_trace, True)])
def test_a_trace_the_analysis_cannot_read_is_stored_as_analysis_failed_not_ok(tmp_path, caplog, monkeypatch, trace,
                                                                              unexpected):
    """Defects 9 and 11: an unexpected error in the analysis (once a trace event with "tid": [1, 2]; here a bug
    injected into the analysis) raised out of the capture thread (no outcome, the trace left in the profile dir
    forever); a corrupt trace was reported as outcome ok. Both are counted as analysis_failed, logged once with
    the capture id, and the trace is stored and pullable."""
    if unexpected:
        from moe_monitor.capture import capturer

        def broken(*args, **kwargs):
            raise TypeError("unhashable type: 'list'")
        monkeypatch.setattr(capturer, "analyze_files", broken)
    source = trace(tmp_path)
    with Vllm(str(tmp_path / "profiles"), trace=source) as vllm:
        c = make(tmp_path, vllm.url)
        c.trigger("manual", {})  # the sidecar's own path: a background thread
        c.wait(30)
    assert_ended(c, "analysis_failed")
    (meta,) = c.catalog.list()
    assert meta["outcome"] == "analysis_failed" and meta["breakdown"] is None
    (name,) = [f["name"] for f in meta["files"]]
    with open(c.catalog.file_path(meta["id"], name), "rb") as f:
        assert f.read() == open(source, "rb").read(), "the trace is stored as vLLM wrote it, for on-call to pull"
    assert os.listdir(tmp_path / "profiles") == []
    (record,) = problems(caplog, meta["id"])
    assert (record.exc_info is not None) == unexpected, "a traceback for a bug, one line for a corrupt file"


def test_an_unexpected_error_is_counted_logged_once_and_leaves_no_trace_behind(tmp_path, caplog):
    """Defect 9: an exception anywhere in the capture (here the sidecar's rank count, once the trace is there)
    killed the capture thread with no outcome, the profiling session open and the trace in the profile dir."""
    profiles, failing = tmp_path / "profiles", [True]

    def ranks():
        if failing and os.listdir(profiles):
            raise RuntimeError("rank count unavailable")
        return 1
    with Vllm(str(profiles)) as vllm:
        c = make(tmp_path, vllm.url, expected_ranks=ranks)
        capture_id = c.trigger("manual", {})
        c.wait(30)
        assert_ended(c, "error")
        (record,) = problems(caplog, capture_id)
        assert record.exc_info is not None and "rank count unavailable" in caplog.text
        assert os.listdir(profiles) == [] and os.listdir(tmp_path / "store") == [capture_id]
        (kept,) = c.catalog.list()  # its outcome alone (metadata.json), for traces list/show (issue #26)
        assert (kept["outcome"], kept["files"]) == ("error", []) and "rank count unavailable" in kept["error"]
        failing.clear()
        assert c.run(ID, "manual", {}, {}) == "ok"
    assert [k for k, _ in vllm.calls] == ["start", "stop", "start", "stop"], "the session was closed"


def enospc_on_second_file(monkeypatch):
    """A cross-filesystem move that runs out of space half-way through the second file."""
    real, moved = shutil.move, []

    def move(src, dst):
        if moved:
            with open(src, "rb") as f, open(dst, "wb") as out:
                out.write(f.read(1000))
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), dst)
        moved.append(src)
        return real(src, dst)
    monkeypatch.setattr(shutil, "move", move)


@pytest.mark.slow
@pytest.mark.parametrize("failure", ["enospc", "unserializable_evidence"])
def test_a_failed_store_is_store_failed_and_leaves_no_partial_directory(tmp_path, caplog, monkeypatch, failure):
    """Defect 9: ENOSPC in the catalog (or metadata that cannot be written: a numpy integer in the evidence)
    raised out of the capture: no outcome, an unlisted partial directory never evicted, traces left behind.
    Now: store_failed, logged once, the catalog holds nothing of it, the profile dir nothing of it."""
    evidence = {"current": np.int64(7)} if failure == "unserializable_evidence" else {"current": 7}
    if failure == "enospc":
        enospc_on_second_file(monkeypatch)
    with Vllm(str(tmp_path / "profiles"), ranks=2) as vllm:
        c = make(tmp_path, vllm.url, expected_ranks=lambda: 2)
        capture_id = c.trigger("imbalance", evidence)
        c.wait(30)
        assert_ended(c, "store_failed", "imbalance")
        assert os.listdir(tmp_path / "store") == [capture_id] and os.listdir(tmp_path / "profiles") == []
        (kept,) = c.catalog.list()  # no trace of it, only its outcome (metadata.json), for traces list/show
        assert (kept["outcome"], kept["files"]) == ("store_failed", []) and str(kept["evidence"]["current"]) == "7"
        (record,) = problems(caplog, capture_id)
        assert (os.strerror(errno.ENOSPC) if failure == "enospc" else "int64") in caplog.text
        monkeypatch.undo()
        assert c.run(ID, "manual", {}, {}) == "ok", "the next capture stores normally"
    assert [m["id"] for m in c.catalog.list()] == [capture_id, ID]
    assert sorted(os.listdir(tmp_path / "store")) == sorted([capture_id, ID])


KILLED_STORE = """
import shutil, sys, time
from moe_monitor.capture.catalog import Catalog
real = shutil.move
def move(src, dst):
    real(src, dst)
    print("moved", flush=True)
    time.sleep(120)
shutil.move = move
Catalog(sys.argv[1]).store(sys.argv[2], sys.argv[3:], {"created": time.time()})
"""


def test_a_kill_while_storing_leaves_nothing_that_outlives_the_next_start(tmp_path):
    """Defect 9: a sidecar killed while it moved a capture into the catalog left an unlisted directory that
    retention never saw, and the rest of the capture's traces in the profile dir. The next start removes both
    (only the catalog's own directories and the capture's own regular files), and so does every store."""
    store, profiles, outside = tmp_path / "store", tmp_path / "profiles", tmp_path / "outside"
    profiles.mkdir()
    outside.mkdir()
    (outside / "keep.gz").write_bytes(b"must survive")
    cat = Catalog(str(store))
    kept = profiles / "dp0_pp0_tp0_dcp0_ep0_rank0.1.pt.trace.json.gz"
    shutil.copy(TRACE, kept)
    cat.store(ID, [str(kept)], {"created": time.time()})
    killed = "20261123T120100Z-imbalance-abcdef"
    sources = [profiles / f"{killed}_dp0_pp0_tp0_dcp0_ep{r}_rank{r}.1.pt.trace.json.gz" for r in (0, 1)]
    for s in sources:
        shutil.copy(TRACE, s)
    others = [profiles / "other_dp0_pp0_tp0_dcp0_ep0_rank0.2.pt.trace.json.gz", store / "notes.txt",
              store / "lost+found"]
    shutil.copy(TRACE, others[0])
    others[1].write_text("not ours")
    others[2].mkdir()
    os.symlink(outside, store / f".tmp-{killed.replace('abcdef', '000000')}")  # never followed
    os.symlink(outside / "keep.gz", profiles / f"{killed}_dp0_pp0_tp0_dcp0_ep2_rank2.1.pt.trace.json.gz")

    proc = subprocess.Popen([sys.executable, "-c", KILLED_STORE, str(store), killed, *map(str, sources)],
                            stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "moved"
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(30)
    left = set(os.listdir(store)) - {ID, "notes.txt", "lost+found"}
    assert len(left) == 2, f"the kill left something behind: {left}"

    restarted = Capturer(CaptureConfig("http://127.0.0.1:1", str(profiles)), Catalog(str(store)))
    assert sorted(os.listdir(store)) == sorted([ID, "notes.txt", "lost+found",
                                                f".tmp-{killed.replace('abcdef', '000000')}"])
    assert sorted(os.listdir(profiles)) == sorted([others[0].name, f"{killed}_dp0_pp0_tp0_dcp0_ep2_rank2.1.pt"
                                                                   ".trace.json.gz"])
    assert (outside / "keep.gz").read_bytes() == b"must survive"
    assert [m["id"] for m in restarted.catalog.list()] == [ID] and restarted.catalog.swept == [killed]

    partial = store / "20261123T120200Z-manual-abcdef"  # an unlisted directory appearing while running
    partial.mkdir()
    (partial / "x.pt.trace.json.gz").write_bytes(b"x" * 1000)
    shutil.copy(TRACE, profiles / "dp0_pp0_tp0_dcp0_ep0_rank0.3.pt.trace.json.gz")
    restarted.catalog.store("20261123T120300Z-manual-abcdef",
                            [str(profiles / "dp0_pp0_tp0_dcp0_ep0_rank0.3.pt.trace.json.gz")], {"created": time.time()})
    assert not partial.exists() and restarted.catalog.swept == [killed, partial.name]


def test_vllm_409_is_vllm_busy_not_skipped_busy(tmp_path):
    """Defect 11: vLLM answering 409 (a profile already running in vLLM) is not our capturer being busy."""
    with Vllm(str(tmp_path / "profiles"), busy=True) as vllm:
        c = make(tmp_path, vllm.url)
        assert c.run(ID, "manual", {}, {}) == "vllm_busy"
    assert_ended(c, "vllm_busy")
    assert [k for k, _ in vllm.calls] == ["start", "stop", "start"], "the stale session is stopped, once"


@pytest.mark.slow
@pytest.mark.parametrize("hang, outcome", [("start", "start_failed"), ("stop", "no_trace")])
def test_capture_timeout_bounds_the_whole_capture(tmp_path, hang, outcome):
    """Defect 11: a hanging /stop_profile took 95 s with --capture-timeout 1 (each call had its own 30 s, and
    the wait after the stop its own 30 s). The whole capture now ends by the deadline."""
    with Vllm(str(tmp_path / "profiles"), mode="stuck", hang=hang) as vllm:
        c = make(tmp_path, vllm.url, timeout_s=1, run_s=10, stop_grace_s=30, http_timeout_s=30)
        began = time.monotonic()
        c.trigger("manual", {})
        c.wait(10)
        took = time.monotonic() - began
        assert not c.busy, f"still running after {took:.0f} s"
    assert took < 3, took
    assert_ended(c, outcome)


@pytest.mark.slow
def test_a_capture_that_stores_nothing_removes_its_own_files_and_only_those(tmp_path):
    """Defect 9: a rank trace that never completed stayed in the profile dir forever. The capture removes its
    own regular files; older files and links (even named with its prefix) stay where they are."""
    profiles, outside = tmp_path / "profiles", tmp_path / "outside.gz"
    profiles.mkdir()
    outside.write_bytes(b"must survive")
    old = profiles / "dp0_pp0_tp0_dcp0_ep0_rank0.1.pt.trace.json.gz"
    shutil.copy(TRACE, old)
    link = profiles / f"{ID}_dp0_pp0_tp0_dcp0_ep1_rank1.1.pt.trace.json.gz"
    os.symlink(outside, link)
    truncated = tmp_path / "truncated.gz"
    truncated.write_bytes(open(TRACE, "rb").read()[:5000])  # a rank that never finished writing
    with Vllm(str(profiles), trace=str(truncated)) as vllm:
        c = make(tmp_path, vllm.url, timeout_s=2, run_s=1)
        assert c.run(ID, "manual", {}, {}) == "no_trace"
    assert_ended(c, "no_trace")
    assert sorted(os.listdir(profiles)) == sorted([old.name, link.name])
    assert outside.read_bytes() == b"must survive"


def test_a_trace_with_a_list_as_tid_is_analysed(tmp_path):
    """The event with "tid": [1, 2] that once crashed the capture is skipped by the reader: outcome ok."""
    with Vllm(str(tmp_path / "profiles"), trace=tid_list_trace(tmp_path)) as vllm:
        c = make(tmp_path, vllm.url)
        c.trigger("manual", {})
        c.wait(30)
    assert_ended(c, "ok")
