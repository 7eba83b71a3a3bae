"""Tests of the shared-memory segment channel (moe_monitor.channel), as its users see it.

Writer side: SegmentWriter(directory, model, ranks, shape, top_k).publish(arrays).
Reader side: read_segment(path) -> Snapshot | SegmentError(kind), list_segments(directory).
"""

from __future__ import annotations

import multiprocessing as mp
import os
import struct
import tempfile
import time
import types
import zlib

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import moe_monitor.channel.reader as reader_mod
from moe_monitor.channel import (
    LAYER_HOOKED,
    LAYER_UNOBSERVABLE,
    PHASES,
    Ranks,
    SegmentError,
    SegmentWriter,
    Shape,
    Snapshot,
    list_segments,
    read_segment,
    segment_filename,
)
from moe_monitor.channel.layout import (
    HEADER,
    HEADER_SIZE,
    MAGIC,
    MODEL_NAME_BYTES,
    SEQ_OFFSET,
    VERSION,
    Header,
    pack_header,
)

KINDS = {"io", "truncated", "magic", "version", "corrupt", "oversized", "torn"}

# --------------------------------------------------------------------------------------------------------------
# Header field offsets, computed from the struct format in layout.py (not hard-coded).

_FIELDS = [
    ("magic", "8s"), ("version", "I"), ("header_size", "I"), ("seq", "Q"), ("generation", "Q"),
    ("created_unix_ns", "q"), ("updated_unix_ns", "q"), ("pid", "I"), ("num_layers", "I"), ("num_experts", "I"),
    ("top_k", "I"), ("ranks", "10i"), ("num_phases", "I"), ("num_token_buckets", "I"),
    ("num_duration_buckets", "I"), ("flags", "I"), ("payload_size", "Q"), ("payload_crc32", "I"),
    ("reserved", "I"), ("publish_errors", "Q"), ("model", f"{MODEL_NAME_BYTES}s"),
    ("eplb_health_size", "I"), ("extension_crc32", "I"),  # extensions: older writers left them zero
    ("step_count_size", "I"), ("step_count_crc32", "I"),
]
OFFSETS: dict[str, int] = {}
FORMATS: dict[str, str] = {}
_prefix = "<"
for _name, _fmt in _FIELDS:
    OFFSETS[_name] = struct.calcsize(_prefix)
    FORMATS[_name] = "<" + _fmt
    _prefix += _fmt


def test_field_table_matches_layout():
    assert _prefix == HEADER.format
    assert struct.calcsize(_prefix) == HEADER.size <= HEADER_SIZE
    assert OFFSETS["seq"] == SEQ_OFFSET
    assert OFFSETS["version"] == 8


def patch(buf: bytes | bytearray, field: str, *values) -> bytearray:
    out = bytearray(buf)
    struct.pack_into(FORMATS[field], out, OFFSETS[field], *values)
    return out


def field(buf: bytes, name: str):
    return struct.unpack_from(FORMATS[name], buf, OFFSETS[name])[0]


def patch_file(path: str, name: str, *values) -> None:
    with open(path, "r+b") as f:
        f.seek(OFFSETS[name])
        f.write(struct.pack(FORMATS[name], *values))


# --------------------------------------------------------------------------------------------------------------
# Helpers


def make_arrays(shape: Shape, rng: np.random.Generator | None = None, fill: int | None = None) -> dict:
    L, E, P = shape.num_layers, shape.num_experts, shape.num_phases
    TB, DB = shape.num_token_buckets, shape.num_duration_buckets
    rng = rng or np.random.default_rng(0)
    token_bounds = np.cumsum(rng.integers(1, 1000, TB)).astype(np.int64)
    token_bounds[-1] = np.iinfo(np.int64).max
    duration_bounds = np.cumsum(rng.random(DB) + 0.001)
    duration_bounds[-1] = np.inf
    if fill is None:
        counts = rng.integers(0, 2**40, (L, E), dtype=np.int64)
        step_hist = rng.integers(0, 2**40, (P, TB, DB), dtype=np.int64)
        step_seconds = rng.random((P, TB)) * 1e4
        step_tokens = rng.integers(0, 2**50, (P, TB), dtype=np.int64)
        step_count = step_hist.sum(axis=2) + rng.integers(0, 2**40, (P, TB), dtype=np.int64)
    else:
        counts = np.full((L, E), fill, np.int64)
        step_hist = np.full((P, TB, DB), fill, np.int64)
        step_seconds = np.full((P, TB), fill * 0.25)
        step_tokens = np.full((P, TB), fill * 3, np.int64)
        step_count = np.full((P, TB), fill * DB * 2, np.int64)
    return dict(
        layer_ids=np.arange(L, dtype=np.int32) * 2 + 1,
        layer_flags=np.where(np.arange(L) % 3 == 2, LAYER_UNOBSERVABLE, LAYER_HOOKED).astype(np.uint8),
        counts=counts, token_bounds=token_bounds, duration_bounds=duration_bounds,
        step_hist=step_hist, step_seconds=step_seconds, step_tokens=step_tokens, step_count=step_count,
    )


def assert_snapshot_equals(snap: Snapshot, arrays: dict) -> None:
    """Byte-exact comparison (float NaN payloads included) plus dtype/shape checks."""
    expected_dtypes = dict(layer_ids=np.int32, layer_flags=np.uint8, counts=np.int64, token_bounds=np.int64,
                           duration_bounds=np.float64, step_hist=np.int64, step_seconds=np.float64,
                           step_tokens=np.int64, step_count=np.int64)
    for name, dt in expected_dtypes.items():
        got = getattr(snap, name)
        want = np.ascontiguousarray(np.asarray(arrays[name]), dtype=dt)
        assert got.dtype == np.dtype(dt), name
        assert got.shape == want.shape, name
        assert got.tobytes() == want.tobytes(), name


