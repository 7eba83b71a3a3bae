"""Where a step's time goes: classify a trace's device kernels (or CPU ops) into MoE categories and sum them.

Pure functions over the events `trace.read_trace` returns; the policy (patterns) lives in categories.toml.
docs/breakdown.md explains the rules and what is and is not attributable.
"""

from __future__ import annotations

import bisect
import functools
import re
import tomllib
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass
from importlib import resources

from .result import (
    BLOCK_FIGURES,
    BlockMeans,
    BreakdownResult,
    Category,
    KernelRow,
    RankRow,
    StepRow,
    UnplacedRow,
    collective_wait_from_json,
    ep_wait_from_json,
)
from .straggler import COMM as COMM_CATEGORIES
from .straggler import CollectiveTable, collective_wait, collectives_of, ep_wait
from .trace import LIMITS, Event, Trace, TraceLimits, read_trace, step_phase

MNK_RE = re.compile(r"(\d+)x(\d+)x(\d+)")
TOKEN_BUCKETS = (1, 8, 32, 128, 512, 2048)
MEMORY_CATS = ("gpu_memcpy", "gpu_memset")  # device events that are copies, whatever runs them


class Anchors(dict[str, re.Pattern]):
    """The [anchors] patterns by kind, with the kinds each kernel name matches memoised: a trace repeats a few
    hundred names hundreds of thousands of times, and the classifier asks several kinds of each."""

    def __init__(self, patterns: dict[str, re.Pattern]):
        super().__init__(patterns)
        self._kinds: dict[str, frozenset[str]] = {}

    def kinds(self, name: str) -> frozenset[str]:
        got = self._kinds.get(name)
        if got is None:
            got = self._kinds[name] = frozenset(k for k, p in self.items() if p.search(name))
        return got


@dataclass(frozen=True)
class Rules:
    categories: tuple[str, ...]
    annotations: tuple[tuple[str, re.Pattern], ...]
    anchors: Anchors
    patterns: tuple[tuple[str, re.Pattern], ...]


def default_rules_text() -> str:
    """The packaged categories.toml."""
    return resources.files(__package__).joinpath("categories.toml").read_text()


def load_rules(path: str | None = None) -> Rules:
    if path is None:
        doc = tomllib.loads(default_rules_text())
    else:
        with open(path, "rb") as f:
            doc = tomllib.load(f)
    flags = re.IGNORECASE
    try:
        return Rules(
            tuple(doc["categories"]),
            tuple((c, re.compile(p, flags)) for c, p in doc.get("annotations", {}).items()),
            Anchors({k: re.compile(p, flags) for k, p in doc["anchors"].items()}),
            tuple((c["name"], re.compile(c["pattern"], flags)) for c in doc["category"]),
        )
    except (KeyError, TypeError, re.error) as e:
        raise ValueError(f"bad rules file {path or 'categories.toml'}: {e}") from None


def token_bucket(m: int) -> str:
    for bound in TOKEN_BUCKETS:
        if m <= bound:
            return f"<={bound}"
    return f">{TOKEN_BUCKETS[-1]}"


@dataclass(slots=True)
class Unit:
    """One classified piece of time: a device event, or the self time of a CPU op."""

    event: Event
    us: float
    category: str = ""
    tokens: int = 0  # M of an expert GEMM when known (annotation MxNxK or recorded shapes)
    parents: tuple[str, ...] = ()  # CPU traces: names of the enclosing ops, outermost first


def units_of(trace: Trace) -> list[Unit]:
    if trace.is_gpu:
        return [Unit(e, e.dur) for e in trace.device]
    return [Unit(e, us, parents=parents) for e, us, parents in self_times(trace.cpu_ops) if us > 0]


