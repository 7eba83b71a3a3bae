"""The publisher's fast path (issue #27 part 2) writes the same bytes as the format's reference serialisation.

SegmentWriter patches a pre-packed header in place and writes the arrays it is given straight from their memory
(pwritev); layout.pack_header + layout.encode_payload are the format's plain definition. Whatever arrays come in
(C or Fortran order, strided views, other dtypes, lists), the file must be byte for byte what the definition gives,
publish after publish, and the publisher's cached layer flags must follow the recorder's seen rows.
"""

from __future__ import annotations

import os
import zlib
from dataclasses import replace

import numpy as np
import pytest
import torch

from moe_monitor.channel import LAYER_HOOKED, LAYER_UNOBSERVABLE, Ranks, SegmentWriter, Shape, read_segment
from moe_monitor.channel.layout import HEADER_OFFSETS, HEADER_SIZE, Header, encode_payload, pack_header


def _arrays(shape: Shape, rng: np.random.Generator, layout: str) -> dict:
    L, E, P = shape.num_layers, shape.num_experts, shape.num_phases
    TB, DB, S, R = shape.num_token_buckets, shape.num_duration_buckets, shape.num_physical, shape.num_load_ranks
    counts = rng.integers(0, 2**40, (L, E + 1), dtype=np.int64)
    a = dict(layer_ids=rng.integers(0, 100, L, dtype=np.int32), layer_flags=rng.integers(0, 4, L, dtype=np.uint8),
             counts=counts[:, :E], token_bounds=np.arange(1, TB + 1, dtype=np.int64),
             duration_bounds=np.linspace(0.001, 1, DB), step_hist=rng.integers(0, 99, (P, TB, DB)),
             step_seconds=rng.random((P, TB)), step_tokens=rng.integers(0, 2**30, (P, TB)))
    a["step_count"] = a["step_hist"].sum(axis=2) + rng.integers(0, 99, (P, TB))
    if S:
        a["physical_to_logical"] = np.tile(np.arange(S) % E, (L, 1))
        a["ep_rank_load"] = rng.random((L, R))
    if layout == "fortran":
        a = {k: np.asfortranarray(v) for k, v in a.items()}
    elif layout == "other_dtypes":
        a.update(layer_ids=a["layer_ids"].astype(np.int64), layer_flags=a["layer_flags"].astype(np.int32),
                 counts=np.ascontiguousarray(a["counts"]).astype(">i8"), step_seconds=a["step_seconds"].tolist())
    return a


def _reference(h: Header, shape: Shape, arrays: dict) -> bytes:
    payload = encode_payload(shape, arrays)
    count = np.asarray(arrays["step_count"], dtype="<i8").tobytes(order="C")  # the step_count extension
    head = pack_header(replace(h, payload_crc32=zlib.crc32(payload), step_count_crc32=zlib.crc32(count)))
    return head + payload + count


@pytest.mark.parametrize("layout", ["contiguous", "fortran", "other_dtypes"])
@pytest.mark.parametrize("shape", [Shape(61, 256, 8, 16), Shape(3, 5, 2, 1), Shape(4, 8, 8, 16, num_physical=10,
                                                                                    num_load_ranks=2)])
def test_the_file_is_the_reference_serialisation_publish_after_publish(tmp_path, shape, layout):
    rng = np.random.default_rng(0)
    ranks = Ranks(global_rank=3, world_size=4, ep_rank=1, ep_size=2 if shape.num_load_ranks else 1)
    w = SegmentWriter(str(tmp_path), "Qwen/Qwen3-30B-A3B", ranks, shape, top_k=8)
    for k in range(3):  # the first publish creates the file, later ones rewrite it in place
        arrays = _arrays(shape, rng, layout)
        w.publish(arrays, publish_errors=k * 7)
        with open(w.path, "rb") as f:
            data = f.read()
        updated = int.from_bytes(data[HEADER_OFFSETS["updated_unix_ns"]:][:8], "little", signed=True)
        h = replace(w._header, seq=2 * k, updated_unix_ns=updated, publish_errors=k * 7)
        assert data == _reference(h, shape, arrays)
        assert len(data) == HEADER_SIZE + shape.payload_size + 8 * shape.num_phases * shape.num_token_buckets
        assert read_segment(w.path).header.seq == 2 * k
    w.close()


def test_a_file_recreated_after_a_reset_starts_again_at_seq_0_with_the_same_generation(tmp_path):
    shape = Shape(2, 4, 1, 1)
    w = SegmentWriter(str(tmp_path), "m", Ranks(), shape, top_k=2)
    arrays = _arrays(shape, np.random.default_rng(1), "contiguous")
    w.publish(arrays)
    w.publish(arrays)
    assert read_segment(w.path).header.seq == 2
    os.unlink(w.path)
    w.publish(arrays)
    snap = read_segment(w.path)
    assert (snap.header.seq, snap.header.generation) == (0, w.generation)
    w.close()


def test_published_layer_flags_follow_the_rows_the_router_reached(tmp_path):
    from moe_monitor.plugin.attach import Attachment, MoELayer
    from moe_monitor.plugin.publisher import Publisher
    from moe_monitor.plugin.recorder import Recorder
    from moe_monitor.plugin.steps import StepStats

    rec, steps = Recorder(3, 8, 2, "cpu"), StepStats()
    layers = Attachment([MoELayer(0, "a", 8, 2, None, True), MoELayer(1, "b", 8, 2, None, True),
                         MoELayer(2, "c", 8, 2, None, False)])
    shape = Shape(3, 8, len(steps.token_bounds), len(steps.duration_bounds))
    pub = Publisher(SegmentWriter(str(tmp_path), "m", Ranks(), shape, 2), rec, steps, layers, 60)
    hooked, bypassed = LAYER_HOOKED, LAYER_HOOKED | LAYER_UNOBSERVABLE

    def published() -> list[int]:
        assert pub.publish_once()
        return read_segment(pub.writer.path).layer_flags.tolist()

    assert published() == [hooked, hooked, LAYER_UNOBSERVABLE]  # no step yet
    rec.set_valid_tokens(1)
    rec.record(0, torch.tensor([[1, 2]]))
    steps.record_step("prefill", 1, 0.01)
    assert published() == [hooked, bypassed, LAYER_UNOBSERVABLE]
    assert published() == [hooked, bypassed, LAYER_UNOBSERVABLE]  # from the cache
    rec.record(1, torch.tensor([[3, 4]]))  # the router of row 1 ran after all
    assert published() == [hooked, hooked, LAYER_UNOBSERVABLE]
    assert not pub.layer_flags(True).flags.writeable  # the cached answer cannot be changed by a caller
