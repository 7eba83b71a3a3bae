"""Bounded profiler captures through vLLM's /start_profile, collected into the catalog with their reason.

One capture at a time, on its own thread: POST /start_profile {"profile_prefix": "<id>_", "max_iterations":
N} (bearer API key when vLLM runs with --api-key), then wait until every rank's trace file of this capture
is complete (a full gzip stream ending a JSON object), POST /stop_profile when the profile has not ended by
itself within `run_s`, analyse the files (kernel breakdown), and store them with metadata. A capture's files
are those named with its prefix or new since it started: vLLM before 0.32 ignores the request body (no
prefix, no max_iterations; set max_iterations in its --profiler-config), and `run_s` bounds such a profile.

Everything that waits on vLLM ends by one deadline, `timeout_s` after the start: each HTTP call gets at most
the time left. Every capture ends with exactly one outcome (OUTCOMES), counted and logged once with its id,
whatever fails; what is left of its own files in the profile directory is removed. Nothing here can stop
the sidecar. A capture that stores no trace is recorded in the catalog all the same (its metadata with the
outcome and why, `error`), so `traces list` and `traces show <id>` find it; while it runs, `running(id)` is
its metadata with the outcome `running`.

A capture takes at most `max_files` rank files (the rest are left out, counted in its metadata and logged), and
analyses them one at a time (breakdown.analyze.analyze_files): its memory is one trace's, not one per rank.
"""

from __future__ import annotations

import asyncio
import gzip
import json
import logging
import os
import stat
import threading
import time
from collections import Counter
from dataclasses import dataclass

import aiohttp

from moe_monitor.breakdown.analyze import analyze_files
from moe_monitor.breakdown.latest import rank_trace
from moe_monitor.breakdown.result import BreakdownResult
from moe_monitor.breakdown.trace import TraceError
from moe_monitor.schema.vocabulary import ALERT_OUTCOMES, CAPTURE_OUTCOMES

from .catalog import CaptureMeta, Catalog, QuotaError, is_regular_file, new_capture_id
from .telemetry import capture_span

log = logging.getLogger(__name__)

# moe_captures_total's outcome label, one per capture (docs/captures.md says what each means).
OUTCOMES = tuple(CAPTURE_OUTCOMES)  # their meanings: moe_monitor/schema/vocabulary.py


class ProfilerDisabled(Exception):
    """vLLM answered 404: it was started without --profiler-config."""


class ProfilerError(Exception):
    pass


class ProfilerBusy(ProfilerError):
    """409: vLLM holds a profiling session (it stays active after max_iterations until /stop_profile)."""


@dataclass(frozen=True)
class CaptureConfig:
    vllm_url: str
    profile_dir: str  # vLLM's torch_profiler_dir, readable by the sidecar
    api_key: str | None = None
    iterations: int = 5  # engine steps per capture (max_iterations)
    timeout_s: float = 120.0  # the whole capture: everything that waits on vLLM ends by start + timeout_s
    run_s: float = 10.0  # a profile still running after this is stopped (/stop_profile)
    stop_grace_s: float = 30.0  # kept for vLLM to write the traces after /stop_profile (at most timeout_s / 2)
    http_timeout_s: float = 30.0  # the API server answers slowly exactly when steps regress (CPU contention)
    max_files: int = 64  # rank files per capture (one per rank); more are left out, and said so


async def _post(cfg: CaptureConfig, path: str, body: dict | None, timeout_s: float) -> None:
    headers = {"Authorization": f"Bearer {cfg.api_key}"} if cfg.api_key else {}
    try:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=timeout_s)) as session:
            async with session.post(cfg.vllm_url.rstrip("/") + path, json=body, headers=headers) as resp:
                if resp.status == 404:
                    raise ProfilerDisabled(f"{path} answered 404: vLLM was started without --profiler-config")
                if resp.status == 409:
                    raise ProfilerBusy(f"{path} answered 409: a profiling session is already active")
                if resp.status != 200:
                    raise ProfilerError(f"{path} answered {resp.status}: {(await resp.text())[:200]}")
    except (TimeoutError, aiohttp.ClientError) as e:
        raise ProfilerError(f"{path}: {type(e).__name__}: {e}") from None


def post(cfg: CaptureConfig, path: str, body: dict | None = None, deadline: float | None = None) -> None:
    """POST to vLLM within `http_timeout_s` and before `deadline` (time.monotonic())."""
    timeout_s = cfg.http_timeout_s if deadline is None else min(cfg.http_timeout_s, deadline - time.monotonic())
    if timeout_s <= 0:
        raise ProfilerError(f"{path}: not sent, the capture's time (timeout {cfg.timeout_s:g} s) is up")
    asyncio.run(_post(cfg, path, body, timeout_s))


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


