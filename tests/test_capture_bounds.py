"""Issue #24 item 7 (captures and the catalog): unbounded work. A metadata.json of any size was parsed whole at every
listing, every /api/captures and every window tick read every capture's metadata (twice per tick), and a capture
held every rank's parsed trace at once, with no cap on its files. Real components: a Catalog on a tmp dir, the
sidecar as `serve` wires it (wiring.build), the real Capturer against a stand-in for vLLM's profiler endpoints,
the real trace fixtures."""

from __future__ import annotations

import builtins
import json
import logging
import os
import shutil
import sys
import time

import pytest
from conftest import parse_exposition, samples
from test_capture import TRACE
from test_capture_accounting import Vllm, make

from moe_monitor.capture.catalog import Catalog
from moe_monitor.sidecar.config import SidecarConfig
from moe_monitor.sidecar.exporter import Exporter
from moe_monitor.sidecar.wiring import build

HERE = os.path.dirname(os.path.abspath(__file__))
TRACES = os.path.join(HERE, "fixtures", "traces")
sys.path.insert(0, os.path.join(HERE, "..", "benchmarks"))


def plant(root, capture_id: str, pad: int = 0, created: float | None = None) -> None:
    """A capture directory as Catalog.store writes it; `pad` more bytes of window statistics in its metadata."""
    meta = {"created": time.time() if created is None else created, "reason": "manual", "outcome": "ok",
            "evidence": {}, "id": capture_id, "total_bytes": 10,
            "files": [{"name": "dp0_pp0_tp0_dcp0_ep0_rank0.1.pt.trace.json.gz", "bytes": 10}],
            "window": {"imbalance_ratio": [1.5] * (pad // 5)}}
    os.makedirs(os.path.join(root, capture_id))
    with open(os.path.join(root, capture_id, "metadata.json"), "w") as f:
        json.dump(meta, f)


def capture_id(i: int) -> str:
    return f"20261123T{i // 3600:02d}{i // 60 % 60:02d}{i % 60:02d}Z-manual-{i:06x}"


@pytest.fixture
def metadata_reads(monkeypatch):
    """Every open of a metadata.json, however it is opened (open() before, os.open() now)."""
    reads = []
    real_open, real_os_open = builtins.open, os.open

    def spy_open(file, *args, **kwargs):
        if isinstance(file, str) and file.endswith("metadata.json"):
            reads.append(file)
        return real_open(file, *args, **kwargs)

    def spy_os_open(path, *args, **kwargs):
        if isinstance(path, str) and path.endswith("metadata.json"):
            reads.append(path)
        return real_os_open(path, *args, **kwargs)
    monkeypatch.setattr(builtins, "open", spy_open)
    monkeypatch.setattr(os, "open", spy_os_open)
    return reads


def exporter_over(tmp_path, store: str) -> Exporter:
    """The sidecar as `serve` wires it, captures on over `store` (retention left room for every capture there)."""
    (tmp_path / "seg").mkdir()
    (tmp_path / "profiles").mkdir()
    return build(SidecarConfig(segment_dir=str(tmp_path / "seg"), profile_dir=str(tmp_path / "profiles"),
                               vllm_url="http://127.0.0.1:9", capture_dir=store, max_captures=100_000),
                 process_metrics=False)


def exported(exporter: Exporter, name: str) -> float:
    return samples(parse_exposition(exporter.latest().body.decode()), name)[()]


def test_a_metadata_json_over_the_cap_is_unreadable_with_its_reason(tmp_path, caplog):
    """A 2 MiB metadata.json (valid JSON, its own id: the attack at a test's size; 300 MiB took 5 s per listing)
    was parsed whole by every listing and listed. Now it is read up to 1 MiB and the capture is damaged: not
    listed, not served, counted, its reason kept and logged once; the good capture beside it is listed."""
    store = Catalog(str(tmp_path / "store"))
    trace = tmp_path / "dp0_pp0_tp0_dcp0_ep0_rank0.1.pt.trace.json.gz"
    shutil.copy(TRACE, trace)
    good = "20261123T120000Z-manual-aaaaaa"
    store.store(good, [str(trace)], {"created": time.time(), "reason": "manual", "outcome": "ok", "evidence": {}})
    big = "20261123T130000Z-manual-bbbbbb"
    plant(store.root, big, pad=2 << 20)
    size = os.path.getsize(os.path.join(store.root, big, "metadata.json"))
    assert size > 2 << 20 and json.load(open(os.path.join(store.root, big, "metadata.json")))["id"] == big
    exporter = exporter_over(tmp_path, store.root)
    exporter.tick(time.time())
    exporter.tick(time.time())
    assert [m["id"] for m in exporter.catalog.list()] == [good]
    assert exporter.catalog.get(big) is None and exporter.catalog.file_path(big, "metadata.json") is None
    reason = f"metadata.json is {size:,} bytes, over the 1,048,576-byte limit"
    assert exporter.catalog.damaged == {big: reason}
    assert exported(exporter, "moe_capture_catalog_damaged") == 1.0
    assert exported(exporter, "moe_capture_catalog_captures") == 1.0
    logged = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING and big in r.getMessage()]
    assert logged == [f"capture {big}: unusable metadata ({reason}); not listed, kept for inspection"]


def test_window_ticks_and_listings_do_not_reread_the_catalog(tmp_path, metadata_reads):
    """Every window tick listed the whole catalog twice (the captures collector and the newest breakdown), and
    every /api/captures once: 20,000 captures took 4.9 s per window build. Now the catalog keeps an index: a tick
    reads no metadata at all, a listing returns the newest 1,000 (count: all of them) and reads again only what
    changed; its own stores and deletions by others are seen."""
    root = tmp_path / "store"
    root.mkdir()
    n = 1_050
    for i in range(n):
        plant(str(root), capture_id(i), created=time.time() - n + i)  # within retention's age
    exporter = exporter_over(tmp_path, str(root))
    catalog = exporter.catalog
    metadata_reads.clear()
    exporter.tick(time.time())
    exporter.tick(time.time())
    assert metadata_reads == [], f"{len(metadata_reads)} metadata.json reads in two window ticks"
    assert exported(exporter, "moe_capture_catalog_captures") == n
    listed = catalog.list()
    assert [m["id"] for m in listed] == [capture_id(i) for i in range(n - 1, n - 1001, -1)]  # newest 1,000
    assert catalog.count == n and catalog.total_bytes == 10 * n
    metadata_reads.clear()
    assert catalog.list() == listed
    assert metadata_reads == [], "a second listing reads nothing"
    trace = tmp_path / "dp0_pp0_tp0_dcp0_ep0_rank0.1.pt.trace.json.gz"
    shutil.copy(TRACE, trace)
    newest = "20261124T000000Z-manual-cccccc"
    catalog.store(newest, [str(trace)], {"created": time.time(), "reason": "manual"})
    shutil.rmtree(root / capture_id(n - 1))  # removed by someone else
    metadata_reads.clear()
    assert [m["id"] for m in catalog.list(limit=3)] == [newest, capture_id(n - 2), capture_id(n - 3)]
    assert len(metadata_reads) <= 1, metadata_reads  # at most the new capture's
    exporter.tick(time.time())
    assert exported(exporter, "moe_capture_catalog_captures") == n


def test_a_capture_takes_at_most_max_files_rank_files(tmp_path, caplog):
    """No cap on files per capture: every rank file found was analysed and stored. Now a capture takes
    `max_files` (64 by default); the rest are left out, said in its metadata and the log, and removed from the
    profile directory with the capture's other leftovers."""
    capture = "20261123T120000Z-manual-abcdef"
    with Vllm(str(tmp_path / "profiles"), mode="idle") as vllm:  # the five ranks' files are there already
        for rank in range(5):
            name = f"{capture}_dp0_pp0_tp0_dcp0_ep{rank}_rank{rank}.1.pt.trace.json.gz"
            shutil.copy(TRACE, tmp_path / "profiles" / name)
        c = make(tmp_path, vllm.url, expected_ranks=lambda: 5, max_files=3)
        assert c.run(capture, "manual", {}, {}) == "partial"  # 3 of the 5 ranks analysed and stored
    meta = c.catalog.get(capture)
    assert meta["files_left_out"] == 2 and meta["max_files"] == 3
    assert len([f for f in meta["files"] if f["name"].endswith(".pt.trace.json.gz")]) == 3
    assert len(json.load(open(c.catalog.file_path(meta["id"], "breakdown.json")))["ranks"]) == 3
    assert os.listdir(tmp_path / "profiles") == []
    assert any("5 rank files, more than the 3 a capture takes: 2 left out" in r.getMessage() for r in caplog.records)


def test_the_capture_breakdown_is_the_pinned_one_on_real_two_rank_traces(tmp_path):
    """The capture's analysis reads and analyses one rank at a time, keeps MoE block sums instead of the blocks
    and each rank's collectives as a compact table: on every two-rank fixture its breakdown is the pinned one
    (tests/fixtures/breakdown_two_ranks_pinned.json), to the bit. Written by the code before streaming, which gave
    the same breakdown; re-pinned when the classifier became structure-first (issue #25: on these fixtures gate and
    align/permute trade the routing's tail, copies in MoE blocks become memory: the commit says by how much)."""
    with open(os.path.join(HERE, "fixtures", "breakdown_two_ranks_pinned.json")) as f:
        before = json.load(f)
    c = make(tmp_path, "http://127.0.0.1:9")
    for config, expected in before.items():
        result = c._analyse(config, [os.path.join(TRACES, name) for name in expected["files"]]).to_json()
        for rank in result["ranks"]:
            rank["path"] = os.path.basename(rank["path"])
        result.pop("collective_wait")  # the per-kind wait table (tests/test_straggler_all.py) came after that code
        assert json.loads(json.dumps(result)) == expected["breakdown"], config
    assert before["tp2ep"]["breakdown"]["ep_wait"]["collectives"] == 24  # the pairing ran


@pytest.mark.slow
def test_analysing_four_ranks_costs_the_memory_of_about_one(tmp_path):
    """A capture held every rank's parsed trace at once (1/2/4/8 files of 3.9M events: 1.3/2.4/3.6/5.9 GB). Now
    it reads and analyses one rank at a time: four ranks of 150k events each (built from the two real tp2ep ranks
    by repeating their events) peak under twice what one rank does (measured: 1.2-1.3x; before: 2.9x)."""
    from capture_bounds import ROOT, child, rank_traces

    paths = rank_traces(str(tmp_path), 4, 150_000)
    one, four = (child("analyse", ranks, ROOT) for ranks in (paths[:1], paths))  # a fresh interpreter each
    assert one["ok"] and four["ok"], (one, four)  # analysed, and the four ranks' collectives paired
    one_mb, four_mb = one["peak_mb"] - one["base_mb"], four["peak_mb"] - four["base_mb"]
    assert one_mb > 30, one  # the events of one rank dominate the measurement
    assert four_mb < 2 * one_mb, (one, four)
