"""The vLLM plugin: the only part of moe-monitor that imports torch and vllm (lazily, inside register()).

vLLM calls `register()` (entry point group `vllm.general_plugins`) in every one of its processes, possibly
more than once. It patches the worker class only where workers are built, and never raises into vLLM.
"""

from __future__ import annotations

import logging
import sys

log = logging.getLogger(__name__)


def log_through_vllm() -> None:
    """Our log lines go where vLLM's go, in its format and at its level (VLLM_LOGGING_LEVEL): vLLM configures
    only its own logger, so without this only our warnings would reach its log, through Python's last-resort
    handler. Left alone when the deployment configured the `moe_monitor` logger itself."""
    ours, theirs = logging.getLogger("moe_monitor"), logging.getLogger("vllm")
    if ours.handlers or not theirs.handlers:
        return
    for handler in theirs.handlers:
        ours.addHandler(handler)
    ours.setLevel(theirs.level)
    ours.propagate = False


def register() -> None:
    from moe_monitor import env

    log_through_vllm()

    if not env.env_bool(env.ENABLED, True):
        log.info("moe-monitor plugin disabled by %s", env.ENABLED)
        return
    # The API server process never builds a model: only patch where vLLM's worker machinery is loaded.
    if "vllm.v1.worker.worker_base" not in sys.modules:
        return
    try:
        import vllm

        from .compat import missing_internals, support

        usable, line = support(getattr(vllm, "__version__", "unknown"), missing_internals())
        if line:
            (log.info if usable else log.warning)(line)
        if not usable:
            return
        from .worker import patch_worker

        if patch_worker():
            log.info("moe-monitor plugin registered: routing counts and step times go to the segment directory")
    except Exception:  # noqa: BLE001 - a broken plugin must not stop vLLM from serving
        log.exception("moe-monitor plugin failed to register; vLLM continues without it")