def self_times(ops: list[Event]) -> list[tuple[Event, float, tuple[str, ...]]]:
    """Self time of nested CPU ops (per thread): duration minus the direct children's durations, with the
    names of the enclosing ops."""
    out: list[tuple[Event, float, tuple[str, ...]]] = []
    stacks: defaultdict[int, list[list]] = defaultdict(list)  # thread -> open [event, self time, parents] frames
    for e in ops:
        stack = stacks[e.stream]
        while stack and stack[-1][0].ts + stack[-1][0].dur <= e.ts:
            out.append(tuple(stack.pop()))
        if stack:
            stack[-1][1] -= min(e.dur, stack[-1][0].ts + stack[-1][0].dur - e.ts)
        stack.append([e, e.dur, stack[-1][2] + (stack[-1][0].name,) if stack else ()])
    for stack in stacks.values():
        out.extend(tuple(x) for x in stack)
    out.sort(key=lambda x: (x[0].ts, -x[0].dur))
    return out


def _containing(ranges: list[Event], ts: float) -> Event | None:
    """Innermost range (sorted by start) that contains ts; ranges may nest."""
    i = _bisect(ranges, ts)
    best = None
    for r in reversed(ranges[max(0, i - 64):i]):
        if r.ts <= ts <= r.ts + r.dur and (best is None or r.dur < best.dur):
            best = r
    return best


def _bisect(ranges: list[Event], ts: float) -> int:
    lo, hi = 0, len(ranges)
    while lo < hi:
        mid = (lo + hi) // 2
        if ranges[mid].ts <= ts:
            lo = mid + 1
        else:
            hi = mid
    return lo


def merge_step_projections(trace: Trace) -> None:
    """One step range per vLLM step. The profiler projects a range onto every stream its kernels ran on (vLLM's
    shared-experts stream gives each step a second, shorter `execute_context_*` range inside the first): ranges
    of the same name that overlap are one step, spanning both. Idempotent."""
    if not trace.is_gpu or len(trace.steps) < 2:
        return
    merged: list[Event] = []
    for s in trace.steps:
        last = merged[-1] if merged else None
        if last is not None and s.name == last.name and s.ts <= last.ts + last.dur:
            end = max(last.ts + last.dur, s.ts + s.dur)
            merged[-1] = Event(last.name, last.ts, end - last.ts, last.stream, last.cat)
        else:
            merged.append(s)
    trace.steps = merged


def classify(trace: Trace, units: list[Unit], rules: Rules) -> list[dict]:
    """Fill unit.category (and unit.tokens); returns the MoE blocks found: {preamble_us, gate_us, first_us,
    experts_us, ts} per block."""
    merge_step_projections(trace)
    anchor = rules.anchors
    by_stream = defaultdict(list)
    for u in units:
        by_stream[u.event.stream].append(u)
    for seq in by_stream.values():  # 0. moe-monitor's own kernels, and the copy that feeds its counting kernel
        _monitoring(seq, anchor)
    tails = _sampling_tails(trace, units, anchor) if trace.is_gpu and trace.steps else set()
    for u in units:  # 1. annotations
        a = _containing(trace.annotations, u.event.ts) if trace.annotations else None
        if a is not None:
            for category, pattern in rules.annotations:
                if _matches(pattern, a.name):
                    u.category = category
                    m = MNK_RE.search(a.name)
                    if m and category == "experts":
                        u.tokens = int(m.group(1))
                    break
    for u in units:  # 1b. CPU ops run by an expert or communication op are its work (_grouped_mm runs mm)
        if not u.category and u.parents:
            u.category = next((c for c in map(functools.partial(_owner, rules), u.parents) if c), "")
    blocks = []
    for seq in by_stream.values():  # 2. structure (the sampling tails are not part of any MoE block)
        blocks += _structure([u for u in seq if id(u) not in tails], anchor)
    _shared_experts(by_stream, blocks, anchor)
    for u in units:  # 3. patterns
        if not u.category:
            if u.event.cat in MEMORY_CATS:
                u.category = "memory"
                continue
            u.category = _pattern_category(rules.patterns, u.event.name)
            if id(u) in tails and u.category not in KEEP_IN_TAIL:
                u.category = "sampling"
    return blocks


KEEP_IN_TAIL = ("memory", "monitoring", *COMM_CATEGORIES)