SMALL = Shape(num_layers=5, num_experts=7, num_token_buckets=4, num_duration_buckets=3)


@pytest.fixture
def valid_segment(tmp_path) -> tuple[str, bytes, dict]:
    """A valid segment file written by SegmentWriter; returns (path, its bytes, the arrays)."""
    arrays = make_arrays(SMALL)
    w = SegmentWriter(str(tmp_path), "mixtral", Ranks(), SMALL, top_k=2)
    w.publish(arrays)
    w.close()
    with open(w.path, "rb") as f:
        data = f.read()
    return w.path, data, arrays


def write(path, data: bytes) -> str:
    with open(path, "wb") as f:
        f.write(data)
    return str(path)


def read_kind(path: str, **kw) -> str:
    kw.setdefault("backoff_s", 0.0)
    with pytest.raises(SegmentError) as ei:
        read_segment(path, **kw)
    assert ei.value.kind in KINDS
    assert str(ei.value)  # carries a message
    return ei.value.kind


# --------------------------------------------------------------------------------------------------------------
# 1. Round trip


def test_round_trip_header_and_arrays(tmp_path):
    shape = Shape(num_layers=61, num_experts=256, num_token_buckets=12, num_duration_buckets=9)
    ranks = Ranks(global_rank=13, world_size=16, dp_rank=1, dp_size=2, tp_rank=5, tp_size=8, pp_rank=0,
                  pp_size=1, ep_rank=13, ep_size=16)
    model = "deepseek-ai/DeepSeek-V3 — 模型 🚀 ünïcødé"
    before = time.time_ns()
    w = SegmentWriter(str(tmp_path), model, ranks, shape, top_k=8)
    assert w.generation != 0
    assert not os.path.exists(w.path)  # nothing until the first publish
    assert os.path.basename(w.path) == segment_filename(ranks) == "dp1-pp0-tp5.moeseg"

    rng = np.random.default_rng(1)
    seqs, updated, created = [], [], set()
    for k in range(4):
        arrays = make_arrays(shape, rng)
        w.publish(arrays, publish_errors=k * 3)
        snap = read_segment(w.path)
        h = snap.header
        assert_snapshot_equals(snap, arrays)
        assert snap.layer_flags.shape == (shape.num_layers,)  # padding is not exposed
        assert h.model == model
        assert h.ranks == ranks
        assert h.top_k == 8
        assert h.shape == shape
        assert h.payload_size == shape.payload_size
        assert h.payload_crc32 == zlib.crc32(open(w.path, "rb").read()[HEADER_SIZE:HEADER_SIZE + h.payload_size])
        assert h.generation == w.generation != 0
        assert h.pid == os.getpid()
        assert h.publish_errors == k * 3
        assert h.seq % 2 == 0
        assert before <= h.created_unix_ns <= h.updated_unix_ns <= time.time_ns()
        seqs.append(h.seq)
        updated.append(h.updated_unix_ns)
        created.add(h.created_unix_ns)
        time.sleep(0.002)
    assert seqs == sorted(set(seqs)) and seqs[0] == 0  # even, strictly increasing
    assert all(b > a for a, b in zip(updated, updated[1:]))
    assert len(created) == 1  # creation time is fixed for the writer's life
    assert os.path.getsize(w.path) == HEADER_SIZE + shape.payload_size + 3 * shape.num_token_buckets * 8  # step_count
    w.close()
    # still readable once the writer has closed it
    assert read_segment(w.path).header.seq == seqs[-1]


def test_snapshot_is_a_copy_not_a_view_of_the_file(tmp_path):
    w = SegmentWriter(str(tmp_path), "m", Ranks(), SMALL, top_k=2)
    w.publish(make_arrays(SMALL, fill=1))
    snap = read_segment(w.path)
    w.publish(make_arrays(SMALL, fill=2))
    assert (snap.counts == 1).all() and (snap.step_hist == 1).all()
    assert (read_segment(w.path).counts == 2).all()
    w.close()


def test_phases_constant_and_flag_values():
    assert PHASES == ("prefill", "decode", "mixed")
    assert SMALL.num_phases == 3
    assert LAYER_HOOKED & LAYER_UNOBSERVABLE == 0


def test_extreme_values_round_trip(tmp_path):
    shape = Shape(num_layers=3, num_experts=4, num_token_buckets=2, num_duration_buckets=4)
    a = make_arrays(shape)
    i64 = np.iinfo(np.int64)
    a["counts"] = np.array([[i64.min, i64.max, 0, -1]] * 3, np.int64)
    a["duration_bounds"] = np.array([-0.0, 5e-324, np.nan, np.inf])
    a["step_seconds"] = np.full((3, 2), -np.inf)
    a["layer_flags"] = np.array([0, 255, 3], np.uint8)
    a["layer_ids"] = np.array([np.iinfo(np.int32).min, 0, np.iinfo(np.int32).max], np.int32)
    w = SegmentWriter(str(tmp_path), "", Ranks(global_rank=-1), shape, top_k=0)
    w.publish(a)
    snap = read_segment(w.path)
    assert_snapshot_equals(snap, a)
    assert snap.header.model == ""
    assert snap.header.ranks.global_rank == -1
    w.close()


def test_empty_layer_and_expert_dims(tmp_path):
    for L, E in [(0, 5), (4, 0), (0, 0)]:
        shape = Shape(num_layers=L, num_experts=E, num_token_buckets=1, num_duration_buckets=1)
        a = make_arrays(shape)
        w = SegmentWriter(str(tmp_path / f"{L}x{E}"), "m", Ranks(), shape, top_k=1)
        w.publish(a)
        snap = read_segment(w.path)
        assert snap.counts.shape == (L, E)
        assert_snapshot_equals(snap, a)
        w.close()


_model_names = st.text(max_size=80).filter(
    lambda s: len(s.encode("utf-8")) <= MODEL_NAME_BYTES and not s.endswith("\x00"))