def remove_regular_files(paths: list[str], capture_id: str) -> None:
    """Unlink the regular files among `paths` (a symlink is left where it is: unlink never follows one)."""
    removed = 0
    for p in paths:
        if is_regular_file(p):
            try:
                os.unlink(p)
                removed += 1
            except FileNotFoundError:
                pass
            except OSError as e:
                log.warning("capture %s: cannot remove %s from the profile dir: %s", capture_id, p, e)
    if removed:
        log.info("capture %s: removed %d of its trace files from the profile dir", capture_id, removed)


class Ended(Exception):
    """A capture ends here with `outcome` (one that stores no trace), `detail` saying why."""

    def __init__(self, outcome: str, detail: str):
        super().__init__(detail)
        self.outcome, self.detail = outcome, detail


class Capturer:
    def __init__(self, cfg: CaptureConfig, catalog: Catalog, expected_ranks=lambda: 1, clock=time.time):
        self.cfg, self.catalog, self.expected_ranks, self._clock = cfg, catalog, expected_ranks, clock
        self.outcomes: Counter[tuple[str, str]] = Counter()
        self.alert_outcomes: Counter[str] = Counter({o: 0 for o in ALERT_OUTCOMES})  # Alertmanager's, by what was done
        self.profiler_enabled: bool | None = None  # unknown until the first capture
        self.last_duration_s: float | None = None
        self.last_end: float | None = None
        self._thread: threading.Thread | None = None
        self._running: dict | None = None  # the running capture's metadata (outcome "running"), until recorded
        self._lock = threading.Lock()
        if catalog.swept:  # stores killed half-way: the rest of their files are still in the profile dir
            self._remove_files_of(catalog.swept)

    @property
    def busy(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def trigger(self, reason: str, evidence: dict, context: dict | None = None,
                extra: dict | None = None) -> str | None:
        """Start a capture in the background; returns its id, or None when one is already running. `extra`:
        files stored with the traces, name -> bytes or a callable making them (the flight record)."""
        with self._lock:
            if self.busy:
                self.outcomes[(reason, "skipped_busy")] += 1
                return None
            capture_id = new_capture_id(reason, self._clock())
            self._running = {"id": capture_id, "created": self._clock(), "reason": reason, "evidence": evidence,
                             "outcome": "running", "files": [], "total_bytes": 0}
            self._thread = threading.Thread(target=self.run, args=(capture_id, reason, evidence, context or {},
                                                                   extra or {}),
                                            name=f"moe-monitor-capture-{capture_id}", daemon=True)
            self._thread.start()
            return capture_id

    def wait(self, timeout: float | None = None) -> None:
        if self._thread is not None:
            self._thread.join(timeout)

    def running(self, capture_id: str | None = None) -> dict | None:
        """The running capture's metadata (outcome "running"; `capture_id`: only if it is that one), else None. A
        capture stays running until its outcome is in the catalog: asked in that order, never neither."""
        running = self._running
        return running if running is not None and capture_id in (None, running["id"]) else None

    def run(self, capture_id: str, reason: str, evidence: dict, context: dict, extra: dict | None = None) -> str:
        """One capture, start to stored. Ends with exactly one outcome, whatever fails on the way."""
        start, deadline = self._clock(), time.monotonic() + self.cfg.timeout_s
        meta: CaptureMeta | None = None
        stopped = [False]
        try:
            with capture_span(capture_id, reason, evidence) as span:
                try:
                    outcome, meta = self._capture(capture_id, reason, evidence, context, start, deadline,
                                                  extra or {}, stopped)
                    detail = None
                except Ended as e:
                    outcome, detail = e.outcome, e.detail
                span.set_attribute("moe_monitor.outcome", outcome)
                if meta:
                    span.set_attribute("moe_monitor.files", len(meta.files))
                    span.set_attribute("moe_monitor.bytes", meta.total_bytes)
        except Exception as e:  # a bug, or a failure nobody foresaw: counted and logged, never a silent dead thread
            log.exception("capture %s (%s) failed", capture_id, reason)
            outcome, detail = "error", f"{type(e).__name__}: {e} (a bug: the traceback is in the sidecar's log)"
        self.outcomes[(reason, outcome)] += 1
        self.last_duration_s, self.last_end = self._clock() - start, self._clock()
        log.info("capture %s (%s): %s in %.1fs", capture_id, reason, outcome, self.last_duration_s)
        if meta is None:
            self._record(capture_id, {"created": start, "reason": reason, "evidence": evidence, "outcome": outcome,
                                      "error": detail, "stopped_by_sidecar": stopped[0],
                                      "duration_s": self.last_duration_s, **context})
        if self._running is not None and self._running["id"] == capture_id:
            self._running = None
        return outcome

    def _record(self, capture_id: str, metadata: dict) -> None:
        """Keep a capture that stored no trace in the catalog as its metadata alone, for `traces list/show`;
        values JSON cannot hold (a numpy number in the evidence: the store_failed it may be recording) as text."""
        try:
            self.catalog.store(capture_id, [], json.loads(json.dumps(metadata, default=str)))
        except Exception as e:  # noqa: BLE001 - ENOSPC, evidence that is not JSON, ...: the log line above stays
            log.warning("capture %s: cannot record its outcome in the catalog: %s", capture_id, e)

    def _names(self) -> frozenset[str]:
        return frozenset(os.path.basename(p) for p in rank_files(self.cfg.profile_dir, ""))

    def _remove_files_of(self, capture_ids: list[str]) -> None:
        """The files named with these captures' prefixes (those vLLM < 0.32 wrote unnamed cannot be told)."""
        try:
            names = self._names()
            for capture_id in capture_ids:
                remove_regular_files(rank_files(self.cfg.profile_dir, f"{capture_id}_", names), capture_id)
        except OSError as e:
            log.warning("cannot clean the profile dir of unfinished captures %s: %s", capture_ids, e)

    def _capture(self, capture_id, reason, evidence, context, start, deadline, extra, stopped) \
            -> tuple[str, CaptureMeta]:
        """(outcome, stored metadata) of a capture that stored its traces; Ended for one that did not."""
        prefix, before = f"{capture_id}_", self._names()  # every rank file there now is not this capture's
        self._start(capture_id, prefix, deadline)
        try:
            files, stopped[0] = self._collect(capture_id, prefix, before, deadline)
            if not files:
                raise Ended("no_trace", f"no complete rank trace in {self.cfg.profile_dir} within the capture's "
                            f"{self.cfg.timeout_s:g} s (--capture-timeout)")
            return self._store(capture_id, files, reason, evidence, context, start, stopped[0], extra)
        finally:  # stored, refused or failed: what is left of this capture's own files goes
            remove_regular_files(rank_files(self.cfg.profile_dir, prefix, before), capture_id)

    def _start(self, capture_id: str, prefix: str, deadline: float) -> None:
        """POST /start_profile; returns once the profile runs, else raises Ended with the capture's outcome."""
        body = {"profile_prefix": prefix, "max_iterations": self.cfg.iterations}
        try:
            try:
                post(self.cfg, "/start_profile", body, deadline)
            except ProfilerBusy:  # a session left open (by vLLM after max_iterations, or by someone else)
                log.warning("capture %s: vLLM holds a profiling session; stopping it and retrying", capture_id)
                post(self.cfg, "/stop_profile", None, deadline)
                post(self.cfg, "/start_profile", body, deadline)
        except ProfilerDisabled as e:
            self.profiler_enabled = False
            log.error("capture %s: cannot capture: %s; monitoring continues", capture_id, e)
            raise Ended("profiler_disabled", str(e)) from None
        except ProfilerBusy as e:
            self.profiler_enabled = True
            log.error("capture %s: vLLM is profiling already and did not let go after /stop_profile: %s",
                      capture_id, e)
            raise Ended("vllm_busy", f"{e} (someone else is profiling vLLM)") from None
        except ProfilerError as e:
            log.error("capture %s: cannot start: %s", capture_id, e)
            raise Ended("start_failed", str(e)) from None
        self.profiler_enabled = True

    def _collect(self, capture_id, prefix, before, deadline) -> tuple[list[str], bool]:
        """This capture's complete rank files by the deadline, and whether the sidecar stopped the profile.
        The profiling session is closed on every path (vLLM keeps a max_iterations session open until
        /stop_profile)."""
        cfg, session_open, stopped = self.cfg, True, False
        began = deadline - cfg.timeout_s
        # stop a profile still running after run_s, early enough to leave vLLM time to write the traces
        run_until = min(began + cfg.run_s, deadline - min(cfg.stop_grace_s, cfg.timeout_s / 2))
        try:
            files = self._wait_for(prefix, before, run_until)
            if len(files) < self._wanted():  # not ended by itself (idle engine, or vLLM < 0.32)
                session_open, stopped = False, self._stop(capture_id, deadline)
                files = self._wait_for(prefix, before, deadline)
            return files, stopped
        finally:
            if session_open:
                self._stop(capture_id, deadline)

    def _stop(self, capture_id: str, deadline: float) -> bool:
        try:
            post(self.cfg, "/stop_profile", None, deadline)
            return True
        except (ProfilerDisabled, ProfilerError) as e:
            log.warning("capture %s: /stop_profile failed: %s", capture_id, e)
            return False

    def _store(self, capture_id, files, reason, evidence, context, start, stopped, extra) -> tuple[str, CaptureMeta]:
        files, left_out = files[: self.cfg.max_files], files[self.cfg.max_files :]
        if left_out:  # not analysed, not stored; removed from the profile dir with the capture's other leftovers
            log.warning("capture %s: %d rank files, more than the %d a capture takes: %d left out (%s%s)",
                        capture_id, len(files) + len(left_out), self.cfg.max_files, len(left_out),
                        ", ".join(os.path.basename(p) for p in left_out[:3]), ", ..." if len(left_out) > 3 else "")
        outcome = "ok" if len(files) >= self.expected_ranks() else "partial"
        breakdown = self._analyse(capture_id, files)
        if breakdown is None:
            outcome = "analysis_failed"
        metadata = {"created": start, "reason": reason, "evidence": evidence, "outcome": outcome,
                    "stopped_by_sidecar": stopped, "duration_s": self._clock() - start, **context,
                    **({"files_left_out": len(left_out), "max_files": self.cfg.max_files} if left_out else {}),
                    "breakdown": {c: round(v.share, 6) for c, v in breakdown.categories.items()}
                    if breakdown else None}
        extra = dict(self._materialise(capture_id, extra),
                     **({"breakdown.json": json.dumps(breakdown.to_json()).encode()} if breakdown else {}))
        try:
            return outcome, self.catalog.store(capture_id, files, metadata, extra)
        except QuotaError as e:
            log.error("capture %s refused: %s", capture_id, e)
            raise Ended("over_quota", f"{e} (--max-capture-bytes)") from None
        except (OSError, TypeError, ValueError) as e:  # ENOSPC, EIO, ...; metadata that cannot be written
            log.error("capture %s: storing it failed, its traces are dropped: %s", capture_id, e,
                      exc_info=not isinstance(e, OSError))
            raise Ended("store_failed", f"storing it failed, its traces are dropped: {e}") from None

    @staticmethod
    def _materialise(capture_id: str, extra: dict) -> dict[str, bytes]:
        """Extra files given as bytes or as a callable that makes them (the flight record); one that fails is
        left out (logged), the capture is stored without it."""
        out = {}
        for name, value in extra.items():
            try:
                out[name] = value() if callable(value) else value
            except Exception:  # noqa: BLE001
                log.exception("capture %s: cannot write %s; stored without it", capture_id, name)
        return out

    def _analyse(self, capture_id: str, files: list[str]) -> BreakdownResult | None:
        """The kernel breakdown, or None when the traces cannot be analysed (they are stored all the same)."""
        try:
            return analyze_files(files)  # one rank's trace in memory at a time
        except (TraceError, ValueError) as e:  # a corrupt or unusable trace
            log.warning("capture %s: cannot analyse its trace, stored without a breakdown: %s", capture_id, e)
        except Exception:
            log.exception("capture %s: the analysis failed (a bug: the trace is stored, please report it with "
                          "the trace); stored without a breakdown", capture_id)
        return None

    def _wanted(self) -> int:
        return min(self.expected_ranks(), self.cfg.max_files)

    def _wait_for(self, prefix: str, before: frozenset[str], until: float) -> list[str]:
        """Rank files of this capture that are complete, waiting until all expected ones are (at most max_files)
        or `until` (time.monotonic()). A file found complete is not read again while its size and mtime stay."""
        complete: dict[str, tuple[int, int]] = {}
        while True:
            done = [p for p in rank_files(self.cfg.profile_dir, prefix, before) if self._complete(p, complete)]
            left = until - time.monotonic()
            if len(done) >= self._wanted() or left <= 0:
                return done
            time.sleep(min(0.5, left))

    @staticmethod
    def _complete(path: str, seen: dict[str, tuple[int, int]]) -> bool:
        try:
            st = os.lstat(path)
        except OSError:
            return False
        if not stat.S_ISREG(st.st_mode):
            return False
        if seen.get(path) == (st.st_size, st.st_mtime_ns):
            return True
        if trace_complete(path):
            seen[path] = (st.st_size, st.st_mtime_ns)
            return True
        return False