def _monitoring(seq: list[Unit], anchor: Anchors) -> None:
    """moe-monitor's kernels (named `moe_monitor_*`) and the copy right before its counting kernel on the same
    stream (the fused recorder's torch.stack: a `CatArrayBatchedCopy`) are `monitoring`."""
    own, feeder = anchor.get("monitoring"), anchor.get("monitoring_feeder")
    if own is None:
        return
    for i, u in enumerate(seq):
        if _matches(own, u.event.name):
            u.category = "monitoring"
            if feeder is not None and i and not seq[i - 1].category and _matches(feeder, seq[i - 1].event.name):
                seq[i - 1].category = "monitoring"


def _shared_experts(by_stream: dict, blocks: list[dict], anchor: Anchors) -> None:
    """Work on another stream that starts inside a MoE block (from its norm or router GEMM to the next kernel
    past its tail on its own stream) is expert work: vLLM runs shared experts (DeepSeek, Qwen2-MoE) on a second
    stream beside the routed ones (their GEMMs, activation and split-K reduction), launched after the routed
    experts, so in eager mode they often start after the last expert kernel ended; the block's stream waits for
    them before it goes on. Communication, memory and monitoring are left alone."""
    spans = sorted((b["ts"], b["next_ts"] if b.get("next_ts") is not None else b["end"], b["stream"])
                   for b in blocks if b.get("end"))
    if not spans:
        return
    starts = [s[0] for s in spans]
    for stream, seq in by_stream.items():
        for u in seq:
            if u.category or u.event.cat in MEMORY_CATS or _is(anchor, "communication", u):
                continue
            i = bisect.bisect_right(starts, u.event.ts) - 1
            if i >= 0 and u.event.ts <= spans[i][1] and spans[i][2] != stream:
                u.category = "experts"


def _step_windows(trace: Trace, units: list[Unit]) -> list[list[Unit]]:
    """The units of each vLLM step: from its range's start to the next step's start. A range's device
    projection can end before the step's work does (vLLM 0.26, CUDA graphs, a second stream: the last layer and
    the sampler fall after it), but its start is the step's first kernel (input preparation)."""
    starts = [s.ts for s in trace.steps]
    windows: list[list[Unit]] = [[] for _ in starts]
    for u in units:
        i = bisect.bisect_right(starts, u.event.ts) - 1
        if i >= 0:
            windows[i].append(u)
    return windows


def _sampling_tails(trace: Trace, units: list[Unit], anchor: Anchors) -> set[int]:
    """The units (by id) of each engine step's lm_head and sampling, on a GPU trace with vLLM's step ranges: the
    last GEMM of the step's window when no expert kernel follows it and a norm (the final norm) lies between
    the step's last expert kernel and it, with everything after it in the window (the sampler, which vLLM 0.26
    runs after `execute_model`, and the output copies). The sampler's softmax would otherwise look like a
    router, and the lm_head before it like a gate."""
    tails: set[int] = set()
    for window in _step_windows(trace, units):
        per_stream = defaultdict(list)
        for u in window:
            per_stream[u.event.stream].append(u)
        for seq in per_stream.values():
            last_gemm = next((j for j in range(len(seq) - 1, -1, -1) if _is(anchor, "gemm", seq[j])
                              and not _is(anchor, "attention", seq[j]) and not _is(anchor, "experts", seq[j])), None)
            if last_gemm is None:
                continue
            experts = [j for j, u in enumerate(seq) if _is(anchor, "experts", u)]
            if not experts or experts[-1] > last_gemm:
                continue
            if any(_is(anchor, "norm", u) or _is(anchor, "boundary", u)
                   for u in seq[experts[-1] + 1:last_gemm]):
                tails.update(id(u) for u in seq[last_gemm:] if not u.category)
    return tails


def _owner(rules: Rules, name: str) -> str:
    """The category an enclosing CPU op gives the ops it runs: experts, or its communication category."""
    if _matches(rules.anchors["experts"], name):
        return "experts"
    comm = rules.anchors.get("communication")
    if comm is not None and _matches(comm, name):
        return next((c for c, p in rules.patterns if _matches(p, name)), "")
    return ""


