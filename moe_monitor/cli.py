"""`moe-monitor` command line. click (rather than argparse) because it gives every flag an environment
variable twin, shows it in --help, and reports a bad value with the flag and variable named."""

from __future__ import annotations

import logging
import sys
import click

from moe_monitor import __version__, env


def _listen(ctx, param, value: str) -> tuple[str, int]:
    host, sep, port = value.rpartition(":")
    if not sep or not port.isdigit() or not 0 < int(port) < 65536:
        raise click.BadParameter(f"{value!r} is not HOST:PORT (e.g. 0.0.0.0:9464)")
    return host or "0.0.0.0", int(port)


def _setup_logging(level: str) -> None:
    logging.basicConfig(level=level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")


@click.group(context_settings={"help_option_names": ["-h", "--help"], "show_default": True})
@click.version_option(__version__, prog_name="moe-monitor")
@click.option("--log-level", envvar=env.LOG_LEVEL, show_envvar=True, default="info",
              type=click.Choice(["debug", "info", "warning", "error"], case_sensitive=False))
def main(log_level: str) -> None:
    """Expert-load and step-time monitoring for MoE models served with vLLM."""
    _setup_logging(log_level)


@main.command()
@click.option("--segment-dir", envvar=env.SEGMENT_DIR, show_envvar=True, default=env.DEFAULT_SEGMENT_DIR,
              help="Directory the vLLM plugin writes per-rank segments into (shared with the vLLM pod).")
@click.option("--listen", envvar=env.LISTEN, show_envvar=True, default=env.DEFAULT_LISTEN, callback=_listen,
              help="HOST:PORT for /metrics.")
@click.option("--window", "window_s", envvar=env.WINDOW, show_envvar=True, default=5.0,
              type=click.FloatRange(min=0.1), help="Window length in seconds; the exposition is rebuilt once per "
              "window, at wall-clock multiples of it.")
@click.option("--stale-after", envvar=env.STALE_AFTER, show_envvar=True, default=env.DEFAULT_STALE_AFTER,
              type=click.FloatRange(min=0.1), help="Seconds without a snapshot before a rank counts as stale.")
@click.option("--rank-series/--no-rank-series", envvar=env.RANK_SERIES, show_envvar=True, default=True,
              help="T1: per layer x EP-rank token counters.")
@click.option("--load-histogram/--no-load-histogram", envvar=env.LOAD_HISTOGRAM, show_envvar=True, default=True,
              help="T1: per-window expert-load histogram per layer.")
@click.option("--expert-series", envvar=env.EXPERT_SERIES, show_envvar=True, default="none",
              type=click.Choice(["none", "all", "top"]), help="T2: per layer x expert counters (all) or the "
              "top-K hot experts per layer (top).")
@click.option("--top-experts", envvar=env.TOP_EXPERTS, show_envvar=True, default=5, type=click.IntRange(min=1),
              help="K for --expert-series top.")
@click.option("--hot-multiple", envvar=env.HOT_MULTIPLE, show_envvar=True, default=2.0,
              type=click.FloatRange(min=1.0), help="An expert is hot when its window load exceeds this multiple of "
              "the layer's mean.")
@click.option("--min-window-assignments", envvar=env.MIN_WINDOW_ASSIGNMENTS, show_envvar=True, default=100,
              type=click.IntRange(min=1), help="Below this many assignments in a window a layer's statistics are NaN.")
@click.option("--placement", "placement_file", envvar=env.PLACEMENT, show_envvar=True, default=None,
              type=click.Path(dir_okay=False), help="JSON logical->physical expert map (EPLB); default: experts "
              "split contiguously over the EP ranks.")
@click.option("--max-series", envvar=env.MAX_SERIES, show_envvar=True, default=20000, type=click.IntRange(min=100),
              help="Series budget: T2, then T1 are dropped beyond it (moe_monitor_series_truncated says so).")
@click.option("--profile-dir", envvar=env.PROFILE_DIR, show_envvar=True, default=None,
              type=click.Path(file_okay=False), help="vLLM's torch_profiler_dir (--profiler-config): the newest "
              "capture there is analysed and its kernel breakdown exported (moe_capture_*).")
@click.option("--vllm-url", envvar=env.VLLM_URL, show_envvar=True, default=None,
              help="vLLM's OpenAI server URL; with --profile-dir turns on captures through /start_profile.")
@click.option("--vllm-api-key", envvar=env.VLLM_API_KEY, show_envvar=True, default=None,
              help="Bearer key for a vLLM started with --api-key.")
@click.option("--capture-dir", envvar=env.CAPTURE_DIR, show_envvar=True, default="/var/lib/moe-monitor/captures", type=click.Path(file_okay=False),
              help="Trace catalog directory.")
@click.option("--capture-iterations", envvar=env.CAPTURE_ITERATIONS, show_envvar=True, default=5, type=click.IntRange(min=1),
              help="Engine steps per capture (max_iterations).")
@click.option("--capture-timeout", envvar=env.CAPTURE_TIMEOUT, show_envvar=True, default=120.0, type=click.FloatRange(min=1),
              help="Seconds to wait for every rank's trace before /stop_profile.")
@click.option("--capture-max-seconds", envvar=env.CAPTURE_MAX_SECONDS, show_envvar=True, default=10.0,
              type=click.FloatRange(min=0.5), help="A profile that has not ended by itself after this many seconds "
              "is stopped with /stop_profile (vLLM before 0.32 ignores max_iterations in the request).")
@click.option("--max-captures", envvar=env.MAX_CAPTURES, show_envvar=True, default=20, type=click.IntRange(min=1),
              help="Retention: captures kept.")
@click.option("--max-capture-bytes", envvar=env.MAX_CAPTURE_BYTES, show_envvar=True, default=2 * 1024**3, type=click.IntRange(min=1),
              help="Retention: disk quota of the catalog, never exceeded.")
@click.option("--max-capture-age", envvar=env.MAX_CAPTURE_AGE, show_envvar=True, default=7 * 24 * 3600.0, type=click.FloatRange(min=60),
              help="Retention: seconds a capture is kept.")
@click.option("--api-token", envvar=env.API_TOKEN, show_envvar=True, default=None,
              help="Bearer token required to download traces and trigger captures.")
@click.option("--captures-api-insecure", envvar=env.CAPTURES_API_INSECURE, show_envvar=True, is_flag=True,
              default=False, help="Without --api-token, let anyone who reaches the port trigger captures and "
              "download traces (trusted networks only; logged loudly). Off: they answer 403 until a token is set.")
@click.option("--step-margin", envvar=env.STEP_MARGIN, show_envvar=True, default=0.30, type=click.FloatRange(min=0.01),
              help="Step-time regression: mean step time above baseline x (1 + margin).")
@click.option("--step-baseline-quantile", envvar=env.STEP_BASELINE_QUANTILE, show_envvar=True, default=0.9,
              type=click.FloatRange(min=0.0, max=1.0), help="Step-time baseline: this quantile of the recent windows "
              "of the same phase and tokens bucket (0.5 = median; 0.9 = the slow end of normal).")
@click.option("--consecutive-windows", envvar=env.CONSECUTIVE_WINDOWS, show_envvar=True, default=3, type=click.IntRange(min=1),
              help="Windows in a row over a threshold before a capture.")
@click.option("--warmup-windows", envvar=env.WARMUP_WINDOWS, show_envvar=True, default=10, type=click.IntRange(min=1),
              help="Active windows learned before anything fires.")
@click.option("--baseline-windows", envvar=env.BASELINE_WINDOWS, show_envvar=True, default=60, type=click.IntRange(min=2),
              help="Windows of history the baselines are taken over.")
@click.option("--min-window-steps", envvar=env.MIN_WINDOW_STEPS, show_envvar=True, default=10,
              type=click.IntRange(min=1), help="Steps of a (phase, tokens bucket) a window needs to count for the "
              "step-time detector.")
@click.option("--imbalance-threshold", envvar=env.IMBALANCE_THRESHOLD, show_envvar=True, default=4.0, type=click.FloatRange(min=1),
              help="Worst-layer max/mean that is a regression on its own.")
@click.option("--imbalance-rise", envvar=env.IMBALANCE_RISE, show_envvar=True, default=1.5, type=click.FloatRange(min=1),
              help="... or this multiple of its recent median.")
@click.option("--capture-cooldown", envvar=env.CAPTURE_COOLDOWN, show_envvar=True, default=600.0, type=click.FloatRange(min=0),
              help="Seconds after a capture before the detector may fire again.")
@click.option("--max-captures-per-hour", envvar=env.MAX_CAPTURES_PER_HOUR, show_envvar=True, default=4, type=click.IntRange(min=0),
              help="Budget of captures per hour, manual ones included.")
@click.option("--max-segment-bytes", envvar=env.MAX_SEGMENT_BYTES, show_envvar=True, default=None,
              type=click.IntRange(min=4096), help="Refuse segments larger than this (default 256 MiB).")
def serve(segment_dir, listen, window_s, stale_after, rank_series, load_histogram, expert_series, top_experts,
          hot_multiple, min_window_assignments, placement_file, max_series, profile_dir, max_segment_bytes,
          **capture) -> None:
    """Read every rank's segment and export Prometheus metrics."""
    from moe_monitor.detect.detector import DetectorConfig
    from moe_monitor.sidecar.config import SidecarConfig
    from moe_monitor.sidecar.exporter import Exporter
    from moe_monitor.sidecar.server import serve as run_server
    from moe_monitor.stats.placement import PlacementError

    detector = DetectorConfig(capture.pop("baseline_windows"), capture.pop("warmup_windows"),
                              capture.pop("consecutive_windows"), capture.pop("step_margin"),
                              capture.pop("min_window_steps"),
                              capture.pop("imbalance_threshold"), capture.pop("imbalance_rise"),
                              capture.pop("capture_cooldown"), capture.pop("max_captures_per_hour"),
                              step_baseline_quantile=capture.pop("step_baseline_quantile"))
    cfg = SidecarConfig(segment_dir, listen[0], listen[1], stale_after, max_segment_bytes, window_s, rank_series,
                        load_histogram, expert_series, top_experts, hot_multiple, min_window_assignments,
                        placement_file, max_series, profile_dir, capture["vllm_url"], capture["vllm_api_key"],
                        capture["capture_dir"], capture["capture_iterations"], capture["capture_timeout"],
                        capture["max_captures"], capture["max_capture_bytes"], capture["max_capture_age"],
                        capture["api_token"], detector, capture_run_s=capture["capture_max_seconds"],
                        captures_api_insecure=capture["captures_api_insecure"])
    try:
        exporter = Exporter(cfg)
    except PlacementError as e:
        raise click.BadParameter(str(e), param_hint="--placement") from None
    except OSError as e:
        raise click.ClickException(f"cannot use the capture directory {cfg.capture_dir}: {e}") from None
    try:
        run_server(exporter)
    except OSError as e:
        raise click.ClickException(f"cannot listen on {cfg.host}:{cfg.port}: {e}") from None


@main.command()
@click.argument("traces", nargs=-1, required=True, type=click.Path(exists=True, dir_okay=False))
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output (the whole breakdown).")
@click.option("--top", type=click.IntRange(min=1), default=15, help="Rows of the top-kernels table.")
@click.option("--rules", type=click.Path(exists=True, dir_okay=False), default=None,
              help="Classification patterns (default: the packaged categories.toml).")
def analyze(traces, as_json: bool, top: int, rules: str | None) -> None:
    """Break torch.profiler traces down into gate / experts / align-permute / attention / all-to-all / other."""
    import json

    from moe_monitor.breakdown.analyze import analyze as run, load_rules
    from moe_monitor.breakdown.report import render_table
    from moe_monitor.breakdown.trace import TraceError, read_trace

    try:
        loaded = [read_trace(t) for t in traces]
        result = run(loaded, load_rules(rules), top=max(top, 50) if as_json else top)
    except (TraceError, ValueError) as e:
        raise click.ClickException(str(e)) from None
    click.echo(json.dumps(result, indent=1) if as_json else render_table(result, top))


@main.group()
@click.option("--url", envvar=env.SIDECAR_URL, show_envvar=True, default="http://127.0.0.1:9464",
              help="The sidecar's base URL.")
@click.option("--token", envvar=env.API_TOKEN, show_envvar=True, default=None,
              help="Bearer token (download and trigger, when the sidecar requires one).")
@click.pass_context
def traces(ctx, url: str, token: str | None) -> None:
    """List, show, pull and trigger the profiler traces the sidecar captured."""
    ctx.obj = {"url": url.rstrip("/"), "token": token}


def _api(ctx, method: str, path: str, body: dict | None = None):
    import json
    import urllib.error
    import urllib.request

    headers = {"Content-Type": "application/json"}
    if ctx.obj["token"]:
        headers["Authorization"] = f"Bearer {ctx.obj['token']}"
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(ctx.obj["url"] + path, data=data, method=method, headers=headers)
    try:
        return urllib.request.urlopen(req, timeout=60)
    except urllib.error.HTTPError as e:
        try:
            message = json.loads(e.read()).get("error", e.reason)
        except ValueError:
            message = e.reason
        raise click.ClickException(f"{method} {path}: {e.code} {message}") from None
    except urllib.error.URLError as e:
        raise click.ClickException(f"cannot reach the sidecar at {ctx.obj['url']}: {e.reason}") from None


@traces.command("list")
@click.pass_context
def traces_list(ctx) -> None:
    """Captures, newest first: id, time, reason, outcome, size."""
    import json
    import time as _time

    captures = json.load(_api(ctx, "GET", "/api/captures"))["captures"]
    if not captures:
        click.echo("no captures")
    for c in captures:
        when = _time.strftime("%Y-%m-%d %H:%M:%S", _time.localtime(c["created"]))
        signal = c["evidence"].get("signal", c["evidence"].get("note", ""))
        click.echo(f"{c['id']}  {when}  {c['reason']:10s} {c['outcome']:8s} {len(c['files'])} files "
                   f"{c['total_bytes'] / 1e6:.1f} MB  {signal}")


@traces.command("show")
@click.argument("capture_id")
@click.pass_context
def traces_show(ctx, capture_id: str) -> None:
    """One capture's metadata (reason, evidence, window statistics, files, breakdown) as JSON."""
    click.echo(_api(ctx, "GET", f"/api/captures/{capture_id}").read().decode())


@traces.command("pull")
@click.argument("capture_id")
@click.option("--out", "out_dir", default=".", type=click.Path(file_okay=False), help="Directory to write into.")
@click.pass_context
def traces_pull(ctx, capture_id: str, out_dir: str) -> None:
    """Download every file of a capture into OUT/<id>/."""
    import json
    import os
    import shutil
    import urllib.parse

    meta = json.load(_api(ctx, "GET", f"/api/captures/{urllib.parse.quote(capture_id)}"))
    target = os.path.join(out_dir, meta["id"])
    os.makedirs(target, exist_ok=True)
    for f in meta["files"]:
        with _api(ctx, "GET", f"/api/captures/{meta['id']}/files/{urllib.parse.quote(f['name'])}") as resp, \
                open(os.path.join(target, os.path.basename(f["name"])), "wb") as out:
            shutil.copyfileobj(resp, out)
    with open(os.path.join(target, "metadata.json"), "w") as out:
        json.dump(meta, out, indent=1)
    click.echo(f"pulled {len(meta['files'])} files into {target}")


@traces.command("trigger")
@click.option("--reason", required=True, help="Why (stored with the capture).")
@click.pass_context
def traces_trigger(ctx, reason: str) -> None:
    """Ask the sidecar for a capture now (same budget as automatic ones)."""
    import json

    click.echo(json.load(_api(ctx, "POST", "/api/captures", {"reason": reason}))["id"])


@main.command("gen-model")
@click.argument("out_dir", type=click.Path(file_okay=False))
@click.option("--arch", type=click.Choice(["qwen3_moe", "mixtral", "qwen2_moe"]), default="qwen3_moe")
@click.option("--layers", type=click.IntRange(min=1), default=2, help="Decoder layers (all MoE).")
@click.option("--experts", type=click.IntRange(min=2), default=8)
@click.option("--top-k", type=click.IntRange(min=1), default=2)
@click.option("--hot-expert", type=click.IntRange(min=0), default=None,
              help="Route the --hot-words tokens to this expert in every layer.")
@click.option("--hot-words", default="hot,blaze", help="Comma-separated words made single tokens.")
@click.option("--seed", type=int, default=0)
def gen_model(out_dir, arch, layers, experts, top_k, hot_expert, hot_words, seed) -> None:
    """Write a tiny random MoE checkpoint (config, safetensors, tokenizer) that vLLM CPU serves."""
    try:
        from moe_monitor.demo.tiny_model import generate
    except ImportError as e:
        raise click.ClickException(f"gen-model needs torch and transformers (pip install 'moe-monitor[vllm]'): {e}")
    if top_k > experts:
        raise click.BadParameter("--top-k cannot exceed --experts", param_hint="--top-k")
    if hot_expert is not None and hot_expert >= experts:
        raise click.BadParameter(f"--hot-expert must be < --experts ({experts})", param_hint="--hot-expert")
    words = [w.strip() for w in hot_words.split(",") if w.strip()]
    meta = generate(out_dir, arch, num_layers=layers, num_experts=experts, top_k=top_k, seed=seed,
                    hot_expert=hot_expert, hot_words=words)
    click.echo(f"wrote {arch} model to {out_dir}: {meta['num_layers']} MoE layers x {meta['num_experts']} "
               f"experts, top-{meta['top_k']}, hot expert {meta['hot_expert']} for {meta['hot_words']}")


@main.command()
@click.option("--workdir", default=".moe-monitor-demo", type=click.Path(file_okay=False),
              help="Where the demo keeps its model, segments and logs.")
@click.option("--vllm-port", type=int, default=8000)
@click.option("--sidecar-port", type=int, default=9464)
@click.option("--prometheus-port", type=int, default=9090)
@click.option("--alertmanager-port", type=int, default=9093)
@click.option("--receiver-port", type=int, default=9095, help="The webhook receiver that prints alerts "
              "(deploy/alertmanager/alertmanager.yml sends to 127.0.0.1:9095).")
@click.option("--alerting/--no-alerting", default=True, help="Also run Prometheus and Alertmanager (Debian packages "
              "prometheus, prometheus-alertmanager) with the configs in deploy/.")
@click.option("--keep-running/--exit", default=True, help="Keep everything up after the workload.")
def demo(workdir: str, vllm_port: int, sidecar_port: int, prometheus_port: int, alertmanager_port: int,
         receiver_port: int, alerting: bool, keep_running: bool) -> None:
    """Generated tiny MoE on vLLM (CPU) + plugin + sidecar + Prometheus/Alertmanager, driven by a short
    mixed workload until the imbalance alert fires."""
    from moe_monitor.demo.up import run_demo

    sys.exit(run_demo(workdir, vllm_port, sidecar_port, keep_running, alerting, prometheus_port,
                      alertmanager_port, receiver_port))


@main.group()
def mixin() -> None:
    """Alert and recording rules, the Kubernetes PrometheusRule and Grafana dashboards, generated from code."""


def _mixin_config(path: str | None):
    from moe_monitor.mixin.config import ConfigError, load_config

    try:
        return load_config(path)
    except ConfigError as e:
        raise click.BadParameter(str(e), param_hint="--config") from None


_config_option = click.option(
    "--config", "config_path", type=click.Path(dir_okay=False), default=None,
    help="TOML file overriding thresholds and knobs (the fields of moe_monitor/mixin/config.py, docs/alerts.md).")


@mixin.command("build")
@_config_option
@click.option("--out", "out_dir", default=".", type=click.Path(file_okay=False),
              help="Root of the tree to write into (the repository root).")
def mixin_build(config_path: str | None, out_dir: str) -> None:
    """Write the rule file, the PrometheusRule and the dashboards under OUT."""
    from moe_monitor.mixin.build import generate, write

    files = generate(_mixin_config(config_path), config_path)
    try:
        changed = set(write(files, out_dir))
    except OSError as e:
        raise click.ClickException(f"cannot write into {out_dir}: {e}") from None
    for path in sorted(files):
        click.echo(f"{'wrote    ' if path in changed else 'unchanged'} {path}")


@mixin.command("check")
@_config_option
@click.option("--out", "out_dir", default=".", type=click.Path(file_okay=False),
              help="Root of the tree to compare (the repository root).")
def mixin_check(config_path: str | None, out_dir: str) -> None:
    """Exit 1, listing them, when generated files under OUT differ from what `mixin build` writes."""
    from moe_monitor.mixin.build import drift, generate

    files = generate(_mixin_config(config_path), config_path)
    problems = drift(files, out_dir)
    for path, why in problems:
        click.echo(f"{path}: {why}", err=True)
    if problems:
        click.echo("run `make mixin` (moe-monitor mixin build) and commit the result", err=True)
        sys.exit(1)
    click.echo(f"{len(files)} generated files up to date")


if __name__ == "__main__":
    main()
