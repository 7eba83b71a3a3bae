"""Declarative settings: every sidecar setting is one dataclass field that carries its default, flag, help and
limits (`setting(...)`); its environment twin is derived from the flag (`--window` → `MOE_MONITOR_WINDOW`).
The CLI builds its options from these fields, the config objects are the fields, and docs/configuration.md is
generated from them, so a setting cannot be documented, parsed or defaulted in two different ways.

Pure: no click here (the CLI maps a `Spec` to a click option).
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field

ENV_PREFIX = "MOE_MONITOR_"


def setting(default, flag: str, help: str, *, minimum=None, maximum=None, choices: tuple | None = None,
            path: str | None = None, secret: bool = False, group: str = "sidecar", factory=None):
    """A dataclass field declaring one setting. `path`: "file" or "dir" (a filesystem path); `secret`: never
    shown with its value (tokens, keys)."""
    meta = {"flag": flag, "help": help, "minimum": minimum, "maximum": maximum, "choices": choices, "path": path,
            "secret": secret, "group": group}
    if factory is not None:
        return field(default_factory=factory, metadata=meta)
    return field(default=default, metadata=meta)


@dataclass(frozen=True)
class Spec:
    name: str  # "window_s", or "detector.cooldown_s" for a nested config's field
    flag: str
    env: str
    type: type  # str | int | float | bool (Optional unwrapped)
    default: object
    help: str
    minimum: object = None
    maximum: object = None
    choices: tuple | None = None
    path: str | None = None
    secret: bool = False
    group: str = "sidecar"


def env_name(flag: str) -> str:
    return ENV_PREFIX + flag.removeprefix("--").upper().replace("-", "_")


def specs(cls, prefix: str = "") -> list[Spec]:
    """The settings of a config dataclass, nested configs (fields whose type is a dataclass) included."""
    hints = typing.get_type_hints(cls)
    out = []
    for f in dataclasses.fields(cls):
        kind = _unwrap(hints[f.name])
        if dataclasses.is_dataclass(kind):
            out += specs(kind, prefix + f.name + ".")
            continue
        m = f.metadata
        if "flag" not in m:
            continue
        default = f.default if f.default is not dataclasses.MISSING else None
        out.append(Spec(prefix + f.name, m["flag"], env_name(m["flag"]), kind, default, m["help"], m["minimum"],
                        m["maximum"], m["choices"], m["path"], m["secret"], m["group"]))
    return out


def build(cls, values: dict):
    """An instance of `cls` from {spec name: value}; nested configs are built from their dotted names."""
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for f in dataclasses.fields(cls):
        kind = _unwrap(hints[f.name])
        if dataclasses.is_dataclass(kind):
            nested = {k.split(".", 1)[1]: v for k, v in values.items() if k.startswith(f.name + ".")}
            kwargs[f.name] = build(kind, nested)
        elif f.name in values:
            kwargs[f.name] = values[f.name]
    return cls(**kwargs)


def _unwrap(kind):
    """`int | None` -> int."""
    args = [a for a in typing.get_args(kind) if a is not type(None)]
    return args[0] if typing.get_origin(kind) in (typing.Union, types.UnionType) and len(args) == 1 else kind


def reference_markdown(cls) -> str:
    """The generated table of docs/configuration.md."""
    out = ["| flag | environment | default | what |", "|---|---|---|---|"]
    for s in specs(cls):
        default = "—" if s.default is None else ("`" + _show(s.default) + "`")
        limits = []
        if s.choices:
            limits.append("one of " + ", ".join(f"`{c}`" for c in s.choices))
        if s.minimum is not None:
            limits.append(f"≥ {s.minimum}")
        if s.maximum is not None:
            limits.append(f"≤ {s.maximum}")
        extra = f" ({'; '.join(limits)})" if limits else ""
        flag = f"`{s.flag}`" if s.type is not bool or s.default is False else f"`{s.flag}` / `--no-{s.flag[2:]}`"
        out.append(f"| {flag} | `{s.env}` | {default} | {s.help.replace('|', chr(92) + '|')}{extra} |")
    return "\n".join(out) + "\n"


def _show(value) -> str:
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)
