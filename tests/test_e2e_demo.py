"""`moe-monitor demo` (what `make demo` runs) shows the whole product: the real command, run to its "Everything keeps
running" line on free ports, then looked at from outside as a user would.

Shown: the imbalance alert reaches the receiver and the sidecar's /api/alerts through Alertmanager, and a capture is
taken without anyone asking, by the detector or by the alert (whichever comes first: the other meets the cooldown),
whose breakdown the demo prints (`traces show`); the captures API wants the demo's generated token (file mode
0600) and answers with it; `top` shows that capture on an 80x24 screen; and every query of every dashboard returns
data from the demo's Prometheus, except the deployment dashboard's, which need a multi-node deployment label
(DEPLOYMENT_ONLY says why for each). The count is printed."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import stat
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request

import pytest
from conftest import free_port, have, prom_api, queries_without_data

pytestmark = [pytest.mark.e2e, pytest.mark.skipif(not have("vllm"), reason="needs vLLM")]

from moe_monitor.capture.alerts import CAPTURE_ALERTS  # noqa: E402
from moe_monitor.demo import up  # noqa: E402
from moe_monitor.mixin import dashboards, queries  # noqa: E402
from moe_monitor.mixin.config import load_config  # noqa: E402
from moe_monitor.mixin.dashboards.overview import NEEDS_EP  # noqa: E402

READY = "Everything keeps running"
# The deployment dashboard reads sidecars grouped by the `deployment` target label, which only a multi-node scrape
# configuration sets (deploy/kubernetes/multinode/servicemonitor.yaml); the demo is one vLLM on one host with one
# unlabelled sidecar, so none of these has data there. tests/test_deployment_view.py runs every one of them against
# sidecars labelled as deployments.
RULE = "recorded by the moe-monitor.deployment rules only for sidecars with a deployment label"
LABELLED = "selects sidecars with a deployment label (deployment!=\"\"): the demo's has none"
DEPLOYMENT_ONLY = {
    ("Worst-layer EP-rank imbalance (deployment)", "A"): RULE,
    ("Worst-layer expert imbalance (deployment, T2)", "A"): RULE,
    ("Assignments/s (deployment)", "A"): RULE,
    ("Sidecars up", "A"): LABELLED,
    ("Sidecars up", "B"): LABELLED,
    ("Expert time lost to EP-rank imbalance (deployment)", "A"): RULE,
    ("Worst layers (deployment)", "A"): RULE,
    ("Assignments/s by EP rank (deployment)", "A"): RULE,
    ("EP-rank imbalance by layer (deployment)", "A"): RULE,
    ("EP-rank load ÷ mean now (deployment)", "A"): RULE,
    ("Assignments/s routed by each sidecar's ranks", "A"): LABELLED,
    ("Expert imbalance by layer (deployment)", "A"): RULE,
    ("Layer $layer: load by expert (deployment)", "A"): RULE,
    ("MoeDeploymentEPRankImbalance firing", "Anno"): "the deployment alert, on the rules above",
    ("namespace", "Var"): "the namespaces of sidecars with a deployment label: none (and the demo has no namespace)",
    ("deployment", "Var"): "the deployment label's values: none",
    ("layer", "Var"): LABELLED,
}


class Prom:
    def __init__(self, port: int):
        self.url = f"http://127.0.0.1:{port}"


@pytest.fixture(scope="module")
def demo(tiny_model, tmp_path_factory):
    """The demo, started as `make demo` starts it (keep-running), until its "keeps running" line; stopped by SIGTERM
    afterwards as Ctrl-C would."""
    workdir = tmp_path_factory.mktemp("demo")
    os.symlink(tiny_model[0], workdir / "model")  # no generation
    ports = {k: free_port() for k in ("vllm", "sidecar", "prometheus", "alertmanager", "receiver")}
    started = time.time()
    proc = subprocess.Popen([sys.executable, "-m", "moe_monitor.cli", "demo", "--workdir", str(workdir),
                             *[a for k, p in ports.items() for a in (f"--{k}-port", str(p))]],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    lines: list[str] = []
    ready = threading.Event()

    def read():
        for line in proc.stdout:
            lines.append(line.rstrip("\n"))
            if READY in line:
                ready.set()
        ready.set()  # the demo ended before it

    threading.Thread(target=read, daemon=True).start()
    try:
        ready.wait(420)
        wall = time.time() - started
        output = "\n".join(lines)
        print(f"\n`moe-monitor demo` ran {wall:.0f} s to '{READY}'")
        assert READY in output, output
        yield {"output": output, "ports": ports, "workdir": workdir, "started": started, "wall": wall,
               "sidecar": f"http://127.0.0.1:{ports['sidecar']}", "prom": Prom(ports["prometheus"]),
               "token": (workdir / up.TOKEN_FILE).read_text().strip()}
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            assert proc.wait(90) == 0
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)


def api(url: str, token: str | None = None, data: dict | None = None) -> tuple[int, bytes]:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    body = None if data is None else json.dumps(data).encode()
    req = urllib.request.Request(url, data=body, headers={**headers, "Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def alert_outcomes(sidecar: str) -> dict[str, float]:
    """The sidecar's moe_capture_alerts_total by outcome."""
    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(sidecar + "/metrics", timeout=10) as r:
        text = r.read().decode()
    return {s.labels["outcome"]: s.value for f in text_string_to_metric_families(text) for s in f.samples
            if s.name == "moe_capture_alerts_total"}


