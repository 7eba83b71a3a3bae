"""The breakdown of one capture as a typed, frozen record: what `analyze` returns, what `moe-monitor analyze --json`
prints and what a capture stores as breakdown.json (`to_json`). `from_json` reads that JSON back, breakdowns stored
by earlier versions included (they lack `moe_blocks_by_tokens`, `unplaced`, `ep_wait` or `collective_wait`), and
refuses a damaged one with the first thing that is wrong, so a bad file fails where it is read, not in a reader
later. Values are kept as analysed (an int stays an int), so `to_json` of a fresh result is byte-for-byte the JSON
it always was."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, TypeGuard, TypeVar

from moe_monitor.schema.json_values import is_int

T = TypeVar("T")
Number = int | float


@dataclass(frozen=True)
class Category:
    us: Number
    share: Number


@dataclass(frozen=True)
class RankRow:
    """One rank's trace: device (or CPU self) time by category, idle time inside its steps."""

    path: str
    rank: str
    kind: str  # "gpu" or "cpu"
    total_us: Number
    idle_us: Number
    steps: int
    categories: Mapping[str, Number]


@dataclass(frozen=True)
class StepRow:
    """One vLLM engine step of one rank."""

    rank: str
    name: str
    phase: str
    tokens: int
    span_us: Number
    busy_us: Number
    idle_us: Number
    categories: Mapping[str, Number]


@dataclass(frozen=True)
class KernelRow:
    """One kernel (or CPU op) in one category, the `top` table's row."""

    name: str
    category: str
    count: int
    total_us: Number
    mean_us: Number
    share: Number


@dataclass(frozen=True)
class UnplacedRow:
    """A kernel no rule or position placed (it is in `other`)."""

    name: str
    count: int
    total_us: Number
    share: Number


BLOCK_FIGURES = ("preamble_us", "gate_us", "first_expert_us", "experts_us")


@dataclass(frozen=True)
class BlockMeans:
    """MoE blocks found and their mean figures (None when none was found)."""

    count: int
    preamble_us: Number | None = None  # the layer's norm to its first expert GEMM
    gate_us: Number | None = None  # the router GEMM
    first_expert_us: Number | None = None
    experts_us: Number | None = None  # every expert kernel of the block

    def to_json(self) -> dict:
        return {"count": self.count, **({k: getattr(self, k) for k in BLOCK_FIGURES} if self.count else {})}


@dataclass(frozen=True)
class EpLayer:
    layer: int  # MoE layer index within the step
    wait_us: Mapping[str, Number]
    caused_us: Mapping[str, Number]


@dataclass(frozen=True)
class EpWait:
    """EP dispatch/combine waiting across ranks (straggler.ep_wait)."""

    ranks: tuple[str, ...]
    collectives: int
    unmatched: int  # the first rank's EP collectives with no partner
    wait_us: Mapping[str, Number]  # per rank: time its EP collectives spent waiting for the last rank
    caused_us: Mapping[str, Number]  # per rank: the others' wait while it was the last to arrive
    caused_share: Mapping[str, Number]
    last_arrivals: Mapping[str, int]
    layers: tuple[EpLayer, ...]

    def to_json(self) -> dict:
        return {"ranks": list(self.ranks), "collectives": self.collectives, "unmatched": self.unmatched,
                "wait_us": dict(self.wait_us), "caused_us": dict(self.caused_us),
                "caused_share": dict(self.caused_share), "last_arrivals": dict(self.last_arrivals),
                "layers": [{"layer": x.layer, "wait_us": dict(x.wait_us), "caused_us": dict(x.caused_us)}
                           for x in self.layers]}


@dataclass(frozen=True)
class Why:
    """Why a rank made the others wait: its device's idle and busy excess over theirs (straggler.py)."""

    idle_us: Number
    busy_us: Number
    unexplained_us: Number
    reason: str
    kernels: tuple[tuple[str, Number], ...]  # the busiest kernels before its collectives

    def to_json(self) -> dict:
        return {"idle_us": self.idle_us, "busy_us": self.busy_us, "unexplained_us": self.unexplained_us,
                "reason": self.reason, "kernels": [[name, us] for name, us in self.kernels]}