@settings(max_examples=40, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    L=st.integers(1, 64), E=st.integers(1, 300), TB=st.integers(1, 16), DB=st.integers(1, 16),
    seed=st.integers(0, 2**32 - 1), model=_model_names, top_k=st.integers(0, 2**32 - 1),
    rank=st.integers(-(2**31), 2**31 - 1), publish_errors=st.integers(0, 2**64 - 1),
    republishes=st.integers(0, 2),
)
def test_round_trip_property(L, E, TB, DB, seed, model, top_k, rank, publish_errors, republishes):
    shape = Shape(num_layers=L, num_experts=E, num_token_buckets=TB, num_duration_buckets=DB)
    rng = np.random.default_rng(seed)
    ranks = Ranks(global_rank=rank, tp_rank=abs(rank) % 7)
    with tempfile.TemporaryDirectory() as d:
        w = SegmentWriter(d, model, ranks, shape, top_k=top_k)
        for k in range(republishes + 1):  # first publish creates the file, later ones rewrite it in place
            a = {
                "layer_ids": rng.integers(-(2**31), 2**31, L, dtype=np.int32),
                "layer_flags": rng.integers(0, 256, L, dtype=np.uint8),
                "counts": rng.integers(np.iinfo(np.int64).min, np.iinfo(np.int64).max, (L, E),
                                       dtype=np.int64, endpoint=True),
                "token_bounds": rng.integers(-(2**63), 2**63 - 1, TB, dtype=np.int64),
                # arbitrary bit patterns, NaN payloads included
                "duration_bounds": rng.integers(-(2**63), 2**63 - 1, DB, dtype=np.int64).view(np.float64),
                "step_hist": rng.integers(-(2**63), 2**63 - 1, (3, TB, DB), dtype=np.int64),
                "step_seconds": rng.integers(-(2**63), 2**63 - 1, (3, TB), dtype=np.int64).view(np.float64),
                "step_tokens": rng.integers(-(2**63), 2**63 - 1, (3, TB), dtype=np.int64),
                "step_count": np.full((3, TB), 2**63 - 1, dtype=np.int64),  # at least any (wrapped) timed sum
            }
            w.publish(a, publish_errors=publish_errors)
            snap = read_segment(w.path)
            assert_snapshot_equals(snap, a)
            h = snap.header
            assert (h.model, h.ranks, h.top_k, h.shape) == (model, ranks, top_k, shape)
            assert h.generation == w.generation and h.generation != 0
            assert h.seq == 2 * k
            assert h.publish_errors == publish_errors
            assert h.pid == os.getpid()
            assert list_segments(d) == [w.path]
        w.close()


def test_long_ascii_model_name_is_truncated_to_field_size(tmp_path):
    name = "m" * (MODEL_NAME_BYTES + 50)
    w = SegmentWriter(str(tmp_path), name, Ranks(), SMALL, top_k=2)
    w.publish(make_arrays(SMALL))
    assert read_segment(w.path).header.model == name[:MODEL_NAME_BYTES]
    w.close()


@pytest.mark.parametrize("name", ["a" * (MODEL_NAME_BYTES - 1) + "é", "x" + "模" * 70])
def test_long_non_ascii_model_name_stays_readable(tmp_path, name):
    assert len(name.encode("utf-8")) > MODEL_NAME_BYTES
    w = SegmentWriter(str(tmp_path), name, Ranks(), SMALL, top_k=2)
    w.publish(make_arrays(SMALL))
    try:
        model = read_segment(w.path).header.model
    finally:
        w.close()
    assert name.startswith(model) and len(model.encode("utf-8")) <= MODEL_NAME_BYTES


# --------------------------------------------------------------------------------------------------------------
# 2. Concurrency: a writer process publishing while this process reads


RACE_SHAPE = Shape(num_layers=32, num_experts=256, num_token_buckets=8, num_duration_buckets=6)
RACE_SECONDS = 2.0


def _race_writer(directory, ready, stop, published):  # runs in the child process
    w = SegmentWriter(directory, "race-model", Ranks(), RACE_SHAPE, top_k=8)
    i = 0
    w.publish(make_arrays(RACE_SHAPE, fill=i), publish_errors=i)
    ready.set()
    deadline = time.monotonic() + RACE_SECONDS
    while time.monotonic() < deadline and not stop.is_set():
        i += 1
        w.publish(make_arrays(RACE_SHAPE, fill=i), publish_errors=i)
    published.value = i
    w.close()


def _check_race_snapshot(snap: Snapshot, constant: dict) -> int:
    """Every entry of every per-publish array must come from one publish index i; returns i."""
    i = int(snap.counts.flat[0])
    assert (snap.counts == i).all(), "torn counts"
    assert (snap.step_hist == i).all(), "torn step_hist"
    assert (snap.step_seconds == i * 0.25).all(), "torn step_seconds"
    assert (snap.step_tokens == 3 * i).all(), "torn step_tokens"
    for name, value in constant.items():
        assert np.array_equal(getattr(snap, name), value), name
    h = snap.header
    assert h.seq % 2 == 0
    # The reader re-checks the seqlock after copying, so the header belongs to the same publish as the payload.
    assert h.seq == 2 * i
    assert h.model == "race-model" and h.shape == RACE_SHAPE and h.top_k == 8
    return i


