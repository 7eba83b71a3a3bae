"""Issue #26 item 5: one --url convention for every client, against a real sidecar and a real Prometheus.
Before: `traces list --url X` failed (--url only before the subcommand, unlike eplb and top; deploy/README.md
showed the failing form), `traces --url 127.0.0.1:9464` failed where top took host:port, and `traces --url
<prometheus>` said "404". Now --url goes before or after the subcommand, HOST:PORT means http://HOST:PORT
everywhere, and a server that answers but is not a sidecar is named as such."""

from __future__ import annotations

import os
import subprocess
import sys
import time
import urllib.error
import urllib.request

import pytest
from conftest import free_port
from test_top import TOKEN, Tmux, fed_sidecar, top_command

from moe_monitor import __version__
from moe_monitor.demo import promstack
from moe_monitor.schema.api import SIDECAR_HEADER

ID = "20261123T120000Z-manual-abcdef"


def cli(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    environ = {k: v for k, v in os.environ.items() if not k.startswith("MOE_MONITOR_")}
    return subprocess.run([sys.executable, "-m", "moe_monitor.cli", *args], capture_output=True, text=True,
                          timeout=120, env={**environ, **(env or {})})


@pytest.fixture(scope="module")
def sidecar(tmp_path_factory):
    """A real sidecar fed by the plugin's segment writer (the flight record has windows), captures on."""
    with fed_sidecar(tmp_path_factory.mktemp("urls"), ready="/readyz") as proc:
        yield proc, proc.url.removeprefix("http://")


@pytest.fixture(scope="module")
def prometheus(tmp_path_factory):
    pytest.importorskip("yaml")
    try:
        promstack.check_available()
    except promstack.MissingTool as e:
        pytest.skip(str(e))
    prom = promstack.start_prometheus(str(tmp_path_factory.mktemp("prom")), free_port(), [], None, "groups: []\n")
    try:
        prom.wait_ready("/-/ready", 60)
        yield prom
    finally:
        prom.stop()


@pytest.mark.slow
def test_url_goes_before_or_after_the_subcommand_and_host_port_is_http(sidecar):
    proc, where = sidecar
    token = ("--token", TOKEN)
    after = cli("traces", "list", "--url", where, *token)  # deploy/README.md's form, which failed
    assert after.returncode == 0 and "no captures" in after.stdout, after.stderr
    assert cli("traces", "--url", where, *token, "list").stdout == after.stdout
    wins = cli("traces", "--url", "http://127.0.0.1:1", "--token", "wrong", "list", "--url", where, *token)
    assert wins.returncode == 0, "after the subcommand wins over before it"
    by_env = cli("traces", "list", env={"MOE_MONITOR_URL": where, "MOE_MONITOR_API_TOKEN": TOKEN})
    assert by_env.returncode == 0 and by_env.stdout == after.stdout, by_env.stderr
    capture_id = cli("traces", "trigger", "--reason", "urls", "--wait", "--url", f"{where}/", *token)
    assert capture_id.returncode == 0 and ", ok, " in capture_id.stdout, capture_id.stderr
    assert ", ok, " in cli("traces", "show", capture_id.stdout.split()[0], "--url", where, *token).stdout

    deadline = time.monotonic() + 30
    while True:  # eplb needs a few windows of the flight record
        plan = cli("eplb", "--live", "--url", where, "--gpus", "4", "--redundant", "0,4", *token)
        if plan.returncode == 0 or time.monotonic() > deadline:
            break
        time.sleep(1)
    assert plan.returncode == 0 and "enable EPLB" in plan.stdout, plan.stderr

    term = Tmux(top_command() + ["--url", where])
    try:
        term.wait("top/test", "[1 Layers]")
        term.quit()
    finally:
        term.close()


@pytest.mark.slow
def test_a_prometheus_is_named_not_a_sidecar_by_every_client(prometheus):
    where = prometheus.url.removeprefix("http://")
    for args in (["traces", "list"], ["traces", "show", ID], ["traces", "pull", ID, "--out", "/nonexistent/x"],
                 ["traces", "trigger", "--reason", "x", "--wait"], ["eplb", "--live", "--gpus", "2"],
                 ["eplb", "--capture", ID, "--gpus", "2"]):
        r = cli(*args, "--url", where)
        lines = r.stderr.strip().splitlines()
        assert r.returncode == 1 and len(lines) == 1, (args, r.stderr)
        assert lines[0].startswith("Error: ") and f"{prometheus.url} is not a moe-monitor sidecar" in lines[0], lines
        assert "answered 404" in lines[0] or "answered 405" in lines[0], lines  # what it did answer
    term = Tmux(top_command() + ["--url", where])
    try:
        term.wait("this is not a moe-monitor sidecar", "no moe_ series (a Prometheus?)")
    finally:
        term.close()
    # and Prometheus itself is still a Prometheus to eplb --prometheus (HOST:PORT too): no data, said so
    r = cli("eplb", "--prometheus", where, "--gpus", "2")
    assert r.returncode == 1 and "not a moe-monitor sidecar" not in r.stderr and "Prometheus" in r.stderr, r.stderr


def test_every_sidecar_answer_says_it_is_one(sidecar):
    proc, _ = sidecar
    for path, status in (("/metrics", 200), ("/healthz", 200), ("/readyz", 200), ("/", 200), ("/nope", 404),
                         ("/api/captures", 401)):
        try:
            with urllib.request.urlopen(proc.url + path, timeout=10) as r:
                got, headers = r.status, r.headers
        except urllib.error.HTTPError as e:
            got, headers = e.code, e.headers
        assert (got, headers.get(SIDECAR_HEADER)) == (status, __version__), (path, got, dict(headers))
