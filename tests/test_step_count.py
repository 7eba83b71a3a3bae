"""Every engine step, counted: the step_count extension of a segment (channel/layout.py) and moe_steps_total.

The plugin times a sample of the steps on CUDA, so the step histogram holds the timed steps and step_count every
step. Written by the real SegmentWriter and read back; readers from before the extension (the channel package as
committed before it, loaded from git) still read a segment that has it, and this reader and the sidecar read one
without it (an older plugin, which timed every step: its histogram's steps are its step count); a step_count that
cannot be right is refused alone. Then what a scrape, the detector, the flight record and `top` make of it."""

from __future__ import annotations

import zlib
from pathlib import Path

import numpy as np
import pytest
from conftest import channel_from_git, parse_exposition, samples

from moe_monitor.channel import Ranks, SegmentWriter, Shape, read_segment
from moe_monitor.channel.layout import HEADER_OFFSETS, HEADER_SIZE, EplbHealth
from moe_monitor.detect.signals import signals_of
from moe_monitor.sidecar.aggregate import Totals
from moe_monitor.sidecar.config import SidecarConfig
from moe_monitor.sidecar.windows import Windower
from moe_monitor.sidecar.wiring import build
from moe_monitor.top import core

WITH_EPLB_HEALTH = "6768121"  # the last commit whose channel package had eplb_health and no step_count
BEFORE_EXTENSIONS = "9bd1632"  # the last commit whose channel package had no extensions
INT64_MAX = np.iinfo(np.int64).max
TOKEN_BOUNDS = np.array([8, 512, INT64_MAX])
DURATION_BOUNDS = np.array([0.005, 0.05, np.inf])
SHAPE = Shape(2, 4, len(TOKEN_BOUNDS), len(DURATION_BOUNDS))
COUNTS = np.array([[40, 10, 6, 4], [8, 8, 8, 8]], dtype=np.int64)
RECORD = EplbHealth(flags=2, rearrangements=1, started=1, last_start_unix_ns=10**18, last_end_unix_ns=10**18 + 5,
                    last_duration_s=0.5, duration_s_total=0.5, step_interval=3000, window_size=1000,
                    steps_since=12, engine_steps=912, engine_steps_at_last=900)


def arrays(timed: np.ndarray | None = None, every: np.ndarray | None = None, scale: int = 1) -> dict:
    """A rank's cumulative arrays: `timed` [phase, tokens bucket] steps timed (2 ms each, in the first duration
    bucket), `every` [phase, tokens bucket] every step (default: 16 x the timed ones, the CUDA default)."""
    timed = np.array([[1, 0, 0], [3, 2, 0], [0, 0, 0]], dtype=np.int64) * scale if timed is None else timed
    hist = np.zeros((3, len(TOKEN_BOUNDS), len(DURATION_BOUNDS)), dtype=np.int64)
    hist[:, :, 0] = timed
    return dict(layer_ids=np.array([1, 3], dtype=np.int32), layer_flags=np.array([1, 1], dtype=np.uint8),
                counts=COUNTS * scale, token_bounds=TOKEN_BOUNDS, duration_bounds=DURATION_BOUNDS, step_hist=hist,
                step_seconds=timed * 0.002, step_tokens=timed * 16 * 4,
                step_count=timed * 16 if every is None else every)


def writer(directory, eplb_health: bool = False, ranks: Ranks | None = None) -> SegmentWriter:
    return SegmentWriter(str(directory), "tiny-moe", ranks or Ranks(), SHAPE, top_k=2, eplb_health=eplb_health)


@pytest.fixture(scope="module")
def eplb_era(tmp_path_factory):
    with channel_from_git(tmp_path_factory.mktemp("eplb_era"), WITH_EPLB_HEALTH, "eplb_era_channel") as channel:
        yield channel


@pytest.fixture(scope="module")
def pre_extensions(tmp_path_factory):
    with channel_from_git(tmp_path_factory.mktemp("pre"), BEFORE_EXTENSIONS, "pre_extensions_channel") as channel:
        yield channel


