"""`moe-monitor` command line. click (rather than argparse) because it gives every flag an environment
variable twin, shows it in --help, and reports a bad value with the flag and variable named."""

from __future__ import annotations

import logging
import sys
from collections.abc import Mapping
from typing import Any

import click

from moe_monitor import __version__, env
from moe_monitor.schema.capture_record import CaptureMeta
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
    from moe_monitor.sidecar.server import serve as run_server
    from moe_monitor.sidecar.wiring import build as build_sidecar
    from moe_monitor.stats.placement import PlacementError

    try:
        cfg = build(SidecarConfig, {k.replace("__", "."): v for k, v in values.items()})
    except ValueError as e:  # a cross-field check of SidecarConfig: name the flag its message starts with
        hint = next((s.flag for s in specs(SidecarConfig) if str(e).startswith(s.name.split(".")[-1])), None)
        raise click.BadParameter(str(e), param_hint=hint) from None
    try:
        exporter = build_sidecar(cfg)
    except PlacementError as e:
        raise click.BadParameter(str(e), param_hint="--placement") from None
    except OSError as e:
        raise click.ClickException(f"cannot use the capture directory {cfg.capture_dir}: {e}") from None
    try:
        run_server(exporter)
    except OSError as e:
        raise click.ClickException(f"cannot listen on {cfg.host}:{cfg.port}: {e}") from None


@main.command()
@click.argument("traces", nargs=-1, type=click.Path(exists=True, dir_okay=False))
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output (the whole breakdown).")
@click.option("--top", type=click.IntRange(min=1), default=15, help="Rows of the top-kernels table.")
@click.option("--rules", type=click.Path(exists=True, dir_okay=False), default=None,
              help="Classification patterns (default: the packaged categories.toml).")
@click.option("--print-rules", is_flag=True, help="Print the packaged categories.toml (a start for --rules) and exit.")
def analyze(traces, as_json: bool, top: int, rules: str | None, print_rules: bool) -> None:
    """Break torch.profiler traces down into gate / experts / align-permute / attention / all-to-all / other."""
    import json

    from moe_monitor.breakdown.analyze import analyze_files, default_rules_text, load_rules
    from moe_monitor.breakdown.report import render_table
    from moe_monitor.breakdown.trace import TraceError

    if print_rules:
        click.echo(default_rules_text(), nl=False)
        return
    if not traces:
        raise click.UsageError("give one or more trace files (every rank of one capture), or --print-rules")

    try:  # one rank's trace in memory at a time
        result = analyze_files(traces, load_rules(rules), top=max(top, 50) if as_json else top)
    except (TraceError, ValueError) as e:
        raise click.ClickException(str(e)) from None
    click.echo(json.dumps(result.to_json(), indent=1) if as_json else render_table(result, top))


def _short(value) -> str:
    """A number as a person reads it (4 significant digits; a unix time, 2001-2096, as its UTC time of day),
    anything else as it is."""
    if isinstance(value, float) and 1e9 <= value < 4e9:
        import time

        return time.strftime("%H:%M:%SZ", time.gmtime(value))
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, list):
        return "[" + ", ".join(_short(v) for v in value) + "]"
    return str(value)


def _wrapped(text: str, width: int = 80) -> str:
    import textwrap

    return "\n".join(textwrap.wrap(text, width, subsequent_indent="  ", break_on_hyphens=False)) or text


MAX_GPUS = 1024  # eplb --gpus; with MAX_EXPERTS the placement files stay within hundreds of MB
MAX_REDUNDANT = 16384  # eplb --redundant, each value
TIMEOUT_HELP = ("Seconds a JSON answer may take in total (a trace download: 10 x this + 1 s per 256 KiB, and "
                "at most 2 x this without a byte).")


URL_HELP = "The sidecar's base URL, or HOST:PORT (http:// is assumed)."
EXIT_NO_TRACE = 3  # traces trigger --wait: the capture ended without storing a trace
EXIT_STILL_RUNNING = 4  # traces trigger --wait: no outcome within --wait-timeout


