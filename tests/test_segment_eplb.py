"""The eplb_health extension of a segment (channel/layout.py): written by the real SegmentWriter and read back; a
version-2 reader that predates it (the channel package as committed before it, loaded from git) still reads a
segment that has it, and this reader reads a segment without it; a record that cannot be right is refused alone,
with its reason, and the rest of the segment is read."""

from __future__ import annotations

import math
import zlib
from pathlib import Path

import numpy as np
import pytest
from conftest import channel_from_git

from moe_monitor.channel import Ranks, SegmentWriter, Shape, read_segment
from moe_monitor.channel.layout import EPLB_HEALTH, HEADER_OFFSETS, HEADER_SIZE, EplbHealth
from moe_monitor.plugin.steps import StepStats

BEFORE_EXTENSIONS = "9bd1632"  # the last commit whose channel package had no extensions
COUNTS = np.array([[40, 10, 6, 4], [8, 8, 8, 8]], dtype=np.int64)
PLACEMENT = np.array([[0, 1, 0, 2, 3, 1], [0, 1, 2, 3, 3, 2]], dtype=np.int32)
RECORD = EplbHealth(flags=2, rearrangements=3, layer_commits=0, started=3, last_start_unix_ns=1_700_000_000 * 10**9,
                    last_end_unix_ns=1_700_000_001 * 10**9, last_duration_s=0.9, duration_s_total=2.7,
                    step_interval=3000, window_size=1000, steps_since=120, engine_steps=9120,
                    engine_steps_at_last=9000)


def arrays(steps: StepStats | None = None) -> dict:
    a = (steps or StepStats()).snapshot()
    a.update(counts=COUNTS, layer_ids=np.array([0, 1], dtype=np.int32), layer_flags=np.array([1, 1], dtype=np.uint8),
             physical_to_logical=PLACEMENT, ep_rank_load=np.array([[31.0, 29.0], [20.0, 12.0]]))
    return a


def writer(directory, eplb_health: bool = True) -> SegmentWriter:
    st = StepStats()
    shape = Shape(2, 4, len(st.token_bounds), len(st.duration_bounds), num_physical=6, num_load_ranks=2)
    return SegmentWriter(str(directory), "tiny-moe", Ranks(ep_size=2), shape, top_k=2, eplb_health=eplb_health)


@pytest.fixture(scope="module")
def old_channel(tmp_path_factory):
    """The channel package as it was before the extension, importable as `old_channel`."""
    with channel_from_git(tmp_path_factory.mktemp("old"), BEFORE_EXTENSIONS, "old_channel") as channel:
        yield channel


def test_the_record_round_trips_through_the_real_writer(tmp_path):
    w = writer(tmp_path)
    w.publish(arrays(), eplb=RECORD)
    w.publish(arrays(), eplb=RECORD)  # in place, under the seqlock
    snap = read_segment(w.path)
    assert snap.eplb_health == RECORD and snap.refused == ()
    assert snap.counts.tolist() == COUNTS.tolist() and snap.physical_to_logical.tolist() == PLACEMENT.tolist()
    assert Path(w.path).stat().st_size == HEADER_SIZE + snap.header.payload_size + EPLB_HEALTH.size + STEP_COUNT_BYTES


def test_before_the_plugin_gives_a_record_the_writer_publishes_an_empty_one(tmp_path):
    w = writer(tmp_path)
    w.publish(arrays())
    e = read_segment(w.path).eplb_health
    assert e is not None and e.rearrangements == 0 and math.isnan(e.last_duration_s) and e.step_interval == 1


def test_a_reader_that_predates_the_extension_reads_a_segment_that_has_it(tmp_path, old_channel):
    w = writer(tmp_path)
    w.publish(arrays(), eplb=RECORD)
    snap = old_channel.read_segment(w.path)
    assert snap.counts.tolist() == COUNTS.tolist()
    assert snap.physical_to_logical.tolist() == PLACEMENT.tolist()
    assert snap.ep_rank_load.tolist() == [[31.0, 29.0], [20.0, 12.0]] and snap.refused == ()


def test_this_reader_reads_a_segment_the_old_writer_wrote(tmp_path, old_channel):
    st = StepStats()
    shape = old_channel.Shape(2, 4, len(st.token_bounds), len(st.duration_bounds), num_physical=6, num_load_ranks=2)
    w = old_channel.SegmentWriter(str(tmp_path), "tiny-moe", old_channel.Ranks(ep_size=2), shape, top_k=2)
    w.publish(arrays())
    snap = read_segment(w.path)
    assert snap.eplb_health is None and snap.refused == ()
    assert snap.counts.tolist() == COUNTS.tolist() and snap.physical_to_logical.tolist() == PLACEMENT.tolist()


def rewrite(path: str, record: bytes | None = None, size: int | None = None, crc: int | None = None,
            cut: int = 0) -> None:
    """Change a published segment the way a hostile or broken writer could: the record's bytes, the announced
    size, the checksum, or the file's end."""
    buf = bytearray(Path(path).read_bytes())
    start = HEADER_SIZE + int.from_bytes(buf[HEADER_OFFSETS["payload_size"]:HEADER_OFFSETS["payload_size"] + 8],
                                         "little")
    if record is not None:
        buf[start:start + len(record)] = record
        crc = zlib.crc32(record) if crc is None else crc
    if size is not None:
        buf[HEADER_OFFSETS["eplb_health_size"]:HEADER_OFFSETS["eplb_health_size"] + 4] = size.to_bytes(4, "little")
    if crc is not None:
        buf[HEADER_OFFSETS["extension_crc32"]:HEADER_OFFSETS["extension_crc32"] + 4] = crc.to_bytes(4, "little")
    Path(path).write_bytes(bytes(buf[:len(buf) - cut]))