@dataclass(frozen=True)
class KindWait:
    """One kind of collective across ranks (straggler.collective_wait)."""

    collectives: int  # matched on every rank
    unmatched: Mapping[str, int]
    wait_us: Mapping[str, Number]
    waited_for: Mapping[str, str | None]
    caused_us: Mapping[str, Number]
    last_arrivals: Mapping[str, int]
    why: Mapping[str, Why]  # per rank that caused waiting

    def to_json(self) -> dict:
        return {"collectives": self.collectives, "unmatched": dict(self.unmatched), "wait_us": dict(self.wait_us),
                "waited_for": dict(self.waited_for), "caused_us": dict(self.caused_us),
                "last_arrivals": dict(self.last_arrivals), "why": {r: w.to_json() for r, w in self.why.items()}}


@dataclass(frozen=True)
class CollectiveWait:
    ranks: tuple[str, ...]
    kinds: Mapping[str, KindWait]

    def to_json(self) -> dict:
        return {"ranks": list(self.ranks), "kinds": {k: row.to_json() for k, row in self.kinds.items()}}


@dataclass(frozen=True)
class BreakdownResult:
    """Where one capture's device time went (analyze.py), over all its ranks."""

    total_us: Number
    idle_us: Number  # between kernels inside steps
    categories: Mapping[str, Category]
    ranks: tuple[RankRow, ...]
    phases: Mapping[str, Mapping[str, Number]]  # phase -> category (and "idle") -> us
    steps: tuple[StepRow, ...]
    top: tuple[KernelRow, ...]
    moe_blocks: BlockMeans
    moe_blocks_by_tokens: Mapping[str, BlockMeans]  # tokens-per-step bucket -> its blocks
    expert_tokens: Mapping[str, Number]  # tokens-per-call bucket -> expert us
    unplaced: tuple[UnplacedRow, ...]
    ep_wait: EpWait | None  # None: fewer than two ranks, or no EP collective matched
    collective_wait: CollectiveWait | None

    def to_json(self) -> dict:
        """The breakdown as JSON types, in the order `analyze --json` and breakdown.json have always had."""
        return {
            "total_us": self.total_us,
            "idle_us": self.idle_us,
            "categories": {c: {"us": row.us, "share": row.share} for c, row in self.categories.items()},
            "ranks": [{"path": r.path, "rank": r.rank, "kind": r.kind, "total_us": r.total_us, "idle_us": r.idle_us,
                       "steps": r.steps, "categories": dict(r.categories)} for r in self.ranks],
            "phases": {p: dict(cats) for p, cats in self.phases.items()},
            "steps": [{"rank": s.rank, "name": s.name, "phase": s.phase, "tokens": s.tokens, "span_us": s.span_us,
                       "busy_us": s.busy_us, "idle_us": s.idle_us, "categories": dict(s.categories)}
                      for s in self.steps],
            "top": [{"name": k.name, "category": k.category, "count": k.count, "total_us": k.total_us,
                     "mean_us": k.mean_us, "share": k.share} for k in self.top],
            "moe_blocks": self.moe_blocks.to_json(),
            "moe_blocks_by_tokens": {b: m.to_json() for b, m in self.moe_blocks_by_tokens.items()},
            "expert_tokens": dict(self.expert_tokens),
            "unplaced": [{"name": u.name, "count": u.count, "total_us": u.total_us, "share": u.share}
                         for u in self.unplaced],
            "ep_wait": self.ep_wait.to_json() if self.ep_wait is not None else None,
            "collective_wait": self.collective_wait.to_json() if self.collective_wait is not None else None,
        }

    @classmethod
    def from_json(cls, doc: object) -> BreakdownResult:
        """Raises ValueError naming the first thing that is missing or of the wrong type."""
        if not isinstance(doc, dict):
            raise ValueError(f"a {type(doc).__name__}, not an object")
        categories = _object(doc.get("categories"), "categories")
        typed = {}
        for name, row in categories.items():
            if not isinstance(row, dict) or not _number(row.get("us")) or not _number(row.get("share")):
                raise ValueError(f"category {name!r} lacks numeric us and share")
            typed[name] = Category(row["us"], row["share"])
        by_tokens = _object(doc.get("moe_blocks_by_tokens", {}), "moe_blocks_by_tokens")  # absent: stored before
        return cls(
            total_us=_num(doc.get("total_us"), "total_us"),
            idle_us=_num(doc.get("idle_us"), "idle_us"),
            categories=typed,
            ranks=_rows(doc.get("ranks"), "ranks", _rank_row),
            phases={p: _numbers(cats, f"phase {p!r}") for p, cats in _object(doc.get("phases"), "phases").items()},
            steps=_rows(doc.get("steps"), "steps", _step_row),
            top=_rows(doc.get("top"), "top", _kernel_row),
            moe_blocks=_blocks(doc.get("moe_blocks"), "moe_blocks"),
            moe_blocks_by_tokens={b: _blocks(m, f"moe_blocks_by_tokens {b!r}") for b, m in by_tokens.items()},
            expert_tokens=_numbers(doc.get("expert_tokens"), "expert_tokens"),
            unplaced=_rows(doc.get("unplaced", []), "unplaced", _unplaced_row),  # absent: stored before it existed
            ep_wait=ep_wait_from_json(doc.get("ep_wait")),
            collective_wait=collective_wait_from_json(doc.get("collective_wait")),
        )