@pytest.mark.slow
def test_concurrent_writer_process_never_gives_a_torn_snapshot(tmp_path, monkeypatch):
    ctx = mp.get_context("fork" if "fork" in mp.get_all_start_methods() else "spawn")
    ready, stop = ctx.Event(), ctx.Event()
    published = ctx.Value("q", -1)
    proc = ctx.Process(target=_race_writer, args=(str(tmp_path), ready, stop, published), daemon=True)

    # count how often the reader's retry path is taken (decode saying "torn")
    torn_decodes = 0
    real_decode = reader_mod.decode_from

    def counting_decode(*args):
        nonlocal torn_decodes
        try:
            return real_decode(*args)
        except SegmentError as e:
            if e.kind == "torn":
                torn_decodes += 1
            raise

    monkeypatch.setattr(reader_mod, "decode_from", counting_decode)

    proc.start()
    try:
        assert ready.wait(30), "writer did not publish"
        path = os.path.join(str(tmp_path), segment_filename(Ranks()))
        constant = {k: v for k, v in make_arrays(RACE_SHAPE, fill=0).items()
                    if k in ("layer_ids", "layer_flags", "token_bounds", "duration_bounds")}
        reads = gave_up = 0
        last_i, last_seq, seen = -1, -1, set()
        generation = None
        while proc.is_alive() or reads == 0:
            try:
                snap = read_segment(path)
            except SegmentError as e:
                assert e.kind == "torn", e  # the only acceptable failure under contention
                gave_up += 1
                continue
            reads += 1
            i = _check_race_snapshot(snap, constant)
            assert i >= last_i, f"went backwards: {last_i} -> {i}"
            assert snap.header.seq >= last_seq
            if generation is None:
                generation = snap.header.generation
            assert snap.header.generation == generation
            last_i, last_seq = i, snap.header.seq
            seen.add(i)
        proc.join(10)
        assert proc.exitcode == 0
        final = read_segment(path)
        n = published.value
        assert _check_race_snapshot(final, constant) == n
        assert final.header.seq == 2 * n and final.header.publish_errors == n
    finally:
        stop.set()
        proc.join(5)
        if proc.is_alive():
            proc.kill()
    print(f"\nrace: {n} publishes, {reads} good reads, {len(seen)} distinct indices, "
          f"{torn_decodes} torn decodes retried, {gave_up} reads gave up after retries")
    assert n >= 20
    assert reads >= 500
    assert len(seen) >= 10
    assert gave_up <= reads // 10  # retries make giving up rare


def test_odd_seq_reads_as_torn_after_all_retries(valid_segment, monkeypatch):
    path, data, _ = valid_segment
    patch_file(path, "seq", 7)
    calls = []
    real_decode = reader_mod.decode_from

    def counting_decode(*args):
        calls.append(1)
        return real_decode(*args)

    monkeypatch.setattr(reader_mod, "decode_from", counting_decode)
    assert read_kind(path, attempts=4) == "torn"
    assert len(calls) == 4
    calls.clear()
    t0 = time.monotonic()
    assert read_kind(path, backoff_s=0.001) == "torn"  # default attempts
    assert len(calls) == 5
    assert time.monotonic() - t0 < 1.0


def test_retry_succeeds_when_the_write_finishes(valid_segment, monkeypatch):
    """Odd seq on the first try; the 'writer' finishes during the reader's back-off; the read succeeds."""
    path, data, arrays = valid_segment
    patch_file(path, "seq", 9)
    sleeps = []

    def fake_sleep(s):
        sleeps.append(s)
        patch_file(path, "seq", 10)

    monkeypatch.setattr(reader_mod, "time", types.SimpleNamespace(sleep=fake_sleep))
    snap = read_segment(path)
    assert snap.header.seq == 10
    assert_snapshot_equals(snap, arrays)
    assert len(sleeps) == 1


