"""--alert-peers: which alerts of a notification go on to which peer's sidecar (capture/alerts.py `route`, pure),
with hostile instance labels and peer names, and the edge (sidecar/forward.py) against a real aiohttp peer on
loopback: what it is sent, the loop header, a down peer, and no request to an address that is not a peer's. Two
real sidecars behind a real Alertmanager: tests/test_e2e_incident.py."""

from __future__ import annotations

import asyncio
import json

import pytest
from aiohttp import web
from test_alert_intake import alert, control, note, outcomes, raw  # noqa: F401 - control: a fixture

from moe_monitor.capture import alerts as am
from moe_monitor.sidecar.config import SidecarConfig
from moe_monitor.sidecar.forward import Forwarder

PEERS = am.parse_peers("peers.ns.svc:9464")
RESOLVED = {"peers.ns.svc": {"10.0.0.2", "10.0.0.3", "fd00::2"}}


def routed(*instances: str, peers=PEERS, resolved=RESOLVED) -> dict:
    n = am.parse(raw(note(*(alert(fingerprint=f"{i:x}", instance=x) for i, x in enumerate(instances)))))
    return {target: [a.labels["instance"] for a in alerts] for target, alerts in am.route(n.alerts, peers,
                                                                                          resolved).items()}


def test_an_alert_about_a_peer_goes_to_that_peer_only():
    assert routed("10.0.0.2:9464", "10.0.0.3:9464", "10.0.0.2:9464") == {
        ("10.0.0.2", 9464): ["10.0.0.2:9464", "10.0.0.2:9464"], ("10.0.0.3", 9464): ["10.0.0.3:9464"]}
    assert routed("[fd00:0::2]:9464") == {("fd00::2", 9464): ["[fd00:0::2]:9464"]}  # normalised
    assert am.url_of("fd00::2", 9464) == "http://[fd00::2]:9464/api/alerts"


HOSTILE_INSTANCES = [
    "10.0.0.9:9464",  # not among the name's addresses
    "10.0.0.2:8000",  # a peer's address, another port
    "10.0.0.2:9464/../admin", "10.0.0.2:9464/x",  # a path
    "user@10.0.0.2:9464", "10.0.0.2@evil.example:9464",  # userinfo
    "fd00::2:9464", "[fd00::2%eth0]:9464", "[10.0.0.2]:9464",  # IPv6 unbracketed, a zone, IPv4 in brackets
    "10.0.0.2:http", "10.0.0.2:+9464", "10.0.0.2:٩٤٦٤", "10.0.0.2:99999", "10.0.0.2:0", "10.0.0.2:",  # ports
    "peers.ns.svc:9464", "localhost:9464", "010.0.0.2:9464", "10.0.0.2", "http://10.0.0.2:9464", "",
]


@pytest.mark.parametrize("instance", HOSTILE_INSTANCES)
def test_a_hostile_instance_label_is_never_routed(instance):
    assert routed(instance) == {}


def test_a_peer_name_that_does_not_resolve_routes_nothing():
    assert routed("10.0.0.2:9464", resolved={}) == {}
    assert routed("10.0.0.2:9464", resolved={"peers.ns.svc": set()}) == {}
    assert routed("10.0.0.2:9464", resolved={"peers.ns.svc": {"not an ip"}}) == {}


@pytest.mark.parametrize("text", ["", ",", "peers", "peers:", "peers:x", "peers:0", "peers:70000", ":9464",
                                  "user@peers:9464", "peers/x:9464", "-peers:9464", "[::1]:9464",
                                  ",".join(["p:1"] * (am.MAX_PEERS + 1))])
def test_bad_peer_lists_are_refused(text):
    with pytest.raises(ValueError, match="alert_peers"):
        am.parse_peers(text)


def test_the_flag_needs_alert_instances():
    with pytest.raises(ValueError, match="needs --alert-instances"):
        SidecarConfig(alert_peers="peers:9464")
    assert SidecarConfig(alert_instances="10.0.0.1:9464", alert_peers="a:1, b.c:2").alert_peer_list == (
        am.Peer("a", 1), am.Peer("b.c", 2))


def test_the_forwarded_notification_keeps_the_envelope_and_only_its_alerts():
    n = am.parse(raw(note(alert(fingerprint="aa", instance="10.0.0.2:9464"), alert(fingerprint="bb"))))
    sent = am.parse(am.forward_body(n, [n.alerts[0]]))
    assert sent.envelope() == n.envelope() and sent.alerts == (n.alerts[0],)


def test_the_peers_answer_is_read_defensively():
    a = am.parse(raw(note(alert(fingerprint="aa")))).alerts
    good = {"alerts": [{"fingerprint": "aa", "startsAt": "2026-12-07T03:00:00Z", "outcome": "captured", "id": "x"}]}
    assert am.peer_outcomes(json.dumps(good).encode(), list(a)) == {a[0].key: {"outcome": "captured", "id": "x"}}
    for body in [b"", b"junk", b"[]", b'{"alerts": 3}', b'{"alerts": [1, {"fingerprint": "zz"}]}',
                 json.dumps({"alerts": [{**good["alerts"][0], "outcome": 5}]}).encode(), b"[" * 100_000]:
        assert am.peer_outcomes(body, list(a)) == {}