# -- the extension -----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("eplb_health", [False, True])
def test_step_count_round_trips_through_the_real_writer(tmp_path, eplb_health):
    w = writer(tmp_path, eplb_health)
    w.publish(arrays(), eplb=RECORD if eplb_health else None)
    w.publish(arrays(scale=2), eplb=RECORD if eplb_health else None)  # in place, under the seqlock
    snap = read_segment(w.path)
    assert snap.refused == ()
    assert snap.step_count.tolist() == [[32, 0, 0], [96, 64, 0], [0, 0, 0]]
    assert snap.step_hist.sum(axis=2).tolist() == [[2, 0, 0], [6, 4, 0], [0, 0, 0]]
    assert snap.eplb_health == (RECORD if eplb_health else None)
    extensions = (104 if eplb_health else 0) + 3 * 3 * 8
    assert Path(w.path).stat().st_size == HEADER_SIZE + snap.header.payload_size + extensions


def test_this_reader_reads_a_segment_without_it(tmp_path, eplb_era):
    w = eplb_era.SegmentWriter(str(tmp_path), "tiny-moe", eplb_era.Ranks(), eplb_era.Shape(2, 4, 3, 3), top_k=2,
                               eplb_health=True)
    w.publish(arrays(), eplb=eplb_era.layout.EplbHealth(**RECORD.__dict__))
    snap = read_segment(w.path)
    assert snap.step_count is None and snap.refused == () and snap.eplb_health == RECORD
    assert snap.counts.tolist() == COUNTS.tolist()


def test_a_reader_that_knows_eplb_health_but_not_step_count_still_checks_and_reads_eplb_health(tmp_path,
                                                                                               eplb_era):
    w = writer(tmp_path, eplb_health=True)
    w.publish(arrays(), eplb=RECORD)
    snap = eplb_era.read_segment(w.path)
    assert snap.refused == () and snap.counts.tolist() == COUNTS.tolist()
    assert snap.eplb_health.engine_steps == RECORD.engine_steps and snap.eplb_health.last_duration_s == 0.5


def test_a_reader_that_predates_the_extensions_reads_a_segment_that_has_it(tmp_path, pre_extensions):
    w = writer(tmp_path, eplb_health=True)
    w.publish(arrays(), eplb=RECORD)
    snap = pre_extensions.read_segment(w.path)
    assert snap.refused == () and snap.counts.tolist() == COUNTS.tolist()
    assert snap.step_hist.sum(axis=2).tolist() == [[1, 0, 0], [3, 2, 0], [0, 0, 0]]


def test_the_writer_refuses_arrays_without_step_count_and_writes_nothing(tmp_path):
    w = writer(tmp_path)
    a = arrays()
    del a["step_count"]
    with pytest.raises(ValueError, match="step_count: not among the published arrays"):
        w.publish(a)
    assert list(tmp_path.iterdir()) == []
    a["step_count"] = np.zeros((3, 4), dtype=np.int64)  # one token bucket too many
    with pytest.raises(ValueError, match=r"step_count: shape \(3, 4\) != \(3, 3\)"):
        w.publish(a)
    assert list(tmp_path.iterdir()) == []


def rewrite(path: str, size: int | None = None, crc: int | None = None, cut: int = 0, flip: int | None = None,
            count: np.ndarray | None = None) -> None:
    """Change a published segment the way a hostile or broken writer could: the announced size, the checksum, the
    file's end, a byte of the array (from its end), or the array itself (with a matching checksum)."""
    buf = bytearray(Path(path).read_bytes())
    n = 3 * 3 * 8
    if count is not None:
        data = np.ascontiguousarray(count, dtype="<i8").tobytes()
        buf[len(buf) - n:] = data
        crc = zlib.crc32(data)
    if flip is not None:
        buf[len(buf) - flip] ^= 0x01
    for name, value in (("step_count_size", size), ("step_count_crc32", crc)):
        if value is not None:
            buf[HEADER_OFFSETS[name]:HEADER_OFFSETS[name] + 4] = value.to_bytes(4, "little")
    Path(path).write_bytes(bytes(buf[:len(buf) - cut]))


