"""The clients' side of the sidecar's HTTP API (and of Prometheus), for `traces`, `eplb` and `top`: nothing a
server sends is trusted. `http` bounds every request (a total deadline, a size cap per kind of answer, gzip
inflated with a cap); `untrusted` makes server strings safe to print and checks ids and file names before a
path is made of them. No torch, vLLM or YAML here: aiohttp and the standard library only.
"""

from moe_monitor.client.http import (
    DEFAULT_TIMEOUT_S,
    JSON_MAX_BYTES,
    Client,
    ClientError,
    Gunzip,
    gunzip,
    normalise_url,
    read_body,
)
from moe_monitor.client.untrusted import capture_id, file_name, printable

__all__ = ["DEFAULT_TIMEOUT_S", "JSON_MAX_BYTES", "Client", "ClientError", "Gunzip", "capture_id",
           "file_name", "gunzip", "normalise_url", "printable", "read_body"]
