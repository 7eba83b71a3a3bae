"""The real `moe-monitor serve` process against what once froze or hung it (issue #14, defects 1 and 2): one bad
part of the input must never stop /metrics from answering and moving on."""

from __future__ import annotations

import os
import shutil
import time

import pytest
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


@pytest.mark.slow
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


@pytest.mark.slow
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


@pytest.mark.slow
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
    from moe_monitor.breakdown.latest import valid_breakdown
    from moe_monitor.breakdown.trace import read_trace

    assert valid_breakdown(json.loads(json.dumps(analyze([read_trace(TRACE)]).to_json())))
    for damaged in ({}, [], {"categories": {}}, {"categories": {"x": {"us": "1"}}, "ranks": [], "idle_us": 0,
                                                 "moe_blocks": {"count": 0}},
                    {"categories": {}, "ranks": [], "idle_us": 0, "moe_blocks": {"count": 3}}):
        assert not valid_breakdown(damaged), damaged


@pytest.mark.slow
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


def _segment_bytes(model: str, layers: int, experts: int, dp: int = 0, hot: int | None = None) -> bytes:
    """A fresh segment of `model` (published now) with `layers` x `experts` counts."""
    import zlib

    import numpy as np

    from moe_monitor.channel.layout import Header, Ranks, Shape, encode_payload, pack_header
    from moe_monitor.plugin.steps import StepStats

    steps = StepStats()
    steps.record_step("decode", 4, 0.01)
    shape = Shape(layers, experts, len(steps.token_bounds), len(steps.duration_bounds))
    counts = np.full((layers, experts), 1000, dtype=np.int64)
    if hot is not None:
        counts[:, hot] = 9000
    arrays = steps.snapshot()
    arrays.update(counts=counts, layer_ids=np.arange(layers, dtype=np.int32),
                  layer_flags=np.ones(layers, dtype=np.uint8))
    payload = encode_payload(shape, arrays)
    now = time.time_ns()
    header = Header(seq=2, generation=7 + dp, created_unix_ns=now, updated_unix_ns=now, pid=100 + dp, top_k=2,
                    ranks=Ranks(global_rank=dp, world_size=2, dp_rank=dp, dp_size=2), shape=shape,
                    payload_size=shape.payload_size, payload_crc32=zlib.crc32(payload), publish_errors=0, model=model)
    return pack_header(header) + payload


@pytest.mark.slow
def test_a_segment_without_experts_or_of_another_model_does_not_take_over(tmp_path):
    """Defect 10: present at start, a segment claiming 0 experts stopped every window metric, and another
    model's segment sorting first replaced the served model's metrics. Both are now left out and named."""
    segments = tmp_path / "seg"
    segments.mkdir()
    for dp in (0, 1):  # the served model: two DP ranks, 4 layers x 8 experts, expert 3 hot
        (segments / f"dp{dp}-pp0-tp0.moeseg").write_bytes(_segment_bytes("served/model", 4, 8, dp, hot=3))
    (segments / "a-other.moeseg").write_bytes(_segment_bytes("other/model", 2, 64))  # sorts first
    (segments / "b-empty.moeseg").write_bytes(_segment_bytes("served/model", 0, 8))
    (segments / "c-noexperts.moeseg").write_bytes(_segment_bytes("served/model", 4, 0))
    sidecar = serve(tmp_path, segments, ["--min-window-assignments", "1"])
    try:
        m = scrape(sidecar.url + "/metrics")
        info = samples(m, "moe_model_info")
        assert [dict(k)["model"] for k in info] == ["served/model"], info
        assert dict(next(iter(info)))["experts"] == "8"
        ignored = {dict(k)["segment"]: dict(k)["reason"] for k in samples(m, "moe_monitor_segments_ignored")}
        assert ignored == {"a-other": "other_model", "b-empty": "no_layers", "c-noexperts": "no_layers"}, ignored
        # the window metrics of the served model keep coming: append a window with expert 3 hot
        deadline = time.monotonic() + 10
        ratios = {}
        while time.monotonic() < deadline and not ratios:
            for dp in (0, 1):
                (segments / f"dp{dp}-pp0-tp0.moeseg.tmp").write_bytes(_segment_bytes("served/model", 4, 8, dp, hot=3))
                os.replace(segments / f"dp{dp}-pp0-tp0.moeseg.tmp", segments / f"dp{dp}-pp0-tp0.moeseg")
            time.sleep(1.1)
            ratios = samples(scrape(sidecar.url + "/metrics"), "moe_layer_window_routed_tokens")
        assert set(ratios) == {(("layer", str(i)),) for i in range(4)}, ratios
        assert samples(scrape(sidecar.url + "/metrics"), "moe_monitor_window_errors_total").get(
            (("stage", "window"),)) == 0.0
        assert sidecar.log_tail(400).count("left out of the model's metrics") == 3, "logged once per segment"
    finally:
        sidecar.stop()