HOSTILE = {  # name: (rewrite kwargs, reason)
    "size_of_one_count": ({"size": 8}, "shape"),
    "size_of_one_more_count": ({"size": 3 * 3 * 8 + 8}, "shape"),
    "size_of_4_GiB": ({"size": (1 << 32) - 1}, "shape"),
    "file_ends_inside_it": ({"cut": 10}, "shape"),
    "checksum": ({"crc": 12345}, "checksum"),
    "a_flipped_byte": ({"flip": 20}, "checksum"),
    "a_negative_count": ({"count": [[16, 0, 0], [48, 32, 0], [0, -1, 0]]}, "value"),
    "a_count_below_the_histogram": ({"count": [[16, 0, 0], [2, 32, 0], [0, 0, 0]]}, "value"),
}


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_a_step_count_that_cannot_be_right_is_refused_alone(tmp_path, case):
    changes, reason = HOSTILE[case]
    w = writer(tmp_path, eplb_health=True)
    w.publish(arrays(), eplb=RECORD)
    rewrite(w.path, **changes)
    snap = read_segment(w.path)
    assert snap.step_count is None
    assert [(r.section, r.reason) for r in snap.refused] == [("step_count", reason)], snap.refused
    assert all(r.message for r in snap.refused)
    assert snap.counts.tolist() == COUNTS.tolist() and snap.eplb_health == RECORD
    assert snap.step_hist.sum(axis=2).tolist() == [[1, 0, 0], [3, 2, 0], [0, 0, 0]]


def test_a_count_equal_to_the_histogram_is_right(tmp_path):
    """Every step timed (the CPU default): the counts equal the histogram's."""
    w = writer(tmp_path)
    w.publish(arrays(every=arrays()["step_hist"].sum(axis=2)))
    snap = read_segment(w.path)
    assert snap.refused == () and snap.step_count.tolist() == [[1, 0, 0], [3, 2, 0], [0, 0, 0]]


# -- the sidecar -------------------------------------------------------------------------------------------------

class Sidecar:
    def __init__(self, directory):
        self.exporter = build(SidecarConfig(segment_dir=str(directory)))
        self.metrics: dict = {}

    def tick(self) -> Sidecar:
        self.metrics = parse_exposition(self.exporter.tick().body.decode())
        return self

    def by_cell(self, name: str) -> dict:
        return {(dict(k)["phase"], dict(k)["tokens_le"]): v for k, v in samples(self.metrics, name).items()}

    def refused(self) -> dict:
        return {dict(k)["section"]: dict(k)["reason"]
                for k, v in samples(self.metrics, "moe_monitor_segment_sections_refused").items() if v}


def test_moe_steps_total_counts_every_step_and_the_histogram_the_timed_ones(tmp_path):
    w = writer(tmp_path)
    w.publish(arrays())
    s = Sidecar(tmp_path).tick()
    assert s.by_cell("moe_steps_total") == {("prefill", "8"): 16, ("decode", "8"): 48, ("decode", "512"): 32}
    assert s.by_cell("moe_step_duration_seconds_count") == {("prefill", "8"): 1, ("decode", "8"): 3,
                                                            ("decode", "512"): 2}
    assert s.metrics[("moe_step_tokens_total", (("phase", "decode"),))] == 5 * 64


def test_a_segment_without_step_count_counts_its_histograms_steps(tmp_path, eplb_era):
    """An older plugin timed every step: its histogram's steps are its step count."""
    w = eplb_era.SegmentWriter(str(tmp_path), "tiny-moe", eplb_era.Ranks(), eplb_era.Shape(2, 4, 3, 3), top_k=2)
    w.publish(arrays())
    s = Sidecar(tmp_path).tick()
    assert s.by_cell("moe_steps_total") == {("prefill", "8"): 1, ("decode", "8"): 3, ("decode", "512"): 2}
    assert s.refused() == {}


def test_dp_ranks_step_counts_add_up_and_one_without_step_count_counts_its_histogram(tmp_path, eplb_era):
    writer(tmp_path, ranks=Ranks(dp_rank=0, dp_size=2)).publish(arrays())
    old = eplb_era.SegmentWriter(str(tmp_path), "tiny-moe", eplb_era.Ranks(dp_rank=1, dp_size=2),
                                 eplb_era.Shape(2, 4, 3, 3), top_k=2)
    old.publish(arrays())
    s = Sidecar(tmp_path).tick()
    assert s.by_cell("moe_steps_total") == {("prefill", "8"): 16 + 1, ("decode", "8"): 48 + 3,
                                            ("decode", "512"): 32 + 2}


