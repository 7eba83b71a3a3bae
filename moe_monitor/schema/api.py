"""What the sidecar's HTTP answers and its clients (`traces`, `eplb`, `top`) agree on."""

SIDECAR_HEADER = "X-Moe-Monitor"  # on every answer of the sidecar (its version): how clients tell it from others