def _url(ctx, param, value: str | None) -> str | None:
    """A --url (or --prometheus) value as the clients take it: HOST:PORT gets http://, no trailing slash."""
    from moe_monitor.client import normalise_url

    return None if value is None else normalise_url(value)


def _sidecar_options(func):
    """--url, --token and --timeout after a `traces` subcommand too: there they win over the same options before
    it (and over MOE_MONITOR_URL, MOE_MONITOR_API_TOKEN, MOE_MONITOR_CLIENT_TIMEOUT, which those read)."""
    def override(ctx, param, value):
        if value is not None:
            ctx.obj = {**ctx.obj, param.name: _url(ctx, param, value) if param.name == "url" else value}

    options = (click.option("--url", default=None, expose_value=False, callback=override,
                            help=URL_HELP + " Also before the subcommand, or MOE_MONITOR_URL."),
               click.option("--token", default=None, expose_value=False, callback=override,
                            help="Bearer token. Also before the subcommand, or MOE_MONITOR_API_TOKEN."),
               click.option("--timeout", type=click.FloatRange(min=0, min_open=True, max=3600), default=None,
                            expose_value=False, callback=override,
                            help="As --timeout before the subcommand (MOE_MONITOR_CLIENT_TIMEOUT)."))
    for option in reversed(options):
        func = option(func)
    return func


def _one_line_errors(func):
    """A server answer that cannot be used (ClientError) as click's one-line error, exit 1."""
    import functools

    @functools.wraps(func)
    def wrapper(*args, **kw):
        from moe_monitor.client import ClientError

        try:
            return func(*args, **kw)
        except ClientError as e:
            raise click.ClickException(str(e)) from None
    return wrapper


@main.group()
@click.option("--url", envvar=env.SIDECAR_URL, show_envvar=True, default="http://127.0.0.1:9464", callback=_url,
              help=URL_HELP + " Also after the subcommand.")
@click.option("--token", envvar=env.API_TOKEN, show_envvar=True, default=None,
              help="Bearer token (every /api/ route, when the sidecar requires one).")
@click.option("--timeout", type=click.FloatRange(min=0, min_open=True, max=3600), default=30.0, help=TIMEOUT_HELP,
              envvar=env.CLIENT_TIMEOUT, show_envvar=True)
@click.pass_context
def traces(ctx, url: str, token: str | None, timeout: float) -> None:
    """List, show, pull and trigger the profiler traces the sidecar captured. --url, --token and --timeout go
    before or after the subcommand. Nothing the sidecar answers is trusted: sizes and deadlines are bounded, ids
    and file names checked, its strings printed with control characters escaped."""
    ctx.obj = {"url": url, "token": token, "timeout": timeout}


def _sidecar(ctx):
    from moe_monitor.client import Client

    return Client(ctx.obj["url"], ctx.obj["token"], ctx.obj["timeout"])


def _asked_id(capture_id: str) -> str:
    from moe_monitor.client import capture_id as valid

    if valid(capture_id) is None:
        raise click.BadParameter(f"{capture_id!r} is not a capture id (like 20250101T120000Z-imbalance-1a2b3c)",
                                 param_hint="CAPTURE_ID")
    return capture_id


def _capture(ctx, capture_id: str) -> CaptureMeta:
    """A capture's metadata from the sidecar, checked (records.capture_metadata)."""
    from moe_monitor.client.records import METADATA_KEYS, capture_metadata

    what = f"capture {capture_id}"
    meta = _sidecar(ctx).get_json(f"/api/captures/{capture_id}", what, expect=METADATA_KEYS)
    return capture_metadata(meta, what, asked=capture_id)


