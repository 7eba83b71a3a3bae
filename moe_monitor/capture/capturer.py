"""Bounded profiler captures through vLLM's /start_profile, collected into the catalog with their reason.

One capture at a time, on its own thread: POST /start_profile {"profile_prefix": "<id>_", "max_iterations":
N} (bearer API key when vLLM runs with --api-key), then wait until every rank's trace file of this capture
is complete (a full gzip stream ending a JSON object), POST /stop_profile when the profile has not ended by
itself within `run_s`, analyse the files (kernel breakdown), and store them with metadata. A capture's files
are those named with its prefix or new since it started: vLLM before 0.32 ignores the request body (no
prefix, no max_iterations; set max_iterations in its --profiler-config), and `run_s` bounds such a profile.
Every outcome is counted and logged; nothing here can stop the sidecar.
"""

from __future__ import annotations

import asyncio
import gzip
import json
import logging
import os
import threading
import time
from collections import Counter
from dataclasses import dataclass

import aiohttp

from moe_monitor.breakdown.analyze import analyze
from moe_monitor.breakdown.latest import rank_trace
from moe_monitor.breakdown.trace import TraceError, read_trace

from .catalog import Catalog, QuotaError, is_regular_file, new_capture_id
from .telemetry import capture_span

log = logging.getLogger(__name__)


class ProfilerDisabled(Exception):
    """vLLM answered 404: it was started without --profiler-config."""


class ProfilerError(Exception):
    pass


class ProfilerBusy(ProfilerError):
    """409: vLLM still holds a profiling session (it stays active after max_iterations until /stop_profile)."""


@dataclass(frozen=True)
class CaptureConfig:
    vllm_url: str
    profile_dir: str  # vLLM's torch_profiler_dir, readable by the sidecar
    api_key: str | None = None
    iterations: int = 5  # engine steps per capture (max_iterations)
    timeout_s: float = 120.0  # from start to all rank files complete
    run_s: float = 10.0  # a profile still running after this is stopped (/stop_profile)
    stop_grace_s: float = 30.0  # after /stop_profile
    http_timeout_s: float = 30.0  # the API server answers slowly exactly when steps regress (CPU contention)


async def _post(cfg: CaptureConfig, path: str, body: dict | None) -> None:
    headers = {"Authorization": f"Bearer {cfg.api_key}"} if cfg.api_key else {}
    timeout = aiohttp.ClientTimeout(total=cfg.http_timeout_s)
    try:
        async with aiohttp.ClientSession(timeout=timeout) as session:
            async with session.post(cfg.vllm_url.rstrip("/") + path, json=body, headers=headers) as resp:
                if resp.status == 404:
                    raise ProfilerDisabled(f"{path} answered 404: vLLM was started without --profiler-config")
                if resp.status == 409:
                    raise ProfilerBusy(f"{path} answered 409: a profiling session is already active")
                if resp.status != 200:
                    raise ProfilerError(f"{path} answered {resp.status}: {(await resp.text())[:200]}")
    except (aiohttp.ClientError, asyncio.TimeoutError) as e:
        raise ProfilerError(f"{path}: {type(e).__name__}: {e}") from None


def post(cfg: CaptureConfig, path: str, body: dict | None = None) -> None:
    asyncio.run(_post(cfg, path, body))


def trace_complete(path: str) -> bool:
    """A rank file is complete when its gzip stream (or plain JSON) ends a JSON object."""
    try:
        opener = gzip.open if path.endswith(".gz") else open
        with opener(path, "rb") as f:
            tail = b""
            while chunk := f.read(1 << 20):
                tail = (tail + chunk)[-64:]
        return tail.rstrip().endswith(b"}")
    except (OSError, EOFError):
        return False


def rank_files(profile_dir: str, prefix: str, before: frozenset[str] = frozenset()) -> list[str]:
    """Rank trace files named with `prefix`, or (vLLM < 0.32 names them without it) not in `before`."""
    try:
        names = os.listdir(profile_dir)
    except FileNotFoundError:
        return []
    return sorted(os.path.join(profile_dir, n) for n in names
                  if rank_trace(n) and (n.startswith(prefix) or n not in before))