def _number(value: object) -> TypeGuard[int | float]:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _num(value: object, what: str) -> Number:
    if not _number(value):
        raise ValueError(f"{what} is not a number")
    return value


def _int(value: object, what: str) -> int:
    if not is_int(value):
        raise ValueError(f"{what} is not an integer")
    return value


def _str(value: object, what: str) -> str:
    if not isinstance(value, str):
        raise ValueError(f"{what} is not a string")
    return value


def _object(value: object, what: str) -> dict:
    if not isinstance(value, dict):
        raise ValueError(f"{what} is not an object")
    return value


def _numbers(value: object, what: str) -> dict[str, Number]:
    """An object of numbers (per category, per rank, per bucket)."""
    if not isinstance(value, dict) or not all(isinstance(k, str) and _number(v) for k, v in value.items()):
        raise ValueError(f"{what} is not an object of numbers")
    return value


def _integers(value: object, what: str) -> dict[str, int]:
    if not isinstance(value, dict) or not all(isinstance(k, str) and is_int(v) for k, v in value.items()):
        raise ValueError(f"{what} is not an object of integers")
    return value


def _rows(value: object, what: str, row: Callable[[dict, str], T]) -> tuple[T, ...]:
    if not isinstance(value, list):
        raise ValueError(f"{what} is not a list")
    out = []
    for i, x in enumerate(value):
        if not isinstance(x, dict):
            raise ValueError(f"{what}[{i}] is not an object")
        out.append(row(x, f"{what}[{i}]"))
    return tuple(out)


def _rank_row(x: dict, what: str) -> RankRow:
    return RankRow(_str(x.get("path"), f"{what}.path"), _str(x.get("rank"), f"{what}.rank"),
                   _str(x.get("kind"), f"{what}.kind"), _num(x.get("total_us"), f"{what}.total_us"),
                   _num(x.get("idle_us"), f"{what}.idle_us"), _int(x.get("steps"), f"{what}.steps"),
                   _numbers(x.get("categories"), f"{what}.categories"))


def _step_row(x: dict, what: str) -> StepRow:
    return StepRow(_str(x.get("rank"), f"{what}.rank"), _str(x.get("name"), f"{what}.name"),
                   _str(x.get("phase"), f"{what}.phase"), _int(x.get("tokens"), f"{what}.tokens"),
                   _num(x.get("span_us"), f"{what}.span_us"), _num(x.get("busy_us"), f"{what}.busy_us"),
                   _num(x.get("idle_us"), f"{what}.idle_us"), _numbers(x.get("categories"), f"{what}.categories"))


def _kernel_row(x: dict, what: str) -> KernelRow:
    return KernelRow(_str(x.get("name"), f"{what}.name"), _str(x.get("category"), f"{what}.category"),
                     _int(x.get("count"), f"{what}.count"), _num(x.get("total_us"), f"{what}.total_us"),
                     _num(x.get("mean_us"), f"{what}.mean_us"), _num(x.get("share"), f"{what}.share"))


