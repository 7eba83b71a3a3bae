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
from dataclasses import dataclass
from importlib import resources

from .trace import Event, Trace, step_phase

MNK_RE = re.compile(r"(\d+)x(\d+)x(\d+)")
TOKEN_BUCKETS = (1, 8, 32, 128, 512, 2048)
COMM_CATEGORIES = ("all_to_all", "collective")


@dataclass(frozen=True)
class Rules:
    categories: tuple[str, ...]
    annotations: tuple[tuple[str, re.Pattern], ...]
    anchors: dict[str, re.Pattern]
    patterns: tuple[tuple[str, re.Pattern], ...]


def load_rules(path: str | None = None) -> Rules:
    if path is None:
        doc = tomllib.loads(resources.files(__package__).joinpath("categories.toml").read_text())
    else:
        with open(path, "rb") as f:
            doc = tomllib.load(f)
    flags = re.IGNORECASE
    try:
        return Rules(
            tuple(doc["categories"]),
            tuple((c, re.compile(p, flags)) for c, p in doc.get("annotations", {}).items()),
            {k: re.compile(p, flags) for k, p in doc["anchors"].items()},
            tuple((c["name"], re.compile(c["pattern"], flags)) for c in doc["category"]),
        )
    except (KeyError, TypeError, re.error) as e:
        raise ValueError(f"bad rules file {path or 'categories.toml'}: {e}") from None


def token_bucket(m: int) -> str:
    for bound in TOKEN_BUCKETS:
        if m <= bound:
            return f"<={bound}"
    return f">{TOKEN_BUCKETS[-1]}"


@dataclass
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
    out, stacks = [], defaultdict(list)  # thread -> open [event, self time, parents] frames
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


def classify(trace: Trace, units: list[Unit], rules: Rules) -> list[dict]:
    """Fill unit.category (and unit.tokens); returns the MoE blocks found: {preamble_us, gate_us, first_us,
    experts_us} per block."""
    anchor = rules.anchors
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
    by_stream = defaultdict(list)
    for u in units:
        by_stream[u.event.stream].append(u)
    for seq in by_stream.values():  # 2. structure
        blocks += _structure(seq, anchor)
    for u in units:  # 3. patterns
        if not u.category:
            if u.event.cat in ("gpu_memcpy", "gpu_memset"):
                u.category = "memory"
                continue
            u.category = next((c for c, p in rules.patterns if _matches(p, u.event.name)), "other")
    return blocks


def _owner(rules: Rules, name: str) -> str:
    """The category an enclosing CPU op gives the ops it runs: experts, or its communication category."""
    if _matches(rules.anchors["experts"], name):
        return "experts"
    comm = rules.anchors.get("communication")
    if comm is not None and _matches(comm, name):
        return next((c for c, p in rules.patterns if _matches(p, name)), "")
    return ""


def _is(anchor: dict[str, re.Pattern], kind: str, u: Unit) -> bool:
    if kind == "experts" and u.category == "experts":
        return True
    if kind == "communication":
        return u.category in COMM_CATEGORIES or ("communication" in anchor and _matches(anchor[kind], u.event.name))
    return _matches(anchor[kind], u.event.name)


@functools.lru_cache(maxsize=65536)
def _matches(pattern: re.Pattern, name: str) -> bool:
    """Traces repeat a few dozen kernel names tens of thousands of times: match each name once."""
    return pattern.search(name) is not None


def _structure(seq: list[Unit], anchor: dict[str, re.Pattern]) -> list[dict]:
    blocks = []
    last_gemm = last_norm = None
    state, pending, block = "idle", [], None
    for i, u in enumerate(seq):
        if _is(anchor, "communication", u):  # EP dispatch/combine sit inside MoE blocks: never align/permute
            continue
        if _is(anchor, "router", u):
            if state == "experts":
                _close(pending, "align_permute")
            if state != "router":  # a new MoE block: the GEMM right before the router is its gate
                start = last_norm if last_norm is not None and last_gemm is not None and last_norm < last_gemm \
                    else last_gemm
                if last_gemm is not None:  # the gate GEMM and what feeds the router after it (casts)
                    for x in seq[last_gemm:i]:
                        x.category = x.category or "gate"
                block = {"start": start if start is not None else i, "gate_us": seq[last_gemm].us
                         if last_gemm is not None else 0.0, "first_us": 0.0, "experts_us": 0.0, "end": None}
                blocks.append(block)
            u.category = u.category or "gate"
            state, pending = "router", []
            continue
        if state == "router" and not pending and _is(anchor, "router_tail", u):
            u.category = u.category or "gate"
            continue
        if _is(anchor, "experts", u) and state in ("router", "experts"):
            u.category = u.category or "experts"
            first = block.get("first_idx")
            if first is None and _is(anchor, "expert_gemm", u):
                block["first_idx"] = i
                block["first_us"] = u.us
            elif first is not None and u.event.ts < seq[first].event.ts + seq[first].event.dur:
                block["first_us"] += u.us  # an op the first expert op runs (CPU: _grouped_mm runs mm)
            _close(pending, "experts" if state == "experts" else "align_permute")
            block["experts_us"] += u.us
            state, pending = "experts", []
            continue
        boundary = _is(anchor, "norm", u) or _is(anchor, "attention", u) or _is(anchor, "gemm", u)
        if state == "experts" and boundary:
            _close(pending, "align_permute")
            state, pending = "idle", []
        if state in ("router", "experts") and not boundary:
            pending.append(u)
        elif state == "router" and boundary:  # a GEMM between router and experts: permute-side work
            pending.append(u)
        if _is(anchor, "gemm", u) and not _is(anchor, "attention", u):
            last_gemm = i
        if _is(anchor, "norm", u):
            last_norm = i
    if state == "experts":
        _close(pending, "align_permute")
    out = []
    for b in blocks:
        if "first_idx" not in b:
            continue
        pre = seq[b["start"]:b["first_idx"]]
        out.append({"preamble_us": sum(x.us for x in pre), "gate_us": b["gate_us"], "first_expert_us": b["first_us"],
                    "experts_us": b["experts_us"]})
    return out


