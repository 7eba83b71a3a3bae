"""Every name the sidecar exports, as data: metric families (type, labels, tier, help, collector), capture
outcomes and detector states. Collectors build their families from here (`sidecar.exposition.family(name)`),
docs/metrics.md's reference section is generated from here (`reference_markdown`), the mixin and `top` query
these names, and the tests check all of them against it, so a name, a help text or a label set lives in exactly
one place.
"""

from __future__ import annotations

from dataclasses import dataclass

from moe_monitor.schema.segment import MAX_EP_SIZE, MAX_REDUNDANT_SLOTS


@dataclass(frozen=True)
class Metric:
    name: str  # as on the TYPE line (counters include _total)
    type: str  # counter | gauge | histogram
    labels: tuple[str, ...]
    tier: str  # t0 | t1 | t2 (the series budget drops t2, then t1)
    collector: str
    help: str


DETECTOR_STATES = ("warmup", "armed", "cooldown", "budget_exhausted")
CAPTURE_REASONS = ("step_time", "imbalance", "manual", "alert")
CAPTURE_OUTCOMES = {  # every capture ends with exactly one (docs/captures.md has what is kept for each)
    "ok": "every rank's trace stored and analysed",
    "partial": "fewer rank traces than ranks by the deadline; the rest stored and analysed",
    "analysis_failed": "the traces could not be analysed (corrupt, or a bug: traceback in the log); stored "
                       "without a breakdown",
    "no_trace": "no complete rank trace by the deadline (--capture-timeout)",
    "profiler_disabled": "vLLM answered /start_profile with 404 (started without --profiler-config)",
    "start_failed": "/start_profile failed: vLLM down, an error status, or no answer in the time left",
    "vllm_busy": "vLLM answered 409 again after the sidecar stopped its profile once: someone else is profiling",
    "over_quota": "the capture alone is larger than --max-capture-bytes",
    "store_failed": "storing failed (ENOSPC, an I/O error); nothing of it is left in the catalog",
    "error": "an unexpected exception in the capture (a bug: traceback in the log)",
    "skipped_busy": "not started: this sidecar's previous capture was still running",
}
ALERT_OUTCOMES = {  # each alert of an Alertmanager notification (POST /api/alerts) gets one (docs/incidents.md)
    "captured": "a firing alert of ours, new: a capture started for it (with the other new ones of its notification)",
    "deduplicated": "a firing a capture was already started for (same fingerprint and startsAt): a repeat or a "
                    "group update",
    "cooldown": "a firing alert of ours, new, within --capture-cooldown of the last capture: no capture",
    "over_budget": "a firing alert of ours, new, with --max-captures-per-hour spent: no capture",
    "busy": "a firing alert of ours, new, while a capture was running: no capture",
    "not_ours": "not one of the shipped rules' routing or step-time alerts: no capture",
    "other_instance": "a firing alert of ours whose instance label --alert-instances does not name (misrouted): no "
                      "capture",
    "resolved": "a resolved alert: no capture",
    "forwarded": "an other_instance alert about a peer (--alert-peers), sent on to that peer's sidecar, which "
                 "answered 2xx: its own outcome is in the answer",
    "forward_failed": "an other_instance alert about a peer that could not be sent on (connection error, timeout, "
                      "non-2xx): answered 502, so Alertmanager sends the notification again",
}
SEGMENT_READ_ERRORS = {
    "io": "cannot open or read the file, or it is not a regular file",
    "truncated": "shorter than its header says",
    "magic": "not a moe-monitor segment",
    "version": "a layout version this sidecar does not read",
    "corrupt": "the header's fields are inconsistent (shape, offsets, counts)",
    "oversized": "larger than --max-segment-bytes",
    "torn": "the writer kept changing it while it was read (retried next window)",
}
SEGMENT_STATES = ("fresh", "stale", "unreadable")
SECTION_REFUSALS = {  # moe_monitor_segment_sections_refused{reason}: an optional (format 2) section left out
    "ep_size": f"the header's ep_size is below 1 or above {MAX_EP_SIZE}, so no section sized by it can be right",
    "shape": "the section's size contradicts the header: EP-rank load columns other than ep_size, or placement "
             "slots that are not a multiple of ep_size between the experts and max(4 x experts, experts + "
             f"{MAX_REDUNDANT_SLOTS}), a step_count other than phases x token buckets, or an extension the file "
             "ends inside",
    "expert_ids": "the placement names an expert outside [0, experts), or leaves one without a slot",
    "value": "the EP-rank load is negative or not finite, or the eplb_health record holds a value no writer "
             "publishes (step interval 0, a count above 2**53, a negative time, a duration that is not finite or "
             "is missing after a rearrangement), or a step count is negative or below the timed steps of its cell",
    "decreased": "the cumulative EP-rank load or step count went down without a restart of the writer",
    "checksum": "the eplb_health record or the step_count does not match its checksum",
}