def _no_trace(meta: CaptureMeta) -> str | None:
    """Why a capture has no trace to show or pull (still running, or ended without one: its outcome and error),
    or None when it stored its traces."""
    from moe_monitor.client import printable

    if meta.stored_traces:
        return None
    if meta.outcome == "running":
        return "still running (moe-monitor traces trigger --wait follows a capture to its outcome)"
    error = meta.error
    return printable(f"no trace stored ({meta.outcome or '?'}" + (f": {error})" if error else ")"))


def _print_capture(meta: CaptureMeta) -> None:
    """A capture's summary: what, when, outcome, evidence, breakdown, and why it has no trace if so."""
    from moe_monitor.client import printable

    click.echo(printable(f"capture {meta.id}: {meta.reason or '?'}, {meta.outcome or '?'}, "
                         f"{_when(meta.created)}, {meta.duration_s or 0:.1f} s, {len(meta.files)} files, "
                         f"{meta.total_bytes / 1e6:.1f} MB"))
    evidence = meta.evidence
    if meta.reason == "alert":
        _print_alert(evidence)
    elif evidence:
        click.echo(_wrapped(printable("evidence: " + ", ".join(f"{k}={_short(v)}" for k, v in evidence.items()))))
    shares = meta.breakdown or {}
    shown = [f"{c} {100 * v:.1f} %" for c, v in sorted(shares.items(), key=lambda kv: -kv[1]) if v >= 0.001]
    if shown:
        click.echo(_wrapped(printable("breakdown: " + ", ".join(shown))))
    why = _no_trace(meta)
    if why is not None:
        click.echo(why)


def _print_alert(evidence: Mapping[str, Any]) -> None:
    """The Alertmanager alert a capture was taken for: its name, since when, its labels and summary."""
    from moe_monitor.client import printable

    def pairs(value) -> str:
        return ", ".join(f"{k}={v}" for k, v in value.items()) if isinstance(value, dict) else ""

    others = evidence.get("alerts")
    more = f" (and {others - 1} more alerts of its notification)" if isinstance(others, int) and others > 1 else ""
    click.echo(_wrapped(printable(f"alert: {evidence.get('alertname', '?')} firing since "
                                  f"{evidence.get('startsAt', '?')}, fingerprint {evidence.get('fingerprint', '?')}"
                                  f"{more}; labels: {pairs(evidence.get('labels'))}")))
    annotations = evidence.get("annotations") if isinstance(evidence.get("annotations"), dict) else {}
    if annotations.get("summary"):
        click.echo(_wrapped(printable(f"summary: {annotations['summary']}")))


def _when(t: float) -> str:
    import time as _time

    try:
        return _time.strftime("%Y-%m-%d %H:%M:%S", _time.localtime(t))
    except (OverflowError, OSError, ValueError):
        return "?"


@traces.command("list")
@_sidecar_options
@click.pass_context
@_one_line_errors
def traces_list(ctx) -> None:
    """Captures, newest first: id, time, reason, outcome, size."""
    from moe_monitor.client import ClientError, printable
    from moe_monitor.client.records import capture_metadata

    captures = _sidecar(ctx).get_json("/api/captures", "the capture list", expect=("captures",))["captures"]
    if not isinstance(captures, list):
        raise ClientError("the capture list: not a moe-monitor sidecar (captures is not a list)")
    if not captures:
        click.echo("no captures")
    for i, c in enumerate(captures):
        meta = capture_metadata(c, f"the capture list, entry {i}")
        signal = meta.evidence.get("signal", meta.evidence.get("note", ""))
        click.echo(printable(f"{meta.id}  {_when(meta.created)}  {meta.reason or '?':10} {meta.outcome or '?':17} "
                             f"{len(meta.files)} files {meta.total_bytes / 1e6:.1f} MB  {signal}"))


@traces.command("show")
@click.argument("capture_id")
@click.option("--json", "as_json", is_flag=True, help="The capture's metadata as JSON (no flight record).")
@click.option("--top", default=1, show_default=True, type=click.IntRange(1, 20),
              help="Hottest experts listed per window of the flight record.")
