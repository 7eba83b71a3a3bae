"""vLLM's EPLB rearrangements as one worker sees them: how many, when the last one ran and how long it took, the
configured interval, and vLLM's own steps-since-rearrangement counter, so the sidecar can tell a rearrangement
that is overdue (a stalled async transfer, a hung collective) from one that is merely not due yet.

vLLM exports no EPLB metric and logs a stall nowhere: a synchronous rearrangement blocks the engine inside
`EplbState.rearrange`, and an asynchronous one that never finishes leaves `EplbModelState.rebalanced` set, so
`EplbState.step` stops starting new ones while its `expert_rearrangement_step` counter climbs past the interval
for good (the "steps until the next rearrangement" of its log then runs negative forever).

Where it hooks (host-side only; nothing here runs per step and none of it calls CUDA):
- `EplbState.rearrange` (class attribute, wrapped once per process): the host clock at entry (its profile run,
  `is_profile=True`, is not counted) and at return. Only when vLLM rearranges: every `step_interval` steps.
- vLLM's commit functions, through the wrappers `placement.follow_commits` already installs
  (`_commit_eplb_maps`: sync EPLB, the whole model at once; `_commit_eplb_maps_for_layer`: async EPLB, one MoE
  layer a step): a rearrangement completes at the whole-model commit, or at the last MoE layer's commit.
  Duration = host time from entering `rearrange` to that commit. Sync: the same call, after the weights moved
  (vLLM's communicator waits for its transfers before the commit); vLLM's own "Rearranged experts in X s" is GPU
  event time on EP rank 0. Async: the policy and the transfers run on vLLM's worker thread, one layer per
  engine step, so the duration spans those steps.
- At each publish (the publisher thread, at its cadence) `record()` reads plain Python attributes of the
  EplbState: `expert_rearrangement_step`, `expert_rearrangement_step_interval`, `expert_load_window_size`,
  `is_async`, and the model state's `rebalanced`.
"""

from __future__ import annotations

import functools
import logging
import math
import time

from moe_monitor.channel.layout import EPLB_ASYNC, EPLB_HOOKED, EPLB_IN_PROGRESS, EplbHealth

log = logging.getLogger(__name__)

STATE_ATTRIBUTES = ("expert_rearrangement_step", "expert_rearrangement_step_interval", "expert_load_window_size",
                    "is_async")


class EplbRecorder:
    """Rearrangements of one model's EPLB state on this rank. `entered`, `returned` and `committed` run on the
    thread vLLM rearranges or commits from; `record` on the publisher's. Each writes only its own plain
    attributes (ints and floats: a torn read between two of them can only be one rearrangement old)."""

    def __init__(self, state, model_state, num_layers: int, engine_steps, hooked: bool = True):
        self.state = state  # vLLM's EplbState
        self.model_state = model_state  # the EplbModelState of the model whose routing we count
        self.num_layers = num_layers
        self._engine_steps = engine_steps  # () -> engine steps so far (StepStats.recorded)
        self.hooked = hooked  # rearrange is wrapped: starts and durations are known
        self.started = 0
        self.rearrangements = 0
        self.layer_commits = 0
        self.last_start_unix_ns = 0
        self.last_end_unix_ns = 0
        self.last_duration_s = math.nan
        self.duration_s_total = 0.0
        self.engine_steps_at_last = 0
        self._entered: float | None = None  # perf_counter at entry of the rearrangement not yet completed
        self._inside = False  # inside a synchronous rearrange call

    def entered(self) -> None:
        self.started += 1
        self.last_start_unix_ns = time.time_ns()
        self._entered = time.perf_counter()
        self._inside = True

    def returned(self) -> None:
        self._inside = False
        if not self._async():
            self._entered = None  # a sync rearrange that returned without a commit skipped (or failed): done

    def committed(self, layer: int | None) -> None:
        if layer is not None:
            self.layer_commits += 1
            if layer != self.num_layers - 1:
                return
        if self._entered is not None:
            self.last_duration_s = time.perf_counter() - self._entered
            self.duration_s_total += self.last_duration_s
        elif math.isnan(self.last_duration_s):
            self.last_duration_s = 0.0  # a commit whose start was not seen (rearrange not wrapped)
        self._entered = None
        self.rearrangements += 1
        self.last_end_unix_ns = time.time_ns()
        self.engine_steps_at_last = int(self._engine_steps())

    def _async(self) -> bool:
        return bool(getattr(self.state, "is_async", False))

    def record(self) -> EplbHealth:
        """The eplb_health record of this publish (host attributes only)."""
        state = self.state
        engine_steps = int(self._engine_steps())
        since = getattr(state, "expert_rearrangement_step", None)
        if not isinstance(since, int):  # a vLLM without the counter: our own steps since the last completion
            since = engine_steps - self.engine_steps_at_last
        interval = getattr(state, "expert_rearrangement_step_interval", 0)
        if not isinstance(interval, int) or interval < 1:
            interval = _config_interval(state)
        window = getattr(state, "expert_load_window_size", 0)
        is_async = self._async()
        # async: in progress while vLLM's model state is marked rebalanced (its worker gave a cycle up when that
        # flag drops without the last layer's commit)
        pending = self._entered is not None and (self._inside or (is_async and bool(
            getattr(self.model_state, "rebalanced", False))))
        flags = (EPLB_ASYNC if is_async else 0) | (EPLB_HOOKED if self.hooked else 0) | (
            EPLB_IN_PROGRESS if pending else 0)
        return EplbHealth(
            flags=flags, rearrangements=self.rearrangements, layer_commits=self.layer_commits, started=self.started,
            last_start_unix_ns=self.last_start_unix_ns, last_end_unix_ns=self.last_end_unix_ns,
            last_duration_s=self.last_duration_s if self.rearrangements else math.nan,
            duration_s_total=self.duration_s_total, step_interval=max(1, interval),
            window_size=max(0, window if isinstance(window, int) else 0), steps_since=max(0, since),
            engine_steps=engine_steps, engine_steps_at_last=min(self.engine_steps_at_last, engine_steps))


