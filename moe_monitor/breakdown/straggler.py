"""Who waits for whom in collectives, and why: from the traces of every rank of one capture.

A collective (a TP all-reduce, an EP dispatch or combine, a sync) completes on every rank at about the same time,
after the last rank joins it. Each rank's kernel therefore lasts its own wait for the last arrival plus the
transfer, and the last rank to arrive has the shortest kernel. Per collective:

    wait(rank) = duration(rank) - min over ranks of duration
    the rank with the shortest kernel is the one the others waited for (it caused sum of the waits)

Kinds (`kind_of`), from the breakdown's category and the kernel name: `ep_dispatch_combine` is the `all_to_all`
row (every collective inside a MoE block, all-to-all / SendRecv / DeepEP anywhere); outside MoE blocks an all-reduce
(`cross_device_reduce_*`, vLLM's custom and quick all-reduce, NCCL `AllReduce`) is `tp_allreduce`, unless NCCL
names an integer type (`AllReduce_Sum_u32`): that is `sync` (vLLM's DP padding sync when NCCL carries it, EPLB's
expert-load all-reduce); all-gather, reduce-scatter, broadcast and reduce are `allgather_reducescatter`; the rest
`other`.

Pairing: the same collective on every rank ends at the same moment (measured on 2 H200s: within 0.4 us), so
each of the first rank's collectives is paired with the collective of the same kind and kernel name on each other
rank whose end is nearest, within `tolerance_us` (closest pairs first; each collective in one pair at most). Ranks
need not have started profiling at the same vLLM step (DP engines do not). The ranks' timestamps must share a
clock: ranks of one host do; across hosts, the clocks must agree within the tolerance (PTP), or their collectives
stay unmatched (counted). The wait is then computed from durations, not from the clock. An EP collective's MoE
layer: its position among its step's EP collectives divided by the collectives per MoE block, when they divide.

Why: each collective also carries its rank's *segment*, from the end of the rank's previous collective to its
start: the device's busy time there (the union of every stream's kernels), its idle time, and the busiest kernels
that started there. When the waiting rank's and the waited-for rank's previous collectives are one paired
collective (both ended at the same moment), the wait is exactly the difference of the two segments, so it splits
into idle and busy: wait = (idle(late) - idle(waiter)) + (busy(late) - busy(waiter)). Idle is the device waiting
for the host (host-bound: vLLM's driver rank scheduling and sampling, or launches slower than the GPU); busy is
computing (more tokens, slower kernels). A wait whose segments do not line up (the first collective of a trace,
an unmatched previous collective) is `unexplained`.

A capture analyses one rank at a time (analyze.py): what it keeps of a rank for the pairing is its collectives as a
`CollectiveTable` (numpy columns, 58 bytes a collective; an EP trace has ~1 in 10 kernels a collective), not its
events, so that memory does not grow by a trace's events per rank.
"""

from __future__ import annotations

import bisect
import functools
import re
from array import array
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from itertools import pairwise
from operator import itemgetter
from typing import overload

import numpy as np
import numpy.typing as npt

from .result import CollectiveWait, EpWait

EP, TP, GATHER, SYNC, OTHER = "ep_dispatch_combine", "tp_allreduce", "allgather_reducescatter", "sync", "other"
KINDS = (TP, GATHER, SYNC, EP, OTHER)  # the order of the report's columns
COMM = ("all_to_all", "collective")  # the breakdown's communication rows
TOP_KERNELS = 3  # busiest kernels kept per segment
_ALL_REDUCE = re.compile(r"all_?reduce|cross_device_reduce|custom_?ar|quick_?reduce", re.IGNORECASE)
_INTEGER = re.compile(r"_(?:[iu](?:8|32|64)|u?int(?:8|32|64)_t)(?:_|\(|$)")  # NCCL: _Sum_u32_, _Sum_int32_t
_GATHER = re.compile(r"all_?gather|reduce_?scatter|broadcast|_reduce_", re.IGNORECASE)