@_sidecar_options
@click.pass_context
@_one_line_errors
def traces_show(ctx, capture_id: str, as_json: bool, top: int) -> None:
    """One capture: reason, evidence, breakdown, files, and its flight record (routing in the minutes before the
    trigger, one line per window: the most imbalanced layer, the hottest experts, the busiest EP rank)."""
    import json

    from moe_monitor.client import printable
    from moe_monitor.client.records import flight_record
    from moe_monitor.schema.flight_record import FILE, MAX_JSON_BYTES, render_summary

    meta = _capture(ctx, _asked_id(capture_id))
    if as_json:
        click.echo(json.dumps(meta.to_json(), indent=1))  # re-encoded: control characters come out as \u001b
        return
    _print_capture(meta)
    if _no_trace(meta) is not None:
        return
    if FILE not in meta.file_names:
        click.echo("flight record: none (the flight recorder was off, or the capture is older than it)")
        return
    what = f"capture {capture_id}'s flight record"
    doc = flight_record(_sidecar(ctx).get_bytes(f"/api/captures/{capture_id}/flight", what, MAX_JSON_BYTES), what)
    click.echo("\n".join(printable(x) for x in render_summary(doc, top).splitlines()))


def _write_new(dir_fd: int, name: str, write) -> None:
    """Write `name` inside the directory `dir_fd` through `.name.part`, renamed once complete: the part file is
    created anew (O_EXCL, O_NOFOLLOW: a link planted there is removed, never followed) and removed on failure,
    so a name in the directory is always a complete file."""
    import os

    part = f".{name}.part"
    try:
        os.unlink(part, dir_fd=dir_fd)
    except FileNotFoundError:
        pass
    fd = os.open(part, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644, dir_fd=dir_fd)
    try:
        with os.fdopen(fd, "wb") as sink:
            write(sink)
        os.replace(part, name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
    except BaseException:
        os.unlink(part, dir_fd=dir_fd)
        raise


def _capture_dir(out_dir: str, capture_id: str) -> int:
    """An open descriptor of OUT/<id>, created if needed, refused when it resolves outside OUT (a link)."""
    import os

    from moe_monitor.client import ClientError

    out = os.path.realpath(out_dir)
    target = os.path.join(out, capture_id)
    try:
        os.makedirs(out, exist_ok=True)
        if not os.path.isdir(target) or os.path.islink(target):
            os.makedirs(target, exist_ok=True)
        if os.path.realpath(target) != target or os.path.commonpath([out, os.path.realpath(target)]) != out:
            raise ClientError(f"{target} resolves outside {out} (a symbolic link?): not writing there")
        return os.open(target, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
    except OSError as e:
        raise ClientError(f"cannot write into {target}: {e.strerror}") from None


@traces.command("pull")
@click.argument("capture_id")
@click.option("--out", "out_dir", default=".", type=click.Path(file_okay=False), help="Directory to write into.")
@_sidecar_options
@click.pass_context
@_one_line_errors
def traces_pull(ctx, capture_id: str, out_dir: str) -> None:
    """Download every file of a capture into OUT/<id>/: its rank traces, breakdown.json, the flight record and, for
    a capture an alert caused, alert.json (the bundle). Its id and file names are checked (the sidecar's formats:
    no separators, no leading dot) before anything is written, each file must be the size the metadata declares,
    and metadata.json is written last: a capture whose pull failed has none."""
    import json
    import os

    from moe_monitor.client import ClientError, printable

    meta = _capture(ctx, _asked_id(capture_id))
    why = _no_trace(meta)
    if why is not None:
        raise ClientError(f"capture {capture_id}: {why}; nothing to pull")
    files = [(f.name, f.bytes) for f in meta.files]
    client = _sidecar(ctx)
    dir_fd = _capture_dir(out_dir, capture_id)
    try:
        try:
            os.unlink("metadata.json", dir_fd=dir_fd)  # written again once every file is in
        except FileNotFoundError:
            pass
        for name, size in files:
            _write_new(dir_fd, name, lambda sink, name=name, size=size: client.download(
                f"/api/captures/{capture_id}/files/{name}", f"{capture_id}/{name}", sink, size))
        _write_new(dir_fd, "metadata.json", lambda sink: sink.write(json.dumps(meta.to_json(), indent=1).encode()))
    except OSError as e:
        raise ClientError(f"cannot write into {os.path.join(os.path.realpath(out_dir), capture_id)}: "
                          f"{e.strerror}") from None
    finally:
        os.close(dir_fd)
    click.echo(f"pulled {len(files)} files into {os.path.join(out_dir, capture_id)}: "
               + printable(", ".join(name for name, _ in files)))


@traces.command("trigger")
@click.option("--reason", required=True, help="Why (stored with the capture).")
@click.option("--wait", is_flag=True, help=f"Follow the capture to its outcome and print it. Exit status 0 once "
              f"its traces are stored, {EXIT_NO_TRACE} when it ended without one (profiler_disabled, start_failed, "
              f"...), {EXIT_STILL_RUNNING} when it is still running after --wait-timeout.")
@click.option("--wait-timeout", type=click.FloatRange(min=0, min_open=True, max=86400), default=300.0,
              show_default=True, help="With --wait: seconds to wait for the outcome (the capture itself is bounded "
              "by the sidecar's --capture-timeout, and goes on after the wait gives up).")
@_sidecar_options
@click.pass_context
@_one_line_errors
def traces_trigger(ctx, reason: str, wait: bool, wait_timeout: float) -> None:
    """Ask the sidecar for a capture now (same budget as automatic ones); prints its id, and with --wait its
    outcome."""
    from moe_monitor.client import ClientError, printable

    answer = _sidecar(ctx).post_json("/api/captures", {"reason": reason}, "trigger a capture", expect=("id",))
    if not isinstance(answer["id"], str):
        raise ClientError("trigger a capture: not a moe-monitor sidecar (its id is not a string)")
    click.echo(printable(answer["id"]))
    if not wait:
        return
    meta = _follow(ctx, _asked_id(answer["id"]), wait_timeout)
    _print_capture(meta)
    why = _no_trace(meta)
    if meta.outcome == "running":
        raise _Exit(EXIT_STILL_RUNNING, f"capture {meta.id}: still running after {wait_timeout:g} s; it goes on "
                                        f"in the sidecar (moe-monitor traces show {meta.id})")
    if why is not None:
        raise _Exit(EXIT_NO_TRACE, f"capture {meta.id}: {why}")


class _Exit(click.ClickException):
    """A one-line error with its own exit status."""

    def __init__(self, code: int, message: str):
        super().__init__(message)
        self.exit_code = code


WAIT_POLL_S = 1.0  # traces trigger --wait asks for the capture's metadata this often
WAIT_RETRIES = 3  # failed requests in a row it retries (a sidecar busy for a moment, a dropped connection)


def _follow(ctx, capture_id: str, timeout_s: float) -> CaptureMeta:
    """The capture's metadata once its outcome is known (not "running"), or as it is after `timeout_s`."""
    import time

    from moe_monitor.client import ClientError

    deadline, failures = time.monotonic() + timeout_s, 0
    while True:
        try:
            meta = _capture(ctx, capture_id)
            failures = 0
            if meta.outcome != "running" or time.monotonic() >= deadline:
                return meta
        except ClientError:
            failures += 1
            if failures > WAIT_RETRIES or time.monotonic() >= deadline:
                raise
        time.sleep(max(0.0, min(WAIT_POLL_S, deadline - time.monotonic())))


@main.command()
@click.option("--capture", "capture_id", help="Plan from this capture's flight record (through the sidecar --url).")
@click.option("--live", is_flag=True, help="Plan from the live sidecar's flight record (--url), optionally "
              "only its last --minutes.")
@click.option("--flight", "flight_file", type=click.Path(exists=True, dir_okay=False),
              help="Plan from a flight record file (a pulled capture's flight.json.gz).")
@click.option("--prometheus", "prometheus_url", callback=_url, help="Plan from Prometheus (its URL, or HOST:PORT): "
              "per-expert series (the sidecars' --expert-series all) increased over --range.")
@click.option("--range", "range_", default="6h", show_default=True, help="With --prometheus: the history range.")
@click.option("--selector", default="", help="With --prometheus: label matchers, e.g. 'model=\"...\"'.")
@click.option("--minutes", type=click.FloatRange(min=0, min_open=True), help="With --live: the last minutes only.")
@click.option("--url", envvar=env.SIDECAR_URL, show_envvar=True, default="http://127.0.0.1:9464", callback=_url,
              help="The sidecar's base URL, or HOST:PORT (--capture, --live).")
@click.option("--token", envvar=env.API_TOKEN, show_envvar=True, default=None, help="Bearer token, if required.")
@click.option("--timeout", type=click.FloatRange(min=0, min_open=True, max=3600), default=30.0,
              envvar=env.CLIENT_TIMEOUT, show_envvar=True,
              help="Seconds the sidecar's or Prometheus' answer may take in total.")
@click.option("--gpus", type=click.IntRange(min=1, max=MAX_GPUS), required=True,
              help="EP ranks (GPUs) the experts spread over.")
@click.option("--nodes", type=click.IntRange(min=1), default=1, show_default=True,
              help="Nodes (the hierarchical policy packs expert groups per node).")
@click.option("--groups", type=click.IntRange(min=1), default=1, show_default=True,
              help="Expert groups of the model (DeepSeek-V3: 8); 1 for models without group-limited routing.")
@click.option("--redundant", callback=lambda ctx, param, value: _redundant(value),
              help="Redundant experts to compare, e.g. 0,16,32 (default: a sweep from the smallest count that "
              "fills every GPU evenly, in steps of --gpus).")
@click.option("--strategy", type=click.Choice(["linear", "round_robin"]), default="linear", show_default=True,
              help="vLLM's placement without EPLB (--expert-placement-strategy), the baseline.")
@click.option("--out", "out_dir", type=click.Path(file_okay=False),
              help="Write the recommended placement here (SGLang, sidecar and vLLM-state files; docs/eplb.md).")
@click.option("--json", "as_json", is_flag=True, help="The report as JSON.")
def eplb(capture_id, live, flight_file, prometheus_url, range_, selector, minutes, url, token, timeout, gpus, nodes,
         groups, redundant, strategy, out_dir, as_json) -> None:
    """Should this deployment enable EPLB, and with how many redundant experts? Plans DeepSeek's EPLB placement
    from recorded routing and predicts per-EP-rank load, balancedness and the straggler factor (docs/eplb.md)."""
    import json
    import shlex

    from moe_monitor.client import printable
    from moe_monitor.eplb import advise, plan_placement, vllm_args, write_placement_files
    from moe_monitor.eplb.history import HistoryError, from_capture, from_file, from_prometheus, from_sidecar

    chosen = [x for x in (capture_id, live or None, flight_file, prometheus_url) if x]
    if len(chosen) != 1:
        raise click.UsageError("give exactly one history: --capture ID, --live, --flight FILE or --prometheus URL")
    try:
        if capture_id:
            history = from_capture(url, capture_id, token, timeout)
        elif live:
            history = from_sidecar(url, minutes, token, timeout)
        elif flight_file:
            history = from_file(flight_file)
        else:
            history = from_prometheus(prometheus_url, range_, selector, timeout=timeout)
        advice = advise(history.load, num_gpus=gpus, num_nodes=nodes, num_groups=groups, redundant=redundant,
                        strategy=strategy, parts=history.parts)
        written = {}
        if out_dir and not advice.stands:
            raise click.ClickException(f"no placement written: the recommendation is withheld: "
                                       f"{advice.confidence.withheld}")
        if out_dir:
            placement = plan_placement(history.load, num_gpus=gpus, num_redundant=advice.recommended.num_redundant,
                                       num_nodes=nodes, num_groups=groups)
            written = write_placement_files(out_dir, placement, history.load, moe_layer_ids=list(history.layer_ids))
    except HistoryError as e:  # its text may quote a server's answer: printed with control characters escaped
        raise click.ClickException(printable(e)) from None
    except ValueError as e:  # the deployment does not fit the model (experts vs GPUs, groups vs nodes, ...)
        raise click.ClickException(f"cannot plan for this deployment: {printable(e)}") from None
    except OSError as e:
        raise click.ClickException(f"cannot write the placement files into {out_dir}: {e.strerror or e}") from None
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
    if not advice.stands:
        click.echo(f"enable EPLB: withheld: {advice.confidence.withheld}. On the whole range the sweep's best "
                   f"fit is {best.num_redundant} redundant experts; that is not a recommendation.")
    elif advice.enable_eplb:
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


def _redundant(value: str | None) -> list[int] | None:
    """--redundant: whole numbers 0..MAX_REDUNDANT, comma-separated (a usage error otherwise)."""
    if not value:
        return None
    try:
        values = [int(x) for x in value.split(",") if x.strip()]
    except ValueError:
        raise click.BadParameter(f"{value!r}: give whole numbers, e.g. 0,16,32", param_hint="--redundant") from None
    if not values or not all(0 <= v <= MAX_REDUNDANT for v in values) or len(values) > 64:
        raise click.BadParameter(f"{value!r}: give 1 to 64 numbers of redundant experts, each 0-{MAX_REDUNDANT}",
                                 param_hint="--redundant")
    return values


main.add_command(top_command, "top")  # defined once, in moe_monitor/top/__main__.py (Textual loads on run)


@main.command("gen-model")
@click.argument("out_dir", type=click.Path(file_okay=False))
@click.option("--arch", type=click.Choice(["qwen3_moe", "mixtral", "qwen2_moe"]), default="qwen3_moe")
@click.option("--layers", type=click.IntRange(min=1), default=2, help="Decoder layers (MoE unless --dense-layers).")
@click.option("--dense-layers", default="", help="Comma-separated layer indices given a dense MLP instead of experts "
              "(qwen3_moe, qwen2_moe), as DeepSeek's first layers: e.g. 0.")
@click.option("--experts", type=click.IntRange(min=2), default=8)
@click.option("--top-k", type=click.IntRange(min=1), default=2)
@click.option("--hot-expert", type=click.IntRange(min=0), default=None,
              help="Route the --hot-words tokens to this expert in every layer.")
@click.option("--hot-words", default="hot,blaze", help="Comma-separated words made single tokens.")
@click.option("--seed", type=int, default=0)
def gen_model(out_dir, arch, layers, dense_layers, experts, top_k, hot_expert, hot_words, seed) -> None:
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
    try:
        dense = [int(x) for x in dense_layers.split(",") if x.strip()]
    except ValueError:
        raise click.BadParameter(f"{dense_layers!r}: comma-separated layer indices", param_hint="--dense-layers") \
            from None
    try:
        meta = generate(out_dir, arch, num_layers=layers, num_experts=experts, top_k=top_k, seed=seed,
                        hot_expert=hot_expert, hot_words=words, dense_layers=dense)
    except ValueError as e:
        raise click.ClickException(str(e)) from None
    moe = meta["moe_layers"]
    which = "" if len(moe) == meta["num_layers"] else f" (layers {', '.join(map(str, moe))} of {meta['num_layers']})"
    click.echo(f"wrote {arch} model to {out_dir}: {len(moe)} MoE layers{which} x {meta['num_experts']} experts, "
               f"top-{meta['top_k']}, hot expert {meta['hot_expert']} for {meta['hot_words']}")


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