def bad(**changes) -> bytes:
    values = {**RECORD.__dict__, **changes}
    return EplbHealth(**values).pack()


STEP_COUNT_BYTES = 3 * len(StepStats().token_bounds) * 8  # the step_count extension, after the record
HOSTILE = {  # name: (rewrite kwargs, reason)
    "size_below_the_record": ({"size": EPLB_HEALTH.size - 8}, "shape"),
    "size_of_4_GiB": ({"size": (1 << 32) - 1}, "shape"),
    "file_ends_inside_it": ({"cut": STEP_COUNT_BYTES + 10}, "shape"),
    "checksum": ({"crc": 12345}, "checksum"),
    "interval_0": ({"record": bad(step_interval=0)}, "value"),
    "steps_2_to_the_60": ({"record": bad(steps_since=1 << 60)}, "value"),
    "duration_nan_after_3": ({"record": bad(last_duration_s=math.nan)}, "value"),
    "duration_negative": ({"record": bad(last_duration_s=-1.0)}, "value"),
    "duration_infinite_total": ({"record": bad(duration_s_total=math.inf)}, "value"),
    "negative_time": ({"record": bad(last_start_unix_ns=-5)}, "value"),
    "steps_at_last_above_steps": ({"record": bad(engine_steps_at_last=10**6)}, "value"),
}
STEP_COUNT_TOO = {  # a record whose size is wrong or cut short misplaces the step_count after it, refused with it
    "size_below_the_record": "checksum", "size_of_4_GiB": "shape", "file_ends_inside_it": "shape"}


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_a_record_that_cannot_be_right_is_refused_alone(tmp_path, case):
    changes, reason = HOSTILE[case]
    w = writer(tmp_path)
    w.publish(arrays(), eplb=RECORD)
    rewrite(w.path, **changes)
    snap = read_segment(w.path)
    assert snap.eplb_health is None
    also = [("step_count", STEP_COUNT_TOO[case])] if case in STEP_COUNT_TOO else []
    assert [(r.section, r.reason) for r in snap.refused] == [("eplb_health", reason), *also], snap.refused
    assert (snap.step_count is None) == bool(also)
    assert snap.counts.tolist() == COUNTS.tolist() and snap.physical_to_logical.tolist() == PLACEMENT.tolist()


def test_the_publisher_writes_the_recorders_record_and_survives_one_that_fails(tmp_path, caplog):
    """The plugin's Publisher with an EplbRecorder (vLLM's EplbState stood in by its attributes): the segment
    carries what the recorder saw; a recorder that raises leaves the counts published and the last record."""
    import types

    torch = pytest.importorskip("torch")
    from moe_monitor.plugin.attach import Attachment, MoELayer
    from moe_monitor.plugin.eplb_health import EplbRecorder
    from moe_monitor.plugin.publisher import Publisher
    from moe_monitor.plugin.recorder import Recorder

    state = types.SimpleNamespace(expert_rearrangement_step=7, expert_rearrangement_step_interval=3000,
                                  expert_load_window_size=1000, is_async=False)
    steps = StepStats()
    rec = EplbRecorder(state, types.SimpleNamespace(rebalanced=False), 2, lambda: steps.recorded)
    rec.entered()
    rec.committed(None)
    rec.returned()
    layers = Attachment([MoELayer(0, "a", 8, 2, None, True), MoELayer(1, "b", 8, 2, None, True)])
    shape = Shape(2, 8, len(steps.token_bounds), len(steps.duration_bounds))
    w = SegmentWriter(str(tmp_path), "m", Ranks(), shape, 2, eplb_health=True)
    recorder = Recorder(2, 8, 2, "cpu")
    pub = Publisher(w, recorder, steps, layers, interval_s=60, eplb=rec)
    assert pub.publish_once()
    e = read_segment(w.path).eplb_health
    assert (e.rearrangements, e.started, e.steps_since, e.step_interval, e.window_size) == (1, 1, 7, 3000, 1000)
    assert e.flags == 2 and 0 <= e.last_duration_s < 1

    state.expert_rearrangement_step = 8
    rec.record = lambda: 1 / 0  # a vLLM whose state cannot be read
    recorder.set_valid_tokens(1)
    recorder.record(0, torch.tensor([[3, 4]]))
    with caplog.at_level("ERROR"):
        assert pub.publish_once() and pub.publish_once()
    snap = read_segment(w.path)
    assert snap.counts[0, 3] == 1 and snap.eplb_health.steps_since == 7  # the counts go on, the last record stays
    assert sum("cannot read vLLM's EPLB state" in r.getMessage() for r in caplog.records) == 1


def test_a_vllm_whose_eplb_cannot_be_followed_costs_only_the_eplb_record(caplog):
    """build_monitor's guard: follow_eplb raising (here: a runner without vLLM's EplbState) is one log line and no
    record; the counts and the placement are published as before."""
    import types

    pytest.importorskip("torch")
    from moe_monitor.plugin.steps import StepStats as Steps
    from moe_monitor.plugin.worker import follow_eplb_safely

    with caplog.at_level("ERROR"):
        assert follow_eplb_safely(types.SimpleNamespace(), types.SimpleNamespace(model_state=None), 2, Steps()) is None
    assert any("cannot follow vLLM's EPLB rearrangements" in r.getMessage() for r in caplog.records)