@functools.lru_cache(maxsize=4096)
def kind_of(category: str, name: str) -> str:
    """The collective kind of a communication kernel from its breakdown category and name."""
    if category == "all_to_all":
        return EP
    if _ALL_REDUCE.search(name):
        return SYNC if _INTEGER.search(name) else TP
    return GATHER if _GATHER.search(name) else OTHER


@dataclass(frozen=True)
class Collective:
    end: float  # us, the rank's clock
    us: float  # kernel duration
    name: str
    layer: int | None = None  # EP: MoE layer index within its step (None: not derivable)
    kind: str = EP
    busy_us: float = 0.0  # device busy in its segment: from the end of the rank's previous collective to its start
    idle_us: float = 0.0  # device idle in that segment
    after_prev: bool = False  # the segment starts at the previous collective of its table (else: not comparable)
    top: tuple[tuple[str, float], ...] = ()  # the segment's busiest kernels: (name, us), busiest first


class CollectiveTable(Sequence[Collective]):
    """One rank's collectives in numpy columns, in the order they started; a Sequence of Collective. ~58 bytes
    each where a Collective with its floats is ~300."""

    COLUMNS = ("end", "us", "name", "layer", "kind", "busy", "idle", "after_prev", "top_code", "top_us")

    def __init__(self, collectives: Iterable[Collective] = ()):
        rows = list(collectives)
        codes: dict[str, int] = {}
        self.end = np.array([c.end for c in rows], np.float64)
        self.us = np.array([c.us for c in rows], np.float64)
        self.name = np.array([codes.setdefault(c.name, len(codes)) for c in rows], np.int32)
        self.layer = np.array([-1 if c.layer is None else c.layer for c in rows], np.int32)
        self.kind = np.array([KINDS.index(c.kind) for c in rows], np.int8)
        self.busy = np.array([c.busy_us for c in rows], np.float32)
        self.idle = np.array([c.idle_us for c in rows], np.float32)
        self.after_prev = np.array([c.after_prev for c in rows], bool)
        self.top_code = np.full((len(rows), TOP_KERNELS), -1, np.int32)
        self.top_us = np.zeros((len(rows), TOP_KERNELS), np.float32)
        for i, c in enumerate(rows):
            for k, (name, us) in enumerate(c.top[:TOP_KERNELS]):
                self.top_code[i, k], self.top_us[i, k] = codes.setdefault(name, len(codes)), us
        self.names: list[str] = list(codes)

    def __len__(self) -> int:
        return len(self.end)

    @overload
    def __getitem__(self, i: int) -> Collective: ...

    @overload
    def __getitem__(self, i: slice) -> CollectiveTable: ...

    def __getitem__(self, i: int | slice) -> Collective | CollectiveTable:
        if isinstance(i, slice):  # the rows of a slice, as a table (a Sequence's slice)
            return CollectiveTable.of_columns(self.names, **{c: getattr(self, c)[i] for c in self.COLUMNS})
        layer = int(self.layer[i])
        return Collective(float(self.end[i]), float(self.us[i]), self.names[self.name[i]],
                          None if layer < 0 else layer, KINDS[self.kind[i]], float(self.busy[i]), float(self.idle[i]),
                          bool(self.after_prev[i]), self.top(i))

    def top(self, i: int) -> tuple[tuple[str, float], ...]:
        return tuple((self.names[c], float(us)) for c, us in zip(self.top_code[i].tolist(), self.top_us[i].tolist())
                     if c >= 0)

    def __add__(self, other: CollectiveTable) -> CollectiveTable:  # the first row of `other` stays not comparable
        return CollectiveTable([*self, *other])

    @classmethod
    def of_columns(cls, names: list[str], **columns: npt.ArrayLike) -> CollectiveTable:
        """A table from its columns (name and top_code: codes into `names`), cast to the table's types."""
        table = cls()
        for column, values in columns.items():
            setattr(table, column, np.asarray(values, getattr(table, column).dtype))
        table.names = names
        return table

    def take(self, keep: np.ndarray) -> CollectiveTable:
        """The rows where `keep` is true (their segments stay what they were)."""
        return CollectiveTable.of_columns(self.names, **{c: getattr(self, c)[keep] for c in self.COLUMNS})

    def of_kind(self, kind: str) -> CollectiveTable:
        return self.take(self.kind == KINDS.index(kind))