@pytest.mark.parametrize("where", ["first", "middle", "last"])
def test_flipped_payload_byte_is_corrupt_not_torn(valid_segment, tmp_path, where):
    path, data, _ = valid_segment
    size = field(data, "payload_size")  # the payload's bytes (the extensions after it have their own checksums)
    pos = HEADER_SIZE + {"first": 0, "middle": size // 2, "last": size - 1}[where]
    buf = bytearray(data)
    buf[pos] ^= 0x01
    write(path, bytes(buf))
    # the copy was consistent (same even seq before and after): a wrong checksum is damage, not a race
    assert read_kind(path, attempts=2) == "corrupt"


def test_crc_field_mismatch_is_corrupt(valid_segment):
    path, data, _ = valid_segment
    write(path, bytes(patch(data, "payload_crc32", field(data, "payload_crc32") ^ 0xFFFFFFFF)))
    assert read_kind(path, attempts=1) == "corrupt"


# --------------------------------------------------------------------------------------------------------------
# 3. Malformed files


def _truncate(n):
    return lambda d: d[:n]


def _garbage(n, seed):
    return lambda d: np.random.default_rng(seed).integers(0, 256, n, dtype=np.uint8).tobytes()


PNG = b"\x89PNG\r\n\x1a\n" + b"\x00\x00\x00\rIHDR" + bytes(600)

MALFORMED = {
    "empty": (lambda d: b"", "truncated"),
    "one_byte": (_truncate(1), "truncated"),
    "half_header": (lambda d: d[: HEADER.size // 2], "truncated"),
    "header_struct_minus_one": (lambda d: d[: HEADER.size - 1], "truncated"),
    "header_only_no_payload": (_truncate(HEADER_SIZE), "truncated"),
    "payload_minus_one_byte": (lambda d: d[:HEADER_SIZE + field(d, "payload_size") - 1], "truncated"),
    "payload_half": (lambda d: d[: HEADER_SIZE + (len(d) - HEADER_SIZE) // 2], "truncated"),
    "png": (lambda d: PNG, "magic"),
    "random_bytes": (_garbage(4096, 3), "magic"),
    "random_bytes_short": (_garbage(HEADER.size, 4), "magic"),
    "zeros": (lambda d: bytes(4096), "magic"),
    "text": (lambda d: b"hello world\n" * 100, "magic"),
    "magic_one_byte_off": (lambda d: patch(d, "magic", MAGIC[:-1] + b"\x01"), "magic"),
    "version_2": (lambda d: patch(d, "version", VERSION + 1), "version"),
    "version_0": (lambda d: patch(d, "version", 0), "version"),
    "version_max": (lambda d: patch(d, "version", 2**32 - 1), "version"),
    "header_size_wrong": (lambda d: patch(d, "header_size", 256), "corrupt"),
    "payload_size_plus_8": (lambda d: patch(d, "payload_size", field(d, "payload_size") + 8), "corrupt"),
    "payload_size_minus_8": (lambda d: patch(d, "payload_size", field(d, "payload_size") - 8), "corrupt"),
    "payload_size_zero": (lambda d: patch(d, "payload_size", 0), "corrupt"),
    "num_experts_changed": (lambda d: patch(d, "num_experts", field(d, "num_experts") + 1), "corrupt"),
    "num_layers_huge": (lambda d: patch(d, "num_layers", 2**32 - 1), "corrupt"),
    "num_phases_2": (lambda d: patch(d, "num_phases", 2), "corrupt"),
    "num_phases_0": (lambda d: patch(d, "num_phases", 0), "corrupt"),
    "token_buckets_0": (lambda d: patch(d, "num_token_buckets", 0), "corrupt"),
    "duration_buckets_0": (lambda d: patch(d, "num_duration_buckets", 0), "corrupt"),
    "model_not_utf8": (lambda d: patch(d, "model", b"\xff\xfemodel"), "corrupt"),
    "model_lone_continuation": (lambda d: patch(d, "model", b"abc\x80"), "corrupt"),
    "payload_size_huge": (lambda d: patch(d, "payload_size", 2**63), "oversized"),
    "payload_size_max": (lambda d: patch(d, "payload_size", 2**64 - 1), "oversized"),
    "payload_size_over_default_limit": (
        lambda d: patch(d, "payload_size", reader_mod.DEFAULT_MAX_PAYLOAD + 8), "oversized"),
    "odd_seq": (lambda d: patch(d, "seq", 1), "torn"),
}


@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_malformed_file_gives_segment_error_kind(valid_segment, case):
    path, data, _ = valid_segment
    mutate, kind = MALFORMED[case]
    write(path, bytes(mutate(data)))
    assert read_kind(path, attempts=2) == kind


def test_truncated_at_every_length_is_truncated(valid_segment):
    path, data, _ = valid_segment
    for n in list(range(0, HEADER.size + 2)) + list(range(HEADER_SIZE, HEADER_SIZE + field(data, "payload_size"))):
        write(path, data[:n])
        assert read_kind(path, attempts=1) == "truncated", n


def test_oversized_by_file_size(valid_segment):
    path, data, arrays = valid_segment
    payload = len(data) - HEADER_SIZE
    # a valid file under a limit smaller than its payload: the file size check fires
    assert read_kind(path, max_payload=payload - 1) == "oversized"
    # the header is fine, but the file carries far more bytes than the limit allows
    write(path, data + bytes(10_000))
    assert read_kind(path, max_payload=payload + 100) == "oversized"
    # exactly at the limit is still fine
    write(path, data)
    assert_snapshot_equals(read_segment(path, max_payload=payload), arrays)


def test_oversized_by_header_claim_in_small_file(tmp_path, valid_segment):
    _, data, _ = valid_segment
    # a small file whose header claims a payload above the caller's limit
    path = write(tmp_path / "x.moeseg", bytes(patch(data, "payload_size", 1 << 20)))
    assert read_kind(path, max_payload=1 << 19) == "oversized"


def test_missing_file_raises_file_not_found(tmp_path):
    with pytest.raises(FileNotFoundError):
        read_segment(str(tmp_path / "nope.moeseg"))


def test_directory_instead_of_file_is_io(tmp_path):
    d = tmp_path / "dir.moeseg"
    d.mkdir()
    assert read_kind(str(d)) == "io"


@settings(max_examples=150, deadline=None, database=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(flips=st.lists(st.tuples(st.integers(0, 10**6), st.integers(1, 255)), max_size=6),
       cut=st.one_of(st.none(), st.integers(0, 10**6)), tail=st.binary(max_size=64))
def test_fuzzed_file_gives_snapshot_or_segment_error(valid_segment, flips, cut, tail):
    path, data, _ = valid_segment
    buf = bytearray(data)
    for pos, x in flips:
        buf[pos % len(buf)] ^= x
    if cut is not None:
        buf = buf[: cut % (len(buf) + 1)]
    buf += tail
    fuzz_path = path + ".fuzz"
    write(fuzz_path, bytes(buf))
    try:
        snap = read_segment(fuzz_path, attempts=1, backoff_s=0.0)
    except SegmentError as e:
        assert e.kind in KINDS
    else:
        assert isinstance(snap, Snapshot)
        assert snap.counts.shape == (snap.header.shape.num_layers, snap.header.shape.num_experts)


def test_dimension_overflow_in_header_is_a_segment_error(tmp_path):
    # L = E = 2**32-1: L*E wraps to a negative int64; TB is chosen so the wrapped total is 76 bytes.
    shape = Shape(num_layers=2**32 - 1, num_experts=2**32 - 1, num_token_buckets=590558004,
                  num_duration_buckets=1)
    true_size = (4 * shape.num_layers + (shape.num_layers + 7) // 8 * 8 + 8 * shape.num_layers * shape.num_experts
                 + 8 * shape.num_token_buckets + 8 + 8 * 3 * shape.num_token_buckets * 1
                 + 16 * 3 * shape.num_token_buckets)
    assert true_size > 2**64  # the real payload would be astronomically large
    claimed = 76
    payload = bytes(claimed)
    h = Header(seq=0, generation=1, created_unix_ns=0, updated_unix_ns=0, pid=1, top_k=2, ranks=Ranks(),
               shape=shape, payload_size=claimed, payload_crc32=zlib.crc32(payload), publish_errors=0, model="x")
    path = write(tmp_path / "evil.moeseg", pack_header(h) + payload)
    assert read_kind(path) in {"corrupt", "oversized"}


# --------------------------------------------------------------------------------------------------------------
# 4. Writer lifecycle


def test_restarted_writer_gets_new_generation(tmp_path):
    ranks = Ranks(dp_rank=1, tp_rank=3)
    w1 = SegmentWriter(str(tmp_path), "m", ranks, SMALL, top_k=2)
    for k in range(3):
        w1.publish(make_arrays(SMALL, fill=k))
    s1 = read_segment(w1.path)
    assert s1.header.generation == w1.generation and s1.header.seq == 4

    # the process "restarts": a new writer for the same ranks, the old one is gone
    w1.close()
    w2 = SegmentWriter(str(tmp_path), "m", ranks, SMALL, top_k=2)
    assert w2.path == w1.path
    assert w2.generation not in (0, w1.generation)
    # until the new writer publishes, the reader still sees the old generation
    assert read_segment(w2.path).header.generation == w1.generation
    w2.publish(make_arrays(SMALL, fill=100))
    s2 = read_segment(w2.path)
    assert s2.header.generation == w2.generation != s1.header.generation
    assert s2.header.seq == 0 and (s2.counts == 100).all()
    assert s2.header.created_unix_ns >= s1.header.created_unix_ns
    assert list_segments(str(tmp_path)) == [w2.path]  # no temp files left over
    w2.close()


def test_restarted_writer_while_old_mapping_still_open(tmp_path):
    """A crashed process may leave its mapping around; the new writer's file replaces it atomically."""
    w1 = SegmentWriter(str(tmp_path), "m", Ranks(), SMALL, top_k=2)
    w1.publish(make_arrays(SMALL, fill=1))
    w2 = SegmentWriter(str(tmp_path), "m", Ranks(), SMALL, top_k=2)
    w2.publish(make_arrays(SMALL, fill=2))
    snap = read_segment(w2.path)
    assert snap.header.generation == w2.generation and (snap.counts == 2).all()
    w1.close()
    w2.close()


def test_generations_are_distinct_and_nonzero(tmp_path):
    gens = {SegmentWriter(str(tmp_path), "m", Ranks(), SMALL, top_k=2).generation for _ in range(200)}
    assert len(gens) == 200 and 0 not in gens
    assert all(0 < g < 2**63 for g in gens)


def test_deleted_file_is_recreated_by_next_publish(tmp_path):
    w = SegmentWriter(str(tmp_path), "m", Ranks(), SMALL, top_k=2)
    w.publish(make_arrays(SMALL, fill=1))
    w.publish(make_arrays(SMALL, fill=2))
    os.unlink(w.path)
    with pytest.raises(FileNotFoundError):
        read_segment(w.path)
    assert list_segments(str(tmp_path)) == []
    w.publish(make_arrays(SMALL, fill=3))
    snap = read_segment(w.path)
    assert (snap.counts == 3).all()
    assert snap.header.generation == w.generation
    assert snap.header.seq % 2 == 0
    # later publishes keep going to the new file
    w.publish(make_arrays(SMALL, fill=4))
    snap2 = read_segment(w.path)
    assert (snap2.counts == 4).all() and snap2.header.seq > snap.header.seq
    assert list_segments(str(tmp_path)) == [w.path]
    w.close()


def test_replaced_file_is_taken_back_by_next_publish(tmp_path):
    w = SegmentWriter(str(tmp_path), "m", Ranks(), SMALL, top_k=2)
    w.publish(make_arrays(SMALL, fill=1))
    other = write(tmp_path / "other", b"somebody else's file")
    os.replace(other, w.path)  # atomically replaced by another file (new inode)
    assert read_kind(w.path) == "truncated"
    w.publish(make_arrays(SMALL, fill=5))
    snap = read_segment(w.path)
    assert (snap.counts == 5).all() and snap.header.generation == w.generation
    w.close()


def _publish_after_in_place_truncation(directory):  # runs in a child process: it may die of SIGBUS
    import faulthandler
    faulthandler.disable()  # keep the expected crash quiet
    shape = RACE_SHAPE  # payload spans many pages
    w = SegmentWriter(directory, "m", Ranks(), shape, top_k=2)
    w.publish(make_arrays(shape, fill=1))
    with open(w.path, "wb") as f:  # e.g. `: > segment` by an operator: same inode, size 0
        f.write(b"x" * 20)
    try:
        w.publish(make_arrays(shape, fill=2))
    except OSError:
        pass  # the documented failure mode: the caller counts it and retries
    w.publish(make_arrays(shape, fill=3))
    assert (read_segment(w.path).counts == 3).all()


def test_in_place_truncation_under_live_writer_does_not_kill_it(tmp_path):
    ctx = mp.get_context("fork" if "fork" in mp.get_all_start_methods() else "spawn")
    proc = ctx.Process(target=_publish_after_in_place_truncation, args=(str(tmp_path),))
    proc.start()
    proc.join(30)
    assert proc.exitcode == 0, f"writer process died (exit code {proc.exitcode}; -7 is SIGBUS)"


def test_directory_is_created_on_first_publish(tmp_path):
    d = tmp_path / "a" / "b" / "c"
    w = SegmentWriter(str(d), "m", Ranks(), SMALL, top_k=2)
    assert not d.exists()
    w.publish(make_arrays(SMALL))
    assert list_segments(str(d)) == [w.path]
    w.close()


def test_list_segments(tmp_path):
    assert list_segments(str(tmp_path / "missing")) == []
    assert list_segments(str(tmp_path / "missing" / "deeper")) == []
    assert list_segments(str(tmp_path)) == []
    paths = []
    for dp, pp, tp in [(1, 0, 0), (0, 1, 0), (0, 0, 1), (0, 0, 0)]:
        w = SegmentWriter(str(tmp_path), "m", Ranks(dp_rank=dp, pp_rank=pp, tp_rank=tp), SMALL, top_k=2)
        w.publish(make_arrays(SMALL))
        w.close()
        paths.append(w.path)
    (tmp_path / "notes.txt").write_text("x")
    (tmp_path / "dp9-pp0-tp0.moeseg.tmp123").write_bytes(b"")
    (tmp_path / "x.moeseg.bak").write_bytes(b"")
    got = list_segments(str(tmp_path))
    assert got == sorted(paths)
    assert all(os.path.isabs(p) or p.startswith(str(tmp_path)) for p in got)
    assert [os.path.basename(p) for p in got] == [
        "dp0-pp0-tp0.moeseg", "dp0-pp0-tp1.moeseg", "dp0-pp1-tp0.moeseg", "dp1-pp0-tp0.moeseg"]
    for p in got:
        assert isinstance(read_segment(p), Snapshot)


def test_close_is_idempotent_and_remove_deletes(tmp_path):
    w = SegmentWriter(str(tmp_path), "m", Ranks(), SMALL, top_k=2)
    w.close()  # never published: nothing to close
    w.publish(make_arrays(SMALL))
    w.close()
    w.close()
    assert os.path.exists(w.path)
    w.close(remove=True)
    assert not os.path.exists(w.path)
    w.close(remove=True)  # already gone: no error


def test_publish_into_unwritable_directory_raises_oserror(tmp_path):
    afile = tmp_path / "afile"
    afile.write_bytes(b"i am a file")
    w = SegmentWriter(str(afile / "sub"), "m", Ranks(), SMALL, top_k=2)
    for _ in range(2):  # and again: the writer keeps failing cleanly
        with pytest.raises(OSError):
            w.publish(make_arrays(SMALL))
    assert sorted(os.listdir(tmp_path)) == ["afile"]
    assert afile.read_bytes() == b"i am a file"


def test_failed_rename_leaves_no_temp_file_and_writer_recovers(tmp_path):
    w = SegmentWriter(str(tmp_path), "m", Ranks(), SMALL, top_k=2)
    os.mkdir(w.path)  # something that cannot be replaced by a file sits at the segment's path
    (tmp_path / os.path.basename(w.path) / "keep").write_bytes(b"")
    with pytest.raises(OSError):
        w.publish(make_arrays(SMALL))
    assert sorted(os.listdir(tmp_path)) == [os.path.basename(w.path)]  # no *.tmp<pid> left behind
    os.unlink(os.path.join(w.path, "keep"))
    os.rmdir(w.path)
    w.publish(make_arrays(SMALL, fill=7))
    assert (read_segment(w.path).counts == 7).all()
    assert sorted(os.listdir(tmp_path)) == [os.path.basename(w.path)]
    w.close()


def _wrong(shape: Shape):
    L, E, TB, DB = shape.num_layers, shape.num_experts, shape.num_token_buckets, shape.num_duration_buckets
    return {
        "counts_more_experts": ("counts", np.zeros((L, E + 1), np.int64)),
        "counts_more_layers": ("counts", np.zeros((L + 1, E), np.int64)),
        "counts_transposed": ("counts", np.zeros((E, L), np.int64)),
        "counts_flat": ("counts", np.zeros(L * E, np.int64)),
        "layer_ids_short": ("layer_ids", np.zeros(L - 1, np.int32)),
        "layer_ids_long": ("layer_ids", np.zeros(L + 1, np.int32)),
        "layer_flags_beyond_padding": ("layer_flags", np.zeros((L + 7) // 8 * 8 + 1, np.uint8)),
        "layer_flags_2d": ("layer_flags", np.zeros((L, 2), np.uint8)),
        "token_bounds_long": ("token_bounds", np.zeros(TB + 1, np.int64)),
        "duration_bounds_short": ("duration_bounds", np.zeros(DB - 1)),
        "step_hist_dims": ("step_hist", np.zeros((3, TB, DB + 1), np.int64)),
        "step_hist_phases": ("step_hist", np.zeros((2, TB, DB), np.int64)),
        "step_seconds_phases": ("step_seconds", np.zeros((2, TB))),
        "step_tokens_buckets": ("step_tokens", np.zeros((3, TB + 1), np.int64)),
    }


@pytest.mark.parametrize("case", sorted(_wrong(SMALL)))
def test_shape_mismatch_raises_value_error(tmp_path, case):
    name, bad = _wrong(SMALL)[case]
    w = SegmentWriter(str(tmp_path), "m", Ranks(), SMALL, top_k=2)
    arrays = make_arrays(SMALL)
    arrays[name] = bad
    with pytest.raises(ValueError):
        w.publish(arrays)
    assert not os.path.exists(w.path)  # a rejected first publish creates nothing
    assert os.listdir(tmp_path) == []

    # after a good publish, a rejected one leaves the previous snapshot intact and readable
    good = make_arrays(SMALL, fill=11)
    w.publish(good)
    with pytest.raises(ValueError):
        w.publish(arrays)
    snap = read_segment(w.path)
    assert_snapshot_equals(snap, good)
    assert snap.header.seq == 0
    w.publish(make_arrays(SMALL, fill=12))
    assert read_segment(w.path).header.seq == 2
    w.close()


@pytest.mark.parametrize("length", [0, 4, 6, 8])
def test_layer_flags_wrong_length_within_padding_raises_value_error(tmp_path, length):
    assert SMALL.num_layers == 5  # pad8 = 8
    w = SegmentWriter(str(tmp_path), "m", Ranks(), SMALL, top_k=2)
    arrays = make_arrays(SMALL)
    arrays["layer_flags"] = np.ones(length, np.uint8)
    try:
        with pytest.raises(ValueError):
            w.publish(arrays)
    finally:
        w.close()


def test_the_live_placement_section_round_trips_and_version_1_segments_still_read(tmp_path):
    from moe_monitor.channel import SegmentWriter, read_segment
    from moe_monitor.channel.layout import VERSION

    shape = Shape(num_layers=2, num_experts=4, num_token_buckets=1, num_duration_buckets=1, num_physical=6)
    arrays = dict(layer_ids=np.arange(2, dtype=np.int32), layer_flags=np.ones(2, dtype=np.uint8),
                  counts=np.arange(8).reshape(2, 4), token_bounds=np.array([2**63 - 1]),
                  duration_bounds=np.array([np.inf]), step_hist=np.zeros((3, 1, 1)), step_seconds=np.zeros((3, 1)),
                  step_tokens=np.zeros((3, 1)), step_count=np.zeros((3, 1)),
                  physical_to_logical=np.array([[0, 1, 2, 3, 0, 1], [3, 2, 1, 0, 0, 0]]))
    w = SegmentWriter(str(tmp_path), "m", Ranks(ep_size=2), shape, top_k=2)
    w.publish(arrays)
    snap = read_segment(w.path)
    assert VERSION == 2 and snap.header.shape.num_physical == 6
    assert snap.physical_to_logical.tolist() == arrays["physical_to_logical"].tolist()

    plain = Shape(num_layers=2, num_experts=4, num_token_buckets=1, num_duration_buckets=1)
    arrays.pop("physical_to_logical")
    w1 = SegmentWriter(str(tmp_path / "v1"), "m", Ranks(), plain, top_k=2)
    w1.publish(arrays)
    with open(w1.path, "r+b") as f:  # what moe-monitor before the placement section wrote: version 1
        f.seek(8)
        f.write(struct.pack("<I", 1))
    old = read_segment(w1.path)
    assert old.physical_to_logical is None and old.counts.tolist() == arrays["counts"].tolist()


# --------------------------------------------------------------------------------------------------------------
# Format-2 sections against the header (issue #24 item 6)

SECTION_CASES = {  # name: (ep_size, placement [2 x S] or None, EP-rank load [2 x R] or None, refused sections)
    "fits": (2, [[0, 1, 0, 2, 3, 1]] * 2, [[1.0, 2.0]] * 2, {}),
    "1M_load_columns": (2, None, np.ones((2, 1 << 20)), {"ep_rank_load": "shape"}),
    "5_load_columns": (2, [[0, 1, 0, 2, 3, 1]] * 2, np.ones((2, 5)), {"ep_rank_load": "shape"}),
    "9_slots_over_2_ranks": (2, [[0, 1, 2, 3, 0, 1, 2, 3, 0]] * 2, [[1.0, 2.0]] * 2, {"physical_to_logical": "shape"}),
    "1029_slots_for_4_experts": (1, np.tile(np.arange(1029) % 4, (2, 1)), None, {"physical_to_logical": "shape"}),
    "ep_size_0": (0, [[0, 1, 0, 2, 3, 1]] * 2, [[1.0, 2.0]] * 2,
                  {"physical_to_logical": "ep_size", "ep_rank_load": "ep_size"}),
    "ep_size_5000": (5000, None, np.ones((2, 5000)), {"ep_rank_load": "ep_size"}),
    "expert_4_of_4": (2, [[0, 1, 2, 3, 4, 0]] * 2, None, {"physical_to_logical": "expert_ids"}),
    "expert_3_without_a_slot": (2, [[0, 1, 2, 0, 1, 2]] * 2, None, {"physical_to_logical": "expert_ids"}),
    "load_not_finite": (2, None, [[np.inf, 2.0], [1.0, 2.0]], {"ep_rank_load": "value"}),
    "load_negative": (2, None, [[-1.0, 2.0], [1.0, 2.0]], {"ep_rank_load": "value"}),
}


@pytest.mark.parametrize("case", sorted(SECTION_CASES))
def test_format_2_sections_that_do_not_fit_the_header_are_refused_and_the_counts_still_read(tmp_path, case):
    """The real writer publishes what a buggy or version-skewed plugin could: sections whose shape or contents do
    not fit the header. The reader refuses those sections (section -> reason) and returns the rest; a refused
    section's bytes are not kept."""
    ep_size, placement, load, expected = SECTION_CASES[case]
    shape = Shape(num_layers=2, num_experts=4, num_token_buckets=1, num_duration_buckets=1,
                  num_physical=np.shape(placement)[1] if placement is not None else 0,
                  num_load_ranks=np.shape(load)[1] if load is not None else 0)
    arrays = dict(layer_ids=np.arange(2, dtype=np.int32), layer_flags=np.ones(2, dtype=np.uint8),
                  counts=np.arange(8).reshape(2, 4), token_bounds=np.array([2**63 - 1]),
                  duration_bounds=np.array([np.inf]), step_hist=np.zeros((3, 1, 1)), step_seconds=np.zeros((3, 1)),
                  step_tokens=np.zeros((3, 1)), step_count=np.zeros((3, 1)), physical_to_logical=placement,
                  ep_rank_load=load)
    w = SegmentWriter(str(tmp_path), "m", Ranks(ep_size=ep_size), shape, top_k=2)
    w.publish(arrays)
    snap = read_segment(w.path)
    assert {r.section: r.reason for r in snap.refused} == expected
    assert all(r.message for r in snap.refused)
    assert snap.counts.tolist() == arrays["counts"].tolist()
    for name, written in (("physical_to_logical", placement), ("ep_rank_load", load)):
        got = getattr(snap, name)
        if written is None or name in expected:
            assert got is None, name
        else:
            assert got.tolist() == np.asarray(written).tolist(), name
    held = {}  # the buffers the snapshot's arrays keep alive
    for f in ("layer_ids", "layer_flags", "counts", "token_bounds", "duration_bounds", "step_hist", "step_seconds",
              "step_tokens", "physical_to_logical", "ep_rank_load"):
        a = getattr(snap, f)
        while isinstance(a, np.ndarray) and a.base is not None:
            a = a.base
        if a is not None:
            held[id(a)] = a.nbytes if isinstance(a, (np.ndarray, memoryview)) else len(a)
    assert sum(held.values()) < 4096  # not the file