def _is(anchor: Anchors, kind: str, u: Unit) -> bool:
    if kind == "experts" and u.category == "experts":
        return True
    if kind == "communication":
        return u.category in COMM_CATEGORIES or kind in anchor.kinds(u.event.name)
    return kind in anchor.kinds(u.event.name)


@functools.lru_cache(maxsize=65536)
def _pattern_category(patterns: tuple, name: str) -> str:
    return next((c for c, p in patterns if p.search(name)), "other")


@functools.lru_cache(maxsize=65536)
def _matches(pattern: re.Pattern, name: str) -> bool:
    """Traces repeat a few dozen kernel names tens of thousands of times: match each name once."""
    return pattern.search(name) is not None


def _structure(seq: list[Unit], anchor: Anchors) -> list[dict]:
    """Find the MoE blocks of one stream by structure and label what is inside them. Returns their figures.

    A block is a run of expert kernels with no norm, attention or inductor kernel between them. Scanning back from
    its first expert kernel to the nearest norm or attention kernel (or the previous block) gives its front:
    the router GEMM, then routing, then align/permute. The router GEMM is the first GEMM after the layer's norm
    (vLLM computes the logits first, then any shared expert run inline, then selects); without a named norm, the
    last GEMM before the first routing hint (or before the first align / expert kernel). GEMMs after the router
    GEMM in the front are a shared expert run inline (`experts`), up to the first routing hint after them.
    Everything else from the router GEMM to the first align hint is `gate`, whatever its name; from there to the
    first expert kernel `align_permute`; between expert kernels `experts`; after the last one, up to the next
    norm / attention / GEMM / inductor kernel, `align_permute` (un-permute, `moe_sum`, combine). Communication
    after the router GEMM is the block's EP traffic (`all_to_all`); copies and memsets stay `memory`,
    moe-monitor's kernels `monitoring`."""
    skip = [u.category == "monitoring" or u.event.cat in MEMORY_CATS for u in seq]
    expert_idx = [i for i, u in enumerate(seq) if not skip[i] and _is(anchor, "experts", u)]
    blocks: list[dict] = []
    prev_end = -1
    for first, last in _expert_runs(seq, expert_idx, anchor):
        stop = next((j for j in range(first - 1, prev_end, -1) if not skip[j] and
                     (_is(anchor, "norm", seq[j]) or _is(anchor, "attention", seq[j]))), prev_end)
        norm = stop if stop > prev_end and _is(anchor, "norm", seq[stop]) else None
        front = [j for j in range(stop + 1, first) if not skip[j]]
        align = next((j for j in front if _is(anchor, "align", seq[j])), first)
        gemms = [j for j in front if j < align and _gemm_start(seq, j, anchor)]
        hints = [j for j in front if j < align and _is(anchor, "router", seq[j])]
        if norm is not None:
            router = gemms[0] if gemms else None
        else:  # the front reaches back to attention: its output projection is a GEMM too
            router = max((j for j in gemms if not hints or j < hints[0]), default=None)
        shared = [j for j in gemms if router is not None and j > router]
        shared_end = -1
        if shared:
            later = [j for j in hints if j > shared[-1]]
            shared_end = later[0] - 1 if later else _gemm_end(seq, shared[-1], anchor)
        gate_us = 0.0
        begin = router if router is not None else (front[0] if front else first)
        router_end = _gemm_end(seq, router, anchor) if router is not None else -1
        for j in front:
            u = seq[j]
            if j < begin or u.category:
                continue
            if _is(anchor, "communication", u):
                u.category = "all_to_all"
            elif j >= align:
                u.category = "align_permute"
            elif shared and shared[0] <= j <= shared_end:
                u.category = "experts"
            else:
                u.category = "gate"
                if j <= router_end:
                    gate_us += u.us
        start = norm if norm is not None else begin
        first_gemm, first_us, experts_us = None, 0.0, 0.0
        for j in range(first, last + 1):
            u = seq[j]
            if skip[j]:
                continue
            if _is(anchor, "experts", u):
                u.category = u.category or "experts"
                experts_us += u.us
                if first_gemm is None and _is(anchor, "expert_gemm", u):
                    first_gemm, first_us = j, u.us
                elif first_gemm is not None and u.event.ts < seq[first_gemm].event.ts + seq[first_gemm].event.dur:
                    first_us += u.us  # an op the first expert op runs (CPU: _grouped_mm runs mm)
            elif not u.category:
                u.category = "all_to_all" if _is(anchor, "communication", u) else "experts"
        prev_end = last
        after: float | None = None
        for j in range(last + 1, len(seq)):
            u = seq[j]
            if skip[j]:
                continue
            if _is(anchor, "communication", u):
                u.category = u.category or "all_to_all"
                continue
            if _separates(anchor, u) or _is(anchor, "gemm", u) or _is(anchor, "experts", u):
                after = u.event.ts
                break
            u.category = u.category or "align_permute"
            prev_end = j
        if first_gemm is not None:
            blocks.append({"preamble_us": sum(seq[j].us for j in range(start, first_gemm) if not skip[j]),
                           "gate_us": gate_us, "first_expert_us": first_us,
                           "experts_us": experts_us, "ts": seq[start].event.ts,
                           "end": seq[last].event.ts + seq[last].event.dur, "stream": seq[first].event.stream,
                           "next_ts": after})
    return blocks



