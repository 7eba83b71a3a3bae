"""Hooks on vLLM's worker: attach after the model is loaded, gate counting and time every engine step.

Each hook body is wrapped so that nothing moe-monitor does can raise into vLLM or stop a step.
"""

from __future__ import annotations

import atexit
import functools
import logging
import math
import random

import torch

from moe_monitor import env
from moe_monitor.channel import Ranks, SegmentWriter, Shape

from .attach import find_moe_layers, patch_bind_routed_experts_capturer, patch_set_capture_fn, tap_layers
from .eplb_health import follow_eplb
from .placement import read_live_placement
from .publisher import Publisher
from .recorder import MODES, Recorder
from .step_timer import CudaEventTimer, DriverEvents, HostTimer, TorchEvents
from .steps import PHASE_INDEX, StepStats, phase_of

log = logging.getLogger(__name__)


CHECKED_STEPS = 64  # real steps whose token count read from vLLM's buffer is checked against the scheduler's


class WorkerMonitor:
    """Everything the plugin keeps for one worker process. Its hooks run on vLLM's worker thread. Every step they
    read a few attributes of the scheduler's output, find the step's phase and queue (phase, tokens); the steps
    chosen for timing (all on CPU, a pseudo-random 1 in `time_every` on CUDA) also record an event at their end (and
    at their start) and resolve the times of earlier timed steps. The step's token count is written only where
    vLLM's own count cannot be read (what that costs: docs/recorder.md, "Cost")."""

    def __init__(self, recorder: Recorder, publisher: Publisher, timer: HostTimer | CudaEventTimer,
                 time_every: int = 1, seed: int | None = None):
        self.recorder, self.publisher, self.timer = recorder, publisher, timer
        self.steps = timer.steps
        # Forwards that are not steps (vLLM's dummy runs: DP idle ranks, warm-up) must count nothing. Until
        # wrap_dummy_run zeroes the count before each of them (build_monitor), it is zeroed after every step's
        # forward, which costs a second write a step.
        self.zero_after_forward = True
        self.off = False  # a hook failed: the worker runs without moe-monitor from then on
        # vLLM's host copy of the buffer the recorder reads the step's tokens from (read_vllm_step_tokens); None:
        # the hooks write the count every step
        self.vllm_tokens = None
        self._checks_left = 0
        self._tokens = 0
        self.sampler = StepSampler(time_every, seed)
        self._countdown = self.sampler.gap()  # steps until the next timed one (1: the next step)
        self._timing = False  # the step under way is timed
        self._chained = False  # the last step with tokens was timed

    def read_vllm_step_tokens(self, device_count, host_buffer) -> None:
        """Count what vLLM says each step has (device_count: a 0-d int32 tensor it fills before the forward), so
        no step writes anything; the first CHECKED_STEPS real steps compare vLLM's host copy (host_buffer[-1])
        with the scheduler's count and go back to writing on the first difference."""
        self.recorder.read_step_tokens_from(device_count)
        self.vllm_tokens, self._checks_left = host_buffer, CHECKED_STEPS

    def step_begin(self, scheduler_output) -> None:
        tokens = scheduler_output.total_num_scheduled_tokens
        if self._timing:  # the timed step before this one never ended (no output): its time is dropped
            self._timing = self._chained = False
            self.timer.cancel()
        if tokens <= 0:
            return
        if self.vllm_tokens is None:
            self.recorder.set_valid_tokens(tokens)
        self._tokens = tokens
        prefill = prefill_tokens(scheduler_output)
        phase = phase_of(prefill, tokens - prefill)
        self.steps.step(PHASE_INDEX[phase], tokens)
        self._countdown -= 1
        if self._countdown:
            self._chained = False
            return
        self._countdown = self.sampler.gap()
        self.timer.begin(phase, tokens, self._chained)
        self._timing = True

    def forward_done(self) -> None:
        self.recorder.set_valid_tokens(0)

    def step_end(self) -> None:
        if self._timing:
            self._timing = False
            self.timer.end()
            self._chained = True
        if self._checks_left:
            self._check_vllm_tokens()

    def _check_vllm_tokens(self) -> None:
        self._checks_left -= 1
        read = int(self.vllm_tokens[-1])
        if read != self._tokens:
            log.warning("moe-monitor: vLLM's per-step token buffer held %d tokens for a step of %d (this vLLM "
                        "fills it otherwise); the step hooks write the count from now on", read, self._tokens)
            self.recorder.stop_reading_step_tokens()
            self.vllm_tokens, self._checks_left = None, 0

    def before_dummy_run(self) -> bool:
        """Before one of vLLM's dummy forwards: count nothing in it. False when nothing was done (inside a
        graph capture, where a write would be captured into the graph and replayed with every step)."""
        if self.recorder.device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            return False  # vLLM starts its captures inside the dummy run, not around it
        if self.vllm_tokens is not None:
            self.recorder.set_gate(False)
        else:
            self.recorder.set_valid_tokens(0)
        return True

    def after_dummy_run(self) -> None:
        if self.vllm_tokens is not None:
            self.recorder.set_gate(True)

    def fail(self, what: str) -> None:
        """A hook raised: log it once, stop counting (a stale token count would count wrong from now on) and
        leave vLLM alone."""
        self.off = True
        log.exception("moe-monitor %s failed; serving continues, moe-monitor stops counting and timing steps in "
                      "this worker", what)
        self.recorder.failed = True
        try:
            self.recorder.valid_tokens.fill_(0)
            self.recorder.gate.fill_(0)
        except Exception:  # noqa: BLE001 - never raise into vLLM
            log.exception("moe-monitor could not zero its token count after that failure")


