"""How close steady traffic comes to a false step-time capture, and how fast a real regression is caught.

`record` runs the README's embedded default (generated tiny MoE model on vLLM CPU, the plugin, a sidecar with
the shipped defaults) under the steady balanced mix the no-false-positive test uses, and writes every 5 s
window's mean step time and step count per (phase, tokens bucket), from the sidecar's own
moe_step_duration_seconds histogram (`--busy` adds other work on the VM for part of the run). `replay` feeds
those windows through the real Detector under the old rule (p90 x 1.30 alone) and the shipped one (also the
median + 3 robust sigma) and prints, per rule, the captures it would take, the largest current/threshold
sustained over `consecutive` windows (a capture needs more than 1.00), and, with every key x1.5 and x2 injected
from onsets every 5 windows, how many of those regressions it catches and how fast.

    python benchmarks/detector_replay.py record --seconds 420 --out benchmarks/results/steady_windows_cpu_2.json
    python benchmarks/detector_replay.py replay benchmarks/results/steady_windows_cpu_*.json \\
        > benchmarks/results/steady_windows_cpu_replay.txt
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections import defaultdict

import click

from moe_monitor.demo import launch
from moe_monitor.detect.detector import Detector, DetectorConfig, WindowSignals

WINDOW_S = 5.0


def _scrape(url: str) -> dict[tuple[str, str, str], float]:
    from prometheus_client.parser import text_string_to_metric_families

    out = {}
    for fam in text_string_to_metric_families(urllib.request.urlopen(url + "/metrics", timeout=10).read().decode()):
        for s in fam.samples:
            if s.name in ("moe_step_duration_seconds_sum", "moe_step_duration_seconds_count"):
                out[(s.name, s.labels["phase"], s.labels["tokens_le"])] = s.value
    return out


@click.group()
def cli() -> None:
    pass


BUSY = "import time, sys\nstop = time.time() + float(sys.argv[1])\nwhile time.time() < stop:\n    sum(range(10000))\n"


def _other_work(busy: str | None, t0: float, procs: list) -> None:
    """--busy START:END:N: N CPU-bound processes (other work on the VM, e.g. another test run) from START to
    END seconds into the traffic, each in its own session like a separate job."""
    if busy:
        start, end, n = (float(x) for x in busy.split(":"))
        if not procs and time.time() - t0 >= start:
            procs += [subprocess.Popen([sys.executable, "-c", BUSY, str(end - start)], start_new_session=True)
                      for _ in range(int(n))]


@cli.command()
@click.option("--seconds", default=420.0, help="Steady traffic after vLLM is ready.")
@click.option("--out", required=True, type=click.Path(dir_okay=False))
@click.option("--busy", default=None, help="START:END:N: N CPU-bound processes from START to END s (other work).")
def record(seconds: float, out: str, busy: str | None) -> None:
    from moe_monitor.demo import workload
    from moe_monitor.demo.tiny_model import generate

    work = tempfile.mkdtemp(prefix="detector-replay-")
    model = os.path.join(work, "model")
    generate(model, "qwen3_moe", hot_expert=3, hot_words=["hot", "blaze"], seed=0)
    segments = os.path.join(work, "segments")
    server = launch.start_vllm(model, launch.free_port(), os.path.join(work, "vllm.log"),
                               launch.vllm_env(segments, publish_interval=0.2), ["--enforce-eager"])
    sidecar = None
    stop = threading.Event()
    traffic = threading.Thread(target=workload.run_until, args=(server.url, stop.is_set, (), 900),
                               kwargs={"max_tokens": 3}, daemon=True)
    windows, others = [], []
    try:
        server.wait_ready("/health", 300)
        sidecar = launch.start_sidecar(segments, launch.free_port(), os.path.join(work, "sidecar.log"))
        sidecar.wait_ready("/healthz", 30)
        traffic.start()
        prev, t0 = _scrape(sidecar.url), time.time()
        while time.time() - t0 < seconds:
            time.sleep(WINDOW_S - time.time() % WINDOW_S + 0.3)
            _other_work(busy, t0, others)
            cur, means = _scrape(sidecar.url), {}
            for (name, phase, tl), count in cur.items():
                n = count - prev.get((name, phase, tl), 0.0)
                if name == "moe_step_duration_seconds_count" and n > 0:
                    total = cur[("moe_step_duration_seconds_sum", phase, tl)]
                    seconds_in = total - prev.get(("moe_step_duration_seconds_sum", phase, tl), 0.0)
                    means[f"{phase}/{tl}"] = [seconds_in / n, int(n)]
            windows.append({"end": round(time.time() - t0, 1), "step_means": means})
            prev = cur
    finally:
        for p in others:
            p.kill()
            p.wait()
        stop.set()
        if traffic.is_alive():
            traffic.join()
        if sidecar is not None:
            sidecar.stop()
        server.stop()
    with open(out, "w") as f:
        json.dump({"window_s": WINDOW_S, "recorded": time.strftime("%Y-%m-%d"), "busy": busy, "windows": windows},
                  f, indent=0)
    click.echo(f"{len(windows)} windows -> {out}")


RULES = {  # name -> overrides of the shipped DetectorConfig
    "old: p90 x 1.30": {"step_noise_sigmas": 0.0},
    "new: and median + 3 sigma": {},
    "(new, 4 in a row)": {"consecutive": 4},  # the trade-off of asking for a longer streak instead
}
FACTORS = (1.5, 2.0)  # injected regressions: every key's mean step time x factor from the onset on
DEADLINE_WINDOWS = 24  # a regression not caught within 2 min (5 s windows) counts as missed


def _config(cfg: DetectorConfig, **overrides) -> DetectorConfig:
    """Every decision counted: no cooldown, no hourly budget."""
    return DetectorConfig(**{**cfg.__dict__, "cooldown_s": 0.0, "max_per_hour": 10**6, **overrides})


def _signals(w: dict, factor: float = 1.0) -> WindowSignals:
    return WindowSignals(w["end"], {tuple(k.split("/")): (m * factor, n) for k, (m, n) in w["step_means"].items()},
                         None)


def replay_one(windows: list[dict], cfg: DetectorConfig) -> tuple[int, float]:
    """Captures fired on the recorded windows as they are, and the worst current/threshold sustained over
    `consecutive` windows of one key (a capture needs more than 1.00)."""
    cfg = _config(cfg)
    detector, fired = Detector(cfg), 0
    ratios: dict[tuple[str, str], list[float]] = defaultdict(list)
    worst = 0.0
    for w in windows:
        signals = _signals(w)
        decision = detector.observe(signals)
        for key, (mean, steps) in signals.step_means.items():
            threshold = detector.thresholds.get(("step_time", *key))
            if steps < cfg.min_steps or threshold is None:
                continue
            ratios[key].append(mean / threshold)
            if len(ratios[key]) >= cfg.consecutive:
                worst = max(worst, min(ratios[key][-cfg.consecutive:]))
        if decision is not None:
            detector.record_capture(w["end"])
            fired += 1
    return fired, worst


def detection_delays(windows: list[dict], cfg: DetectorConfig, factor: float, step: int = 5) -> list[int | None]:
    """For onsets every `step` windows after the warm-up (each with DEADLINE_WINDOWS recorded windows after it):
    windows from the onset until the first capture with every key's mean x factor from the onset on (1 = the
    onset window itself), None when not caught within DEADLINE_WINDOWS. Decisions before the onset are dropped
    (the false ones are replay_one's count)."""
    cfg = _config(cfg)
    delays = []
    for onset in range(2 * cfg.warmup_windows, len(windows) - DEADLINE_WINDOWS + 1, step):
        detector, delay = Detector(cfg), None
        for i, w in enumerate(windows[:onset + DEADLINE_WINDOWS]):
            decision = detector.observe(_signals(w, factor if i >= onset else 1.0))
            if decision is not None:
                detector.record_capture(w["end"])
                if i >= onset:
                    delay = i - onset + 1
                    break
        delays.append(delay)
    return delays


def _delay_text(delays: list[int | None], window_s: float) -> str:
    caught = sorted(d for d in delays if d is not None)
    if not caught:
        return f"caught 0/{len(delays)}"
    return (f"caught {len(caught)}/{len(delays)}, median {caught[len(caught) // 2] * window_s:.0f} s, "
            f"worst {caught[-1] * window_s:.0f} s")


@cli.command()
@click.argument("paths", nargs=-1, required=True, type=click.Path(exists=True, dir_okay=False))
def replay(paths: tuple[str, ...]) -> None:
    """Old rule and new rule side by side: false captures on the recorded steady windows, and how fast a
    regression injected into the same windows is caught."""
    cfg = DetectorConfig()
    click.echo(f"defaults: margin {cfg.step_margin}, p{cfg.step_baseline_quantile * 100:.0f} baseline, noise "
               f"{cfg.step_noise_sigmas} sigma, {cfg.consecutive} in a row, horizon {cfg.horizon_windows}, warm-up "
               f"{cfg.warmup_windows}, min steps {cfg.min_steps}; regression injected every 5 windows after "
               f"{2 * cfg.warmup_windows}, missed if not caught in {DEADLINE_WINDOWS} windows")
    totals = defaultdict(int)
    for path in paths:
        with open(path) as f:
            data = json.load(f)
        windows, window_s = data["windows"], float(data.get("window_s", WINDOW_S))
        click.echo(f"{path}: {len(windows)} windows" + (f" (other work: --busy {data['busy']})"
                                                          if data.get("busy") else ""))
        for name, overrides in RULES.items():
            rule = DetectorConfig(**{**cfg.__dict__, **overrides})
            fired, worst = replay_one(windows, rule)
            totals[name] += fired
            caught = "; ".join(f"x{f}: {_delay_text(detection_delays(windows, rule, f), window_s)}" for f in FACTORS)
            click.echo(f"  {name:27s} false captures {fired}, worst sustained current/threshold {worst:.2f}; {caught}")
    click.echo("false captures in all: " + ", ".join(f"{name} {n}" for name, n in totals.items()))


if __name__ == "__main__":
    cli()