def test_the_alert_fires_and_a_capture_is_taken_on_its_own(demo):
    """The capture is the detector's or the alert's (Alertmanager → the sidecar's /api/alerts), whichever came
    first; the other is refused (cooldown, or busy while the first runs), which the demo says as well."""
    out = demo["output"]
    assert re.search(r"alert at the receiver: FIRING\s+MoeExpertImbalanceSustained", out), out
    taken = re.search(r">>> capture by (the detector|alert (\w+)):\s+(\S+), ok", out)
    assert taken, out
    by_alert, capture_id = taken.group(2) is not None, taken.group(3)
    print(f"\ncapture by {taken.group(1)}: {capture_id}; sidecar's alert outcomes {alert_outcomes(demo['sidecar'])}")
    if by_alert:  # MoeExpertImbalanceSustained, or MoeHotExpert when its notification reaches the sidecar first
        assert taken.group(2) in CAPTURE_ALERTS and "-alert-" in capture_id, taken.group(0)
    else:
        assert "-imbalance-" in capture_id, capture_id
    # the sidecar got the alert through Alertmanager's moe-sidecar receiver, and the demo says what it did with it
    outcomes = alert_outcomes(demo["sidecar"])
    assert sum(outcomes.values()) >= 1, outcomes
    said = re.search(r"the sidecar's /api/alerts:\s+(\d+ \w+.*)", out)
    assert said, out
    assert "captured" in said.group(1) or not by_alert, (said.group(0), taken.group(0))
    # what the demo prints of it: `traces show`, breakdown and flight record included
    reason = "alert" if by_alert else "imbalance"
    assert f"traces show {capture_id}\ncapture {capture_id}: {reason}, ok" in out, out
    # the breakdown line, wrapped at 80 columns (its continuation lines are indented); it leaves out categories
    # under 0.1 %, where the gate of this tiny model can fall on a loaded machine (CI, 2026-12-07): the gate is
    # checked in the whole breakdown, as `traces show --json` gives it
    shares = dict(re.findall(r"(\w+) ([\d.]+) %", re.search(r"^breakdown: (.*(?:\n  .*)*)", out, re.M).group(1)))
    assert float(shares["experts"]) > 0, shares
    env = {**os.environ, "MOE_MONITOR_API_TOKEN": demo["token"],
           "MOE_MONITOR_URL": demo["sidecar"].removeprefix("http://")}
    shown = subprocess.run([sys.executable, "-m", "moe_monitor.cli", "traces", "show", capture_id, "--json"], env=env,
                           capture_output=True, text=True, timeout=60)
    assert shown.returncode == 0, shown.stdout + shown.stderr
    breakdown = json.loads(shown.stdout)["breakdown"]
    assert breakdown["experts"] > 0 and breakdown["gate"] > 0, breakdown
    assert re.search(r"^flight record: \d+ windows", out, re.M), out


def test_the_captures_api_wants_the_generated_token(demo):
    token_file = demo["workdir"] / up.TOKEN_FILE
    assert stat.S_IMODE(token_file.stat().st_mode) == 0o600 and len(demo["token"]) >= 40
    assert f"export MOE_MONITOR_API_TOKEN=$(cat {token_file})" in demo["output"]
    sidecar = demo["sidecar"]
    assert api(f"{sidecar}/api/captures")[0] == 401
    assert api(f"{sidecar}/api/captures", "wrong")[0] == 401
    status, body = api(f"{sidecar}/api/captures", demo["token"])
    assert status == 200 and json.loads(body)["captures"], body
    # the CLI as the demo tells the user to run it: the token and the URL from the environment
    env = {**os.environ, "MOE_MONITOR_API_TOKEN": demo["token"], "MOE_MONITOR_URL": sidecar.removeprefix("http://")}
    listed = subprocess.run([sys.executable, "-m", "moe_monitor.cli", "traces", "list"], env=env, capture_output=True,
                            text=True, timeout=60)
    # the capture the demo waited for: the detector's (reason imbalance) or an alert's (reason alert)
    assert listed.returncode == 0 and re.search(r"^\S+-(imbalance|alert)-\S+ ", listed.stdout, re.M), \
        listed.stdout + listed.stderr