def test_moe_steps_total_never_goes_down_while_the_writer_lives(tmp_path):
    w = writer(tmp_path)
    s = Sidecar(tmp_path)
    w.publish(arrays(scale=2))
    assert s.tick().by_cell("moe_steps_total")[("decode", "8")] == 96
    fewer = arrays(scale=2)["step_count"]
    fewer[1, 0] -= 1
    w.publish(arrays(scale=2, every=fewer))  # a buggy writer: one decode step less
    assert s.tick().by_cell("moe_steps_total")[("decode", "8")] == 96  # the last one used
    assert s.refused() == {"step_count": "decreased"}
    w.publish(arrays(scale=3, every=np.zeros((3, 3), dtype=np.int64)))  # refused (below the histogram)
    assert s.tick().by_cell("moe_steps_total")[("decode", "8")] == 96  # above the 9 timed steps
    assert s.refused() == {"step_count": "value"}
    w.publish(arrays(scale=3))  # right again
    assert s.tick().by_cell("moe_steps_total")[("decode", "8")] == 144
    assert s.refused() == {}


def test_a_restarted_writer_starts_its_count_again_and_the_sidecar_carries_the_old_one(tmp_path):
    writer(tmp_path).publish(arrays(scale=2))
    s = Sidecar(tmp_path)
    assert s.tick().by_cell("moe_steps_total")[("decode", "8")] == 96
    writer(tmp_path).publish(arrays())  # a new process (generation): 48 steps so far
    assert s.tick().by_cell("moe_steps_total")[("decode", "8")] == 96 + 48
    assert s.refused() == {}


# -- windows, the detector, top ---------------------------------------------------------------------------------

def totals(scale: int) -> Totals:
    a = arrays(scale=scale)
    return Totals((1, 3), a["counts"], a["step_hist"], a["step_seconds"], a["step_tokens"], a["step_count"],
                  TOKEN_BOUNDS, DURATION_BOUNDS)


def test_a_window_counts_every_step_and_the_detectors_mean_is_the_timed_steps():
    windower = Windower(5.0)
    assert windower.close(100.0, totals(1)) is None  # the baseline
    w = windower.close(105.0, totals(3))
    assert w.step_count.tolist() == [[32, 0, 0], [96, 64, 0], [0, 0, 0]]
    assert w.timed_steps.tolist() == [[2, 0, 0], [6, 4, 0], [0, 0, 0]]
    means = signals_of(w, None).step_means
    assert means[("decode", "8")] == (pytest.approx(0.002), 6)  # timed seconds / timed steps, and their number


def steps_exposition(every: int, timed: int, seconds: float, end: float) -> str:
    return "\n".join([
        "# TYPE moe_window_end_timestamp_seconds gauge", f"moe_window_end_timestamp_seconds {end}",
        "# TYPE moe_step_duration_seconds histogram",
        f'moe_step_duration_seconds_bucket{{phase="decode",tokens_le="8",le="0.005"}} {timed}',
        f'moe_step_duration_seconds_bucket{{phase="decode",tokens_le="8",le="+Inf"}} {timed}',
        f'moe_step_duration_seconds_sum{{phase="decode",tokens_le="8"}} {seconds}',
        f'moe_step_duration_seconds_count{{phase="decode",tokens_le="8"}} {timed}',
        "# TYPE moe_steps_total counter",
        f'moe_steps_total{{phase="decode",tokens_le="8"}} {every}',
        f'moe_steps_total{{phase="mixed",tokens_le="512"}} {every // 10}', ""])


def test_top_shows_every_step_and_the_timed_steps_mean():
    h = core.History()
    h.add(core.parse_metrics(steps_exposition(160, 10, 0.03, end=100.0), 1.0))
    h.add(core.parse_metrics(steps_exposition(480, 30, 0.07, end=105.0), 2.0))
    rows = {(r.phase, r.tokens_le): r for r in core.steps_view(h).rows}
    decode = rows[("decode", None)]
    assert (decode.steps, decode.per_second) == (320, 64.0)  # every step, from moe_steps_total
    assert decode.mean_s == pytest.approx(0.04 / 20)  # over the 20 timed steps
    mixed = rows[("mixed", None)]  # steps, none of them timed: counted, no time
    assert (mixed.steps, mixed.mean_s, mixed.quantiles[0]) == (32, None, (None, False))