class StepSampler:
    """Which steps the timer measures: each step with probability 1 / every, independently (gaps between timed steps
    are geometric, drawn once per timed step), so the sample cannot fall into step with a periodic pattern of the
    workload (a chunked prefill every 16 steps, say) the way every 16th step would."""

    def __init__(self, every: int = 1, seed: int | None = None):
        if every < 1:
            raise ValueError(f"time one step in {every}: expected a whole number >= 1")
        self.every = every
        self._random = random.Random(seed)
        self._log_stay = math.log1p(-1.0 / every) if every > 1 else 0.0

    def gap(self) -> int:
        """Steps from one timed step to the next (1: the next step)."""
        if self.every == 1:
            return 1
        return 1 + int(math.log1p(-self._random.random()) / self._log_stay)


def prefill_tokens(scheduler_output) -> int:
    """Prompt tokens of one scheduled step (the rest are decode tokens). A decode step without new, resumed or
    still-prefilling requests costs one C-level scan of the requests' output counts (~8 ns a request); only
    steps with such requests walk them in Python."""
    scheduled = scheduler_output.num_scheduled_tokens
    new = scheduler_output.scheduled_new_reqs
    prefill = sum(scheduled.get(r.req_id, 0) for r in new) if new else 0
    cached = scheduler_output.scheduled_cached_reqs
    resumed = getattr(cached, "resumed_req_ids", None)
    outputs = cached.num_output_tokens
    if resumed or 0 in outputs:
        for req_id, n_out in zip(cached.req_ids, outputs):
            if n_out == 0 or (resumed and req_id in resumed):
                prefill += scheduled.get(req_id, 0)
    return prefill


def wrap_dummy_run(runner, monitor: WorkerMonitor) -> bool:
    """Zero the token count before each of the runner's dummy runs (an instance attribute over vLLM's method), so
    a step's count need not be zeroed after its forward. False where the runner has no `_dummy_run`."""
    original = getattr(runner, "_dummy_run", None)
    if not callable(original) or getattr(original, "_moe_monitor", False):
        return False

    @functools.wraps(original)
    def _dummy_run(*args, **kwargs):
        gated = False
        if not monitor.off:
            try:
                gated = monitor.before_dummy_run()
            except Exception:  # noqa: BLE001 - never raise into vLLM
                monitor.fail("dummy-run hook")
        try:
            return original(*args, **kwargs)
        finally:
            if gated and not monitor.off:
                try:
                    monitor.after_dummy_run()
                except Exception:  # noqa: BLE001
                    monitor.fail("dummy-run hook")

    _dummy_run._moe_monitor = True
    runner._dummy_run = _dummy_run
    return True


