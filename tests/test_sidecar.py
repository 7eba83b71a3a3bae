"""Sidecar behaviour over real segment files: what /metrics shows for dedupe, DP sums, restarts, bad files."""

from __future__ import annotations

import os
import time

import numpy as np
import pytest
from conftest import parse_exposition

from moe_monitor.channel import LAYER_HOOKED, LAYER_UNOBSERVABLE, Ranks, SegmentWriter, Shape
from moe_monitor.plugin.steps import StepStats
from moe_monitor.sidecar.config import SidecarConfig
from moe_monitor.sidecar.wiring import build

L, E = 2, 4


def publish(directory, ranks: Ranks, counts, layer_ids=(0, 1), flags=None, steps: StepStats | None = None,
            writer: SegmentWriter | None = None, placement=None, rank_load=None) -> SegmentWriter:
    steps = steps or StepStats()
    slots = np.asarray(placement).shape[1] if placement is not None else 0
    shape = Shape(len(layer_ids), counts.shape[1], len(steps.token_bounds), len(steps.duration_bounds),
                  num_physical=slots, num_load_ranks=np.asarray(rank_load).shape[1] if rank_load is not None else 0)
    writer = writer or SegmentWriter(str(directory), "tiny-moe", ranks, shape, top_k=2)
    arrays = steps.snapshot()
    arrays.update(counts=np.asarray(counts, dtype=np.int64), layer_ids=np.asarray(layer_ids, dtype=np.int32),
                  layer_flags=np.asarray(flags if flags is not None else [LAYER_HOOKED] * len(layer_ids)))
    if placement is not None:
        arrays["physical_to_logical"] = np.asarray(placement, dtype=np.int32)
    if rank_load is not None:
        arrays["ep_rank_load"] = np.asarray(rank_load, dtype=np.float64)
    writer.publish(arrays)
    return writer


class Scraper:
    """Each call rebuilds the exposition (one window tick) and looks a sample up, like a scrape would."""

    def __init__(self, exporter):
        self.exporter = exporter
        self.body = b""

    def __call__(self, name, **labels):
        self.body = self.exporter.tick().body
        return parse_exposition(self.body.decode()).get((name, tuple(sorted((k, str(v)) for k, v in labels.items()))))


@pytest.fixture
def scrape(tmp_path):
    return Scraper(build(SidecarConfig(segment_dir=str(tmp_path), expert_series="all")))


def tokens(scrape, layer, expert):
    return scrape("moe_expert_routed_tokens_total", layer=layer, expert=expert)


def test_empty_directory_exports_health_only(scrape):
    assert scrape("moe_monitor_segments", state="fresh") == 0
    assert tokens(scrape, 0, 0) is None


def test_counts_per_layer_and_expert(tmp_path, scrape):
    counts = np.arange(L * E).reshape(L, E)
    publish(tmp_path, Ranks(), counts, layer_ids=(3, 7))
    assert tokens(scrape, 3, 0) == 0
    assert tokens(scrape, 7, 3) == 7
    assert scrape("moe_monitor_segments", state="fresh") == 1
    assert scrape("moe_monitor_segment_up", segment="dp0-pp0-tp0") == 1
    assert scrape("moe_model_info", model="tiny-moe", moe_layers="2", experts=str(E), top_k="2") == 1


def test_tp_duplicates_counted_once_dp_ranks_summed(tmp_path, scrape):
    same = np.full((L, E), 5)
    publish(tmp_path, Ranks(tp_rank=0, tp_size=2, dp_rank=0, dp_size=2), same)
    publish(tmp_path, Ranks(tp_rank=1, tp_size=2, dp_rank=0, dp_size=2), same)
    publish(tmp_path, Ranks(tp_rank=0, tp_size=2, dp_rank=1, dp_size=2), np.full((L, E), 2))
    publish(tmp_path, Ranks(tp_rank=1, tp_size=2, dp_rank=1, dp_size=2), np.full((L, E), 2))
    assert tokens(scrape, 1, 2) == 7  # 5 from DP rank 0 + 2 from DP rank 1, each TP pair counted once
    assert scrape("moe_monitor_rank_info", segment="dp0-pp0-tp1", model="tiny-moe", dp_rank=0, pp_rank=0,
                  tp_rank=1, ep_rank=0, counted="false") == 1


