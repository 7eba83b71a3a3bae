"""The README's main job: tiny MoE model → vLLM CPU with the plugin and the profiler on → sidecar with captures
(a generated API token) → Prometheus + Alertmanager (deploy/ configs, generated rules) → balanced, then hot
prompts, until the imbalance alert reaches the receiver and a capture is stored: the detector's, or the one the
alert asks for through Alertmanager's moe-sidecar receiver (the sidecar's /api/alerts), whichever comes first (the
other is refused by the cooldown); then the capture is shown as `moe-monitor traces show` shows it, and what the
sidecar did with the alerts it got."""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import textwrap
import time
import urllib.request

import numpy as np

from moe_monitor import env

from . import launch, needs, promstack, workload
from .alert_sink import AlertSink, describe

DEMO_THRESHOLDS = os.path.join(promstack.REPO, "deploy", "prometheus", "demo-thresholds.toml")
IMBALANCE_ALERT = "MoeExpertImbalanceSustained"
TOKEN_FILE = "api-token"
CAPTURE_ITERATIONS = 5  # the sidecar's --capture-iterations default; also vLLM's max_iterations (below)
# The detector, tuned to the demo's few minutes (production keeps the defaults, docs/captures.md): it learns from 4
# loaded 2 s windows instead of 10, fires on 2 windows in a row instead of 3, at the alert's max/mean (2.75, between
# the tiny model's balanced 2.36 and hot 3.25: deploy/prometheus/demo-thresholds.toml), and takes only a doubled
# step time for a step-time regression (+30 % by default), so that the hot prompts, not the noise of a shared
# laptop, take the demo's capture.
DETECTOR_ARGS = ["--warmup-windows", "4", "--consecutive-windows", "2", "--imbalance-threshold", "2.75",
                 "--step-margin", "1.0", "--min-window-steps", "3"]
LEARN_S, HOT_S = 60, 120  # at most this long for the detector's baselines, then for the alert and the capture


def _start_alerting(workdir: str, sidecar: str, vllm: str, prom_port: int, am_port: int, sink_port: int,
                    token_path: str):
    """Prometheus + Alertmanager with the shipped configs and the demo thresholds; (procs, sink) or ([], None)
    when the Debian packages are missing (the demo goes on without them). Alertmanager's team receivers go to the
    printing receiver, its moe-sidecar receiver to the sidecar's /api/alerts with the demo's token file."""
    from moe_monitor.mixin.build import to_yaml
    from moe_monitor.mixin.config import load_config
    from moe_monitor.mixin.rules import rules_document

    try:
        promstack.check_available()
        rules = to_yaml(rules_document(load_config(DEMO_THRESHOLDS)))
    except promstack.MissingTool as e:
        print(f"without Prometheus/Alertmanager: {e}")
        return [], None
    sink = AlertSink(port=sink_port, on_alert=lambda a: print(textwrap.fill(
        describe(a), 80, initial_indent="  >>> alert at the receiver: ", subsequent_indent=" " * 6)))
    am = promstack.start_alertmanager(workdir, am_port, sink.url,
                                      promstack.Timing(group_wait="1s", group_interval="5s", repeat_interval="1h"),
                                      sidecar=(f"http://{sidecar}", token_path))
    prom = promstack.start_prometheus(workdir, prom_port, [sidecar], f"127.0.0.1:{am_port}", rules, vllm=vllm,
                                      timing=promstack.Timing(interval="2s"))
    return [prom, am], sink


def _samples(metrics_url: str) -> list:
    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(metrics_url, timeout=10) as r:
        text = r.read().decode()
    return [s for family in text_string_to_metric_families(text) for s in family.samples]


def _routed(metrics_url: str) -> tuple[np.ndarray, dict[str, float]]:
    counts: dict[tuple[int, int], float] = {}
    health: dict[str, float] = {}
    for s in _samples(metrics_url):
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


def _learned(metrics_url: str) -> bool:
    """The detector has baselines for the worst layer's imbalance and for at least one step-time key."""
    signals = {s.labels["signal"] for s in _samples(metrics_url) if s.name == "moe_detector_baseline"}
    return {"worst_layer_imbalance_ratio", "step_time"} <= signals


def _show(title: str, counts: np.ndarray) -> None:
    print(f"\n{title}")
    for layer, row in enumerate(counts):
        total = max(int(row.sum()), 1)
        bar = " ".join(f"{int(v):5d}" for v in row)
        print(f"  layer {layer}: {bar}   max/mean {row.max() / (total / len(row)):.2f}")


