"""Alertmanager's webhook (payload version 4) read and judged: which alerts of a notification get a profiler
capture, pure code (the HTTP edge is sidecar/server.py, the budget and the capture capture/control.py).

A notification is checked whole before anything is done: a body that is not a version-4 payload of bounded size
and shape raises PayloadError naming what is wrong, and nothing changes. An alert is *ours* when its alertname is
one of the shipped rules' routing and step-time alerts (CAPTURE_ALERTS): alert names are fixed in
moe_monitor/mixin/rules.py whatever the thresholds or selector, so this needs no label on the rules and still
holds for a mixin TOML of one's own. Health alerts of the monitoring itself (the sidecar down, stale segments, the
profiler off, captures failing) are not captured: a trace shows nothing about them, and a capture to answer
MoeCapturesFailing could fail and feed it.

An alert is known by (fingerprint, startsAt): Alertmanager sends a firing alert again every repeat_interval and
with every change of its group, with the same pair; a new firing after a resolve has a new startsAt.
"""

from __future__ import annotations

import ipaddress
import json
import re
from collections import OrderedDict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from types import MappingProxyType

from moe_monitor.schema.capture_record import CaptureMeta

# The shipped rules' alerts a trace of the moment explains (routing and step time); tests/test_alert_intake.py
# checks that these and HEALTH_ALERTS are exactly the generated rules' alerts.
CAPTURE_ALERTS = frozenset({"MoeExpertImbalanceSustained", "MoeHotExpert", "MoeDeadExperts", "MoeEPRankImbalance",
                            "MoeDeploymentEPRankImbalance", "MoeStepTimeRegression", "MoeLayerSilent"})
HEALTH_ALERTS = frozenset({"MoeSidecarDown", "MoeSegmentsStale", "MoeCapturesFailing", "MoeProfilerDisabled",
                           "MoeEplbRearrangementStalled"})

FILE = "alert.json"  # stored beside a capture's traces: the notification and the alerts it captured
MAX_BODY_BYTES = 1 << 20  # a notification's body; Alertmanager's webhook max_alerts bounds it at the source
MAX_ALERTS = 1000  # alerts in one notification
MAX_LABELS = 64  # labels (or annotations) of one alert
MAX_TEXT = 8192  # characters of one label or annotation value, a URL, a time
MAX_SEEN = 4096  # alerts remembered for deduplication (the oldest forgotten first)
FINGERPRINT = re.compile(r"^[0-9a-f]{1,64}$")
LABEL_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,127}$")
RFC3339 = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d{1,9})?(Z|[+-]\d\d:\d\d)$")


class PayloadError(ValueError):
    """The body is not an Alertmanager webhook payload of version 4 within the bounds; the message says why."""


@dataclass(frozen=True)
class Alert:
    status: str  # firing | resolved
    labels: MappingProxyType
    annotations: MappingProxyType
    starts_at: str
    ends_at: str
    fingerprint: str
    generator_url: str

    @property
    def name(self) -> str:
        return self.labels.get("alertname", "")

    @property
    def key(self) -> tuple[str, str]:
        """One firing of one alert: the same in Alertmanager's repeats and group updates, new after a resolve."""
        return self.fingerprint, self.starts_at

    def to_json(self) -> dict:
        return {"status": self.status, "labels": dict(self.labels), "annotations": dict(self.annotations),
                "startsAt": self.starts_at, "endsAt": self.ends_at, "fingerprint": self.fingerprint,
                "generatorURL": self.generator_url}


@dataclass(frozen=True)
class Notification:
    receiver: str
    status: str
    alerts: tuple[Alert, ...]
    group_labels: MappingProxyType
    common_labels: MappingProxyType
    common_annotations: MappingProxyType
    external_url: str
    group_key: str
    truncated_alerts: int

    def envelope(self) -> dict:
        """The notification without its alerts (stored with each capture it causes)."""
        return {"receiver": self.receiver, "status": self.status, "groupLabels": dict(self.group_labels),
                "commonLabels": dict(self.common_labels), "commonAnnotations": dict(self.common_annotations),
                "externalURL": self.external_url,
                "groupKey": self.group_key, "truncatedAlerts": self.truncated_alerts}


