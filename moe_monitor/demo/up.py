"""The README's main job: tiny MoE model → vLLM CPU with the plugin → sidecar → Prometheus + Alertmanager
(deploy/ configs, generated rules) → a short mixed workload, until the imbalance alert reaches the receiver."""

from __future__ import annotations

import os
import shutil
import signal
import time
import urllib.request

import numpy as np

from . import launch, needs, promstack, workload
from .alert_sink import AlertSink, describe

DEMO_THRESHOLDS = os.path.join(promstack.REPO, "deploy", "prometheus", "demo-thresholds.toml")
IMBALANCE_ALERT = "MoeExpertImbalanceSustained"


def _start_alerting(workdir: str, sidecar: str, vllm: str, prom_port: int, am_port: int, sink_port: int):
    """Prometheus + Alertmanager with the shipped configs and the demo thresholds; (procs, sink) or ([], None)
    when the Debian packages are missing (the demo goes on without them)."""
    from moe_monitor.mixin.build import to_yaml
    from moe_monitor.mixin.config import load_config
    from moe_monitor.mixin.rules import rules_document

    try:
        promstack.check_available()
        rules = to_yaml(rules_document(load_config(DEMO_THRESHOLDS)))
    except promstack.MissingTool as e:
        print(f"without Prometheus/Alertmanager: {e}")
        return [], None
    sink = AlertSink(port=sink_port, on_alert=lambda a: print(f"  >>> alert at the receiver: {describe(a)}"))
    am = promstack.start_alertmanager(workdir, am_port, sink.url,
                                      promstack.Timing(group_wait="1s", group_interval="5s", repeat_interval="1h"))
    prom = promstack.start_prometheus(workdir, prom_port, [sidecar], f"127.0.0.1:{am_port}", rules, vllm=vllm,
                                      timing=promstack.Timing(interval="2s"))
    return [prom, am], sink


def _routed(metrics_url: str) -> tuple[np.ndarray, dict[str, float]]:
    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(metrics_url, timeout=10) as r:
        text = r.read().decode()
    counts: dict[tuple[int, int], float] = {}
    health: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == "moe_expert_routed_tokens_total":
                counts[int(s.labels["layer"]), int(s.labels["expert"])] = s.value
            elif s.name == "moe_monitor_segments":
                health[s.labels["state"]] = s.value
    layers = sorted({k[0] for k in counts})
    experts = 1 + max((k[1] for k in counts), default=-1)
    out = np.zeros((len(layers), experts), dtype=np.int64)
    for (layer, expert), v in counts.items():
        out[layers.index(layer), expert] = int(v)
    return out, health


def _show(title: str, counts: np.ndarray) -> None:
    print(f"\n{title}")
    for layer, row in enumerate(counts):
        total = max(int(row.sum()), 1)
        bar = " ".join(f"{int(v):5d}" for v in row)
        print(f"  layer {layer}: {bar}   max/mean {row.max() / (total / len(row)):.2f}")


def run_demo(workdir: str, vllm_port: int, sidecar_port: int, keep_running: bool, alerting: bool = True,
             prometheus_port: int = 9090, alertmanager_port: int = 9093, receiver_port: int = 9095) -> int:
    needs.require("demo", {**needs.DEMO, **(needs.ALERTING if alerting else {})})
    from .tiny_model import generate, load_meta

    workdir = os.path.abspath(workdir)
    model_dir = os.path.join(workdir, "model")
    segments = os.path.join(workdir, "segments")
    os.makedirs(workdir, exist_ok=True)
    # A fresh channel each run: the sidecar would otherwise (rightly) carry the last run's counters forward.
    shutil.rmtree(segments, ignore_errors=True)
    for store in ("prometheus", "alertmanager"):
        shutil.rmtree(os.path.join(workdir, store), ignore_errors=True)
    if not os.path.exists(os.path.join(model_dir, "config.json")):
        print(f"generating a tiny Qwen3-MoE (2 layers x 8 experts, top-2, expert 3 hot) in {model_dir}")
        generate(model_dir, "qwen3_moe", hot_expert=3, hot_words=["hot", "blaze"])
    meta = load_meta(model_dir)
    procs: list = []  # everything started, stopped in `finally` whatever ends the demo
    previous = {sig: signal.signal(sig, _terminated) for sig in (signal.SIGTERM, signal.SIGHUP)}
    try:
        return _demo(workdir, model_dir, segments, meta, procs, vllm_port, sidecar_port, keep_running, alerting,
                     prometheus_port, alertmanager_port, receiver_port)
    except (KeyboardInterrupt, Terminated):
        return 0
    finally:
        for proc in reversed(procs):
            if hasattr(proc, "stop"):
                proc.stop()
            else:
                proc.close()
        for sig, handler in previous.items():
            signal.signal(sig, handler)


class Terminated(Exception):
    """SIGTERM or SIGHUP (a supervisor, `kill`, a closed terminal): stop everything like Ctrl-C does."""