def table_of(collectives: Sequence[Collective]) -> CollectiveTable:
    return collectives if isinstance(collectives, CollectiveTable) else CollectiveTable(collectives)


def collectives_of(units: list, windows: list[list], step_blocks: list[int]) -> CollectiveTable:
    """One rank's collectives in its steps' windows, from a GPU trace's classified units (analyze.Unit, in start
    order), the units of each step's window and the MoE blocks per step; each with its segment (what the device did
    since the rank's previous collective). Computed before the trace is dropped: the table is all the pairing needs
    of it."""
    firsts = [(w[0].event.ts, blocks) for w, blocks in zip(windows, step_blocks) if w]
    comm, names, columns = _segments(units)
    if not firsts or not comm:
        return CollectiveTable()
    starts = [ts for ts, _ in firsts]
    window = [bisect.bisect_right(starts, u.event.ts) - 1 for u in comm]  # -1: before the first step
    ep_by_window: dict[int, list[int]] = defaultdict(list)  # a step's EP collectives give its MoE layers
    for i, u in enumerate(comm):
        if window[i] >= 0 and u.category == "all_to_all":
            ep_by_window[window[i]].append(i)
    layer = [-1] * len(comm)
    for k, ep in ep_by_window.items():
        blocks = firsts[k][1]
        if blocks and len(ep) % blocks == 0:
            for j, i in enumerate(ep):
                layer[i] = j // (len(ep) // blocks)
    kept = np.array(window) >= 0  # in a step's window: from the first step on
    after_prev = np.frombuffer(columns.pop("after_prev"), np.int8).astype(bool) & kept
    after_prev[np.argmax(kept)] = False  # the first row kept: its previous collective is not in the table
    kind = [KINDS.index(kind_of(u.category, u.event.name)) for u in comm]
    return CollectiveTable.of_columns(
        names, layer=layer, kind=kind, after_prev=after_prev,
        top_code=np.frombuffer(columns.pop("top_code"), np.int32).reshape(-1, TOP_KERNELS),
        top_us=np.frombuffer(columns.pop("top_us"), np.float64).reshape(-1, TOP_KERNELS),
        **{c: np.frombuffer(v, np.int32 if c == "name" else np.float64) for c, v in columns.items()}).take(kept)


def _segments(units: list) -> tuple[list, list[str], dict[str, array]]:
    """Every collective of a rank in start order (its units), the names its columns' codes index, and its columns:
    end, us, name, and its segment's busy and idle time, whether it follows a collective, its busiest kernels
    (TOP_KERNELS codes and times a row). One pass over the units in start order keeping the union of the device's
    intervals as it goes; memory: the collectives' columns, not the units'."""
    if any(b.event.ts < a.event.ts for a, b in pairwise(units)):
        units = sorted(units, key=lambda u: u.event.ts)
    comm: list = []
    codes: dict[str, int] = {}
    inf = float("inf")
    end, us, name, busy_col, idle_col, after_prev, top_code, top_us = columns = (
        array("d"), array("d"), array("i"), array("d"), array("d"), array("b"), array("i"), array("d"))
    lo = -inf  # the previous collective's end: the segment's start (-inf: no collective yet)
    seg_busy = 0.0
    kernels: defaultdict[str, float] = defaultdict(float)
    cur_s = cur_e = -inf  # the union's interval still open
    for u in units:
        event = u.event
        s = event.ts
        e = s + event.dur
        if u.category in COMM:
            busy = idle = 0.0
            if -inf < lo < s:  # not the first collective, nor one starting before the previous ends
                busy = seg_busy + max(0.0, min(cur_e, s) - max(cur_s, lo))
                idle = max(0.0, s - lo - busy)
            top = sorted(kernels.items(), key=itemgetter(1), reverse=True)[:TOP_KERNELS]
            top += [("", 0.0)] * (TOP_KERNELS - len(top))
            comm.append(u)
            end.append(e)
            us.append(u.us)
            name.append(codes.setdefault(event.name, len(codes)))
            busy_col.append(busy)
            idle_col.append(idle)
            after_prev.append(lo > -inf)
            top_code.extend(codes.setdefault(n, len(codes)) if n else -1 for n, _ in top)
            top_us.extend(t for _, t in top)
            lo, seg_busy, kernels = e, 0.0, defaultdict(float)
        elif s >= lo > -inf:
            kernels[event.name] += event.dur
        if s > cur_e:  # the open interval closes: its part in the segment is busy
            if cur_e > lo:
                seg_busy += cur_e - (cur_s if cur_s > lo else lo)
            cur_s, cur_e = s, e
        elif e > cur_e:
            cur_e = e
    names = ("end", "us", "name", "busy", "idle", "after_prev", "top_code", "top_us")
    return comm, list(codes), dict(zip(names, columns))