_M = Metric
METRICS: tuple[Metric, ...] = (
    # -- model: which layers are observable, the served model
    _M("moe_layer_observable", "gauge", ("layer",), "t0", "model",
       "1 when moe-monitor sees this MoE layer's routing; 0 when a fused kernel routes internally and its counts "
       "stay zero."),
    _M("moe_monitor_unobservable_layers", "gauge", (), "t0", "model",
       "MoE layers whose routing moe-monitor cannot see."),
    _M("moe_model_info", "gauge", ("model", "moe_layers", "experts", "top_k"), "t0", "model",
       "The served MoE model, as the plugin saw it."),
    # -- balance: per-layer and model-level statistics of the last closed window
    _M("moe_layer_window_routed_tokens", "gauge", ("layer",), "t0", "balance",
       "Assignments routed in the last closed window."),
    _M("moe_layer_imbalance_ratio", "gauge", ("layer",), "t0", "balance",
       "max / mean expert load in the last closed window (1 = balanced). NaN when the window had too few "
       "assignments."),
    _M("moe_layer_balancedness", "gauge", ("layer",), "t0", "balance",
       "mean / max expert load in the last closed window (1 = balanced)."),
    _M("moe_layer_load_cv", "gauge", ("layer",), "t0", "balance",
       "Coefficient of variation (population std / mean) of expert load."),
    _M("moe_layer_load_entropy", "gauge", ("layer",), "t0", "balance",
       "Shannon entropy of the expert-load distribution / log(experts) (1 = uniform)."),
    _M("moe_layer_top1_share", "gauge", ("layer",), "t0", "balance",
       "Share of the window's assignments on the most loaded expert."),
    _M("moe_layer_topk_share", "gauge", ("layer",), "t0", "balance",
       "Share of the window's assignments on the top_k most loaded experts (top_k of the model's routing)."),
    _M("moe_layer_dead_experts", "gauge", ("layer",), "t0", "balance",
       "Experts with no assignment in the last closed window."),
    _M("moe_layer_hot_experts", "gauge", ("layer",), "t0", "balance",
       "Experts whose window load exceeds the hot multiple of the mean."),
    _M("moe_layer_ep_rank_imbalance_ratio", "gauge", ("layer",), "t0", "balance",
       "max / mean EP-rank load in the last closed window (1 = balanced ranks)."),
    _M("moe_window_length_seconds", "gauge", (), "t0", "balance", "Configured window length."),
    _M("moe_window_end_timestamp_seconds", "gauge", (), "t0", "balance",
       "End of the last closed window (unix time)."),
    _M("moe_window_routed_tokens", "gauge", (), "t0", "balance",
       "Assignments routed in the last closed window, all layers."),
    _M("moe_worst_layer_imbalance_ratio", "gauge", ("layer",), "t0", "balance",
       "Largest per-layer imbalance ratio in the last closed window; the layer label names it."),
    _M("moe_mean_layer_imbalance_ratio", "gauge", (), "t0", "balance", "Mean of the per-layer imbalance ratios."),
    _M("moe_eplb_balancedness_vllm", "gauge", (), "t0", "balance",
       "vLLM EPLB's balancedness over EP ranks: sum over layers of mean rank load / sum over layers of max rank "
       "load."),
    _M("moe_eplb_balancedness_sglang", "gauge", (), "t0", "balance",
       "SGLang's balancedness over EP ranks: mean over layers of (mean + 1e-5) / (max + 1e-5) of the rank "
       "loads."),
    # -- steps
    _M("moe_step_duration_seconds", "histogram", ("phase", "tokens_le"), "t0", "steps",
       "Engine step wall time in the worker (execute_model to sampled tokens) of a sample of the steps, by phase and "
       "tokens-per-step bucket (tokens_le: upper bound): the plugin times a pseudo-random 1 in N steps on CUDA "
       "(MOE_MONITOR_STEP_TIME_EVERY, default 16), every step on CPU, so its quantiles and mean stand for all steps "
       "but its counts do not: step counts and rates come from moe_steps_total."),
    _M("moe_steps_total", "counter", ("phase", "tokens_le"), "t0", "steps",
       "Engine steps (every step, timed or not), by phase and tokens-per-step bucket (tokens_le: upper bound)."),
    _M("moe_step_tokens_total", "counter", ("phase",), "t0", "steps", "Tokens computed in engine steps, by phase."),
    # -- vLLM's EPLB rearrangements (only for segments whose plugin follows vLLM's EPLB; docs/eplb.md)
    _M("moe_eplb_info", "gauge", ("segment", "mode", "timed"), "t0", "eplb",
       "1 for each rank whose vLLM runs EPLB: mode=sync|async (eplb_config.use_async); timed=false where this vLLM "
       "has no EplbState.rearrange to wrap (rearrangements counted at their commits, no start times or "
       "durations)."),
    _M("moe_eplb_rearrangements_total", "counter", ("segment",), "t0", "eplb",
       "EPLB rearrangements completed on the rank: vLLM's whole-model commit (sync), or the commit of the last "
       "MoE layer (async EPLB commits one layer a step)."),
    _M("moe_eplb_rearrangements_started_total", "counter", ("segment",), "t0", "eplb",
       "EPLB rearrangements vLLM entered on the rank (EplbState.rearrange, its profile run excluded); more than "
       "completed while one is in progress, or when one was skipped or given up."),
    _M("moe_eplb_layer_commits_total", "counter", ("segment",), "t0", "eplb",
       "Per-layer placement commits of async EPLB on the rank (one MoE layer per engine step while layers move)."),
    _M("moe_eplb_rearrangement_seconds_total", "counter", ("segment",), "t0", "eplb",
       "Time the completed rearrangements took on the rank, host clock, vLLM entering rearrange to the "
       "rearrangement's (last) commit."),
    _M("moe_eplb_last_rearrangement_timestamp_seconds", "gauge", ("segment",), "t0", "eplb",
       "When the rank's last rearrangement completed (unix time); no series before the first."),
    _M("moe_eplb_last_rearrangement_duration_seconds", "gauge", ("segment",), "t0", "eplb",
       "How long the rank's last completed rearrangement took (sync: the engine waits this long; async: spans the "
       "steps its layers moved in); no series before the first."),
    _M("moe_eplb_rearrangement_interval_steps", "gauge", ("segment",), "t0", "eplb",
       "vLLM's configured EPLB step_interval: engine steps between rearrangements."),
    _M("moe_eplb_steps_since_rearrangement", "gauge", ("segment",), "t0", "eplb",
       "vLLM's own counter of steps since its last rearrangement started (EplbState.expert_rearrangement_step; "
       "starts at 3/4 of the interval). It passes the interval only while an async rearrangement has not "
       "finished."),
    _M("moe_eplb_rearrangement_overdue_steps", "gauge", ("segment",), "t0", "eplb",
       "max(0, steps since rearrangement - interval): steps since the next rearrangement was due. Grows without "
       "bound when an async rearrangement stalls (MoeEplbRearrangementStalled)."),
    _M("moe_eplb_rearrangement_in_progress_seconds", "gauge", ("segment",), "t0", "eplb",
       "Seconds since vLLM entered the rearrangement that has not completed; 0 when none is in progress. A sync "
       "rearrangement that hangs (a collective that never returns) blocks the engine and grows this."),
    # -- EP ranks, load histogram, routing (T1, T2)
    _M("moe_ep_rank_routed_tokens_total", "counter", ("layer", "ep_rank"), "t1", "ep_ranks",
       "Assignments served by each EP rank (physical load) under the expert placement; replicated experts "
       "split their tokens evenly."),
    _M("moe_expert_load_ratio", "histogram", ("layer",), "t1", "load_histogram",
       "Expert load / mean expert load of the layer, one observation per expert per closed window (the "
       "expert-load heatmap)."),
    _M("moe_expert_routed_tokens_total", "counter", ("layer", "expert"), "t2", "routing",
       "Tokens routed to a logical expert (one per token per top-k slot; computed tokens only). Summed over DP "
       "ranks, TP duplicates counted once."),
    _M("moe_layer_top_expert_id", "gauge", ("layer", "rank"), "t2", "routing",
       "Logical id of the expert at this load rank (1 = most loaded) in the last closed window; the rank label "
       "is stable, the expert id is the value."),
    _M("moe_layer_top_expert_share", "gauge", ("layer", "rank"), "t2", "routing",
       "Share of the layer's window load on the expert at this load rank."),
    # -- the newest analysed capture's breakdown
    _M("moe_capture_analysis_errors_total", "counter", (), "t0", "breakdown",
       "Profiler captures that could not be analysed."),
    _M("moe_capture_info", "gauge", ("capture", "ranks"), "t0", "breakdown",
       "The newest analysed profiler capture: its file prefix and ranks."),
    _M("moe_capture_end_timestamp_seconds", "gauge", (), "t0", "breakdown",
       "When the newest analysed capture's last file was written (unix time)."),
    _M("moe_capture_device_seconds", "gauge", ("category",), "t0", "breakdown",
       "Device time of the capture by category (all ranks)."),
    _M("moe_capture_share", "gauge", ("category",), "t0", "breakdown",
       "Share of the capture's device time by category."),
    _M("moe_capture_idle_seconds", "gauge", (), "t0", "breakdown",
       "Device idle time between kernels inside engine steps."),
    _M("moe_capture_moe_preamble_seconds", "gauge", (), "t0", "breakdown",
       "Per MoE layer (mean): device time from the layer's input norm to the first expert GEMM."),
    _M("moe_capture_first_expert_gemm_seconds", "gauge", (), "t0", "breakdown",
       "Per MoE layer (mean): the first expert GEMM kernel."),
    _M("moe_capture_ep_wait_seconds", "gauge", ("rank",), "t0", "breakdown",
       "Time the rank's EP collectives (MoE dispatch/combine) waited for the last rank to join, in the capture."),
    _M("moe_capture_ep_wait_caused_share", "gauge", ("rank",), "t0", "breakdown",
       "Share of the capture's EP-collective waiting that this rank caused by joining last (the straggler)."),
    _M("moe_capture_collective_wait_seconds", "gauge", ("kind", "rank"), "t0", "breakdown",
       "Time the rank's collectives of this kind (tp_allreduce, allgather_reducescatter, sync, ep_dispatch_combine, "
       "other) waited for the last rank to join, in the capture."),
    _M("moe_capture_collective_wait_caused_seconds", "gauge", ("kind", "rank", "reason"), "t1", "breakdown",
       "Waiting in collectives of this kind that the rank caused by joining last, by what its device did instead "
       "since the previous collective, in excess of the waiter's: idle (host-bound), busy (computing), unexplained "
       "(not comparable, e.g. the trace's first collective)."),
    # -- imbalance cost: what EP-rank imbalance costs (the last closed window; of step time, with the newest capture)
    _M("moe_layer_ep_expert_time_lost_ratio", "gauge", ("layer",), "t0", "imbalance_cost",
       "Fraction of the layer's expert time spent waiting for its busiest EP rank in the last closed window: 1 - "
       "mean / max of the layer's EP-rank loads (1 - 1 / moe_layer_ep_rank_imbalance_ratio; 0 = balanced), "
       "assuming expert time proportional to the assignments a rank serves. NaN below --min-window-assignments; "
       "no series with one EP rank."),
    _M("moe_ep_expert_time_lost_ratio", "gauge", (), "t0", "imbalance_cost",
       "Fraction of the model's expert time lost to EP-rank imbalance in the last closed window: sum over layers of "
       "(max - mean) / sum over layers of max EP-rank load, each layer weighed by its expert time (1 - "
       "moe_eplb_balancedness_vllm over the layers with at least --min-window-assignments). No series with one EP "
       "rank."),
    _M("moe_ep_step_time_lost_ratio", "gauge", (), "t0", "imbalance_cost",
       "Estimated fraction of step time lost to EP-rank imbalance: s x (sum over layers of max / sum over layers of "
       "mean EP-rank load - 1), the loads of the last closed window, s the experts' share of step time in the newest "
       "analysed capture (moe_capture_device_seconds{category=\"experts\"} / (sum of moe_capture_device_seconds + "
       "moe_capture_idle_seconds)), which may be old: moe_capture_end_timestamp_seconds says when it was taken. No "
       "series without an analysed capture, with one EP rank, or when s x max / mean exceeds 1 (the capture's "
       "workload is not this window's)."),
    # -- detector
    _M("moe_detector_state", "gauge", ("state",), "t0", "detector",
       "Regression detector state (1 for the current one)."),
    _M("moe_detector_baseline", "gauge", ("signal", "phase", "tokens_le"), "t0", "detector",
       "Baseline of each detector signal (median of recent windows): step time in seconds per phase/tokens "
       "bucket, worst-layer imbalance ratio."),
    _M("moe_detector_current", "gauge", ("signal", "phase", "tokens_le"), "t0", "detector",
       "The last closed window's value of each detector signal."),
    # -- captures
    _M("moe_captures_total", "counter", ("reason", "outcome"), "t0", "captures",
       "Profiler captures by reason (" + ", ".join(CAPTURE_REASONS) + ") and outcome ("
       + ", ".join(CAPTURE_OUTCOMES) + ")."),
    _M("moe_capture_in_progress", "gauge", (), "t0", "captures", "1 while a capture is running."),
    _M("moe_capture_profiler_enabled", "gauge", (), "t0", "captures",
       "0 when vLLM answered /start_profile with 404 (started without --profiler-config)."),
    _M("moe_capture_last_duration_seconds", "gauge", (), "t0", "captures",
       "Duration of the last capture, start to stored."),
    _M("moe_capture_last_end_timestamp_seconds", "gauge", (), "t0", "captures",
       "When the last capture ended (unix time)."),
    _M("moe_capture_catalog_captures", "gauge", (), "t0", "captures", "Captures in the trace catalog."),
    _M("moe_capture_catalog_bytes", "gauge", (), "t0", "captures",
       "Bytes in the trace catalog (never above --max-capture-bytes)."),
    _M("moe_capture_catalog_damaged", "gauge", (), "t0", "captures",
       "Capture directories whose metadata.json is unusable: not listed, not served, kept for inspection."),
    _M("moe_capture_alerts_total", "counter", ("outcome",), "t0", "captures",
       "Alerts received from Alertmanager's webhook (POST /api/alerts) by what was done with them (" +
       ", ".join(ALERT_OUTCOMES) + ")."),
    # -- health of the segments and the sidecar
    _M("moe_monitor_segment_up", "gauge", ("segment",), "t0", "health",
       "1 when the rank's segment was read and is fresh."),
    _M("moe_monitor_snapshot_age_seconds", "gauge", ("segment",), "t0", "health",
       "Seconds since the rank last published, at the last window boundary."),
    _M("moe_monitor_rank_info", "gauge", ("segment", "model", "dp_rank", "pp_rank", "tp_rank", "ep_rank",
                                           "counted"), "t0", "health",
       "Ranks of each segment; counted=false marks a TP duplicate whose identical routing is not added again."),
    _M("moe_monitor_plugin_publish_errors_total", "counter", ("segment",), "t0", "health",
       "Snapshots the plugin failed to publish (as reported by its next successful one)."),
    _M("moe_monitor_segments", "gauge", ("state",), "t0", "health", "Segments in the directory by state."),
    _M("moe_monitor_segment_read_errors_total", "counter", ("kind",), "t0", "health",
       "Failed segment reads by kind."),
    _M("moe_monitor_segments_ignored", "gauge", ("segment", "reason"), "t0", "health",
       "Readable segments left out of the model's metrics: reason=other_model (another model than the one "
       "most ranks serve), no_layers (a segment describing no MoE layer or no expert)."),
    _M("moe_monitor_segment_sections_refused", "gauge", ("segment", "section", "reason"), "t0", "health",
       "Optional sections of a readable segment left out, the rest of it used: section=physical_to_logical (the "
       "live placement), ep_rank_load (the EP-rank load the plugin attributed), eplb_health (vLLM's EPLB "
       "rearrangements) or step_count (every engine step: moe_steps_total falls back to the timed steps); "
       "reason=" + ", ".join(SECTION_REFUSALS) + " (docs/reference/metrics.md)."),
    _M("moe_monitor_rank_restarts_total", "counter", (), "t0", "health",
       "vLLM rank restarts seen (new segment generation); counts before a restart are carried, not lost."),
    _M("moe_monitor_build_info", "gauge", ("version",), "t0", "health", "moe-monitor version."),
    # -- the exporter about itself (always rendered, never cut by the budget)
    _M("moe_monitor_collector_success", "gauge", ("collector",), "t0", "exporter",
       "1 when the collector built its families for this exposition; 0 when it failed (its families are "
       "missing from this exposition, the rest is served; the log says why). collector=\"stage:<name>\": a "
       "stage of the window loop, 1 when it ran (render's row is the previous pass)."),
    _M("moe_monitor_collector_duration_seconds", "gauge", ("collector",), "t0", "exporter",
       "Time the collector (or, collector=\"stage:<name>\", the window loop's stage) took for this exposition."),
    _M("moe_monitor_window_errors_total", "counter", ("stage",), "t0", "exporter",
       "Windows in which a stage of the window loop failed (read: the segments; window: closing the window and "
       "its statistics; detect: the regression detector; breakdown: looking for a new capture breakdown; "
       "render: the exposition); the previous figures stay served."),
    _M("moe_monitor_series", "gauge", ("tier",), "t0", "exporter",
       "Series in this exposition by tier (before the budget cut)."),
    _M("moe_monitor_series_truncated", "gauge", (), "t0", "exporter",
       "1 when the series budget (--max-series) dropped T2 and then T1 families from this exposition."),
    _M("moe_monitor_build_duration_seconds", "gauge", (), "t0", "exporter",
       "Time the last exposition took to build (read segments, fold, statistics, render)."),
    _M("moe_monitor_flight_windows", "gauge", (), "t0", "exporter",
       "Windows the routing flight recorder holds (at most --flight-minutes of --window; /api/flight)."),
    _M("moe_monitor_flight_bytes", "gauge", (), "t0", "exporter",
       "Memory those windows take: their JSON, as /api/flight serves it (at most --flight-max-bytes)."),
    _M("moe_monitor_http_refused_total", "counter", ("reason",), "t0", "exporter",
       "HTTP requests and connections the sidecar refused or cut short, by reason (unauthorized: wrong or no "
       "token; forbidden: the API is off without --api-token; busy: too many API requests of one kind at once, "
       "503; slow_client: stopped reading its answer, dropped; evicted: closed at the connection cap to make room; "
       "bad_request: malformed HTTP or a body that did not arrive in time; bad_stored_data: a capture's stored "
       "file that cannot be served). Scrapes are never refused for these."),
)
BY_NAME = {m.name: m for m in METRICS}
if len(BY_NAME) != len(METRICS):
    raise AssertionError("a metric name is declared twice")


