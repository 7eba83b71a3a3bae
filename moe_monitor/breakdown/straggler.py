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
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass


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


def ep_wait(ranks_ops: dict[str, list[Collective]], tolerance_us: float = 30.0) -> dict | None:
    """None with fewer than two ranks or no EP collective matched on all of them."""
    ranks = sorted(ranks_ops)
    if len(ranks) < 2:
        return None
    wait = dict.fromkeys(ranks, 0.0)
    caused = dict.fromkeys(ranks, 0.0)
    last = dict.fromkeys(ranks, 0)
    layers: dict[int, dict] = {}
    anchors = ranks_ops[ranks[0]]
    partners = {r: _pair(anchors, ranks_ops[r], tolerance_us) for r in ranks[1:]}
    matched = 0
    for i, anchor in enumerate(anchors):
        if any(i not in partners[r] for r in ranks[1:]):
            continue
        group = [anchor] + [partners[r][i] for r in ranks[1:]]
        matched += 1
        durations = [c.us for c in group]
        shortest = min(durations)
        straggler = ranks[durations.index(shortest)]
        waits = [d - shortest for d in durations]
        last[straggler] += 1
        caused[straggler] += sum(waits)
        row = None
        if anchor.layer is not None:
            row = layers.setdefault(anchor.layer, {"wait_us": dict.fromkeys(ranks, 0.0),
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
        "unmatched": len(ranks_ops[ranks[0]]) - matched,  # the first rank's EP collectives with no partner
        "wait_us": wait,  # per rank: time its EP collectives spent waiting for the last rank
        "caused_us": caused,  # per rank: the others' wait while it was the last to arrive
        "caused_share": {r: (caused[r] / total if total else 0.0) for r in ranks},
        "last_arrivals": last,  # per rank: collectives it joined last
        "layers": [{"layer": k, **v} for k, v in sorted(layers.items())],  # k: MoE layer index within the step
    }


def _pair(anchors: list[Collective], ops: list[Collective], tolerance: float) -> dict[int, Collective]:
    """anchor index -> its partner among `ops`: same kernel name, ends within `tolerance`, closest pairs first,
    each collective in one pair at most."""
    ordered = sorted(ops, key=lambda c: c.end)
    ends = [c.end for c in ordered]
    candidates = []
    for i, a in enumerate(anchors):
        lo, hi = bisect.bisect_left(ends, a.end - tolerance), bisect.bisect_right(ends, a.end + tolerance)
        candidates += [(abs(ordered[j].end - a.end), i, j) for j in range(lo, hi) if ordered[j].name == a.name]
    pairs, taken = {}, set()
    for _, i, j in sorted(candidates):
        if i not in pairs and j not in taken:
            pairs[i] = ordered[j]
            taken.add(j)
    return pairs


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
