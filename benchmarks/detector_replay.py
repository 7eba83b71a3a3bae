"""How close steady traffic comes to a false step-time capture, per baseline quantile.

`record` runs the README's embedded default (generated tiny MoE model on vLLM CPU, the plugin, a sidecar with
the shipped defaults) under the steady balanced mix the no-false-positive test uses, and writes every 5 s
window's mean step time and step count per (phase, tokens bucket), from the sidecar's own
moe_step_duration_seconds histogram. `replay` feeds those windows through the real Detector with several
baseline quantiles and prints, per quantile, the captures it would take and the largest current/baseline
sustained over `consecutive` windows (the figure that must stay under 1 + step_margin).

    python benchmarks/detector_replay.py record --seconds 420 --out benchmarks/results/steady_windows_cpu_2.json
    python benchmarks/detector_replay.py replay benchmarks/results/steady_windows_cpu_*.json
"""

from __future__ import annotations

import json
import os
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


@cli.command()
@click.option("--seconds", default=420.0, help="Steady traffic after vLLM is ready.")
@click.option("--out", required=True, type=click.Path(dir_okay=False))
def record(seconds: float, out: str) -> None:
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
    windows = []
    try:
        server.wait_ready("/health", 300)
        sidecar = launch.start_sidecar(segments, launch.free_port(), os.path.join(work, "sidecar.log"))
        sidecar.wait_ready("/healthz", 30)
        traffic.start()
        prev, t0 = _scrape(sidecar.url), time.time()
        while time.time() - t0 < seconds:
            time.sleep(WINDOW_S - time.time() % WINDOW_S + 0.3)
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
        stop.set()
        if traffic.is_alive():
            traffic.join()
        if sidecar is not None:
            sidecar.stop()
        server.stop()
    with open(out, "w") as f:
        json.dump({"window_s": WINDOW_S, "recorded": time.strftime("%Y-%m-%d"), "windows": windows}, f, indent=0)
    click.echo(f"{len(windows)} windows -> {out}")


def replay_one(windows: list[dict], quantile: float, cfg: DetectorConfig) -> tuple[int, float]:
    """Captures fired (every decision taken, no cooldown or budget) and the worst sustained ratio."""
    cfg = DetectorConfig(**{**cfg.__dict__, "step_baseline_quantile": quantile, "cooldown_s": 0.0,
                            "max_per_hour": 10**6})
    detector, fired = Detector(cfg), 0
    ratios: dict[tuple[str, str], list[float]] = defaultdict(list)
    worst = 0.0
    for w in windows:
        means = {tuple(k.split("/")): (m, n) for k, (m, n) in w["step_means"].items()}
        decision = detector.observe(WindowSignals(w["end"], means, None))
        for key, (mean, steps) in means.items():
            base = detector.baselines.get(("step_time", *key))
            if steps < cfg.min_steps or base is None:
                continue
            ratios[key].append(mean / base)
            if len(ratios[key]) >= cfg.consecutive:
                worst = max(worst, min(ratios[key][-cfg.consecutive:]))
        if decision is not None:
            detector.record_capture(w["end"])
            fired += 1
    return fired, worst


@cli.command()
@click.argument("paths", nargs=-1, required=True, type=click.Path(exists=True, dir_okay=False))
@click.option("--quantiles", default="0.5,0.75,0.9")
def replay(paths: tuple[str, ...], quantiles: str) -> None:
    cfg = DetectorConfig()
    click.echo(f"defaults: margin {cfg.step_margin}, {cfg.consecutive} in a row, horizon {cfg.horizon_windows}, "
               f"warm-up {cfg.warmup_windows}, min steps {cfg.min_steps}")
    for path in paths:
        with open(path) as f:
            windows = json.load(f)["windows"]
        click.echo(f"{path}: {len(windows)} windows")
        for q in (float(x) for x in quantiles.split(",")):
            fired, worst = replay_one(windows, q, cfg)
            click.echo(f"  baseline quantile {q:.2f}: captures {fired}, worst {cfg.consecutive}-window sustained "
                       f"current/baseline {worst:.2f} (fires above {1 + cfg.step_margin:.2f})")


if __name__ == "__main__":
    cli()