def test_ep_rank_load_follows_the_placement_the_ranks_publish(tmp_path, scrape):
    """vLLM's EPLB: 4 logical experts in 6 physical slots over 2 EP ranks (3 each). The segments carry the live
    placement; after a rearrangement, new assignments go by the new placement and earlier ones keep theirs (the
    counter never re-attributes history, so it never decreases)."""
    counts = np.array([[40, 10, 6, 4], [8, 8, 8, 8]])
    # layer 0: rank 0 holds 0, 1, 0 (expert 0 twice: its 40 split 20/20), rank 1 holds 2, 3, 1
    # layer 1: rank 0 holds 0, 1, 2; rank 1 holds 3, 3, 2
    before = [[0, 1, 0, 2, 3, 1], [0, 1, 2, 3, 3, 2]]
    w0 = publish(tmp_path, Ranks(dp_rank=0, dp_size=2, ep_rank=0, ep_size=2), counts, placement=before)
    w1 = publish(tmp_path, Ranks(dp_rank=1, dp_size=2, ep_rank=1, ep_size=2), counts, placement=before)
    # both DP ranks routed `counts`: 2x in total
    assert scrape("moe_ep_rank_routed_tokens_total", layer=0, ep_rank=0) == 2 * (40 + 5)
    assert scrape("moe_ep_rank_routed_tokens_total", layer=0, ep_rank=1) == 2 * (6 + 4 + 5)
    assert scrape("moe_ep_rank_routed_tokens_total", layer=1, ep_rank=1) == 2 * (8 + 4)
    after = [[2, 1, 3, 0, 0, 0], [0, 1, 2, 3, 3, 2]]  # expert 0 now only on rank 1, three times
    more = counts + np.array([[30, 2, 2, 2], [0, 0, 0, 0]])
    for w, rank in ((w0, 0), (w1, 1)):
        publish(tmp_path, Ranks(dp_rank=rank, dp_size=2, ep_rank=rank, ep_size=2), more, writer=w, placement=after)
    assert scrape("moe_ep_rank_routed_tokens_total", layer=0, ep_rank=0) == 2 * (40 + 5) + 2 * (2 + 2 + 2)
    assert scrape("moe_ep_rank_routed_tokens_total", layer=0, ep_rank=1) == 2 * (6 + 4 + 5) + 2 * 30
    assert scrape("moe_ep_rank_routed_tokens_total", layer=1, ep_rank=1) == 2 * (8 + 4)


def test_the_ep_rank_load_the_plugin_attributed_is_exported_as_is(tmp_path, scrape):
    """With EPLB the plugin attributes each placement's tokens itself: the sidecar sums the ranks' figures
    (DP ranks: their own tokens) instead of splitting counts under the placement it sees now."""
    counts, placement = np.array([[40, 10, 6, 4], [8, 8, 8, 8]]), [[0, 1, 0, 2, 3, 1], [0, 1, 2, 3, 3, 2]]
    w0 = publish(tmp_path, Ranks(dp_rank=0, dp_size=2, ep_rank=0, ep_size=2), counts, placement=placement,
                 rank_load=[[31, 29], [20, 12]])
    publish(tmp_path, Ranks(dp_rank=1, dp_size=2, ep_rank=1, ep_size=2), counts, placement=placement,
            rank_load=[[45, 15], [16, 16]])
    assert scrape("moe_ep_rank_routed_tokens_total", layer=0, ep_rank=0) == 31 + 45  # not 2 * 45 (the split)
    assert scrape("moe_ep_rank_routed_tokens_total", layer=1, ep_rank=1) == 12 + 16
    publish(tmp_path, Ranks(dp_rank=0, dp_size=2, ep_rank=0, ep_size=2), counts + 10, writer=w0,
            placement=placement, rank_load=[[71, 29], [40, 32]])
    assert scrape("moe_ep_rank_routed_tokens_total", layer=0, ep_rank=0) == 71 + 45


def test_a_published_placement_that_does_not_fit_drops_ep_metrics_not_the_scrape(tmp_path, scrape):
    counts = np.array([[4, 3, 2, 1], [1, 1, 1, 1]])
    publish(tmp_path, Ranks(ep_size=2), counts, placement=[[0, 1, 2, 3, 9, 0], [0, 1, 2, 3, 0, 1]])  # expert 9?
    assert scrape("moe_ep_rank_routed_tokens_total", layer=0, ep_rank=0) is None
    assert tokens(scrape, 0, 0) == 4  # everything else is still exported


def test_pp_stages_hold_disjoint_layers(tmp_path, scrape):
    publish(tmp_path, Ranks(pp_rank=0, pp_size=2), np.full((1, E), 1), layer_ids=(0,))
    publish(tmp_path, Ranks(pp_rank=1, pp_size=2), np.full((1, E), 9), layer_ids=(1,))
    assert tokens(scrape, 0, 0) == 1 and tokens(scrape, 1, 0) == 9


def test_restart_carries_counts_so_counters_never_decrease(tmp_path, scrape):
    publish(tmp_path, Ranks(), np.full((L, E), 10))
    assert tokens(scrape, 0, 0) == 10
    publish(tmp_path, Ranks(), np.full((L, E), 3))  # a new process: new generation, counts from zero
    assert tokens(scrape, 0, 0) == 13
    assert scrape("moe_monitor_rank_restarts_total") == 1


def test_removed_segment_keeps_its_counts(tmp_path, scrape):
    w = publish(tmp_path, Ranks(), np.full((L, E), 4))
    assert tokens(scrape, 0, 1) == 4
    os.unlink(w.path)
    assert tokens(scrape, 0, 1) == 4
    assert scrape("moe_monitor_segments", state="fresh") == 0