def test_a_failing_collector_drops_only_its_families():
    """node_exporter's rule, on the exporter itself: a collector that raises reports success 0 and its
    families are missing; every other family is served and the next exposition is built."""
    from conftest import parse_exposition

    from moe_monitor.sidecar.collectors import ALL, Collector
    from moe_monitor.sidecar.config import SidecarConfig
    from moe_monitor.sidecar.wiring import build

    calls = []

    def broken(reading):
        calls.append(reading.now)
        raise RuntimeError("boom")

    collectors = tuple(c if c.name != "steps" else Collector("steps", "t0", broken) for c in ALL)
    exporter = build(SidecarConfig(segment_dir=os.path.dirname(SEGMENT)), process_metrics=False,
                     collectors=collectors)
    for _ in range(2):
        m = parse_exposition(exporter.tick().body.decode())
    success = {dict(k)["collector"]: v for k, v in samples(m, "moe_monitor_collector_success").items()}
    assert success["steps"] == 0.0 and success["health"] == 1.0 and success["model"] == 1.0, success
    assert not samples(m, "moe_step_tokens_total")
    assert samples(m, "moe_monitor_segment_up") and samples(m, "moe_model_info")
    assert len(calls) == 2


@pytest.mark.slow
def test_damaged_capture_metadata_and_a_deleted_catalog_never_freeze_the_sidecar(tmp_path):
    """Defect 8: metadata that is a list, has no files, a string `created` or `total_bytes`, and a catalog
    directory deleted under the sidecar froze the metrics or answered 500 on /api/captures. Now the damaged
    captures are left out (and counted), the good one is listed, and a deleted catalog lists nothing."""
    import json
    import urllib.request

    segments = tmp_path / "seg"
    segments.mkdir()
    shutil.copy(SEGMENT, segments)
    store = Catalog(str(tmp_path / "store"))
    trace = tmp_path / "dp0_pp0_tp0_dcp0_ep0_rank0.1.pt.trace.json.gz"
    shutil.copy(TRACE, trace)
    good = "20261123T120000Z-manual-aaaaaa"
    store.store(good, [str(trace)], {"created": time.time(), "reason": "manual", "outcome": "ok", "evidence": {}})
    damaged = {"20261123T120001Z-manual-bbbbbb": [1, 2],
               "20261123T120002Z-manual-cccccc": {"created": 1.0, "total_bytes": 3},
               "20261123T120003Z-manual-dddddd": {"created": "yesterday", "total_bytes": 3, "files": []},
               "20261123T120004Z-manual-eeeeee": {"created": 1.0, "total_bytes": "3", "files": []}}
    for capture_id, meta in damaged.items():
        os.makedirs(os.path.join(store.root, capture_id))
        if isinstance(meta, dict):
            meta = {**meta, "id": capture_id}
        with open(os.path.join(store.root, capture_id, "metadata.json"), "w") as f:
            json.dump(meta, f)
    (tmp_path / "profiles").mkdir()
    sidecar = serve(tmp_path, segments, ["--profile-dir", str(tmp_path / "profiles"), "--capture-dir", store.root,
                                         "--vllm-url", f"http://127.0.0.1:{free_port()}", "--captures-api-insecure"])
    try:
        m = scrape(sidecar.url + "/metrics")
        assert samples(m, "moe_capture_catalog_captures") == {(): 1.0}
        assert samples(m, "moe_capture_catalog_damaged") == {(): 4.0}
        assert all(v == 1.0 for v in samples(m, "moe_monitor_collector_success").values()), \
            samples(m, "moe_monitor_collector_success")
        with urllib.request.urlopen(sidecar.url + "/api/captures", timeout=10) as r:
            assert [c["id"] for c in json.load(r)["captures"]] == [good]
        shutil.rmtree(store.root)  # the volume went away under the running sidecar
        first = window_end(sidecar.url)
        time.sleep(2.2)
        m = scrape(sidecar.url + "/metrics")
        assert window_end(sidecar.url) > first, "the window loop keeps running"
        assert samples(m, "moe_capture_catalog_captures") == {(): 0.0}
        with urllib.request.urlopen(sidecar.url + "/api/captures", timeout=10) as r:
            assert r.status == 200 and json.load(r)["captures"] == []
        assert sidecar.log_tail(400).count("unusable metadata") == 4, "logged once per capture"
    finally:
        sidecar.stop()


def test_many_torn_segments_cost_a_bounded_pause_per_window(tmp_path, monkeypatch):
    """Defect 11 (part): every torn file (a writer stuck mid-publish) was retried with its own back-off, so
    500 of them held the window loop for 8 s. The pauses are now shared: their total does not grow with the
    number of files."""
    from moe_monitor.channel import reader
    from moe_monitor.channel.layout import SEQ_OFFSET
    from moe_monitor.sidecar import segments as segments_mod
    from moe_monitor.sidecar.segments import SegmentSource

    data = bytearray(open(SEGMENT, "rb").read())
    data[SEQ_OFFSET] |= 1  # odd sequence number: inside a publish, forever
    paused = []
    for module in (reader, segments_mod):
        monkeypatch.setattr(module.time, "sleep", paused.append)
    totals = {}
    for n in (10, 400):
        d = tmp_path / str(n)
        d.mkdir()
        for i in range(n):
            (d / f"r{i:04d}.moeseg").write_bytes(bytes(data))
        paused.clear()
        statuses, _ = SegmentSource(str(d)).read(time.time())
        assert [s.error for s in statuses] == ["torn"] * n
        totals[n] = sum(paused)
    assert totals[400] == totals[10] <= 0.02, totals