def vllm_step_tokens(runner, device: torch.device):
    """(device count, host buffer) of the step's real tokens as vLLM itself keeps them, or None: the runner's
    `query_start_loc` buffer, whose elements past the step's requests vLLM pads with the step's total and copies
    to the device before every forward (GPUModelRunner._prepare_inputs, vLLM 0.26 to 0.32; the CPU runner
    inherits it), so its last element is the count. Its dummy runs pad only their own slice and leave it stale:
    WorkerMonitor closes the gate around them."""
    buffer = getattr(runner, "query_start_loc", None)
    device_buffer, host_buffer = getattr(buffer, "gpu", None), getattr(buffer, "np", None)
    if not isinstance(device_buffer, torch.Tensor) or device_buffer.dim() != 1 or device_buffer.numel() < 2:
        return None
    if device_buffer.dtype != torch.int32 or device_buffer.device != torch.device(device):
        return None
    if host_buffer is None or len(host_buffer) != device_buffer.numel():
        return None
    return device_buffer[-1], host_buffer


def read_ranks(vllm_config) -> Ranks:
    from vllm.distributed import parallel_state as ps

    def group(getter):
        try:
            g = getter()
            return g.rank_in_group, g.world_size
        except Exception:  # noqa: BLE001 - group not initialised in this configuration
            return 0, 1

    tp, pp, ep = group(ps.get_tp_group), group(ps.get_pp_group), group(ps.get_ep_group)
    pc = vllm_config.parallel_config
    dp = (getattr(pc, "data_parallel_rank", 0), getattr(pc, "data_parallel_size", 1))
    try:
        import torch.distributed as dist
        world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    except Exception:  # noqa: BLE001
        world = (0, 1)
    return Ranks(world[0], world[1], dp[0], dp[1], tp[0], tp[1], pp[0], pp[1], ep[0], ep[1])


def model_name(vllm_config) -> str:
    mc = vllm_config.model_config
    served = getattr(mc, "served_model_name", None)
    if isinstance(served, (list, tuple)):
        served = served[0] if served else None
    return str(served or mc.model)


def build_monitor(worker) -> WorkerMonitor | None:
    runner = worker.model_runner
    attachment = find_moe_layers(runner.get_model())
    if not attachment.layers:
        log.info("moe-monitor: no MoE layers in this model; the plugin stays idle")
        return None
    vllm_config = worker.vllm_config
    num_experts = max(x.num_experts for x in attachment.layers)
    top_k = max(x.top_k for x in attachment.layers)
    capacity = max(int(getattr(vllm_config.scheduler_config, "max_num_batched_tokens", 0) or 0), 8192)
    mode = env.env_choice(env.RECORDER, MODES)  # default: fused on CUDA, per_layer on CPU
    via_sink = sum(1 for x in attachment.observable if x.via == "sink")
    id_dtypes = (torch.int32, torch.int64) + ((torch.int16,) if via_sink else ())  # sinks hold int16 ids
    try:
        recorder = Recorder(len(attachment.layers), num_experts, top_k, runner.device, capacity=capacity, mode=mode,
                            id_dtypes=id_dtypes)
    except ValueError as e:
        log.warning("moe-monitor: %s=%s is not usable here (%s); using the default recorder", env.RECORDER, mode, e)
        recorder = Recorder(len(attachment.layers), num_experts, top_k, runner.device, capacity=capacity,
                            id_dtypes=id_dtypes)
    patch_set_capture_fn()
    patch_bind_routed_experts_capturer()
    tap_layers(attachment, recorder)
    steps = StepStats()
    ranks = read_ranks(vllm_config)
    placement = read_live_placement(runner, runner.get_model(), len(attachment.layers), ranks.ep_size,
                                    recorder.host_counts)  # None without EPLB
    shape = Shape(len(attachment.layers), num_experts, len(steps.token_bounds), len(steps.duration_bounds),
                  num_physical=placement.num_physical if placement else 0,
                  num_load_ranks=placement.num_ranks if placement else 0)
    eplb = follow_eplb_safely(runner, placement, len(attachment.layers), steps) if placement else None
    writer = SegmentWriter(env.env_str(env.SEGMENT_DIR, env.DEFAULT_SEGMENT_DIR), model_name(vllm_config), ranks,
                           shape, top_k, eplb_health=eplb is not None)
    interval = env.env_float(env.PUBLISH_INTERVAL, env.DEFAULT_PUBLISH_INTERVAL, minimum=0.01)
    publisher = Publisher(writer, recorder, steps, attachment, interval, placement, eplb)
    publisher.publish_once()  # the segment exists (with zeros) as soon as the model is loaded
    publisher.start()
    atexit.register(publisher.stop)
    log.info("moe-monitor: counting %d MoE layers x %d experts (top-%d) on %s with the %s recorder "
             "(%d through the kernel's routed-experts sink), %d unobservable; %s; segment %s",
             len(attachment.observable), num_experts, top_k, ranks, recorder.mode, via_sink,
             len(attachment.layers) - len(attachment.observable),
             f"EPLB placement of {placement.num_physical} physical experts published live" if placement
             else "contiguous expert placement", writer.path)
    if recorder.device.type != "cuda":
        timer = HostTimer(steps)
    else:
        timer = CudaEventTimer(steps, DriverEvents(*recorder.driver) if recorder.driver else TorchEvents())
    every = env.env_int(env.STEP_TIME_EVERY, env.DEFAULT_STEP_TIME_EVERY_CUDA if recorder.device.type == "cuda"
                        else env.DEFAULT_STEP_TIME_EVERY_CPU, minimum=1)
    monitor = WorkerMonitor(recorder, publisher, timer, time_every=every)
    monitor.zero_after_forward = not wrap_dummy_run(runner, monitor)
    source = None if monitor.zero_after_forward else vllm_step_tokens(runner, recorder.device)
    if source is not None:
        monitor.read_vllm_step_tokens(*source)
    log.info("moe-monitor: the step's token count is %s; every step is counted, %s timed", "read from vLLM's own "
             "buffer (no write a step)" if source is not None else "written by the step hook",
             "every step" if every == 1 else f"a pseudo-random 1 in {every} ({env.STEP_TIME_EVERY})")
    return monitor


