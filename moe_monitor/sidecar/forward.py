"""The HTTP edge of --alert-peers: other instances' alerts sent on to the sidecar of their instance (which is which:
capture/alerts.py `route`, pure). On Kubernetes an Alertmanager webhook reaches one random pod of the Service; the
alerts about another pod go on to that pod's sidecar (docs/incidents.md).

Each notification: the peer names resolved now (off the event loop), each peer sent its alerts in one POST with this
sidecar's API token and FORWARDED_BY, concurrently, 5 s in all, redirects not followed; a notification that carries
FORWARDED_BY is never sent on again."""

from __future__ import annotations

import asyncio
import logging
import socket

import aiohttp

from moe_monitor.capture import alerts as am

log = logging.getLogger(__name__)

TIMEOUT_S = 5.0
MAX_ANSWER_BYTES = 1 << 20


class Forwarder:
    def __init__(self, peers: tuple[am.Peer, ...], instances: frozenset[str], me: str, token: str | None,
                 resolve=None) -> None:
        self.peers, self.instances, self.me, self.token = peers, instances, me, token
        self._resolve = resolve or _resolve

    @classmethod
    def of(cls, cfg) -> Forwarder:
        """The sidecar's: --alert-peers, --alert-instances (the first names this sidecar), --api-token."""
        return cls(cfg.alert_peer_list, cfg.alert_instance_set, (cfg.alert_instances or "").split(",")[0].strip(),
                   cfg.api_token)

    async def forward(self, note: am.Notification, forwarded_by: str | None
                      ) -> dict[tuple[str, str], tuple[str, dict | None]]:
        """(forwarded or forward_failed, the peer's word on it) by alert key, for the alerts sent on; {} when there
        are no peers, the notification was itself forwarded, or no foreign alert is a peer's."""
        foreign = [a for a in note.alerts if am.foreign(a, self.instances)]
        if not self.peers or forwarded_by is not None or not foreign:
            return {}
        names = sorted({p.name for p in self.peers})
        found = await asyncio.gather(*(self._resolve(n) for n in names))
        plan = am.route(foreign, self.peers, dict(zip(names, found)))
        if not plan:
            return {}
        out: dict[tuple[str, str], tuple[str, dict | None]] = {}
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=TIMEOUT_S)) as session:
            sent = await asyncio.gather(*(self._post(session, note, target, alerts)
                                          for target, alerts in plan.items()))
        for part in sent:
            out.update(part)
        return out

    async def _post(self, session: aiohttp.ClientSession, note: am.Notification, target: tuple[str, int],
                    alerts: list[am.Alert]) -> dict[tuple[str, str], tuple[str, dict | None]]:
        url = am.url_of(*target)
        headers = {"Content-Type": "application/json", am.FORWARDED_BY: self.me,
                   **({"Authorization": f"Bearer {self.token}"} if self.token else {})}
        try:
            async with session.post(url, data=am.forward_body(note, alerts), headers=headers,
                                    allow_redirects=False) as r:
                body = await _bounded(r)
                if not 200 <= r.status < 300:
                    raise aiohttp.ClientError(f"answered {r.status}")
        except (aiohttp.ClientError, TimeoutError, OSError) as e:
            log.warning("alerts: cannot send %d alert(s) on to the peer %s: %s", len(alerts), url,
                        e or type(e).__name__)
            return {a.key: (am.FORWARD_FAILED, None) for a in alerts}
        said = am.peer_outcomes(body, alerts)
        log.info("alerts: sent %d alert(s) on to the peer %s", len(alerts), url)
        return {a.key: (am.FORWARDED, said.get(a.key)) for a in alerts}


async def _bounded(r: aiohttp.ClientResponse) -> bytes:
    chunks, size = [], 0
    async for chunk in r.content.iter_chunked(64 * 1024):
        size += len(chunk)
        if size > MAX_ANSWER_BYTES:
            return b""
        chunks.append(chunk)
    return b"".join(chunks)


async def _resolve(name: str) -> frozenset[str]:
    """A peer name's addresses now (the event loop's resolver runs in a thread); none when it does not resolve."""
    try:
        infos = await asyncio.wait_for(asyncio.get_running_loop().getaddrinfo(name, None, type=socket.SOCK_STREAM),
                                       TIMEOUT_S)
    except (OSError, TimeoutError) as e:
        log.warning("alerts: the peer name %s does not resolve (%s): its alerts are not sent on", name, e)
        return frozenset()
    return frozenset(str(info[4][0]) for info in infos)