def _separates(anchor: Anchors, u: Unit) -> bool:
    """A kernel that lies between two MoE layers' expert kernels, never inside one: a norm, attention, or a kernel
    torch.compile generated (vLLM's MoE layer is a custom op inductor does not enter)."""
    return _is(anchor, "norm", u) or _is(anchor, "attention", u) or _is(anchor, "boundary", u)


def _expert_runs(seq: list[Unit], expert_idx: list[int], anchor: Anchors) -> list[tuple[int, int]]:
    """(first, last) expert kernel of each run of expert kernels not separated by `_separates`."""
    runs: list[list[int]] = []
    for i in expert_idx:
        if runs and not any(_separates(anchor, seq[j]) for j in range(runs[-1][1] + 1, i)):
            runs[-1][1] = i
        else:
            runs.append([i, i])
    return [(first, last) for first, last in runs]


def _gemm_start(seq: list[Unit], j: int, anchor: Anchors) -> bool:
    """A GEMM that is not attention, not an expert, not the reduction of the GEMM before it (split-K), and not
    an op run by another GEMM op (CPU: aten::linear runs aten::addmm)."""
    u = seq[j]
    if not _is(anchor, "gemm", u) or _is(anchor, "attention", u) or _is(anchor, "experts", u) or \
            _is(anchor, "gemm_tail", u):
        return False
    return not any("gemm" in anchor.kinds(p) for p in u.parents)


def _gemm_end(seq: list[Unit], j: int, anchor: Anchors) -> int:
    """The last index of the GEMM starting at j: its split-K reduction, and the ops it runs (CPU)."""
    k = j
    while k + 1 < len(seq) and (_is(anchor, "gemm_tail", seq[k + 1]) or
                                (seq[k + 1].parents and seq[j].event.name in seq[k + 1].parents)):
        k += 1
    return k


def _idle(trace: Trace, units: list[Unit], span: Event) -> tuple[float, float]:
    """(busy union, idle) of the device inside a step range."""
    lo, hi = span.ts, span.ts + span.dur
    intervals = sorted((max(u.event.ts, lo), min(u.event.ts + u.event.dur, hi)) for u in units
                       if u.event.ts < hi and u.event.ts + u.event.dur > lo)
    busy = 0.0
    if intervals:
        cur_s, cur_e = intervals[0]
        for s, e in intervals[1:]:
            if s > cur_e:
                busy += cur_e - cur_s
                cur_s, cur_e = s, e
            else:
                cur_e = max(cur_e, e)
        busy += cur_e - cur_s
    return busy, max(0.0, (hi - lo) - busy)


