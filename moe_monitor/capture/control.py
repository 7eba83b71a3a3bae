"""The one owner of "should a capture start now": the detector's decisions, manual requests and Alertmanager's
alerts go through here, against one budget and cooldown (the detector's), the capturer's busy flag, and the rule
that windows the profiler slowed down are neither evidence nor baseline."""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Callable
from typing import Any

from moe_monitor.detect.detector import Detector
from moe_monitor.detect.signals import signals_of
from moe_monitor.schema.flight_record import FILE as FLIGHT_FILE

from . import alerts as am

log = logging.getLogger(__name__)


def window_context(vllm_url: str | None, window, stats) -> dict:
    """What a capture stores about the window that led to it."""
    ctx = {"vllm_url": vllm_url}
    if window is not None and stats is not None:
        def floats(xs):
            return [None if math.isnan(x) else float(x) for x in xs]
        ctx["window"] = {"start": window.start, "end": window.end, "layers": [int(x) for x in window.layer_ids],
                         "imbalance_ratio": floats(stats.imbalance_ratio), "top1_share": floats(stats.top1_share),
                         "routed_tokens": [int(x) for x in stats.tokens]}
    return ctx


class RanksReported:
    """Ranks that reported in the last window: a capture expects one trace per rank. The control sets it, the
    capturer calls it (made before both, so neither needs the other to exist first)."""

    def __init__(self) -> None:
        self.value = 1

    def __call__(self) -> int:
        return self.value


class CaptureControl:
    def __init__(self, detector: Detector, capturer=None, vllm_url: str | None = None, clock=time.time,
                 flight: Callable[[float], Any] | None = None, ranks: RanksReported | None = None):
        """`flight`: (trigger time) -> the flight record's bytes (the capture's thread calls it), when the flight
        recorder is on."""
        self.detector, self.capturer, self.vllm_url, self._clock = detector, capturer, vllm_url, clock
        self.flight, self.reported = flight, ranks if ranks is not None else RanksReported()
        self._window = self._stats = None
        self.seen = am.Seen()
        self._seeded = False  # self.seen holds the catalog's alert captures (read at the first notification)
        self._alert_lock = threading.Lock()

    @property
    def ranks(self) -> int:
        return self.reported.value

    def observe(self, window, stats, ranks: int) -> None:
        """A window closed: feed the detector, start a capture when it decides so."""
        self._window, self._stats, self.reported.value = window, stats, max(1, ranks)
        capturer = self.capturer
        if capturer is not None and (capturer.busy or (capturer.last_end or 0) > window.start):
            return  # the profiler slows the steps it records: those windows are neither evidence nor baseline
        decision = self.detector.observe(signals_of(window, stats))
        if decision is None:
            return
        if capturer is None:
            log.warning("regression detected (captures not configured): %s", decision.evidence())
            self.detector.record_capture(window.end)  # cooldown and budget also pace the log
        elif capturer.trigger(decision.reason, decision.evidence(), self._context(),
                              self._extra(window.end)) is not None:
            log.warning("regression detected, capturing: %s", decision.evidence())
            self.detector.record_capture(window.end)

    def manual(self, reason: str) -> tuple[int, dict]:
        """(HTTP status, body) of a manual capture request; manual captures obey the same budget."""
        now = self._clock()
        if self.capturer is None:
            return 503, {"error": "captures are not configured: start the sidecar with --vllm-url and --profile-dir"}
        if not self.detector.allow_manual(now):
            return 429, {"error": "capture budget exhausted (--max-captures-per-hour)"}
        capture_id = self.capturer.trigger("manual", {"reason": "manual", "note": reason}, self._context(),
                                           self._extra(now))
        if capture_id is None:
            return 409, {"error": "a capture is already running"}
        self.detector.record_capture(now)
        return 202, {"id": capture_id}

    def alerts(self, note: am.Notification, instances: frozenset[str] = frozenset(),
               forwarded: dict[tuple[str, str], tuple[str, dict | None]] | None = None) -> list[dict]:
        """What is done with each alert of an Alertmanager notification: the firing alerts of ours not captured
        before get one capture between them, within the budget, the cooldown and one capture at a time, like the
        detector's; resolved alerts, others' and firings already captured get none (capture/alerts.py). Needs the
        capturer (the HTTP edge answers 503 without one). `instances`: --alert-instances (empty: any).
        `forwarded`: other instances' alerts sent on to their peer (sidecar/forward.py), by key: (forwarded or
        forward_failed, what the peer said of it). A notification answered 502 for a failed forward is sent again by
        Alertmanager whole, which is safe: a firing captured here is in self.seen (and in the catalog's alert_keys
        across a restart) and answered deduplicated, and so it is on the peer."""
        forwarded = forwarded or {}
        with self._alert_lock:
            self._seed()
            verdicts = am.classify(note, self.seen, instances)
            fresh = [a for a, outcome, _ in verdicts if outcome is None]
            outcome, capture_id = self._alert_capture(note, fresh) if fresh else (None, None)
            out = []
            for alert, said, known in verdicts:
                said, known = (outcome, capture_id) if said is None else (said, known)
                said, peer = forwarded[alert.key] if said == am.OTHER and alert.key in forwarded else (said, None)
                self.capturer.alert_outcomes[said] += 1
                out.append({"alertname": alert.name, "status": alert.status, "fingerprint": alert.fingerprint,
                            "startsAt": alert.starts_at, "outcome": said, **({"id": known} if known else {}),
                            **({"peer": peer} if peer else {})})
            return out

    def _alert_capture(self, note: am.Notification, fresh: list[am.Alert]) -> tuple[str, str | None]:
        now, first = self._clock(), fresh[0]
        if self.detector.cooling_down(now):
            return "cooldown", None
        if not self.detector.allow_manual(now):
            return "over_budget", None
        context = {**self._context(), "alert_keys": [list(a.key) for a in fresh]}
        extra = {**self._extra(now), am.FILE: am.bundle_file(note, fresh, now)}
        capture_id = self.capturer.trigger("alert", am.evidence(first, len(fresh)), context, extra)
        if capture_id is None:
            return "busy", None
        self.detector.record_capture(now)
        for a in fresh:
            self.seen.add(a.key, capture_id)
        log.warning("alert %s (fingerprint %s, since %s)%s: capturing %s", first.name, first.fingerprint,
                    first.starts_at, f" and {len(fresh) - 1} more" if len(fresh) > 1 else "", capture_id)
        return "captured", capture_id

    def _seed(self) -> None:
        """Once: the alert captures the catalog holds, so that a restarted sidecar does not capture them again."""
        if self._seeded or self.capturer is None:
            return
        self._seeded = True
        try:
            for key, capture_id in am.seen_in(self.capturer.catalog.metas()):
                self.seen.add(key, capture_id)
        except Exception:  # noqa: BLE001 - a catalog that cannot be listed costs the deduplication of old captures
            log.exception("cannot read the catalog's alert captures; alerts captured before a restart may be "
                          "captured again")

    def _extra(self, trigger: float) -> dict:
        """Files a capture stores beside its traces: the flight record of the minutes before the trigger (its
        windows taken now, serialised by the capture's thread). A failure here costs the capture its record,
        never the capture."""
        if self.flight is None:
            return {}
        try:
            return {FLIGHT_FILE: self.flight(trigger)}
        except Exception:  # noqa: BLE001
            log.exception("cannot snapshot the flight record; the capture goes on without it")
            return {}

    def _context(self) -> dict:
        return window_context(self.vllm_url, self._window, self._stats)