def _unplaced_row(x: dict, what: str) -> UnplacedRow:
    return UnplacedRow(_str(x.get("name"), f"{what}.name"), _int(x.get("count"), f"{what}.count"),
                       _num(x.get("total_us"), f"{what}.total_us"), _num(x.get("share"), f"{what}.share"))


def _blocks(value: object, what: str) -> BlockMeans:
    if not isinstance(value, dict) or not is_int(value.get("count")):
        raise ValueError(f"{what}.count is not an integer")
    if not value["count"]:
        return BlockMeans(0)
    if not all(_number(value.get(k)) for k in BLOCK_FIGURES):
        raise ValueError(f"{what} lacks {', '.join(BLOCK_FIGURES)}")
    return BlockMeans(value["count"], *(value[k] for k in BLOCK_FIGURES))


def ep_wait_from_json(doc: object) -> EpWait | None:
    """straggler.ep_wait's result (or its JSON) typed; None stays None."""
    if doc is None:  # fewer than two ranks; or stored before the table existed
        return None
    try:
        d = _object(doc, "ep_wait")
        ranks = tuple(_str(r, "a rank") for r in _list(d.get("ranks"), "ranks"))
        layers = tuple(EpLayer(_int(x.get("layer"), "layer"), _numbers(x.get("wait_us"), "wait_us"),
                               _numbers(x.get("caused_us"), "caused_us"))
                       for x in (_object(x, "layer") for x in _list(d.get("layers"), "layers")))
        return EpWait(ranks, _int(d.get("collectives"), "collectives"), _int(d.get("unmatched"), "unmatched"),
                      _numbers(d.get("wait_us"), "wait_us"), _numbers(d.get("caused_us"), "caused_us"),
                      _numbers(d.get("caused_share"), "caused_share"),
                      _integers(d.get("last_arrivals"), "last_arrivals"), layers)
    except ValueError as e:
        raise ValueError(f"ep_wait: {e}") from None


def collective_wait_from_json(doc: object) -> CollectiveWait | None:
    """straggler.collective_wait's result (or its JSON) typed; None stays None."""
    if doc is None:  # fewer than two ranks; or stored before the table existed
        return None
    if not isinstance(doc, dict) or not isinstance(doc.get("kinds"), dict) or not isinstance(doc.get("ranks"), list):
        raise ValueError("collective_wait lacks ranks and kinds")
    kinds: dict = doc["kinds"]
    typed = {}
    for kind, row in kinds.items():
        try:
            typed[kind] = _kind_wait(_object(row, "the row"))
        except ValueError as e:
            raise ValueError(f"collective_wait kind {kind!r}: {e}") from None
    return CollectiveWait(tuple(_str(r, "collective_wait rank") for r in doc["ranks"]), typed)


def _kind_wait(d: dict) -> KindWait:
    waited_for = _object(d.get("waited_for"), "waited_for")
    if not all(v is None or isinstance(v, str) for v in waited_for.values()):
        raise ValueError("waited_for names a rank that is not a string")
    why = {r: _why(_object(w, f"why {r!r}"), f"why {r!r}") for r, w in _object(d.get("why"), "why").items()}
    return KindWait(_int(d.get("collectives"), "collectives"), _integers(d.get("unmatched"), "unmatched"),
                    _numbers(d.get("wait_us"), "wait_us"), waited_for, _numbers(d.get("caused_us"), "caused_us"),
                    _integers(d.get("last_arrivals"), "last_arrivals"), why)


def _why(d: dict, what: str) -> Why:
    kernels = _list(d.get("kernels"), f"{what}.kernels")
    if not all(isinstance(k, list) and len(k) == 2 and isinstance(k[0], str) and _number(k[1]) for k in kernels):
        raise ValueError(f"{what}.kernels is not a list of [name, us]")
    return Why(_num(d.get("idle_us"), f"{what}.idle_us"), _num(d.get("busy_us"), f"{what}.busy_us"),
               _num(d.get("unexplained_us"), f"{what}.unexplained_us"), _str(d.get("reason"), f"{what}.reason"),
               tuple((name, us) for name, us in kernels))


def _list(value: object, what: str) -> list[Any]:
    if not isinstance(value, list):
        raise ValueError(f"{what} is not a list")
    return value