def _label_blocks(trace: Trace, blocks: list[dict]) -> None:
    """Each MoE block's tokens-per-step bucket: the tokens of the vLLM step range it starts in ("" outside)."""
    starts = [s.ts for s in trace.steps]
    for b in blocks:
        i = bisect.bisect_right(starts, b["ts"]) - 1
        inside = i >= 0 and b["ts"] < trace.steps[i].ts + trace.steps[i].dur
        tokens = step_phase(trace.steps[i].name)[1] if inside else 0
        b["bucket"] = token_bucket(tokens) if tokens else ""


def _bucket_order(bucket: str) -> int:
    return int(bucket.lstrip("<=>")) + (bucket[0] == ">")


class Breakdown:
    """A capture's breakdown built one rank at a time. `add` classifies one rank's trace and keeps only what the
    result needs of it (category and kernel sums, its steps, MoE block sums, its EP collectives as a compact
    table for the pairing), so the caller can drop the trace, and its events, before reading the next one:
    memory is one trace's, not one per rank. `result` combines the ranks."""

    def __init__(self, rules: Rules | None = None, top: int = 20):
        self.rules, self.top = rules or load_rules(), top
        self.cats = cats = list(self.rules.categories)
        self.overall = dict.fromkeys(cats, 0.0)
        self.by_phase: dict[str, dict[str, float]] = {}
        self.per_rank: list[RankRow] = []
        self.steps: list[StepRow] = []
        self.kernels: dict[tuple[str, str], list] = {}  # (name, category): one kernel can be in two rows (a GEMM
        # config serves the attention projections and the lm_head)
        self.expert_tokens: dict[str, float] = defaultdict(float)
        self.idle_total = 0.0
        self.blocks = _BlockSums()  # every MoE block
        self.blocks_by_tokens: dict[str, _BlockSums] = {}  # those inside a step range, by its tokens bucket
        self.collectives: dict[str, CollectiveTable] = {}  # rank -> its collectives (straggler.py)

    def add(self, trace: Trace) -> None:
        cats, rules = self.cats, self.rules
        units = units_of(trace)
        trace_blocks = classify(trace, units, rules)
        _label_blocks(trace, trace_blocks)
        for b in trace_blocks:
            self.blocks.add(b)
            if b["bucket"]:
                self.blocks_by_tokens.setdefault(b["bucket"], _BlockSums()).add(b)
        block_starts = sorted(b["ts"] for b in trace_blocks)
        rank_cats = dict.fromkeys(cats, 0.0)
        for u in units:
            rank_cats[u.category] = rank_cats.get(u.category, 0.0) + u.us
            k = self.kernels.setdefault((u.event.name, u.category), [0, 0, 0.0])
            k[1] += 1
            k[2] += u.us
            if u.category == "experts" and u.tokens:
                self.expert_tokens[token_bucket(u.tokens)] += u.us
        starts = [u.event.ts for u in units]
        windows = _step_windows(trace, units) if trace.is_gpu else None
        rank_idle, rank_blocks = 0.0, []
        for i, s in enumerate(trace.steps):
            phase, tokens = step_phase(s.name)
            lo, hi = bisect.bisect_left(starts, s.ts), bisect.bisect_right(starts, s.ts + s.dur)
            inside = units[lo:hi]  # CPU: the step's range; GPU: also what runs after its device projection
            step_cats = dict.fromkeys(cats, 0.0)
            for u in (windows[i] if windows is not None else inside):
                step_cats[u.category] = step_cats.get(u.category, 0.0) + u.us
            if trace.is_gpu:  # the MoE blocks that start in the step's range
                n_blocks = bisect.bisect_right(block_starts, s.ts + s.dur) - bisect.bisect_left(block_starts, s.ts)
                rank_blocks.append(n_blocks)
            busy, idle = _idle(trace, inside, s) if trace.is_gpu else (sum(step_cats.values()), 0.0)
            rank_idle += idle
            self.steps.append(StepRow(trace.rank, s.name, phase, tokens, s.dur, busy, idle, step_cats))
            ph = self.by_phase.setdefault(phase, dict.fromkeys(cats + ["idle"], 0.0))
            for c, v in step_cats.items():
                ph[c] = ph.get(c, 0.0) + v
            ph["idle"] += idle
        if windows is not None and trace.steps:  # GPU traces
            table = collectives_of(units, windows, rank_blocks)
            known = self.collectives.get(trace.rank)
            self.collectives[trace.rank] = table if known is None else known + table
        self.idle_total += rank_idle
        for c, v in rank_cats.items():
            self.overall[c] = self.overall.get(c, 0.0) + v
        self.per_rank.append(RankRow(trace.path, trace.rank, "gpu" if trace.is_gpu else "cpu", sum(rank_cats.values()),
                                     rank_idle, len(trace.steps), rank_cats))

    def result(self) -> BreakdownResult:
        total = sum(self.overall.values())
        top_rows = sorted(self.kernels.items(), key=lambda kv: -kv[1][2])[: self.top]
        return BreakdownResult(
            total_us=total,
            idle_us=self.idle_total,
            categories={c: Category(v, v / total if total else 0.0) for c, v in self.overall.items()},
            ranks=tuple(self.per_rank),
            phases=self.by_phase,
            steps=tuple(self.steps),
            top=tuple(KernelRow(name, cat, cnt, us, us / cnt, us / total if total else 0.0)
                      for (name, cat), (_, cnt, us) in top_rows),
            moe_blocks=self.blocks.means(),
            moe_blocks_by_tokens={bucket: self.blocks_by_tokens[bucket].means()
                                  for bucket in sorted(self.blocks_by_tokens, key=_bucket_order)},
            expert_tokens=dict(sorted(self.expert_tokens.items())),
            unplaced=unplaced(self.kernels, total),
            ep_wait=ep_wait_from_json(ep_wait(self.collectives)),
            collective_wait=collective_wait_from_json(collective_wait(self.collectives)),
        )


