"""The newest analysed profiler capture: device time by category (docs/breakdown.md has the rows)."""

from __future__ import annotations

from ..exposition import Family, family
from ..reading import Reading
from .base import Collector


def collect(r: Reading) -> list[Family]:
    latest = r.breakdown
    if latest is None:  # no --profile-dir (the collector is off then)
        return []
    errors = family("moe_capture_analysis_errors_total")
    errors.add(latest.errors)
    out = [errors]
    result, capture = latest.result, latest.capture
    if result is None or capture is None:
        return out
    info = family("moe_capture_info")
    info.add(1, [("capture", capture.prefix.rstrip("_") or "unnamed"), ("ranks", result.ranks)])
    end = family("moe_capture_end_timestamp_seconds")
    end.add(capture.end)
    seconds, share = family("moe_capture_device_seconds"), family("moe_capture_share")
    for category, row in result.categories.items():
        seconds.add(row.us / 1e6, [("category", category)])
        share.add(row.share, [("category", category)])
    idle = family("moe_capture_idle_seconds")
    idle.add(result.idle_us / 1e6)
    out += [info, end, seconds, share, idle]
    if result.moe_blocks:
        pre = family("moe_capture_moe_preamble_seconds")
        pre.add(result.preamble_us / 1e6)
        first = family("moe_capture_first_expert_gemm_seconds")
        first.add(result.first_expert_us / 1e6)
        out += [pre, first]
    if result.ep_wait_us:
        wait, caused = family("moe_capture_ep_wait_seconds"), family("moe_capture_ep_wait_caused_share")
        for rank, us in result.ep_wait_us.items():
            wait.add(us / 1e6, [("rank", rank)])
            caused.add(result.ep_caused_share.get(rank, 0.0), [("rank", rank)])
        out += [wait, caused]
    if result.collective_wait_us:
        wait = family("moe_capture_collective_wait_seconds")
        caused = family("moe_capture_collective_wait_caused_seconds")
        for kind, ranks in result.collective_wait_us.items():
            for rank, us in ranks.items():
                wait.add(us / 1e6, [("kind", kind), ("rank", rank)])
            for rank, reasons in (result.collective_caused_us or {}).get(kind, {}).items():
                for reason, us in reasons.items():
                    caused.add(us / 1e6, [("kind", kind), ("rank", rank), ("reason", reason)])
        out += [wait, caused]
    return out


COLLECTOR = Collector("breakdown", "t0", collect, enabled=lambda config: config.profile_dir is not None)