def follow_eplb_safely(runner, placement, num_layers: int, steps: StepStats):
    """vLLM's EPLB rearrangements (the eplb_health extension), or None (one log line) when they cannot be
    followed: the counts and the placement are published either way."""
    try:
        return follow_eplb(runner.eplb_state, placement.model_state, num_layers, lambda: steps.recorded)
    except Exception:  # noqa: BLE001 - EPLB health must not cost the attach
        log.exception("moe-monitor cannot follow vLLM's EPLB rearrangements; routing counts and the placement are "
                      "published without them")
        return None


_warned: set[str] = set()


def _guarded(what: str, fn, *args) -> None:
    try:
        fn(*args)
    except Exception:  # noqa: BLE001 - never raise into vLLM
        if what not in _warned:
            _warned.add(what)
            log.exception("moe-monitor %s failed; serving continues, this hook is skipped from now on", what)


def patch_worker() -> bool:
    """Wrap Worker.load_model / execute_model / sample_tokens. Idempotent."""
    from vllm.v1.worker.gpu_worker import Worker

    if getattr(Worker, "_moe_monitor_patched", False):
        return False
    orig_load, orig_execute, orig_sample = Worker.load_model, Worker.execute_model, Worker.sample_tokens

    @functools.wraps(orig_load)
    def load_model(self, *args, **kwargs):
        result = orig_load(self, *args, **kwargs)
        self._moe_monitor = None

        def build():
            self._moe_monitor = build_monitor(self)
        _guarded("attach", build)
        return result

    # The step hooks are inlined here (no helper call, one try each): they run every step.
    @functools.wraps(orig_execute)
    def execute_model(self, scheduler_output, *args, **kwargs):
        monitor = getattr(self, "_moe_monitor", None)
        if monitor is None or monitor.off:
            return orig_execute(self, scheduler_output, *args, **kwargs)
        try:
            monitor.step_begin(scheduler_output)
        except Exception:  # noqa: BLE001 - never raise into vLLM
            monitor.fail("step hook")
        try:
            output = orig_execute(self, scheduler_output, *args, **kwargs)
        finally:
            if monitor.zero_after_forward and not monitor.off:
                try:
                    monitor.forward_done()
                except Exception:  # noqa: BLE001
                    monitor.fail("step hook")
        if output is not None and not monitor.off:
            try:
                monitor.step_end()
            except Exception:  # noqa: BLE001
                monitor.fail("step hook")
        return output

    @functools.wraps(orig_sample)
    def sample_tokens(self, *args, **kwargs):
        output = orig_sample(self, *args, **kwargs)
        monitor = getattr(self, "_moe_monitor", None)
        if monitor is not None and not monitor.off:
            try:
                monitor.step_end()
            except Exception:  # noqa: BLE001
                monitor.fail("step hook")
        return output

    Worker.load_model, Worker.execute_model, Worker.sample_tokens = load_model, execute_model, sample_tokens
    Worker._moe_monitor_patched = True
    return True
