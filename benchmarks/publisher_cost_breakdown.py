"""Where `Publisher.publish_once` spends its time, stage by stage (issue #27 part 2).

The set-up of `plugin_host_cost.py --publisher LxE` (CPU recorder, a real SegmentWriter into a temporary directory),
with each stage wrapped in a perf_counter_ns pair and summed per publish: StepStats.snapshot, Recorder.host_counts,
Publisher.layer_flags, the payload's encoding (encode_payload or payload_parts, whichever the writer calls),
zlib.crc32, the header (pack_header, dataclasses.replace), and the writer's system calls (stat, fstat, pwrite,
pwritev). "other" is the publish's wall time less its stages: Python glue. The wrappers add ~0.2 us a call, counted
in the stages. Runs against whichever moe_monitor is first on sys.path (PYTHONPATH=<a checkout> for a "before").

    .venv/bin/python benchmarks/publisher_cost_breakdown.py 61x256 24x128

Stages that release the GIL: zlib.crc32 over more than 5 KiB (the counts: CPython's zlib module), the system calls.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from collections import defaultdict

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import timing  # noqa: E402

NS: dict[str, int] = defaultdict(int)  # stage -> ns in the current publish


def timed(name: str, fn):
    return timing.timed(name, fn, lambda key, ns: NS.__setitem__(key, NS[key] + ns))


class Shim:
    """A module whose named functions are timed; everything else is the module's."""

    def __init__(self, module, names: dict[str, str]):
        self._module = module
        for attr, stage in names.items():
            if hasattr(module, attr):
                setattr(self, attr, timed(stage, getattr(module, attr)))

    def __getattr__(self, name):
        return getattr(self._module, name)


def instrument() -> None:
    import zlib

    from moe_monitor.channel import writer
    from moe_monitor.plugin import publisher, recorder, steps

    steps.StepStats.snapshot = timed("steps.snapshot", steps.StepStats.snapshot)
    recorder.Recorder.host_counts = timed("recorder.host_counts", recorder.Recorder.host_counts)
    publisher.Publisher.layer_flags = timed("publisher.layer_flags", publisher.Publisher.layer_flags)
    for name, stage in (("encode_payload", "encode payload"), ("payload_parts", "encode payload"),
                        ("pack_header", "header"), ("replace", "header")):
        if hasattr(writer, name):
            setattr(writer, name, timed(stage, getattr(writer, name)))
    writer.zlib = Shim(zlib, {"crc32": "crc32"})
    writer.os = Shim(os, {"stat": "stat/fstat", "fstat": "stat/fstat", "pwrite": "pwrite/pwritev",
                          "pwritev": "pwrite/pwritev"})


def make_publisher(layers: int, experts: int):
    import torch

    from moe_monitor.channel import Ranks, SegmentWriter, Shape
    from moe_monitor.plugin.attach import Attachment, MoELayer
    from moe_monitor.plugin.publisher import Publisher
    from moe_monitor.plugin.recorder import Recorder
    from moe_monitor.plugin.steps import StepStats

    recorder = Recorder(layers, experts, 8, "cpu")  # as plugin_host_cost.py --publisher
    recorder.counts[:, :experts] = torch.from_numpy(np.random.default_rng(0).integers(0, 1 << 40, (layers, experts)))
    recorder.seen_rows.update(range(layers))
    steps = StepStats()
    steps.record_step("decode", 8, 0.01)
    attachment = Attachment([MoELayer(i, f"layers.{i}.mlp", experts, 8, None, True) for i in range(layers)])
    shape = Shape(layers, experts, len(steps.token_bounds), len(steps.duration_bounds))
    writer = SegmentWriter(tempfile.mkdtemp(prefix="seg_"), "bench", Ranks(), shape, 8)
    return Publisher(writer, recorder, steps, attachment, 1.0)


def breakdown(layers: int, experts: int, repeats: int) -> None:
    pub = make_publisher(layers, experts)
    pub.publish_once()  # creates the file
    per: dict[str, list[int]] = defaultdict(list)
    for _ in range(repeats):
        NS.clear()
        t = time.perf_counter_ns()
        assert pub.publish_once()
        total = time.perf_counter_ns() - t
        per["TOTAL"].append(total)
        per["other (Python glue)"].append(total - sum(NS.values()))
        for stage, ns in NS.items():
            per[stage].append(ns)
    print(f"{layers}x{experts}: {repeats} publishes, median us per publish (stages' medians need not sum)")
    for stage, v in sorted(per.items(), key=lambda kv: -statistics.median(kv[1])):
        print(f"    {stage:24s} {statistics.median(v) / 1e3:7.1f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("shapes", nargs="*", default=["61x256", "24x128"], metavar="LxE")
    ap.add_argument("--repeats", type=int, default=500)
    args = ap.parse_args()
    instrument()
    for s in args.shapes:
        breakdown(*map(int, s.lower().split("x")), args.repeats)
    sys.stdout.flush()


if __name__ == "__main__":
    main()