def _write_token(workdir: str) -> tuple[str, str]:
    """A fresh bearer token for the sidecar's API in workdir/api-token, mode 0600 from the start (never through a
    link someone left there: the old file is removed and the new one created exclusively)."""
    path = os.path.join(workdir, TOKEN_FILE)
    token = secrets.token_urlsafe(32)
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
    with os.fdopen(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "w") as f:
        f.write(token + "\n")
    return token, path


def _auto_capture(sidecar_url: str, token: str) -> dict | None:
    """The newest capture the detector or an alert took (not a manual one) once it has an outcome, else None."""
    req = urllib.request.Request(f"{sidecar_url}/api/captures", headers={"Authorization": f"Bearer {token}"})
    with urllib.request.urlopen(req, timeout=10) as r:
        listed = json.load(r)["captures"]
    return next((c for c in listed if c.get("reason") != "manual" and c.get("outcome") != "running"), None)


def _command() -> str:
    """How the user runs moe-monitor from here: the name on PATH, else the venv's script (make demo's)."""
    script = os.path.join(os.path.dirname(sys.executable), "moe-monitor")
    if shutil.which("moe-monitor") == script or not os.path.exists(script):
        return "moe-monitor"
    return _short(script)


def _short(path: str) -> str:
    """`path` relative to the working directory when it is below it, else as it is."""
    rel = os.path.relpath(path)
    return path if rel.startswith("..") else rel


def _traces_show(sidecar_url: str, token: str, capture_id: str) -> None:
    """Print what `moe-monitor traces show <id>` prints (the command itself, as the user would run it)."""
    print(f"\n$ {_command()} traces show {capture_id}")
    done = subprocess.run([sys.executable, "-m", "moe_monitor.cli", "traces", "show", capture_id],
                          env={**os.environ, env.API_TOKEN: token, env.SIDECAR_URL: sidecar_url},
                          capture_output=True, text=True, timeout=120)
    print((done.stdout + done.stderr).rstrip())


