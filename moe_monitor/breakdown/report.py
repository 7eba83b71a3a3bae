"""Text table of a breakdown (the JSON form is `BreakdownResult.to_json()`)."""

from __future__ import annotations

from .result import BlockMeans, BreakdownResult, Category
from .straggler import render as render_ep_wait
from .straggler import render_kinds as render_collective_wait


def _pct(x: float) -> str:
    return f"{100 * x:5.1f} %"


def _blocks(b: BlockMeans) -> str:
    return (f"{b.preamble_us:.1f} us (gate GEMM {b.gate_us:.1f} us) vs first expert GEMM {b.first_expert_us:.1f} us, "
            f"all expert kernels {b.experts_us:.1f} us")


def render_table(result: BreakdownResult, top: int = 15) -> str:
    total, idle = result.total_us, result.idle_us
    lines = [f"device time {total / 1000:.3f} ms in {len(result.ranks)} trace(s), "
             f"{len(result.steps)} engine step(s); "
             f"idle between kernels inside steps {idle / 1000:.3f} ms",
             "", f"{'category':18s} {'ms':>10s} {'share':>8s}"]
    for cat, row in sorted(result.categories.items(), key=lambda kv: -kv[1].us):
        if row.us:
            lines.append(f"{cat:18s} {row.us / 1000:10.3f} {_pct(row.share):>8s}")
    if idle:
        lines.append(f"{'(idle)':18s} {idle / 1000:10.3f} {_pct(idle / (total + idle)):>8s}"
                     "  of busy + idle")
    if len(result.ranks) > 1:
        lines += ["", "per rank:"] + [
            f"  {r.rank:24s} {r.total_us / 1000:10.3f} ms  idle {r.idle_us / 1000:.3f} ms" for r in result.ranks]
    if result.phases:
        lines += ["", "per phase (ms):"]
        for phase, cats in result.phases.items():
            body = ", ".join(f"{c} {v / 1000:.3f}" for c, v in sorted(cats.items(), key=lambda kv: -kv[1]) if v)
            lines.append(f"  {phase:8s} {body}")
    blocks = result.moe_blocks
    if blocks.count:
        lines += ["", f"MoE pre-amble per layer (mean of {blocks.count} MoE blocks): norm→first expert GEMM "
                  + _blocks(blocks)]
    by_tokens = result.moe_blocks_by_tokens
    if len(by_tokens) > 1 or (by_tokens and not blocks.count):
        lines += ["", "MoE pre-amble per layer by tokens per step (vLLM steps):"] + [
            f"  {bucket:>7s} tokens: {b.count:5d} blocks, pre-amble " + _blocks(b) for bucket, b in by_tokens.items()]
    if result.expert_tokens:
        lines += ["", "expert time by tokens per call: " + ", ".join(
            f"{b}: {us / 1000:.3f} ms" for b, us in result.expert_tokens.items())]
    lines += render_collective_wait(result.collective_wait)
    lines += render_ep_wait(result.ep_wait)
    lines += render_unplaced(result)
    lines += ["", f"{'top kernels / ops':60s} {'category':16s} {'calls':>6s} "
                  f"{'total ms':>9s} {'mean us':>8s} {'share':>7s}"]
    for k in result.top[:top]:
        name = k.name if len(k.name) <= 60 else k.name[:57] + "..."
        lines.append(f"{name:60s} {k.category:16s} {k.count:6d} {k.total_us / 1000:9.3f} "
                     f"{k.mean_us:8.1f} {_pct(k.share):>7s}")
    return "\n".join(lines)


HOW_TO_PLACE = ("  to place one: `moe-monitor analyze --print-rules > rules.toml`, add a [[category]] whose pattern "
                "matches it\n  (before the catch-all rows), then `moe-monitor analyze --rules rules.toml ...` "
                "(docs/breakdown.md, \"Adding a rule\")")


def render_unplaced(result: BreakdownResult) -> list[str]:
    """What no rule or position placed: its share, the kernels, and how to add a rule."""
    other = result.categories.get("other", Category(0.0, 0.0))
    rows = result.unplaced
    if not other.us or not rows:
        return []
    lines = ["", f"not placed (in `other`): {_pct(other.share).strip()} of device time; "
                 f"the top {len(rows)} kernel(s) / op(s):"]
    for row in rows:
        name = row.name if len(row.name) <= 90 else row.name[:87] + "..."
        lines.append(f"  {_pct(row.share)} {row.count:7d} calls  {name}")
    return lines + HOW_TO_PLACE.split("\n")