def _config_interval(state) -> int:
    try:
        return int(state.parallel_config.eplb_config.step_interval)
    except (AttributeError, TypeError, ValueError):
        return 1


_recorders: list[EplbRecorder] = []


def on_commit(model_state, layer: int | None) -> None:
    """Called by placement.follow_commits' wrappers after vLLM committed a map (whole model: layer None)."""
    for r in _recorders:
        if r.model_state is model_state:
            r.committed(layer)


def _for_state(state) -> list[EplbRecorder]:
    return [r for r in _recorders if r.state is state]


def wrap_rearrange() -> bool:
    """Wrap `EplbState.rearrange` once per process; False (and one log line) when this vLLM has no such method
    or its EplbState lacks the counters read at publish: then only commits are counted, without durations."""
    from vllm.distributed.eplb import eplb_state as es

    cls = getattr(es, "EplbState", None)
    original = getattr(cls, "rearrange", None)
    if cls is None or not callable(original):
        log.warning("moe-monitor: this vLLM has no EplbState.rearrange; EPLB rearrangements are counted at their "
                    "commits, without start times or durations")
        return False
    if getattr(original, "_moe_monitor", False):
        return True

    @functools.wraps(original)
    def rearrange(self, *args, **kwargs):
        mine = [] if kwargs.get("is_profile", args[0] if args else False) else _for_state(self)
        for r in mine:
            try:
                r.entered()
            except Exception:  # noqa: BLE001 - never raise into vLLM's rearrangement
                log.exception("moe-monitor could not time an EPLB rearrangement")
        try:
            return original(self, *args, **kwargs)
        finally:
            for r in mine:
                try:
                    r.returned()
                except Exception:  # noqa: BLE001
                    log.exception("moe-monitor could not time an EPLB rearrangement")

    rearrange._moe_monitor = True
    cls.rearrange = rearrange
    return True


def follow_eplb(state, model_state, num_layers: int, engine_steps) -> EplbRecorder:
    """An EplbRecorder for `model_state` of `state` (vLLM's EplbState), registered for commits and rearranges."""
    hooked = wrap_rearrange()
    missing = [a for a in STATE_ATTRIBUTES if not hasattr(state, a)]
    if missing:
        log.warning("moe-monitor: vLLM's EplbState lacks %s; steps since the last rearrangement are counted from "
                    "the engine steps moe-monitor times", ", ".join(missing))
    recorder = EplbRecorder(state, model_state, num_layers, engine_steps, hooked=hooked)
    _recorders[:] = [r for r in _recorders if r.model_state is not model_state] + [recorder]
    return recorder