def collective_wait(ranks_ops: Mapping[str, Sequence[Collective]], tolerance_us: float = 30.0) -> dict | None:
    """Per kind of collective: each rank's wait, the rank it waited for, the waiting each rank caused and why. None
    with fewer than two ranks or no collective at all."""
    ranks = sorted(ranks_ops)
    if len(ranks) < 2:
        return None
    tables = [table_of(ranks_ops[r]) for r in ranks]
    if not any(len(t) for t in tables):
        return None
    partner = _match(tables, tolerance_us)
    anchor_of = []  # per rank, per row: the first rank's row it is paired with (-1: none)
    for k, t in enumerate(tables):
        a = np.full(len(t), -1, np.int64)
        found = partner[k] >= 0
        a[partner[k, found]] = np.flatnonzero(found)
        anchor_of.append(a)
    full = (partner >= 0).all(axis=0)
    acc = {KINDS[k]: _KindSums(ranks) for t in tables for k in np.unique(t.kind).tolist()}
    for i in np.flatnonzero(full).tolist():
        rows = partner[:, i].tolist()
        durations = [float(t.us[j]) for t, j in zip(tables, rows)]
        s = durations.index(min(durations))
        sums = acc[KINDS[tables[0].kind[i]]]
        sums.collectives += 1
        sums.last[ranks[s]] += 1
        idle_part = busy_part = 0.0
        for w in range(len(ranks)):
            if w == s:
                continue
            wait = durations[w] - durations[s]
            sums.wait[ranks[w]] += wait
            sums.caused[ranks[s]] += wait
            sums.by[ranks[w]][ranks[s]] += wait
            if _aligned(tables, anchor_of, w, rows[w], s, rows[s]):
                idle_part += float(tables[s].idle[rows[s]]) - float(tables[w].idle[rows[w]])
                busy_part += float(tables[s].busy[rows[s]]) - float(tables[w].busy[rows[w]])
        sums.idle[ranks[s]] += idle_part
        sums.busy[ranks[s]] += busy_part
        if busy_part > 0:
            for name, us in tables[s].top(rows[s]):
                kernels = sums.kernels[ranks[s]]
                kernels[name] = kernels.get(name, 0.0) + us
    for k, t in enumerate(tables):
        matched = np.zeros(len(t), bool)
        matched[partner[k, full]] = True
        for code in np.unique(t.kind[~matched]).tolist():
            acc[KINDS[code]].unmatched[ranks[k]] = int(np.count_nonzero(~matched & (t.kind == code)))
    return {"ranks": ranks, "kinds": {kind: acc[kind].result() for kind in KINDS if kind in acc}}