def test_forwarded_alerts_are_counted_as_such_with_the_peers_word(control):  # noqa: F811 - the fixture
    ctl, capturer, _ = control
    n = notification(("aa", "10.0.0.2:9464"), ("bb", "10.0.0.3:9464"), ("cc", "10.0.0.9:9464"),
                     ("dd", "10.0.0.1:9464"))
    said = {"outcome": "captured", "id": "cap-1"}
    answer = ctl.alerts(n, frozenset({"10.0.0.1:9464"}), {("aa", "2026-12-07T03:00:00Z"): ("forwarded", said),
                                                          ("bb", "2026-12-07T03:00:00Z"): ("forward_failed", None)})
    assert outcomes(answer) == ["forwarded", "forward_failed", "other_instance", "captured"]
    assert answer[0]["peer"] == said and "peer" not in answer[1] and len(capturer.started) == 1
    assert {k: v for k, v in capturer.alert_outcomes.items() if v} == {
        "forwarded": 1, "forward_failed": 1, "other_instance": 1, "captured": 1}


# -- the edge, against a real peer on loopback --------------------------------------------------------------------

class Peer:
    """A stand-in for a peer's sidecar: records what it is sent, answers `status`."""

    def __init__(self, status: int = 200) -> None:
        self.status, self.requests = status, []

    async def handle(self, request: web.Request) -> web.Response:
        body = json.loads(await request.read())
        self.requests.append((request.path, dict(request.headers), body))
        return web.json_response({"alerts": [{"fingerprint": a["fingerprint"], "startsAt": a["startsAt"],
                                              "outcome": "captured", "id": "cap-1"} for a in body["alerts"]]},
                                 status=self.status, headers={"Location": "/api/alerts"} if 300 <= self.status < 400
                                 else None)


def notification(*instances_with_fingerprint) -> am.Notification:
    return am.parse(raw(note(*(alert(fingerprint=f, instance=x) for f, x in instances_with_fingerprint))))


def test_the_peer_gets_its_alerts_with_the_token_and_the_loop_header():
    peer = Peer()
    n = notification(("aa", "127.0.0.1:PORT"), ("bb", "10.0.0.1:9464"), ("cc", "10.9.9.9:9464"))
    got, asked = asyncio.run(forward_via(n, peer))
    assert asked == ["localhost"]
    ((path, headers, body),) = peer.requests
    assert path == "/api/alerts" and headers["Authorization"] == "Bearer tok"
    assert headers[am.FORWARDED_BY] == "10.0.0.1:9464"
    assert [a["fingerprint"] for a in body["alerts"]] == ["aa"] and body["receiver"] == "moe-sidecar"
    assert got == {("aa", "2026-12-07T03:00:00Z"): ("forwarded", {"outcome": "captured", "id": "cap-1"})}


async def forward_via(n: am.Notification, peer: Peer, forwarded_by: str | None = None, down: bool = False):
    """Forwarder.forward with the peer on 127.0.0.1:<port> (PORT in the instance labels is replaced by it once it
    listens; `down`: closed again before), the peer name `localhost` resolved by a stub that records what it is
    asked. (what forward returned, the names resolved)."""
    app = web.Application()
    app.router.add_post("/api/alerts", peer.handle)
    runner = web.AppRunner(app)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    port = runner.addresses[0][1]
    if down:
        await runner.cleanup()
    doc = json.loads(am.forward_body(n, list(n.alerts)))
    for a in doc["alerts"]:
        a["labels"]["instance"] = a["labels"]["instance"].replace("PORT", str(port))
    asked = []

    async def resolve(name):
        asked.append(name)
        return frozenset({"127.0.0.1"}) if name == "localhost" else frozenset()

    f = Forwarder((am.Peer("localhost", port),), frozenset({"10.0.0.1:9464"}), "10.0.0.1:9464", "tok", resolve)
    try:
        return await f.forward(am.parse(json.dumps(doc).encode()), forwarded_by), asked
    finally:
        await runner.cleanup()


def test_a_forwarded_notification_is_never_forwarded_again():
    peer = Peer()
    got, asked = asyncio.run(forward_via(notification(("aa", "127.0.0.1:PORT")), peer, "10.0.0.2:9464"))
    assert got == {} and peer.requests == [] and asked == []


def test_a_label_naming_an_address_no_peer_has_is_never_contacted():
    peer = Peer()
    for instance in ("127.0.0.2:PORT", "localhost:PORT", "127.0.0.1:PORT/x", "user@127.0.0.1:PORT"):
        got, _ = asyncio.run(forward_via(notification(("aa", instance)), peer))
        assert got == {}
    assert peer.requests == []


def test_a_peer_that_fails_redirects_or_is_down_is_forward_failed():
    key = ("aa", "2026-12-07T03:00:00Z")
    for peer, down in [(Peer(status=503), False), (Peer(status=307), False), (Peer(), True)]:
        got, _ = asyncio.run(forward_via(notification(("aa", "127.0.0.1:PORT")), peer, down=down))
        assert got == {key: ("forward_failed", None)}, (peer.status, down)
        assert len(peer.requests) == (0 if down else 1)