class Capturer:
    def __init__(self, cfg: CaptureConfig, catalog: Catalog, expected_ranks=lambda: 1, clock=time.time):
        self.cfg, self.catalog, self.expected_ranks, self._clock = cfg, catalog, expected_ranks, clock
        self.outcomes: Counter[tuple[str, str]] = Counter()
        self.profiler_enabled: bool | None = None  # unknown until the first capture
        self.last_duration_s: float | None = None
        self.last_end: float | None = None
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    @property
    def busy(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def trigger(self, reason: str, evidence: dict, context: dict | None = None) -> str | None:
        """Start a capture in the background; returns its id, or None when one is already running."""
        with self._lock:
            if self.busy:
                self.outcomes[(reason, "skipped_busy")] += 1
                return None
            capture_id = new_capture_id(reason, self._clock())
            self._thread = threading.Thread(target=self.run, args=(capture_id, reason, evidence, context or {}),
                                            name=f"moe-monitor-capture-{capture_id}", daemon=True)
            self._thread.start()
            return capture_id

    def wait(self, timeout: float | None = None) -> None:
        if self._thread is not None:
            self._thread.join(timeout)

    def run(self, capture_id: str, reason: str, evidence: dict, context: dict) -> str:
        start = self._clock()
        with capture_span(capture_id, reason, evidence) as span:
            outcome, meta = self._capture(capture_id, reason, evidence, context, start)
            span.set_attribute("moe_monitor.outcome", outcome)
            if meta:
                span.set_attribute("moe_monitor.files", len(meta["files"]))
                span.set_attribute("moe_monitor.bytes", meta["total_bytes"])
        self.outcomes[(reason, outcome)] += 1
        self.last_duration_s, self.last_end = self._clock() - start, self._clock()
        log.info("capture %s (%s): %s in %.1fs", capture_id, reason, outcome, self.last_duration_s)
        return outcome

    def _capture(self, capture_id, reason, evidence, context, start) -> tuple[str, dict | None]:
        cfg, prefix = self.cfg, f"{capture_id}_"
        start_body = {"profile_prefix": prefix, "max_iterations": cfg.iterations}
        before = frozenset(os.path.basename(p) for p in rank_files(cfg.profile_dir, ""))  # every one there now
        try:
            try:
                post(cfg, "/start_profile", start_body)
            except ProfilerBusy:  # a session left open (by vLLM after max_iterations, or by someone else)
                log.warning("capture %s: vLLM holds a profiling session; stopping it and retrying", capture_id)
                post(cfg, "/stop_profile")
                post(cfg, "/start_profile", start_body)
            self.profiler_enabled = True
        except ProfilerDisabled as e:
            self.profiler_enabled = False
            log.error("cannot capture: %s; monitoring continues", e)
            return "profiler_disabled", None
        except ProfilerError as e:
            log.error("cannot start a capture: %s", e)
            return "start_failed", None
        files = self._wait_for(prefix, before, start + min(cfg.run_s, cfg.timeout_s))
        stopped = False
        if len(files) < self.expected_ranks():
            try:  # the profile did not end by itself (idle engine, or a vLLM that ignores max_iterations)
                post(cfg, "/stop_profile")
                stopped = True
            except (ProfilerDisabled, ProfilerError) as e:
                log.warning("capture %s: /stop_profile failed: %s", capture_id, e)
            files = self._wait_for(prefix, before, max(start + cfg.timeout_s, self._clock() + cfg.stop_grace_s))
        if not stopped:  # vLLM keeps a max_iterations session open until /stop_profile: close it
            try:
                post(cfg, "/stop_profile")
            except (ProfilerDisabled, ProfilerError) as e:
                log.warning("capture %s: closing the profiling session failed: %s", capture_id, e)
        if not files:
            return "no_trace", None
        outcome = "ok" if len(files) >= self.expected_ranks() else "partial"
        breakdown = None
        try:
            breakdown = analyze([read_trace(p) for p in files])
        except (TraceError, ValueError) as e:
            log.warning("capture %s: breakdown failed: %s", capture_id, e)
        metadata = {"created": start, "reason": reason, "evidence": evidence, "outcome": outcome,
                    "stopped_by_sidecar": stopped, "duration_s": self._clock() - start, **context,
                    "breakdown": {c: round(v["share"], 6) for c, v in breakdown["categories"].items()}
                    if breakdown else None}
        extra = {"breakdown.json": json.dumps(breakdown).encode()} if breakdown else {}
        try:
            return outcome, self.catalog.store(capture_id, files, metadata, extra)
        except QuotaError as e:
            log.error("capture %s refused: %s", capture_id, e)
            for p in files:
                os.unlink(p)
            return "over_quota", None

    def _wait_for(self, prefix: str, before: frozenset[str], deadline: float) -> list[str]:
        """Rank files of this capture that are complete, waiting until all expected ones are or the deadline."""
        while True:
            done = [p for p in rank_files(self.cfg.profile_dir, prefix, before)
                    if is_regular_file(p) and trace_complete(p)]
            if len(done) >= self.expected_ranks() or self._clock() >= deadline:
                return done
            time.sleep(0.5)