class _KindSums:
    def __init__(self, ranks: list[str]):
        self.collectives = 0
        self.unmatched = dict.fromkeys(ranks, 0)
        self.last = dict.fromkeys(ranks, 0)
        self.wait, self.caused, self.idle, self.busy = (dict.fromkeys(ranks, 0.0) for _ in range(4))
        self.by = {r: dict.fromkeys(ranks, 0.0) for r in ranks}  # waiter -> waited-for rank -> us
        self.kernels: dict[str, dict[str, float]] = {r: {} for r in ranks}

    def result(self) -> dict:
        why = {}
        for r, caused in self.caused.items():
            if caused <= 0:
                continue
            parts = {"host-bound": self.idle[r], "busy": self.busy[r],
                     "unexplained": caused - self.idle[r] - self.busy[r]}
            kernels = sorted(self.kernels[r].items(), key=lambda kv: -kv[1])[:TOP_KERNELS]
            why[r] = {"idle_us": self.idle[r], "busy_us": self.busy[r], "unexplained_us": parts["unexplained"],
                      "reason": max(parts, key=parts.__getitem__), "kernels": [[name, us] for name, us in kernels]}
        return {
            "collectives": self.collectives,  # matched on every rank
            "unmatched": self.unmatched,  # per rank: its collectives of this kind not matched on every rank
            "wait_us": self.wait,  # per rank: time its collectives spent waiting for the last rank
            "waited_for": {r: (max(by, key=by.__getitem__) if self.wait[r] > 0 else None) for r, by in self.by.items()},
            "caused_us": self.caused,  # per rank: the others' wait while it was the last to arrive
            "last_arrivals": self.last,
            "why": why,  # per rank that caused waiting: that waiting split into its device idle and busy excess
        }


def _aligned(tables, anchor_of, w: int, jw: int, s: int, js: int) -> bool:
    """Both ranks' segments start at one paired collective: then their difference is the wait."""
    if not (tables[w].after_prev[jw] and tables[s].after_prev[js]):
        return False
    a = anchor_of[w][jw - 1]
    return a >= 0 and a == anchor_of[s][js - 1]


def _match(tables: list[CollectiveTable], tolerance: float) -> np.ndarray:
    """[rank, row of the first rank's table]: the row of its partner on that rank (-1: none), same kind and name."""
    anchors = tables[0]
    partner = np.full((len(tables), len(anchors)), -1, np.int64)
    partner[0] = np.arange(len(anchors))
    for k, ops in enumerate(tables[1:], 1):
        for kind in np.unique(anchors.kind).tolist():
            a, o = np.flatnonzero(anchors.kind == kind), np.flatnonzero(ops.kind == kind)
            p = _pair(anchors.end[a], [anchors.names[c] for c in anchors.name[a].tolist()],
                      ops.end[o], [ops.names[c] for c in ops.name[o].tolist()], tolerance)
            partner[k, a[p >= 0]] = o[p[p >= 0]]
    return partner


def ep_wait(ranks_ops: Mapping[str, Sequence[Collective]], tolerance_us: float = 30.0) -> dict | None:
    """EP dispatch/combine only, per rank and per MoE layer. None with fewer than two ranks or no EP collective
    matched on all of them. Each rank's collectives: a list of Collective or a CollectiveTable (what a capture
    keeps of a rank)."""
    ranks = sorted(ranks_ops)
    if len(ranks) < 2:
        return None
    wait = dict.fromkeys(ranks, 0.0)
    caused = dict.fromkeys(ranks, 0.0)
    last = dict.fromkeys(ranks, 0)
    layers: dict[int, dict] = {}
    tables = [table_of(ranks_ops[r]).of_kind(EP) for r in ranks]
    partner = _match(tables, tolerance_us)
    anchors = tables[0]
    matched = 0
    for i in np.flatnonzero((partner >= 0).all(axis=0)).tolist():
        matched += 1
        durations_i = [float(t.us[j]) for t, j in zip(tables, partner[:, i].tolist())]
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


def _pair(a_end: np.ndarray, a_names: list[str], o_end: np.ndarray, o_names: list[str],
          tolerance: float) -> np.ndarray:
    """For each anchor, the index among the others of its partner (-1: none): same kernel name, ends within
    `tolerance`, closest pairs first, each collective in one pair at most."""
    order = np.argsort(o_end, kind="stable")
    ends = o_end[order]
    lo = np.searchsorted(ends, a_end - tolerance, "left").tolist()
    hi = np.searchsorted(ends, a_end + tolerance, "right").tolist()
    ends_, anchor_ends = ends.tolist(), a_end.tolist()
    names = [o_names[j] for j in order.tolist()]
    candidates = []
    for i, (e, name) in enumerate(zip(anchor_ends, a_names)):
        candidates += [(abs(ends_[j] - e), i, j) for j in range(lo[i], hi[i]) if names[j] == name]
    partner, taken, order_ = [-1] * len(a_names), set(), order.tolist()
    for _, i, j in sorted(candidates):
        if partner[i] < 0 and j not in taken:
            partner[i] = order_[j]
            taken.add(j)
    return np.array(partner, np.int64)