def declared(name: str) -> str:
    """`name` when the vocabulary declares that metric, else KeyError naming it: for code that reads the
    exposition by name (`moe-monitor top`), so a renamed metric fails where it is read, at import."""
    if name not in BY_NAME:
        raise KeyError(f"{name} is not a metric schema/vocabulary.py declares")
    return name


def reference_markdown() -> str:
    """The generated reference section of docs/metrics.md."""
    out = ["| metric | type | labels | tier | collector | help |", "|---|---|---|---|---|---|"]
    for m in METRICS:
        labels = ", ".join(f"`{x}`" for x in m.labels) or "—"
        out.append(f"| `{m.name}` | {m.type} | {labels} | {m.tier.upper()} | {m.collector} | "
                   f"{m.help.replace('|', chr(92) + '|')} |")
    out += ["", "Plus prometheus_client's process collector about the sidecar itself: "
            "`moe_monitor_process_cpu_seconds_total`, "
            "`moe_monitor_process_resident_memory_bytes`, `moe_monitor_process_open_fds`, … (Linux).", ""]
    out += ["Capture outcomes (`moe_captures_total{outcome}`, `moe-monitor traces list`):", "",
            "| outcome | meaning |", "|---|---|"]
    out += [f"| `{k}` | {v} |" for k, v in CAPTURE_OUTCOMES.items()]
    out += ["", "Alert outcomes (`moe_capture_alerts_total{outcome}`, POST /api/alerts):", "",
            "| outcome | meaning |", "|---|---|"]
    out += [f"| `{k}` | {v} |" for k, v in ALERT_OUTCOMES.items()]
    out += ["", "Segment read errors (`moe_monitor_segment_read_errors_total{kind}`):", "",
            "| kind | meaning |", "|---|---|"]
    out += [f"| `{k}` | {v} |" for k, v in SEGMENT_READ_ERRORS.items()]
    out += ["", "Refused segment sections (`moe_monitor_segment_sections_refused{reason}`):", "",
            "| reason | meaning |", "|---|---|"]
    out += [f"| `{k}` | {v} |" for k, v in SECTION_REFUSALS.items()]
    out += ["", "Detector states (`moe_detector_state{state}`): " + ", ".join(f"`{s}`" for s in DETECTOR_STATES)
            + "."]
    return "\n".join(out) + "\n"