def test_unobservable_layers_reported(tmp_path, scrape):
    publish(tmp_path, Ranks(), np.zeros((L, E)), flags=[LAYER_HOOKED, LAYER_UNOBSERVABLE])
    assert scrape("moe_layer_observable", layer=0) == 1
    assert scrape("moe_layer_observable", layer=1) == 0
    assert scrape("moe_monitor_unobservable_layers") == 1


def test_step_histogram_by_phase_and_tokens(tmp_path, scrape):
    steps = StepStats()
    steps.record_step("decode", 4, 0.003)
    steps.record_step("decode", 4, 0.020)
    steps.record_step("prefill", 300, 0.2)
    publish(tmp_path, Ranks(), np.zeros((L, E)), steps=steps)
    assert scrape("moe_step_duration_seconds_count", phase="decode", tokens_le=8) == 2
    assert scrape("moe_step_duration_seconds_bucket", phase="decode", tokens_le=8, le="0.005") == 1
    assert scrape("moe_step_duration_seconds_sum", phase="decode", tokens_le=8) == pytest.approx(0.023)
    assert scrape("moe_step_duration_seconds_count", phase="prefill", tokens_le=512) == 1
    assert scrape("moe_step_tokens_total", phase="decode") == 8
    assert scrape("moe_step_tokens_total", phase="prefill") == 300


@pytest.mark.parametrize("content, kind", [
    (b"", "truncated"),
    (b"\x89PNG\r\n\x1a\n" + b"\x00" * 600, "magic"),
    (b"MOEMSEG\x00" + (99).to_bytes(4, "little") + b"\x00" * 600, "version"),
])
def test_bad_files_counted_never_fail_the_scrape(tmp_path, scrape, content, kind):
    publish(tmp_path, Ranks(), np.full((L, E), 1))
    (tmp_path / "dp1-pp0-tp0.moeseg").write_bytes(content)
    assert tokens(scrape, 0, 0) == 1  # the good rank is still exported
    first = scrape("moe_monitor_segment_read_errors_total", kind=kind)  # one failed read per scrape
    assert scrape("moe_monitor_segment_read_errors_total", kind=kind) == first + 1 >= 2
    assert scrape("moe_monitor_segment_up", segment="dp1-pp0-tp0") == 0
    assert scrape("moe_monitor_segments", state="unreadable") == 1
    assert b"moe_expert_routed_tokens_total" in scrape.body


def test_stale_segment(tmp_path):
    now = [time.time()]
    scrape = Scraper(build(SidecarConfig(segment_dir=str(tmp_path), stale_after_s=5), clock=lambda: now[0]))
    publish(tmp_path, Ranks(), np.zeros((L, E)))
    assert scrape("moe_monitor_segment_up", segment="dp0-pp0-tp0") == 1
    now[0] += 60
    assert scrape("moe_monitor_segment_up", segment="dp0-pp0-tp0") == 0
    assert scrape("moe_monitor_segments", state="stale") == 1
    assert scrape("moe_monitor_snapshot_age_seconds", segment="dp0-pp0-tp0") >= 59


def test_a_published_ep_rank_load_that_is_not_finite_is_not_exported(tmp_path, scrape, caplog):
    counts, placement = np.array([[40, 10, 6, 4], [8, 8, 8, 8]]), [[0, 1, 0, 2, 3, 1], [0, 1, 2, 3, 3, 2]]
    publish(tmp_path, Ranks(ep_size=2), counts, placement=placement, rank_load=[[np.nan, 1], [-5, 2]])
    assert scrape("moe_ep_rank_routed_tokens_total", layer=0, ep_rank=0) == 40 + 5  # split by the sidecar instead
    assert "published EP-rank load is negative or not finite" in caplog.text


def test_the_captures_collector_reads_only_the_frozen_reading():
    """Collectors see plain summaries, never the capturer or the catalog: a hand-built Reading is enough."""
    from moe_monitor.sidecar.collectors import captures
    from moe_monitor.sidecar.exposition import render
    from moe_monitor.sidecar.reading import CapturesView, Reading

    view = CapturesView(outcomes=((("imbalance", "ok"), 2), (("manual", "skipped_busy"), 1)), busy=True,
                        profiler_enabled=True, last_duration_s=4.5, last_end=1000.0, catalog_captures=2,
                        catalog_bytes=1 << 20, catalog_damaged=1)
    reading = Reading(1001.0, SidecarConfig(segment_dir="/nonexistent"), (), None, {}, 0, captures=view)
    values = parse_exposition(render(captures.collect(reading)).decode())
    assert values[("moe_captures_total", (("outcome", "ok"), ("reason", "imbalance")))] == 2
    assert values[("moe_capture_in_progress", ())] == 1 and values[("moe_capture_catalog_bytes", ())] == 1 << 20
    assert values[("moe_capture_catalog_damaged", ())] == 1 and values[("moe_capture_last_duration_seconds", ())] == 4.5
