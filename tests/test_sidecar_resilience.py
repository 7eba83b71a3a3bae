"""The real `moe-monitor serve` process against what once froze or hung it (issue #14, defects 1 and 2): one bad
part of the input must never stop /metrics from answering and moving on."""

from __future__ import annotations

import os
import shutil
import time

from conftest import free_port, samples, scrape
from moe_monitor.capture.catalog import Catalog
from moe_monitor.demo import launch

FIXTURES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures")
SEGMENT = os.path.join(FIXTURES, "segments", "t0", "dp0-pp0-tp0.moeseg")
TRACE = os.path.join(FIXTURES, "traces", "gpu_graph.pt.trace.json.gz")


def serve(tmp_path, segments, extra=()):
    sidecar = launch.start_sidecar(str(segments), free_port(), str(tmp_path / "sidecar.log"),
                                   ["--window", "1", "--stale-after", "1000000000", *extra])
    sidecar.wait_ready("/healthz", 20)
    return sidecar


def window_end(url: str) -> float:
    return samples(scrape(url + "/metrics"), "moe_window_end_timestamp_seconds").get((), 0.0)


def test_fifo_and_a_link_to_one_named_like_segments_do_not_block_the_sidecar(tmp_path):
    segments = tmp_path / "seg"
    segments.mkdir()
    shutil.copy(SEGMENT, segments)
    os.mkfifo(segments / "trap.moeseg")  # open() of a FIFO blocks until a writer appears
    os.symlink(segments / "trap.moeseg", segments / "link.moeseg")
    sidecar = serve(tmp_path, segments)
    try:
        began = time.monotonic()
        m = scrape(sidecar.url + "/metrics")
        assert time.monotonic() - began < 5
        up = {dict(k)["segment"]: v for k, v in samples(m, "moe_monitor_segment_up").items()}
        assert up == {"dp0-pp0-tp0": 1.0, "trap": 0.0, "link": 0.0}, up
        assert samples(m, "moe_monitor_segment_read_errors_total")[(("kind", "io"),)] >= 2
        assert "not a regular file" in sidecar.log_tail(50)
    finally:
        sidecar.stop()


def test_a_segment_file_name_that_is_not_utf8_is_served_and_labelled(tmp_path):
    segments = tmp_path / "seg"
    segments.mkdir()
    shutil.copy(SEGMENT, os.path.join(os.fsencode(segments), b"dp0-pp0-tp0\xff.moeseg"))
    sidecar = serve(tmp_path, segments)
    try:
        m = scrape(sidecar.url + "/metrics")
        assert samples(m, "moe_monitor_segment_up") == {(("segment", "dp0-pp0-tp0\ufffd"),): 1.0}
        first = window_end(sidecar.url)
        time.sleep(2.2)
        assert window_end(sidecar.url) > first, "the window loop keeps running"
    finally:
        sidecar.stop()


def test_a_damaged_breakdown_in_the_catalog_is_counted_and_the_windows_go_on(tmp_path):
    """Defect 1: a corrupt breakdown.json present at start killed the window thread (500 on /metrics forever,
    /healthz 200). Now the capture is counted as an analysis error and everything else is exported."""
    segments = tmp_path / "seg"
    segments.mkdir()
    shutil.copy(SEGMENT, segments)
    store = Catalog(str(tmp_path / "store"))
    blocks_without_figures = (b'{"categories": {}, "ranks": [], "idle_us": 0, "moe_blocks": {"count": 3}}')
    for n, breakdown in enumerate((b'{"categories": {}}', blocks_without_figures, b"\xff{ not json")):
        trace = tmp_path / f"dp0_pp0_tp0_dcp0_ep0_rank0.{n}.pt.trace.json.gz"
        shutil.copy(TRACE, trace)
        store.store(f"20261123T12000{n}Z-manual-abcdef", [str(trace)], {"created": time.time()},
                    {"breakdown.json": breakdown})  # the newest (last) is the one the sidecar reads
    (tmp_path / "profiles").mkdir()
    sidecar = serve(tmp_path, segments, ["--profile-dir", str(tmp_path / "profiles"), "--capture-dir", store.root,
                                         "--vllm-url", f"http://127.0.0.1:{free_port()}"])
    try:
        m = scrape(sidecar.url + "/metrics")
        assert samples(m, "moe_capture_analysis_errors_total") == {(): 1.0}
        assert not samples(m, "moe_capture_info"), "nothing is exported from a damaged breakdown"
        assert samples(m, "moe_monitor_segment_up") == {(("segment", "dp0-pp0-tp0"),): 1.0}
        first = window_end(sidecar.url)
        time.sleep(2.2)
        assert window_end(sidecar.url) > first, "the window loop keeps running"
        assert "cannot use its breakdown.json" in sidecar.log_tail(50)
    finally:
        sidecar.stop()


def test_only_a_whole_breakdown_is_exported():
    """What `analyze` writes is accepted; a breakdown missing what the capture gauges read is not (it would
    otherwise fail every window's build and freeze the exposition)."""
    import json

    from moe_monitor.breakdown.analyze import analyze
    from moe_monitor.breakdown.trace import read_trace
    from moe_monitor.sidecar.exporter import valid_breakdown

    assert valid_breakdown(json.loads(json.dumps(analyze([read_trace(TRACE)]))))
    for damaged in ({}, [], {"categories": {}}, {"categories": {"x": {"us": "1"}}, "ranks": [], "idle_us": 0,
                                                 "moe_blocks": {"count": 0}},
                    {"categories": {}, "ranks": [], "idle_us": 0, "moe_blocks": {"count": 3}}):
        assert not valid_breakdown(damaged), damaged


def test_bytes_that_are_not_utf8_get_400_and_401_not_500(tmp_path):
    """Defect 11 (part): a body or an Authorization header that is not UTF-8 answered 500."""
    import http.client

    segments = tmp_path / "seg"
    segments.mkdir()
    (tmp_path / "profiles").mkdir()
    sidecar = serve(tmp_path, segments, ["--profile-dir", str(tmp_path / "profiles"), "--capture-dir",
                                         str(tmp_path / "store"), "--vllm-url", f"http://127.0.0.1:{free_port()}",
                                         "--api-token", "s3cret"])
    try:
        host, port = sidecar.url.removeprefix("http://").split(":")

        def post(headers: dict, body: bytes) -> int:
            conn = http.client.HTTPConnection(host, int(port), timeout=10)
            conn.putrequest("POST", "/api/captures")
            for k, v in headers.items():
                conn.putheader(k, v)
            conn.putheader("Content-Length", str(len(body)))
            conn.endheaders(body)
            status = conn.getresponse().status
            conn.close()
            return status

        assert post({"Authorization": b"Bearer s3cr\xe9t\xff", "Content-Type": "application/json"},
                    b'{"reason": "x"}') == 401
        assert post({"Authorization": "Bearer s3cret", "Content-Type": "application/json"},
                    b'{"reason": "\xff\xfe"}') == 400
        assert "Traceback" not in sidecar.log_tail(200)
    finally:
        sidecar.stop()
