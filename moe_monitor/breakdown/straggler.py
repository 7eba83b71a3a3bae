"""Who waits for whom in EP communication: from the traces of every rank of one capture.

An EP collective (dispatch or combine of a MoE layer: the breakdown's `all_to_all` row) completes on every rank at
about the same time, after the last rank joins it. Each rank's kernel therefore lasts its own wait for the last
arrival plus the transfer, and the last rank to arrive has the shortest kernel. Per collective:

    wait(rank) = duration(rank) - min over ranks of duration
    the rank with the shortest kernel is the one the others waited for (it caused sum of the waits)

Pairing: the same collective on every rank ends at the same moment (measured on 2 H200s: within 0.4 us), so
each of the first rank's EP collectives is paired with the collective of the same kernel name on each other rank
whose end is nearest, within `tolerance_us` (closest pairs first; each collective in one pair at most). Ranks
need not have started profiling at the same vLLM step (DP engines do not). The ranks' timestamps must share a
clock: ranks of one host do; across hosts, the clocks must agree within the tolerance (PTP), or their
collectives stay unmatched (counted). The wait is then computed from durations, not from the clock. A
collective's MoE layer: its position among its step's EP collectives divided by the collectives per MoE block
(dispatch + combine: 2), when they divide evenly.

A capture analyses one rank at a time (analyze.py): what it keeps of a rank for the pairing is its collectives as a
`CollectiveTable` (numpy columns, 24 bytes a collective; an EP trace has ~1 in 10 kernels a collective), not its
events, so that memory does not grow by a trace's events per rank.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Collective:
    end: float  # us, the rank's clock
    us: float  # kernel duration
    name: str
    layer: int | None  # MoE layer index within its step (None: not derivable)


def collectives_of(step_units: list[list], step_blocks: list[int]) -> list[Collective]:
    """One rank's EP collectives from its steps' units (already classified) and MoE blocks per step."""
    out = []
    for units, blocks in zip(step_units, step_blocks):
        ep = sorted((u for u in units if u.category == "all_to_all"), key=lambda u: u.event.ts)
        per_layer = len(ep) // blocks if blocks and len(ep) % blocks == 0 else 0
        out += [Collective(u.event.ts + u.event.dur, u.us, u.event.name, j // per_layer if per_layer else None)
                for j, u in enumerate(ep)]
    return out


class CollectiveTable(Sequence):
    """One rank's EP collectives in numpy columns (end, us, name, layer), in their order; a Sequence of
    Collective. ~24 bytes each where a Collective with its floats is ~150."""

    def __init__(self, collectives: Iterable[Collective] = ()):
        rows = list(collectives)
        codes: dict[str, int] = {}
        self.end = np.array([c.end for c in rows], np.float64)
        self.us = np.array([c.us for c in rows], np.float64)
        self.name = np.array([codes.setdefault(c.name, len(codes)) for c in rows], np.int32)
        self.layer = np.array([-1 if c.layer is None else c.layer for c in rows], np.int32)
        self.names: list[str] = list(codes)

    def __len__(self) -> int:
        return len(self.end)

    def __getitem__(self, i: int) -> Collective:
        layer = int(self.layer[i])
        return Collective(float(self.end[i]), float(self.us[i]), self.names[self.name[i]],
                          None if layer < 0 else layer)

    def __add__(self, other: CollectiveTable) -> CollectiveTable:
        return CollectiveTable([*self, *other])


def table_of(collectives: Sequence[Collective]) -> CollectiveTable:
    return collectives if isinstance(collectives, CollectiveTable) else CollectiveTable(collectives)


def ep_wait(ranks_ops: dict[str, Sequence[Collective]], tolerance_us: float = 30.0) -> dict | None:
    """None with fewer than two ranks or no EP collective matched on all of them. Each rank's collectives: a list
    of Collective or a CollectiveTable (what a capture keeps of a rank)."""
    ranks = sorted(ranks_ops)
    if len(ranks) < 2:
        return None
    wait = dict.fromkeys(ranks, 0.0)
    caused = dict.fromkeys(ranks, 0.0)
    last = dict.fromkeys(ranks, 0)
    layers: dict[int, dict] = {}
    anchors = table_of(ranks_ops[ranks[0]])
    durations = np.empty((len(ranks), len(anchors)), np.float64)  # [rank, anchor]: its partner's duration
    durations[0] = anchors.us
    paired = np.ones(len(anchors), bool)  # partnered on every rank
    for k, r in enumerate(ranks[1:], 1):
        ops = table_of(ranks_ops[r])
        partner = _pair(anchors, ops, tolerance_us)
        found = partner >= 0
        durations[k, found] = ops.us[partner[found]]
        paired &= found
    matched = 0
    for i in np.flatnonzero(paired).tolist():
        matched += 1
        durations_i = durations[:, i].tolist()
        shortest = min(durations_i)
        straggler = ranks[durations_i.index(shortest)]
        waits = [d - shortest for d in durations_i]
        last[straggler] += 1
        caused[straggler] += sum(waits)
        row = None
        layer = int(anchors.layer[i])
        if layer >= 0:
            row = layers.setdefault(layer, {"wait_us": dict.fromkeys(ranks, 0.0),
                                            "caused_us": dict.fromkeys(ranks, 0.0)})
            row["caused_us"][straggler] += sum(waits)
        for r, w in zip(ranks, waits):
            wait[r] += w
            if row is not None:
                row["wait_us"][r] += w
    if not matched:
        return None
    total = sum(caused.values())
    return {
        "ranks": ranks,
        "collectives": matched,
        "unmatched": len(anchors) - matched,  # the first rank's EP collectives with no partner
        "wait_us": wait,  # per rank: time its EP collectives spent waiting for the last rank
        "caused_us": caused,  # per rank: the others' wait while it was the last to arrive
        "caused_share": {r: (caused[r] / total if total else 0.0) for r in ranks},
        "last_arrivals": last,  # per rank: collectives it joined last
        "layers": [{"layer": k, **v} for k, v in sorted(layers.items())],  # k: MoE layer index within the step
    }


def _pair(anchors: CollectiveTable, ops: CollectiveTable, tolerance: float) -> np.ndarray:
    """For each anchor, the index in `ops` of its partner (-1: none): same kernel name, ends within `tolerance`,
    closest pairs first, each collective in one pair at most."""
    order = np.argsort(ops.end, kind="stable")
    ends = ops.end[order]
    lo = np.searchsorted(ends, anchors.end - tolerance, "left").tolist()
    hi = np.searchsorted(ends, anchors.end + tolerance, "right").tolist()
    ends_, anchor_ends = ends.tolist(), anchors.end.tolist()
    names = [ops.names[c] for c in ops.name[order].tolist()]
    anchor_names = [anchors.names[c] for c in anchors.name.tolist()]
    candidates = []
    for i, (a_end, a_name) in enumerate(zip(anchor_ends, anchor_names)):
        candidates += [(abs(ends_[j] - a_end), i, j) for j in range(lo[i], hi[i]) if names[j] == a_name]
    partner, taken, order_ = [-1] * len(anchors), set(), order.tolist()
    for _, i, j in sorted(candidates):
        if partner[i] < 0 and j not in taken:
            partner[i] = order_[j]
            taken.add(j)
    return np.array(partner, np.int64)


def render(result: dict | None) -> list[str]:
    if not result:
        return []
    lines = ["", f"EP communication wait ({result['collectives']} collectives matched across "
                 f"{len(result['ranks'])} ranks" + (f", {result['unmatched']} of the first rank's left unmatched"
                                                    if result["unmatched"] else "") + "):",
             f"  {'rank':24s} {'waited ms':>10s} {'made others wait ms':>20s} {'share':>7s} {'joined last':>12s}"]
    for r in result["ranks"]:
        lines.append(f"  {r:24s} {result['wait_us'][r] / 1000:10.3f} {result['caused_us'][r] / 1000:20.3f} "
                     f"{100 * result['caused_share'][r]:6.1f} % {result['last_arrivals'][r]:12d}")
    worst = sorted(result["layers"], key=lambda x: -sum(x["wait_us"].values()))[:5]
    if worst:
        lines.append("  MoE layers with the most waiting (layer: total wait ms; the rank waited for):")
        for row in worst:
            culprit = max(row["caused_us"], key=row["caused_us"].get)
            lines.append(f"    layer {row['layer']:3d}: {sum(row['wait_us'].values()) / 1000:.3f} ms; {culprit}")
    return lines