def parse(raw: bytes) -> Notification:
    """The notification in `raw`, checked whole; PayloadError otherwise."""
    if len(raw) > MAX_BODY_BYTES:
        raise PayloadError(f"the body is over {MAX_BODY_BYTES} bytes")
    try:
        doc = json.loads(raw)
    except (ValueError, RecursionError):  # not JSON, not UTF-8, nested past Python's recursion limit
        raise PayloadError("the body is not UTF-8 JSON") from None
    if not isinstance(doc, dict):
        raise PayloadError("the body is not a JSON object (an Alertmanager webhook payload)")
    if doc.get("version", "4") != "4":
        raise PayloadError(f"payload version {_shown(doc.get('version'))}: only version 4 is read")
    alerts = doc.get("alerts")
    if not isinstance(alerts, list) or not alerts:
        raise PayloadError("alerts is not a non-empty list")
    if len(alerts) > MAX_ALERTS:
        raise PayloadError(f"{len(alerts)} alerts, over {MAX_ALERTS} in one notification")
    truncated = doc.get("truncatedAlerts", 0)
    if not isinstance(truncated, int) or isinstance(truncated, bool) or truncated < 0:
        raise PayloadError("truncatedAlerts is not a whole number >= 0")
    return Notification(receiver=_text(doc, "receiver"), status=_status(doc.get("status"), "status"),
                        alerts=tuple(_alert(a, i) for i, a in enumerate(alerts)),
                        group_labels=_labels(doc.get("groupLabels", {}), "groupLabels"),
                        common_labels=_labels(doc.get("commonLabels", {}), "commonLabels"),
                        common_annotations=_labels(doc.get("commonAnnotations", {}), "commonAnnotations"),
                        external_url=_text(doc, "externalURL"), group_key=_text(doc, "groupKey"),
                        truncated_alerts=truncated)


def _alert(a, i: int) -> Alert:
    where = f"alerts[{i}]"
    if not isinstance(a, dict):
        raise PayloadError(f"{where} is not an object")
    labels = _labels(a.get("labels"), f"{where}.labels")
    if not labels.get("alertname"):
        raise PayloadError(f"{where} has no alertname label")
    fingerprint = a.get("fingerprint")
    if not isinstance(fingerprint, str) or not FINGERPRINT.match(fingerprint):
        raise PayloadError(f"{where}.fingerprint {_shown(fingerprint)} is not a hex fingerprint")
    starts_at = a.get("startsAt")
    if not isinstance(starts_at, str) or not RFC3339.match(starts_at):
        raise PayloadError(f"{where}.startsAt {_shown(starts_at)} is not an RFC 3339 time")
    return Alert(status=_status(a.get("status"), f"{where}.status"), labels=labels,
                 annotations=_labels(a.get("annotations", {}), f"{where}.annotations"), starts_at=starts_at,
                 ends_at=_text(a, "endsAt", where), fingerprint=fingerprint,
                 generator_url=_text(a, "generatorURL", where))


def _status(value, where: str) -> str:
    if value not in ("firing", "resolved"):
        raise PayloadError(f"{where} {_shown(value)} is neither firing nor resolved")
    return value


def _labels(value, where: str) -> MappingProxyType:
    if not isinstance(value, dict):
        raise PayloadError(f"{where} is not an object")
    if len(value) > MAX_LABELS:
        raise PayloadError(f"{where} has {len(value)} entries, over {MAX_LABELS}")
    for k, v in value.items():
        if not LABEL_NAME.match(k):
            raise PayloadError(f"{where}: {_shown(k)} is not a label name")
        if not isinstance(v, str) or len(v) > MAX_TEXT:
            raise PayloadError(f"{where}.{k} is not a string of at most {MAX_TEXT} characters")
    return MappingProxyType(dict(value))


def _text(doc: dict, key: str, where: str = "") -> str:
    value = doc.get(key, "")
    if not isinstance(value, str) or len(value) > MAX_TEXT:
        raise PayloadError(f"{where + '.' if where else ''}{key} is not a string of at most {MAX_TEXT} characters")
    return value