UNPLACED_ROWS = 10


def unplaced(kernels: dict[tuple[str, str], list], total: float) -> tuple[UnplacedRow, ...]:
    """The kernels no rule or position placed (`other`), most time first: what `analyze` asks the user to add a
    rule for."""
    rows = sorted(((name, cnt, us) for (name, cat), (_, cnt, us) in kernels.items() if cat == "other"),
                  key=lambda r: -r[2])[:UNPLACED_ROWS]
    return tuple(UnplacedRow(name, cnt, us, us / total if total else 0.0) for name, cnt, us in rows)


class _BlockSums:
    """Count and running sums of MoE blocks' figures, added in order (the same floats as summing a list of them)."""

    def __init__(self):
        self.count, self.sums = 0, dict.fromkeys(BLOCK_FIGURES, 0.0)

    def add(self, block: dict) -> None:
        self.count += 1
        for k in BLOCK_FIGURES:
            self.sums[k] += block[k]

    def means(self) -> BlockMeans:
        n = self.count
        return BlockMeans(n, **{k: v / n for k, v in self.sums.items()}) if n else BlockMeans(0)


def analyze(traces: Iterable[Trace], rules: Rules | None = None, top: int = 20) -> BreakdownResult:
    """The breakdown of one capture's rank traces. Give an iterator (analyze_files does) to hold one trace at a
    time: each is dropped once added, before the next is read."""
    breakdown = Breakdown(rules, top)
    for trace in traces:
        breakdown.add(trace)
        del trace  # not kept while the iterator reads the next one
    return breakdown.result()


def analyze_files(paths: Iterable[str], rules: Rules | None = None, top: int = 20,
                  limits: TraceLimits = LIMITS) -> BreakdownResult:
    """analyze() over rank trace files, read one at a time: peak memory is about the largest file's, whatever
    their number."""
    return analyze((read_trace(p, limits) for p in paths), rules, top)