def run_demo(workdir: str, vllm_port: int, sidecar_port: int, keep_running: bool, alerting: bool = True,
             prometheus_port: int = 9090, alertmanager_port: int = 9093, receiver_port: int = 9095) -> int:
    needs.require("demo", {**needs.DEMO, **(needs.ALERTING if alerting else {})})
    from .tiny_model import generate, load_meta

    workdir = os.path.abspath(workdir)
    model_dir = os.path.join(workdir, "model")
    os.makedirs(workdir, exist_ok=True)
    # A fresh channel, trace catalog and Prometheus each run: the sidecar would otherwise (rightly) carry the last
    # run's counters forward, and list its captures.
    for store in ("segments", "profiles", "captures", "prometheus", "alertmanager"):
        shutil.rmtree(os.path.join(workdir, store), ignore_errors=True)
    if not os.path.exists(os.path.join(model_dir, "config.json")):
        print(f"generating a tiny Qwen3-MoE (2 layers x 8 experts, top-2, expert 3 hot) in {model_dir}")
        generate(model_dir, "qwen3_moe", hot_expert=3, hot_words=["hot", "blaze"])
    meta = load_meta(model_dir)
    procs: list = []  # everything started, stopped in `finally` whatever ends the demo
    previous = {sig: signal.signal(sig, _terminated) for sig in (signal.SIGTERM, signal.SIGHUP)}
    try:
        return _demo(workdir, model_dir, meta, procs, vllm_port, sidecar_port, keep_running, alerting,
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


def _start_monitored_vllm(workdir: str, model_dir: str, vllm_port: int):
    gpu = launch.has_gpu()
    print(f"starting vLLM ({'GPU: bf16, torch.compile, CUDA graphs' if gpu else 'CPU'}) with the moe-monitor "
          "plugin\nand the profiler on; the first start takes a minute or two ...")
    # The profiler as docs/captures.md turns it on. max_iterations here too: vLLM before 0.32 (a GPU's) ignores
    # the sidecar's /start_profile body, and would otherwise record until the sidecar stops it.
    profiler = {"profiler": "torch", "torch_profiler_dir": os.path.join(workdir, "profiles"),
                "torch_profiler_with_stack": False, "ignore_frontend": True, "max_iterations": CAPTURE_ITERATIONS}
    return launch.start_vllm(model_dir, vllm_port, os.path.join(workdir, "vllm.log"),
                             launch.vllm_env(os.path.join(workdir, "segments")),
                             ([] if gpu else ["--enforce-eager"]) + ["--profiler-config", json.dumps(profiler)],
                             gpu=gpu)


def _start_sidecar(workdir: str, sidecar_port: int, vllm_url: str, token: str):
    return launch.start_sidecar(
        os.path.join(workdir, "segments"), sidecar_port, os.path.join(workdir, "sidecar.log"),
        ["--window", "2", "--expert-series", "all", "--min-window-assignments", "20",
         "--profile-dir", os.path.join(workdir, "profiles"), "--vllm-url", vllm_url,
         "--capture-dir", os.path.join(workdir, "captures"), "--capture-iterations", str(CAPTURE_ITERATIONS),
         *DETECTOR_ARGS],
        env={env.API_TOKEN: token})  # in the environment, not on the command line (`ps` shows that)


def _demo(workdir, model_dir, meta, procs, vllm_port, sidecar_port, keep_running, alerting,
          prometheus_port, alertmanager_port, receiver_port) -> int:
    server = _start_monitored_vllm(workdir, model_dir, vllm_port)
    procs.append(server)
    token, token_path = _write_token(workdir)
    sidecar = _start_sidecar(workdir, sidecar_port, server.url, token)
    procs.append(sidecar)
    metrics_url = f"{sidecar.url}/metrics"
    extra, sink = ([], None)
    if alerting:
        extra, sink = _start_alerting(workdir, f"127.0.0.1:{sidecar_port}", f"127.0.0.1:{vllm_port}",
                                      prometheus_port, alertmanager_port, receiver_port, token_path)
        procs.extend(extra)
        if sink is not None:
            procs.append(sink)
    print(f"vLLM ready after {server.wait_ready('/health', 600):.0f}s at {server.url}")
    sidecar.wait_ready("/healthz", 60)
    for proc in extra:
        proc.wait_ready("/-/ready", 60)
    if extra:
        print(f"Prometheus at {extra[0].url}, rules generated by moe_monitor/mixin with\n"
              f"  {os.path.relpath(DEMO_THRESHOLDS, promstack.REPO)}\n"
              f"Alertmanager at {extra[1].url}, alerts printed by the receiver at\n  {sink.url}, MoE alerts to the "
              f"sidecar's\n  {sidecar.url}/api/alerts as well")
    zero, health = _routed(metrics_url)
    print(f"sidecar ready at {metrics_url}\n  segments {health}; routed tokens so far: {int(zero.sum())}")

    print("\nworkload 1/2: 16 balanced prompts, 4 at a time (prefill, decode, mixed steps)")
    workload.run(server.url, workload.prompts(16, seed=1), max_tokens=12)
    print(f"  ... and more until the detector has learned its baselines (at most {LEARN_S} s)")
    deadline = time.time() + LEARN_S
    workload.run_until(server.url, lambda: _learned(metrics_url) or time.time() > deadline, seed=11)
    time.sleep(2.5)  # one publish interval (1 s) plus margin
    balanced, _ = _routed(metrics_url)
    _show("routed tokens per expert, balanced traffic (moe_expert_routed_tokens_total):", balanced)

    print(f"\nworkload 2/2: 16 prompts full of {', '.join(meta['hot_words'])} (routed to expert "
          f"{meta['hot_expert']})")
    workload.run(server.url, workload.prompts(16, meta["hot_words"], hot_share=0.9, seed=2,
                                              words_per_prompt=(30, 60)), max_tokens=4)
    waited = "the detector's capture is stored" if sink is None else f"{IMBALANCE_ALERT} reaches the receiver\n" \
        "  and a capture is stored, the detector's or the alert's"
    print(f"  ... and more of them until {waited} (at most {HOT_S} s)")
    capture = _hot_until_captured(server, sidecar.url, token, sink, meta, time.time() + HOT_S)
    if sink is not None and not sink.alerts(IMBALANCE_ALERT, "firing"):
        print(f"  {IMBALANCE_ALERT} did not arrive; see {workdir}/prometheus.log and the Prometheus UI")
    elif sink is not None:
        print(_alerts_at_sidecar(metrics_url, workdir))
    time.sleep(2.5)
    hot, _ = _routed(metrics_url)
    _show(f"routed tokens added by the hot prompts (expert {meta['hot_expert']} should dominate):",
          hot - balanced)
    if capture is not None:
        _traces_show(sidecar.url, token, capture["id"])
    else:
        print(f"\nno capture in {HOT_S} s, by the detector or an alert: see {workdir}/sidecar.log")
    _look_at(workdir, server, sidecar, extra, token_path)
    if keep_running:
        print("\nEverything keeps running; Ctrl-C (or SIGTERM) stops it all.")
        while all(p.popen.poll() is None for p in (server, sidecar, *extra)):
            time.sleep(1)
        print("a process exited; see the logs above")
        return 1
    return 0


def _hot_until_captured(server, sidecar_url: str, token: str, sink, meta, deadline: float) -> dict | None:
    """Hot prompts until the alert has reached the receiver (when there is one) and a capture (the detector's or an
    alert's) has an outcome, or the deadline; the capture, or None."""
    found: list[dict] = []

    def done() -> bool:
        if not found and (capture := _auto_capture(sidecar_url, token)) is not None:
            found.append(capture)
            print(_taken_by(capture))
        alerted = sink is None or bool(sink.alerts(IMBALANCE_ALERT, "firing"))
        return (alerted and bool(found)) or time.time() > deadline

    workload.run_until(server.url, done, meta["hot_words"], seed=3, batch=8)
    return found[0] if found else None


def _taken_by(capture: dict) -> str:
    """Who took the capture (the detector, or an alert through Alertmanager), its id and outcome, and why."""
    ev = capture.get("evidence") or {}
    if capture.get("reason") == "alert":
        head = f"  >>> capture by alert {ev.get('alertname', '?')}: {capture['id']}, {capture.get('outcome')}"
        why = f"(firing since {ev.get('startsAt', '?')}, through Alertmanager)"
    else:
        head = f"  >>> capture by the detector: {capture['id']}, {capture.get('outcome')}"
        why = f"({ev.get('signal')} " + " >= ".join(
            f"{v:.2f}" for v in (ev.get("current"), ev.get("threshold")) if isinstance(v, float)) + ")"
    return "\n".join(textwrap.wrap(head, 80, subsequent_indent=" " * 6, break_on_hyphens=False,
                                   break_long_words=False) + [" " * 6 + why])


ALERT_REFUSED = ("cooldown", "over_budget", "busy")  # capture/control.py's outcomes of a new alert without capture


def _alert_outcomes(metrics_url: str) -> dict[str, int]:
    """moe_capture_alerts_total by outcome, the outcomes counted so far only."""
    return {s.labels["outcome"]: int(s.value) for s in _samples(metrics_url)
            if s.name == "moe_capture_alerts_total" and s.value > 0}


def _alerts_at_sidecar(metrics_url: str, workdir: str, wait_s: float = 30) -> str:
    """One line: what the sidecar's /api/alerts did with the alerts Alertmanager sent it (moe_capture_alerts_total),
    once it has counted one (its /metrics follow a window behind), or that none came in wait_s."""
    deadline = time.time() + wait_s
    while not (outcomes := _alert_outcomes(metrics_url)) and time.time() < deadline:
        time.sleep(1)
    if not outcomes:
        return f"  the sidecar's /api/alerts got no alert in {wait_s:.0f} s: see {workdir}/alertmanager.log"
    first = ("captured", "deduplicated", *ALERT_REFUSED)  # then any other outcome, by name
    said = ", ".join(f"{outcomes[o]} {o}" + (" (no capture)" if o in ALERT_REFUSED else "")
                     for o in sorted(outcomes, key=lambda o: (first.index(o) if o in first else len(first), o)))
    return textwrap.fill(f"the sidecar's /api/alerts: {said}", 80, initial_indent="  ", subsequent_indent="    ")


def _look_at(workdir: str, server, sidecar, extra: list, token_path: str) -> None:
    shown, mm = _short(token_path), _command()
    print(f"""
Look at:
  {sidecar.url}/metrics
    moe_layer_imbalance_ratio{{layer}}     max/mean expert load in the last window
    moe_layer_top1_share{{layer}}          the busiest expert's share of it
    moe_expert_routed_tokens_total        tokens routed per layer x expert
    moe_step_duration_seconds             engine step time histogram
    moe_capture_share{{category}}          the newest capture's kernel breakdown
    moe_monitor_segment_up                health of the plugin's channel
  captures and the live view (the API wants the token in {TOKEN_FILE}, mode 0600):
    export MOE_MONITOR_URL={sidecar.url.removeprefix('http://')}
    export MOE_MONITOR_API_TOKEN=$(cat {shown})
    {mm} traces list      # then: show ID, pull ID --out DIR
    {mm} traces trigger --reason "a look" --wait
    {mm} top              # live view; 80x24 is enough
  {server.url}/v1/completions  your own prompts (model "{launch.SERVED_NAME}")
  logs: {workdir}/vllm.log, sidecar.log""")
    if extra:
        print(f"""  {extra[0].url}/alerts   the alert rules and their state
  {extra[1].url}          Alertmanager; the receiver prints what it sends,
                                 the sidecar's /api/alerts takes MoE alerts
                                 (moe_capture_alerts_total{{outcome}})
  Grafana: grafana/dashboards/*.json, or provision them (grafana/README.md),
    with a Prometheus data source at {extra[0].url}""")