def _shown(value) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


# -- what is done with each alert -----------------------------------------------------------------------------

CAPTURED, DEDUPLICATED, RESOLVED, NOT_OURS, OTHER = "captured", "deduplicated", "resolved", "not_ours", \
    "other_instance"
FORWARDED, FORWARD_FAILED = "forwarded", "forward_failed"


class Seen:
    """The firings (fingerprint, startsAt) a capture was started for, and its id; bounded (the oldest go first).
    A firing that got no capture (cooldown, budget, busy) is not remembered: a later notification of it may still
    get one, within the budget."""

    def __init__(self, limit: int = MAX_SEEN) -> None:
        self.limit = limit
        self._ids: OrderedDict[tuple[str, str], str] = OrderedDict()

    def get(self, key: tuple[str, str]) -> str | None:
        return self._ids.get(key)

    def add(self, key: tuple[str, str], capture_id: str) -> None:
        self._ids[key] = capture_id
        self._ids.move_to_end(key)
        while len(self._ids) > self.limit:
            self._ids.popitem(last=False)

    def __len__(self) -> int:
        return len(self._ids)


def classify(note: Notification, seen: Seen, instances: frozenset[str] = frozenset()
             ) -> list[tuple[Alert, str | None, str | None]]:
    """(alert, outcome, capture id) per alert; outcome None for the firing alerts of ours seen for the first time
    (the candidates for one capture). An alert listed twice in one notification counts once. `instances`: the
    instance labels this sidecar answers for (empty: any); an alert without one (a deployment's) is not refused."""
    out, fresh = [], set()
    for a in note.alerts:
        if a.status == "resolved":
            out.append((a, RESOLVED, None))
        elif a.name not in CAPTURE_ALERTS:
            out.append((a, NOT_OURS, None))
        elif foreign(a, instances):
            out.append((a, OTHER, None))
        elif (capture_id := seen.get(a.key)) is not None or a.key in fresh:
            out.append((a, DEDUPLICATED, capture_id))
        else:
            fresh.add(a.key)
            out.append((a, None, None))
    return out


def foreign(alert: Alert, instances: frozenset[str]) -> bool:
    """A firing alert of ours about an instance that --alert-instances does not name (empty: none is foreign)."""
    return (bool(instances) and alert.status == "firing" and alert.name in CAPTURE_ALERTS
            and alert.labels.get("instance", "") not in instances | {""})


def evidence(alert: Alert, alerts: int) -> dict:
    """A capture's evidence for the first alert it captures (`alerts`: how many it captures)."""
    return {"reason": "alert", "signal": alert.name, "alertname": alert.name, "startsAt": alert.starts_at,
            "fingerprint": alert.fingerprint, "labels": dict(alert.labels), "annotations": dict(alert.annotations),
            "alerts": alerts}


def bundle_file(note: Notification, alerts: list[Alert], received: float) -> bytes:
    """alert.json: the notification's envelope and the alerts the capture is for."""
    return json.dumps({**note.envelope(), "received": received, "alerts": [a.to_json() for a in alerts]},
                      indent=1).encode()


def seen_in(captures: list[CaptureMeta]) -> list[tuple[tuple[str, str], str]]:
    """((fingerprint, startsAt), capture id) of the alert captures in a catalog listing, oldest first: a restarted
    sidecar deduplicates against what it stored."""
    return [(key, meta.id) for meta in reversed(captures) if meta.reason == "alert" for key in meta.alert_keys]


# -- forwarding to the peers (--alert-peers): which alerts go where, pure; the HTTP edge is sidecar/forward.py ------
#
# A sidecar contacts no address taken from a label unless the DNS of a configured peer name says it is a peer: an
# alert's instance must be IP:PORT (an IP literal, IPv6 in brackets), PORT a peer entry's and IP among that entry's
# name resolved now. A notification that a peer forwarded carries FORWARDED_BY and is never forwarded again.

