"""`moe-monitor` command line. click (rather than argparse) because it gives every flag an environment
variable twin, shows it in --help, and reports a bad value with the flag and variable named."""

from __future__ import annotations

import logging
import sys

import click

from moe_monitor import __version__, env
from moe_monitor.sidecar.config import SidecarConfig
from moe_monitor.top.__main__ import top as top_command


def _setup_logging(level: str) -> None:
    logging.basicConfig(level=level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")


@click.group(context_settings={"help_option_names": ["-h", "--help"], "show_default": True})
@click.version_option(__version__, prog_name="moe-monitor")
@click.option("--log-level", envvar=env.LOG_LEVEL, show_envvar=True, default="info",
              type=click.Choice(["debug", "info", "warning", "error"], case_sensitive=False))
def main(log_level: str) -> None:
    """Expert-load and step-time monitoring for MoE models served with vLLM."""
    _setup_logging(log_level)


def _click_type(spec):
    if spec.choices:
        return click.Choice(spec.choices)
    if spec.path:
        return click.Path(dir_okay=spec.path == "dir", file_okay=spec.path == "file")
    if spec.type is int:
        return click.IntRange(min=spec.minimum, max=spec.maximum)
    if spec.type is float:
        return click.FloatRange(min=spec.minimum, max=spec.maximum)
    return click.STRING


def settings_options(config_cls):
    """One click option per declared setting of `config_cls` (moe_monitor/settings.py), env twin included;
    the command receives them as keyword arguments named by the setting ("detector.cooldown_s" ->
    detector__cooldown_s)."""
    from moe_monitor.settings import specs

    def decorate(func):
        for spec in reversed(specs(config_cls)):
            name = spec.name.replace(".", "__")
            if spec.type is bool:
                decl = spec.flag if spec.default is False else f"{spec.flag}/--no-{spec.flag[2:]}"
                option = click.option(decl, name, envvar=spec.env, show_envvar=True, default=spec.default,
                                      is_flag=True, help=spec.help)
            else:
                option = click.option(spec.flag, name, envvar=spec.env, show_envvar=True, default=spec.default,
                                      type=_click_type(spec), help=spec.help, show_default=not spec.secret)
            func = option(func)
        return func
    return decorate


@main.command()
@settings_options(SidecarConfig)
def serve(**values) -> None:
    """Read every rank's segment and export Prometheus metrics."""
    from moe_monitor.settings import build, specs
    from moe_monitor.sidecar.exporter import Exporter
    from moe_monitor.sidecar.server import serve as run_server
    from moe_monitor.stats.placement import PlacementError

    try:
        cfg = build(SidecarConfig, {k.replace("__", "."): v for k, v in values.items()})
    except ValueError as e:  # a cross-field check of SidecarConfig: name the flag its message starts with
        hint = next((s.flag for s in specs(SidecarConfig) if str(e).startswith(s.name.split(".")[-1])), None)
        raise click.BadParameter(str(e), param_hint=hint) from None
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

    from moe_monitor.breakdown.analyze import analyze as run
    from moe_monitor.breakdown.analyze import load_rules
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
        evidence = c.get("evidence") or {}
        signal = evidence.get("signal", evidence.get("note", ""))
        click.echo(f"{c['id']}  {when}  {c.get('reason', '?'):10s} {c.get('outcome', '?'):8s} {len(c['files'])} files "
                   f"{c['total_bytes'] / 1e6:.1f} MB  {signal}")


@traces.command("show")
@click.argument("capture_id")
@click.option("--json", "as_json", is_flag=True, help="The capture's metadata as JSON (no flight record).")
@click.option("--top", default=1, show_default=True, type=click.IntRange(1, 20),
              help="Hottest experts listed per window of the flight record.")
@click.pass_context
def traces_show(ctx, capture_id: str, as_json: bool, top: int) -> None:
    """One capture: reason, evidence, breakdown, files, and its flight record (routing in the minutes before the
    trigger, one line per window: the most imbalanced layer, the hottest experts, the busiest EP rank)."""
    import json
    import time as _time
    import urllib.parse

    from moe_monitor.sidecar.flight import FlightError, parse, render_summary

    quoted = urllib.parse.quote(capture_id)
    raw = _api(ctx, "GET", f"/api/captures/{quoted}").read()
    if as_json:
        click.echo(raw.decode())
        return
    meta = json.loads(raw)
    when = _time.strftime("%Y-%m-%d %H:%M:%S", _time.localtime(meta["created"]))
    click.echo(f"capture {meta['id']}: {meta.get('reason', '?')}, {meta.get('outcome', '?')}, {when}, "
               f"{meta.get('duration_s', 0):.1f} s, {len(meta['files'])} files, {meta['total_bytes'] / 1e6:.1f} MB")
    evidence = meta.get("evidence") or {}
    if evidence:
        click.echo("evidence: " + ", ".join(f"{k}={v}" for k, v in evidence.items()))
    shares = meta.get("breakdown") or {}
    if shares:
        click.echo("breakdown: " + ", ".join(f"{c} {100 * v:.1f} %" for c, v in
                                             sorted(shares.items(), key=lambda kv: -kv[1]) if v >= 0.001))
    if not any(f["name"] == "flight.json.gz" for f in meta["files"]):
        click.echo("flight record: none (the flight recorder was off, or the capture is older than it)")
        return
    try:
        doc = parse(_api(ctx, "GET", f"/api/captures/{quoted}/flight").read())
    except FlightError as e:
        raise click.ClickException(f"capture {capture_id}: {e}") from None
    click.echo(render_summary(doc, top))


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


@main.command()
@click.option("--capture", "capture_id", help="Plan from this capture's flight record (through the sidecar --url).")
@click.option("--live", is_flag=True, help="Plan from the live sidecar's flight record (--url), optionally "
              "only its last --minutes.")
@click.option("--flight", "flight_file", type=click.Path(exists=True, dir_okay=False),
              help="Plan from a flight record file (a pulled capture's flight.json.gz).")
@click.option("--prometheus", "prometheus_url", help="Plan from Prometheus: per-expert series (the sidecars' "
              "--expert-series all) increased over --range.")
@click.option("--range", "range_", default="6h", show_default=True, help="With --prometheus: the history range.")
@click.option("--selector", default="", help="With --prometheus: label matchers, e.g. 'model=\"...\"'.")
@click.option("--minutes", type=click.FloatRange(min=0, min_open=True), help="With --live: the last minutes only.")
@click.option("--url", envvar=env.SIDECAR_URL, show_envvar=True, default="http://127.0.0.1:9464",
              help="The sidecar's base URL (--capture, --live).")
@click.option("--token", envvar=env.API_TOKEN, show_envvar=True, default=None, help="Bearer token, if required.")
@click.option("--gpus", type=click.IntRange(min=1), required=True, help="EP ranks (GPUs) the experts spread over.")
@click.option("--nodes", type=click.IntRange(min=1), default=1, show_default=True,
              help="Nodes (the hierarchical policy packs expert groups per node).")
@click.option("--groups", type=click.IntRange(min=1), default=1, show_default=True,
              help="Expert groups of the model (DeepSeek-V3: 8); 1 for models without group-limited routing.")
@click.option("--redundant", help="Redundant experts to compare, e.g. 0,16,32 (default: a sweep from the "
              "smallest count that fills every GPU evenly, in steps of --gpus).")
@click.option("--strategy", type=click.Choice(["linear", "round_robin"]), default="linear", show_default=True,
              help="vLLM's placement without EPLB (--expert-placement-strategy), the baseline.")
@click.option("--out", "out_dir", type=click.Path(file_okay=False),
              help="Write the recommended placement here (SGLang, sidecar and vLLM-state files; docs/eplb.md).")
@click.option("--json", "as_json", is_flag=True, help="The report as JSON.")
def eplb(capture_id, live, flight_file, prometheus_url, range_, selector, minutes, url, token, gpus, nodes, groups,
         redundant, strategy, out_dir, as_json) -> None:
    """Should this deployment enable EPLB, and with how many redundant experts? Plans DeepSeek's EPLB placement
    from recorded routing and predicts per-EP-rank load, balancedness and the straggler factor (docs/eplb.md)."""
    import json
    import shlex

    from moe_monitor.eplb import advise, plan_placement, vllm_args, write_placement_files
    from moe_monitor.eplb.history import HistoryError, from_capture, from_file, from_prometheus, from_sidecar

    chosen = [x for x in (capture_id, live or None, flight_file, prometheus_url) if x]
    if len(chosen) != 1:
        raise click.UsageError("give exactly one history: --capture ID, --live, --flight FILE or --prometheus URL")
    try:
        if capture_id:
            history = from_capture(url, capture_id, token)
        elif live:
            history = from_sidecar(url, minutes, token)
        elif flight_file:
            history = from_file(flight_file)
        else:
            history = from_prometheus(prometheus_url, range_, selector)
        values = None if not redundant else [int(x) for x in redundant.split(",") if x.strip()]
        advice = advise(history.load, num_gpus=gpus, num_nodes=nodes, num_groups=groups, redundant=values,
                        strategy=strategy)
        written = {}
        if out_dir:
            placement = plan_placement(history.load, num_gpus=gpus, num_redundant=advice.recommended.num_redundant,
                                       num_nodes=nodes, num_groups=groups)
            written = write_placement_files(out_dir, placement, history.load, moe_layer_ids=list(history.layer_ids))
    except HistoryError as e:
        raise click.ClickException(str(e)) from None
    except ValueError as e:  # the deployment does not fit the model (experts vs GPUs, groups vs nodes, ...)
        raise click.ClickException(f"cannot plan for this deployment: {e}") from None
    head = (f"history: {history.source}; {history.assignments:,} assignments over {len(history.layer_ids)} MoE "
            f"layers x {history.load.shape[1]} experts")
    if as_json:
        click.echo(json.dumps({"history": {"source": history.source, "model": history.model,
                                           "start": history.start, "end": history.end,
                                           "layer_ids": list(history.layer_ids),
                                           "assignments": history.assignments},
                               "advice": advice.to_dict(), "files": {k: str(v) for k, v in written.items()}},
                              indent=1))
        return
    click.echo(head)
    click.echo(advice.format_table())
    best = advice.recommended
    if advice.enable_eplb:
        click.echo(f"enable EPLB: yes, with {best.num_redundant} redundant experts: mean straggler factor "
                   f"{advice.baseline.summary.mean_straggler:.3f} -> {best.summary.mean_straggler:.3f} "
                   f"(x{advice.predicted_gain:.2f} on the slowest rank's expert time); vLLM: "
                   + " ".join(shlex.quote(a) for a in vllm_args(best.num_redundant)))
    else:
        click.echo(f"enable EPLB: no: the best setting ({best.num_redundant} redundant experts, mean straggler "
                   f"{best.summary.mean_straggler:.3f}) does not beat EPLB off "
                   f"({advice.baseline.summary.mean_straggler:.3f}) by more than {100 * advice.tolerance:.0f} %")
    for name, path in written.items():
        click.echo(f"wrote {name}: {path}")


main.add_command(top_command, "top")  # defined once, in moe_monitor/top/__main__.py (Textual loads on run)


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
        raise click.ClickException(
            f"gen-model needs torch and transformers (pip install 'moe-monitor[vllm]'): {e}") from None
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
    try:
        import grafana_foundation_sdk  # noqa: F401
        import yaml  # noqa: F401
    except ImportError as e:
        raise click.ClickException(f"the mixin commands need the 'mixin' extra: pip install 'moe-monitor[mixin]' "
                                   f"({e})") from None
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
    cfg = _mixin_config(config_path)
    from moe_monitor.mixin.build import generate, write

    files = generate(cfg, config_path)
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
    cfg = _mixin_config(config_path)
    from moe_monitor.mixin.build import drift, generate

    files = generate(cfg, config_path)
    problems = drift(files, out_dir)
    for path, why in problems:
        click.echo(f"{path}: {why}", err=True)
    if problems:
        click.echo("run `make mixin` (moe-monitor mixin build) and commit the result", err=True)
        sys.exit(1)
    click.echo(f"{len(files)} generated files up to date")


if __name__ == "__main__":
    main()
