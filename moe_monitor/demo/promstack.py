"""Prometheus and Alertmanager (Debian packages `prometheus`, `prometheus-alertmanager`) on loopback, next to
vLLM and the sidecar, run with the configs shipped in deploy/ and the generated rules (demo and end-to-end
tests). Only addresses, intervals, paths and the webhook URL are changed; everything else is used as is."""

from __future__ import annotations

import copy
import os
import shutil
from dataclasses import dataclass

from .launch import Proc, spawn

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
PROMETHEUS_YML = os.path.join(REPO, "deploy", "prometheus", "prometheus.yml")
ALERTMANAGER_YML = os.path.join(REPO, "deploy", "alertmanager", "alertmanager.yml")


class MissingTool(RuntimeError):
    pass


def binary(*names: str) -> str:
    for name in names:
        path = shutil.which(name)
        if path:
            return path
    raise MissingTool(f"{names[0]} is not installed (Debian: apt-get install prometheus prometheus-alertmanager; "
                      f"scripts/setup-env does it)")


def check_available() -> None:
    """Raises MissingTool unless both binaries and both shipped configs are there."""
    binary("prometheus")
    binary("prometheus-alertmanager", "alertmanager")
    for path in (PROMETHEUS_YML, ALERTMANAGER_YML):
        _load(path)


def _load(path: str) -> dict:
    if not os.path.exists(path):
        raise MissingTool(f"{path} not found: the demo's Prometheus/Alertmanager configs come from a checkout "
                          f"of the moe-monitor repository")
    import yaml  # the `mixin` extra; imported here so that `moe-monitor demo` can say what is missing (demo/needs.py)

    with open(path) as f:
        return yaml.safe_load(f)


@dataclass(frozen=True)
class Timing:
    """Prometheus scrape/evaluation interval and Alertmanager grouping times. The shipped defaults suit
    production; the demo and tests shorten them so alerts fire and resolve in seconds."""
    interval: str | None = None  # None: keep deploy/prometheus/prometheus.yml's
    group_wait: str | None = None
    group_interval: str | None = None
    repeat_interval: str | None = None


def prometheus_config(sidecars: list[str | dict], alertmanager: str | None, rule_file: str, vllm: str | None = None,
                      timing: Timing = Timing(), relabel_configs: list[dict] | None = None) -> dict:
    """deploy/prometheus/prometheus.yml with these sidecar targets (job moe-monitor), this Alertmanager (None: no
    alerting), this rule file and this vLLM target (None: its job is dropped). A sidecar is HOST:PORT, or a static
    config group {"targets": [HOST:PORT, ...], "labels": {...}} (target labels, e.g. a deployment's);
    relabel_configs, if given, are the sidecar job's."""
    cfg = copy.deepcopy(_load(PROMETHEUS_YML))
    if timing.interval:
        cfg["global"]["scrape_interval"] = cfg["global"]["evaluation_interval"] = timing.interval
        cfg["global"]["scrape_timeout"] = timing.interval
    cfg["rule_files"] = [rule_file]
    if alertmanager:
        cfg["alerting"]["alertmanagers"][0]["static_configs"][0]["targets"] = [alertmanager]
    else:
        cfg.pop("alerting", None)
    jobs = []
    for job in cfg["scrape_configs"]:
        if job["job_name"] == "moe-monitor":
            job["static_configs"] = _static_configs(sidecars)
            if relabel_configs is not None:
                job["relabel_configs"] = copy.deepcopy(relabel_configs)
        elif job["job_name"] == "vllm":
            if not vllm:
                continue  # no vLLM address given: drop its job rather than scrape a wrong port
            job["static_configs"][0]["targets"] = [vllm]
        jobs.append(job)
    cfg["scrape_configs"] = jobs
    return cfg