FORWARDED_BY = "X-Moe-Monitor-Forwarded-By"
PEER_NAME = re.compile(r"^[A-Za-z0-9]([A-Za-z0-9.-]{0,252})$")
PORT = re.compile(r"^[0-9]{1,5}$")
MAX_PEERS = 16


@dataclass(frozen=True)
class Peer:
    name: str  # a DNS name (a headless Service's) or an IP literal, resolved per notification
    port: int


def parse_peers(text: str) -> tuple[Peer, ...]:
    """--alert-peers: comma-separated NAME:PORT; ValueError naming the bad entry."""
    peers = []
    for entry in (e.strip() for e in text.split(",")):
        if not entry:
            continue
        name, sep, port = entry.rpartition(":")
        if not sep or not PEER_NAME.match(name) or not PORT.match(port) or not 0 < int(port) < 65536:
            raise ValueError(f"alert_peers: {entry!r} is not NAME:PORT (e.g. moe-monitor-peers.ns.svc:9464)")
        peers.append(Peer(name, int(port)))
    if not peers or len(peers) > MAX_PEERS:
        raise ValueError(f"alert_peers: 1 to {MAX_PEERS} NAME:PORT entries, got {len(peers)}")
    return tuple(peers)


def instance_address(instance: str) -> tuple[str, int] | None:
    """(IP, port) of an instance label IP:PORT, the IP normalised; None for anything else (a host name, a path,
    userinfo, an IPv6 zone, a port out of range)."""
    host, sep, port = instance.rpartition(":")
    if not sep or not PORT.match(port) or not 0 < int(port) < 65536:
        return None
    bracketed = host.startswith("[") and host.endswith("]")
    try:
        ip = ipaddress.IPv6Address(host[1:-1]) if bracketed else ipaddress.IPv4Address(host)
    except ValueError:
        return None
    return None if getattr(ip, "scope_id", None) else (str(ip), int(port))


def url_of(ip: str, port: int) -> str:
    """The webhook URL of a peer's sidecar at (IP, port)."""
    host = f"[{ip}]" if ":" in ip else ip
    return f"http://{host}:{port}/api/alerts"


def route(alerts: Iterable[Alert], peers: Iterable[Peer], resolved: Mapping[str, Iterable[str]]
          ) -> dict[tuple[str, int], list[Alert]]:
    """The foreign alerts to forward, by peer (IP, port): those whose instance is a peer's address. `resolved`: each
    peer name's addresses now (a name missing or empty resolves to nothing). The others are not forwarded."""
    out: dict[tuple[str, int], list[Alert]] = {}
    addresses = {name: {_normal(x) for x in found} for name, found in resolved.items()}  # each name's, normalised once
    for a in alerts:
        address = instance_address(a.labels.get("instance", ""))
        if address is None:
            continue
        ip, port = address
        for peer in peers:
            if peer.port == port and ip in addresses.get(peer.name, ()):
                out.setdefault(address, []).append(a)
                break
    return out


def _normal(ip: str) -> str | None:
    try:
        return str(ipaddress.ip_address(ip))
    except ValueError:
        return None


def forward_body(note: Notification, alerts: list[Alert]) -> bytes:
    """The notification a peer gets: the same envelope, only its alerts."""
    return json.dumps({"version": "4", **note.envelope(), "alerts": [a.to_json() for a in alerts]}).encode()


def peer_outcomes(body: bytes, alerts: list[Alert]) -> dict[tuple[str, str], dict]:
    """What the peer said of each forwarded alert ({"outcome", "id"?}), from its answer; {} for an answer that is not
    the sidecar's, an alert it does not list gets none."""
    try:
        doc = json.loads(body)
    except (ValueError, RecursionError):
        return {}
    listed = doc.get("alerts") if isinstance(doc, dict) else None
    keys, out = {a.key for a in alerts}, {}
    for entry in listed if isinstance(listed, list) else ():
        if not isinstance(entry, dict):
            continue
        key = (entry.get("fingerprint"), entry.get("startsAt"))
        said = {k: entry[k] for k in ("outcome", "id") if isinstance(entry.get(k), str) and len(entry[k]) <= 128}
        if key in keys and "outcome" in said:
            out[key] = said
    return out
