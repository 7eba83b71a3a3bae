"""Engine steps by phase and tokens-per-step bucket: every step (moe_steps_total) and its tokens, and the step time
histogram of the steps the plugin timed (a sample of them on CUDA)."""

from __future__ import annotations

import numpy as np
from prometheus_client.utils import floatToGoString

from moe_monitor.channel import PHASES

from ..exposition import Family, family
from ..reading import Reading
from .base import Collector

INT64_MAX = np.iinfo(np.int64).max


def collect(r: Reading) -> list[Family]:
    totals = r.totals
    hist, count = family("moe_step_duration_seconds"), family("moe_steps_total")
    tokens = family("moe_step_tokens_total")
    if totals.step_hist is None:
        return [hist, count, tokens]
    seconds, step_tokens, step_count = totals.step_seconds, totals.step_tokens, totals.step_count
    assert (totals.duration_bounds is not None and totals.token_bounds is not None and seconds is not None
            and step_tokens is not None and step_count is not None)  # set together with step_hist
    les = [floatToGoString(b) for b in totals.duration_bounds]
    for p, phase in enumerate(PHASES):
        for t, bound in enumerate(totals.token_bounds):
            tl = "+Inf" if int(bound) == INT64_MAX else str(int(bound))
            if step_count[p, t]:
                count.add(int(step_count[p, t]), [("phase", phase), ("tokens_le", tl)])
            row = totals.step_hist[p, t]
            if not row.any():
                continue
            for le, c in zip(les, np.cumsum(row)):
                hist.add(int(c), [("phase", phase), ("tokens_le", tl), ("le", le)], suffix="_bucket")
            hist.add(float(seconds[p, t]), [("phase", phase), ("tokens_le", tl)], suffix="_sum")
            hist.add(int(row.sum()), [("phase", phase), ("tokens_le", tl)], suffix="_count")
        tokens.add(int(step_tokens[p].sum()), [("phase", phase)])
    return [hist, count, tokens]


COLLECTOR = Collector("steps", "t0", collect)