def test_top_shows_the_capture_on_an_80x24_screen(demo):
    import aiohttp

    from moe_monitor.top import core, render
    from moe_monitor.top.client import fetch

    async def poll():
        async with aiohttp.ClientSession(auto_decompress=False) as session:
            return await fetch(session, demo["sidecar"], demo["token"], flight_windows=6, captures=True)

    state = core.SidecarState(demo["sidecar"])
    state.apply(asyncio.run(poll()))
    assert state.error is None and state.captures_error is None, (state.error, state.captures_error)
    newest = state.captures[0]["id"]
    for view in render.VIEW_NAMES:
        text = render.screen([state], render.Ui(view=view, colour=False), 80, 24, time.time()).plain
        assert max(map(len, text.split("\n"))) <= 80 and text.count("\n") == 23
        if view == "detector":
            print("\n" + text)
            assert f" newest: {newest}" in text and "kernel breakdown of" in text, text


def test_every_dashboard_query_has_data_but_the_multi_node_ones(demo):
    prom = demo["prom"]
    # The newest capture's figures reach Prometheus a window and a scrape after the capture is stored.
    deadline = time.time() + 30
    while not prom_api(prom, "query", query="moe_capture_share")["result"] and time.time() < deadline:
        time.sleep(1)

    def values(label: str, match: str) -> list[str]:
        return prom_api(prom, f"label/{label}/values", **{"match[]": match})

    variables = {"datasource": "prometheus", "job": ["moe-monitor"],
                 "instance": values("instance", 'up{job="moe-monitor"}'),
                 "model": values("model", 'moe_model_info{job="moe-monitor"}'),
                 "layer": values("layer", 'moe_layer_observable{job="moe-monitor"}'),
                 "deployment": values("deployment", 'moe_monitor_build_info{job="moe-monitor", deployment!=""}'),
                 "namespace": ""}  # no namespace on the demo's target: Grafana leaves the variable empty
    assert variables["instance"] and variables["model"] and variables["layer"] and not variables["deployment"]
    end = time.time()
    span = int(end - demo["started"]) + 1
    empty, checked, panels, panels_with_data = [], 0, 0, 0
    for name, dash in dashboards.build(load_config(up.DEMO_THRESHOLDS)).items():
        n, missing = queries_without_data(prom, dash, variables, end - span, end, 2, rate_interval="8s",
                                          range_=f"{span}s", interval="2s")
        checked += n
        empty += [(name, m) for m in missing]
        panels += sum(q.kind == queries.PANEL for q in queries.panel_queries(dash))
        panels_with_data += sum(q.kind == queries.PANEL for q in queries.panel_queries(dash)) - \
            sum(" [panel " in m for m in missing)
    print(f"\ndemo ({demo['wall']:.0f} s): {panels_with_data} of {panels} panel queries return data; "
          f"{checked - len(empty)} of {checked} queries with annotations and variables")
    # the demo's vLLM has one EP rank: the imbalance-cost panels have no series (test_deployment_view runs them
    # over EP=4 sidecars with a real EP capture)
    one_ep_rank = [m for d, m in empty if d == "moe-overview.json" and m.startswith(NEEDS_EP)]
    assert len(one_ep_rank) == 3, one_ep_rank
    unexpected = [f"{d} / {m}" for d, m in empty if d != "moe-deployment.json" and m not in one_ep_rank]
    assert not unexpected, "queries without data in the demo:\n" + "\n".join(unexpected)
    found = {(m.split(" [")[0], m.split(" [")[1].split("]")[0].split()[-1]) for d, m in empty if m not in one_ep_rank}
    assert found == set(DEPLOYMENT_ONLY), f"unexplained: {found - set(DEPLOYMENT_ONLY)}; " \
        f"have data now (drop them from DEPLOYMENT_ONLY): {set(DEPLOYMENT_ONLY) - found}"


def test_on_call_triggers_a_capture_with_the_demo_token(demo):
    """Last (it adds a capture): `traces trigger --wait`, as the demo prints it, under a little traffic (a capture
    ends after its engine steps)."""
    from moe_monitor.demo import workload

    stop = threading.Event()
    traffic = threading.Thread(target=workload.run_until, daemon=True,
                               args=(f"http://127.0.0.1:{demo['ports']['vllm']}", stop.is_set), kwargs={"seed": 7})
    env = {**os.environ, "MOE_MONITOR_API_TOKEN": demo["token"], "MOE_MONITOR_URL": demo["sidecar"]}
    traffic.start()
    try:
        done = subprocess.run([sys.executable, "-m", "moe_monitor.cli", "traces", "trigger", "--reason", "a look",
                               "--wait"], env=env, capture_output=True, text=True, timeout=180)
    finally:
        stop.set()
        traffic.join(60)
    assert done.returncode == 0, done.stdout + done.stderr
    assert re.search(r"^capture \S+-manual-\S+: manual, ok", done.stdout, re.M), done.stdout