def _static_configs(sidecars: list[str | dict]) -> list[dict]:
    """HOST:PORT strings as one group (first), groups with labels as given."""
    plain = [s for s in sidecars if isinstance(s, str)]
    groups = [copy.deepcopy(s) for s in sidecars if not isinstance(s, str)]
    if plain or not groups:
        groups.insert(0, {"targets": plain})
    return groups


SIDECAR_RECEIVER = "moe-sidecar"  # deploy/alertmanager/alertmanager.yml's receiver for the sidecar's /api/alerts


def alertmanager_config(webhook_url: str, timing: Timing = Timing(), sidecar: tuple[str, str] | None = None) -> dict:
    """deploy/alertmanager/alertmanager.yml with every team receiver's webhook sent to `webhook_url` and, with
    `sidecar` (its base URL, a file holding its API token), the sidecar receiver sent to that sidecar's
    /api/alerts; without, the sidecar receiver and its route are left out."""
    cfg = copy.deepcopy(_load(ALERTMANAGER_YML))
    if sidecar is None:
        cfg["receivers"] = [r for r in cfg["receivers"] if r["name"] != SIDECAR_RECEIVER]
        cfg["route"]["routes"] = [r for r in cfg["route"]["routes"] if r.get("receiver") != SIDECAR_RECEIVER]
    for receiver in cfg["receivers"]:
        for hook in receiver.get("webhook_configs", []):
            if receiver["name"] != SIDECAR_RECEIVER:
                hook["url"] = webhook_url
            else:
                hook["url"] = sidecar[0].rstrip("/") + "/api/alerts"
                hook["http_config"]["authorization"]["credentials_file"] = sidecar[1]
    for key in ("group_wait", "group_interval", "repeat_interval"):
        if getattr(timing, key):
            cfg["route"][key] = getattr(timing, key)
    return cfg


def _write(path: str, doc: dict | str) -> str:
    import yaml

    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        f.write(doc if isinstance(doc, str) else yaml.safe_dump(doc, sort_keys=False))
    return path


def start_prometheus(workdir: str, port: int, sidecars: list[str | dict], alertmanager: str | None, rules_yaml: str,
                     vllm: str | None = None, timing: Timing = Timing(),
                     relabel_configs: list[dict] | None = None) -> Proc:
    """rules_yaml: the rules document (moe_monitor.mixin's output). Storage lives in workdir/prometheus. Sidecars
    and relabel_configs as for prometheus_config."""
    home = os.path.join(workdir, "prometheus")
    rule_file = _write(os.path.join(home, "rules", "moe-monitor.rules.yml"), rules_yaml)
    config = _write(os.path.join(home, "prometheus.yml"),
                    prometheus_config(sidecars, alertmanager, rule_file, vllm, timing, relabel_configs))
    cmd = [binary("prometheus"), f"--config.file={config}", f"--storage.tsdb.path={os.path.join(home, 'data')}",
           f"--web.listen-address=127.0.0.1:{port}", "--log.level=warn"]
    return spawn("prometheus", cmd, dict(os.environ), os.path.join(workdir, "prometheus.log"),
                  f"http://127.0.0.1:{port}")


def start_alertmanager(workdir: str, port: int, webhook_url: str, timing: Timing = Timing(),
                       sidecar: tuple[str, str] | None = None) -> Proc:
    """`sidecar`: (base URL, API token file) of a sidecar whose /api/alerts gets the routing alerts."""
    home = os.path.join(workdir, "alertmanager")
    config = _write(os.path.join(home, "alertmanager.yml"), alertmanager_config(webhook_url, timing, sidecar))
    cmd = [binary("prometheus-alertmanager", "alertmanager"), f"--config.file={config}",
           f"--storage.path={os.path.join(home, 'data')}", f"--web.listen-address=127.0.0.1:{port}",
           "--cluster.listen-address=",  # a single instance: no gossip port to collide with
           "--log.level=warn"]
    return spawn("alertmanager", cmd, dict(os.environ), os.path.join(workdir, "alertmanager.log"),
                  f"http://127.0.0.1:{port}")