def render(result: EpWait | None) -> list[str]:
    """The EP table (ep_wait's result, typed)."""
    if not result:
        return []
    lines = ["", f"EP communication wait ({result.collectives} collectives matched across "
                 f"{len(result.ranks)} ranks" + (f", {result.unmatched} of the first rank's left unmatched"
                                                 if result.unmatched else "") + "):",
             f"  {'rank':24s} {'waited ms':>10s} {'made others wait ms':>20s} {'share':>7s} {'joined last':>12s}"]
    for r in result.ranks:
        lines.append(f"  {r:24s} {result.wait_us[r] / 1000:10.3f} {result.caused_us[r] / 1000:20.3f} "
                     f"{100 * result.caused_share[r]:6.1f} % {result.last_arrivals[r]:12d}")
    worst = sorted(result.layers, key=lambda x: -sum(x.wait_us.values()))[:5]
    if worst:
        lines.append("  MoE layers with the most waiting (layer: total wait ms; the rank waited for):")
        for row in worst:
            culprit = max(row.caused_us, key=row.caused_us.__getitem__)
            lines.append(f"    layer {row.layer:3d}: {sum(row.wait_us.values()) / 1000:.3f} ms; {culprit}")
    return lines


def render_kinds(result: CollectiveWait | None, waiters: int = 4) -> list[str]:
    """The per-kind table (collective_wait's result, typed): each rank's wait per kind, then per kind who waited
    for whom and why the waited-for rank was late."""
    if not result or not result.kinds:
        return []
    kinds, ranks = result.kinds, result.ranks
    width = {k: max(len(k), 12) + 2 for k in kinds}
    lines = ["", f"Collective wait per kind ({len(ranks)} ranks): ms each rank's collectives waited for the last "
                 "rank to join",
             f"  {'rank':24s}" + "".join(f"{k:>{width[k]}s}" for k in kinds)]
    for r in ranks:
        lines.append(f"  {r:24s}" + "".join(f"{kinds[k].wait_us[r] / 1000:{width[k]}.3f}" for k in kinds))
    counts = {k: f"{row.collectives} ({sum(row.unmatched.values())})" for k, row in kinds.items()}
    lines.append(f"  {'matched (unmatched)':24s}" + "".join(f"{counts[k]:>{width[k]}s}" for k in kinds))
    lines.append("  who and why (the late rank's device since both ranks' previous collective: idle = host-bound, "
                 "busy = computing):")
    for kind, row in kinds.items():
        floor = 0.01 * sum(row.wait_us.values())  # leave out who waited or caused under 1 % of the kind's wait
        for w in sorted((r for r in ranks if row.wait_us[r] > floor), key=lambda r: -row.wait_us[r])[:waiters]:
            lines.append(f"    {kind}: {w} waited {row.wait_us[w] / 1000:.3f} ms, most for {row.waited_for[w]}")
        late = [(s, why) for s, why in row.why.items() if row.caused_us[s] > floor]
        for s, why in sorted(late, key=lambda kv: -row.caused_us[kv[0]])[:waiters]:
            lines.append(f"      {s} joined last {row.last_arrivals[s]} of {row.collectives}, made others wait "
                         f"{row.caused_us[s] / 1000:.3f} ms: {why.reason} (device idle {why.idle_us / 1000:+.3f} ms, "
                         f"busy {why.busy_us / 1000:+.3f} ms, unexplained {why.unexplained_us / 1000:.3f} ms)")
            if why.kernels and why.busy_us > 0.1 * row.caused_us[s]:
                lines.append("        busiest kernels before it: " + ", ".join(
                    f"{_short(name)} {us / 1000:.3f} ms" for name, us in why.kernels))
    return lines


def _short(name: str, n: int = 48) -> str:
    return name if len(name) <= n else name[:n - 3] + "..."