def _terminated(signum, frame):
    raise Terminated(signal.Signals(signum).name)


def _demo(workdir, model_dir, segments, meta, procs, vllm_port, sidecar_port, keep_running, alerting,
          prometheus_port, alertmanager_port, receiver_port) -> int:
    gpu = launch.has_gpu()
    print(f"starting vLLM ({'GPU: bf16, torch.compile, CUDA graphs' if gpu else 'CPU'}) with the moe-monitor "
          "plugin; the first start takes a minute or two ...")
    server = launch.start_vllm(model_dir, vllm_port, os.path.join(workdir, "vllm.log"), launch.vllm_env(segments),
                               [] if gpu else ["--enforce-eager"], gpu=gpu)
    procs.append(server)
    sidecar = launch.start_sidecar(segments, sidecar_port, os.path.join(workdir, "sidecar.log"),
                                   ["--window", "2", "--expert-series", "all", "--min-window-assignments", "20",
                                    # loopback only: `moe-monitor top` and `traces` need no token here
                                    "--captures-api-insecure"])
    procs.append(sidecar)
    metrics_url = f"{sidecar.url}/metrics"
    extra, sink = ([], None)
    if alerting:
        extra, sink = _start_alerting(workdir, f"127.0.0.1:{sidecar_port}", f"127.0.0.1:{vllm_port}",
                                      prometheus_port, alertmanager_port, receiver_port)
        procs.extend(extra)
        if sink is not None:
            procs.append(sink)
    print(f"vLLM ready after {server.wait_ready('/health', 600):.0f}s at {server.url}")
    sidecar.wait_ready("/healthz", 60)
    for proc in extra:
        proc.wait_ready("/-/ready", 60)
    if extra:
        print(f"Prometheus at {extra[0].url} (rules generated by moe_monitor/mixin with {DEMO_THRESHOLDS}), "
              f"Alertmanager at {extra[1].url}, alerts printed by the receiver at {sink.url}")
    zero, health = _routed(metrics_url)
    print(f"sidecar ready at {metrics_url}: segments {health}, routed tokens before any request: "
          f"{int(zero.sum())}")

    print("\nworkload 1/2: 16 balanced prompts, 4 concurrent (prefill, decode and mixed steps)")
    workload.run(server.url, workload.prompts(16, seed=1), max_tokens=12)
    time.sleep(2.5)  # one publish interval (1 s) plus margin
    balanced, _ = _routed(metrics_url)
    _show("routed tokens per expert after balanced traffic (moe_expert_routed_tokens_total):", balanced)

    print(f"\nworkload 2/2: 16 prompts full of {meta['hot_words']} (the model routes them to expert "
          f"{meta['hot_expert']})")
    workload.run(server.url, workload.prompts(16, meta["hot_words"], hot_share=0.9, seed=2,
                                              words_per_prompt=(30, 60)), max_tokens=4)
    if sink is not None:
        print(f"  ... and more of them until {IMBALANCE_ALERT} reaches the receiver (at most 90 s)")
        deadline = time.time() + 90

        def done() -> bool:
            return bool(sink.alerts(IMBALANCE_ALERT, "firing")) or time.time() > deadline

        workload.run_until(server.url, done, meta["hot_words"], seed=3, batch=8)
        if not sink.alerts(IMBALANCE_ALERT, "firing"):
            print(f"  {IMBALANCE_ALERT} did not arrive; see {workdir}/prometheus.log and the Prometheus UI")
    time.sleep(2.5)
    hot, _ = _routed(metrics_url)
    _show(f"routed tokens added by the hot prompts (expert {meta['hot_expert']} should dominate):",
          hot - balanced)

    print(f"""
Look at:
  {metrics_url}
    moe_layer_imbalance_ratio{{layer}}               max/mean expert load in the last 2 s window
    moe_layer_top1_share{{layer}}                    share of the window's load on the busiest expert
    moe_expert_routed_tokens_total{{layer,expert}}   tokens routed per layer x expert (rate() it)
    moe_step_duration_seconds{{phase,tokens_le}}     engine step time histogram
    moe_monitor_segment_up / moe_monitor_segments   health of the plugin -> sidecar channel
  {server.url}/v1/completions                      send your own prompts (model name "{launch.SERVED_NAME}")
  logs: {workdir}/vllm.log, {workdir}/sidecar.log""")
    if extra:
        print(f"""  {extra[0].url}/alerts                           the alert rules and their state (Prometheus)
  {extra[1].url}                                    Alertmanager; the receiver prints what it sends
  grafana/dashboards/*.json                        import into a Grafana pointed at {extra[0].url}""")
    if keep_running:
        print("\nEverything keeps running; Ctrl-C (or SIGTERM) stops it all.")
        while all(p.popen.poll() is None for p in (server, sidecar, *extra)):
            time.sleep(1)
        print("a process exited; see the logs above")
        return 1
    return 0