def _close(pending: list[Unit], category: str) -> None:
    for u in pending:
        if not u.category:
            u.category = category


def _idle(trace: Trace, units: list[Unit], span: Event) -> tuple[float, float]:
    """(busy union, idle) of the device inside a step range."""
    lo, hi = span.ts, span.ts + span.dur
    intervals = sorted((max(u.event.ts, lo), min(u.event.ts + u.event.dur, hi)) for u in units
                       if u.event.ts < hi and u.event.ts + u.event.dur > lo)
    busy, cur_s, cur_e = 0.0, None, None
    for s, e in intervals:
        if cur_e is None or s > cur_e:
            if cur_e is not None:
                busy += cur_e - cur_s
            cur_s, cur_e = s, e
        else:
            cur_e = max(cur_e, e)
    if cur_e is not None:
        busy += cur_e - cur_s
    return busy, max(0.0, (hi - lo) - busy)


def analyze(traces: list[Trace], rules: Rules | None = None, top: int = 20) -> dict:
    rules = rules or load_rules()
    cats = list(rules.categories)
    overall = dict.fromkeys(cats, 0.0)
    by_phase: dict[str, dict[str, float]] = {}
    per_rank, steps, blocks = [], [], []
    kernels: dict[str, list] = {}
    expert_tokens: dict[str, float] = defaultdict(float)
    idle_total = 0.0
    for trace in traces:
        units = units_of(trace)
        blocks += classify(trace, units, rules)
        rank_cats = dict.fromkeys(cats, 0.0)
        for u in units:
            rank_cats[u.category] = rank_cats.get(u.category, 0.0) + u.us
            k = kernels.setdefault(u.event.name, [u.category, 0, 0.0])
            k[1] += 1
            k[2] += u.us
            if u.category == "experts" and u.tokens:
                expert_tokens[token_bucket(u.tokens)] += u.us
        starts = [u.event.ts for u in units]
        rank_idle = 0.0
        for s in trace.steps:
            phase, tokens = step_phase(s.name)
            lo, hi = bisect.bisect_left(starts, s.ts), bisect.bisect_right(starts, s.ts + s.dur)
            inside = units[lo:hi]
            step_cats = dict.fromkeys(cats, 0.0)
            for u in inside:
                step_cats[u.category] = step_cats.get(u.category, 0.0) + u.us
            busy, idle = _idle(trace, inside, s) if trace.is_gpu else (sum(step_cats.values()), 0.0)
            rank_idle += idle
            steps.append({"rank": trace.rank, "name": s.name, "phase": phase, "tokens": tokens, "span_us": s.dur,
                          "busy_us": busy, "idle_us": idle, "categories": step_cats})
            ph = by_phase.setdefault(phase, dict.fromkeys(cats + ["idle"], 0.0))
            for c, v in step_cats.items():
                ph[c] = ph.get(c, 0.0) + v
            ph["idle"] += idle
        idle_total += rank_idle
        for c, v in rank_cats.items():
            overall[c] = overall.get(c, 0.0) + v
        per_rank.append({"path": trace.path, "rank": trace.rank, "kind": "gpu" if trace.is_gpu else "cpu",
                         "total_us": sum(rank_cats.values()), "idle_us": rank_idle, "steps": len(trace.steps),
                         "categories": rank_cats})
    total = sum(overall.values())
    top_rows = sorted(kernels.items(), key=lambda kv: -kv[1][2])[:top]
    n = len(blocks)
    return {
        "total_us": total,
        "idle_us": idle_total,
        "categories": {c: {"us": v, "share": v / total if total else 0.0} for c, v in overall.items()},
        "ranks": per_rank,
        "phases": by_phase,
        "steps": steps,
        "top": [{"name": name, "category": cat, "count": cnt, "total_us": us, "mean_us": us / cnt,
                 "share": us / total if total else 0.0} for name, (cat, cnt, us) in top_rows],
        "moe_blocks": {"count": n, **({k: sum(b[k] for b in blocks) / n for k in
                                       ("preamble_us", "gate_us", "first_expert_us", "experts_us")} if n else {})},
        "expert_tokens": dict(sorted(expert_tokens.items())),
    }