def test_a_stage_that_keeps_failing_is_counted_every_window_and_logged_once(caplog):
    """The window loop retries every window: a stage that stays broken is counted each time, its traceback is
    logged once, and the previous exposition stays served."""
    from conftest import parse_exposition

    from moe_monitor.sidecar.config import SidecarConfig
    from moe_monitor.sidecar.wiring import build

    exporter = build(SidecarConfig(segment_dir=os.path.dirname(SEGMENT)), process_metrics=False)
    good = exporter.tick()
    exporter.source.read = lambda now: (_ for _ in ()).throw(OSError("disk gone"))
    with caplog.at_level("ERROR"):
        for _ in range(3):
            assert not exporter.safe_tick()
    assert exporter.latest() is good
    assert exporter.errors["read"] == 3
    assert sum("window stage 'read' failed" in r.getMessage() for r in caplog.records) == 1
    del exporter.source.read  # it works again: the count is exported with the next exposition
    m = parse_exposition(exporter.tick().body.decode())
    assert samples(m, "moe_monitor_window_errors_total")[(("stage", "read"),)] == 3.0


def test_a_failing_stage_reports_like_a_collector_and_the_later_stages_still_run():
    """Each window stage reports its success and duration in the collectors' families; one that raises (here
    the EP-rank attribution) reports 0, is counted in its window_errors row, its figures are missing, and every
    later stage runs on (the window, detection, the exposition)."""
    from conftest import parse_exposition

    from moe_monitor.sidecar.config import SidecarConfig
    from moe_monitor.sidecar.wiring import build

    exporter = build(SidecarConfig(segment_dir=os.path.dirname(SEGMENT)), process_metrics=False)
    exporter.tick(1000.0)
    ep_load = exporter.parts.pipeline.stages[2]
    assert ep_load.name == "ep_load"
    ep_load.run = lambda reading: (_ for _ in ()).throw(RuntimeError("boom"))
    m = parse_exposition(exporter.tick(1005.0).body.decode())
    success = {dict(k)["collector"]: v for k, v in samples(m, "moe_monitor_collector_success").items()}
    assert success["stage:ep_load"] == 0.0, success
    assert all(success[f"stage:{s}"] == 1.0 for s in ("read", "window", "flight", "detect", "breakdown", "render"))
    assert {dict(k)["collector"] for k in samples(m, "moe_monitor_collector_duration_seconds")} == set(success)
    assert samples(m, "moe_monitor_window_errors_total")[(("stage", "window"),)] == 1.0
    assert not samples(m, "moe_ep_rank_routed_tokens_total") and samples(m, "moe_layer_imbalance_ratio")
    assert exporter.window is not None and exporter.window.end == 1005.0


@pytest.mark.slow
def test_a_segment_with_ep_size_0_and_a_placement_keeps_the_flight_recorder_recording(tmp_path):
    """Issue #24 item 6: a segment whose header says ep_size 0 but carries a placement raised in the window stage
    every window, outside the placement handling, so no window reached the flight recorder. Now the placement is
    refused (one warning, a reason in /metrics) and the windows, their routing and the flight record go on."""
    import json
    import urllib.request

    import numpy as np
    from test_sidecar import publish

    from moe_monitor.channel import Ranks

    segments = tmp_path / "seg"
    counts = np.array([[40, 10, 6, 4], [8, 8, 8, 8]])
    writer = publish(segments, Ranks(ep_size=0), counts, placement=[[0, 1, 0, 2, 3, 1], [0, 1, 2, 3, 3, 2]])
    sidecar = serve(tmp_path, segments, ["--captures-api-insecure", "--min-window-assignments", "1"])
    try:
        windows, deadline = [], time.monotonic() + 20
        while len(windows) < 3 and time.monotonic() < deadline:
            counts = counts + 1
            publish(segments, Ranks(ep_size=0), counts, writer=writer,
                    placement=[[0, 1, 0, 2, 3, 1], [0, 1, 2, 3, 3, 2]])
            time.sleep(0.5)
            with urllib.request.urlopen(sidecar.url + "/api/flight", timeout=10) as r:
                windows = json.load(r)["windows"]
        assert len(windows) >= 3, sidecar.log_tail(40)
        assert sum(windows[-1]["counts"][0]) > 0 and windows[-1]["rank_load"] is None
        m = scrape(sidecar.url + "/metrics")
        assert samples(m, "moe_monitor_window_errors_total")[(("stage", "window"),)] == 0.0
        assert samples(m, "moe_monitor_segment_sections_refused") == {
            (("reason", "ep_size"), ("section", "physical_to_logical"), ("segment", "dp0-pp0-tp0")): 1.0}
        assert sidecar.log_tail(400).count("section physical_to_logical refused") == 1, "logged once"
    finally:
        sidecar.stop()
        writer.close()
