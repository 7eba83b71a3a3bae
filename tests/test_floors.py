"""No import runs up the floors: moe_monitor's packages stand in floors, and a module may import only from its own
package or from a lower floor. Packages that share a floor never import each other. The graph is read from the
source with `ast` (module-level and function-level imports, TYPE_CHECKING ones included, relative and absolute),
so the rule holds without importing anything; a new package must be given a floor here before it is imported."""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "moe_monitor"

# Bottom to top. Why each stands where it does:
FLOORS: tuple[tuple[str, ...], ...] = (
    # The root package (`__version__` only) and schema/: the names and formats several parts share (the metric
    # vocabulary, the flight record, the sidecar's HTTP header, segment limits). They import nothing of ours.
    ("moe_monitor", "schema"),
    # Settings declared once (the sidecar's and detector's fields) and the plugin's environment variables.
    ("settings", "env"),
    # Pure parts over data: the segment format (its limits from schema), numpy statistics, the trace analysis.
    ("channel", "stats", "breakdown"),
    # The regression detector: statistics of segment windows under its settings.
    ("detect",),
    # Captures: the detector's decisions start them, the breakdown analyses what they stored.
    ("capture",),
    # The three that run: the sidecar (reads segments, detects, captures, serves), the plugin inside vLLM (writes
    # segments) and the client library of the sidecar's API. They share only what is below (the segment format,
    # the schema), never each other: the sidecar never imports the plugin's torch, and the clients know the
    # sidecar only through its answers.
    ("sidecar", "plugin", "client"),
    # The tools over those: `eplb` and `top` read the sidecar through the client; the mixin generates rules,
    # dashboards and references from the vocabulary and the sidecar's settings.
    ("eplb", "top", "mixin"),
    # The demo: the sidecar, Prometheus and Alertmanager with the mixin's rules.
    ("demo",),
    # The command line reaches everything.
    ("cli",),
)
FLOOR = {p: i for i, floor in enumerate(FLOORS) for p in floor}


@dataclass(frozen=True)
class Edge:
    source: str  # the importing file, relative to the package's parent
    line: int
    importer: str  # package of the importing module
    imported: str  # package of the imported module

    def __str__(self) -> str:
        return f"{self.source}:{self.line}: {self.importer} imports {self.imported}"


def package_of(module: str) -> str | None:
    """The package a dotted module name belongs to (`moe_monitor.sidecar.flight` -> `sidecar`; the root package
    itself -> `moe_monitor`); None outside moe_monitor."""
    parts = module.split(".")
    if parts[0] != "moe_monitor":
        return None
    return parts[1] if len(parts) > 1 else "moe_monitor"


def is_module(root: Path, dotted: str) -> bool:
    path = root.parent.joinpath(*dotted.split("."))
    return path.with_suffix(".py").is_file() or (path / "__init__.py").is_file()


def imported_modules(node: ast.Import | ast.ImportFrom, package: list[str], root: Path) -> list[str]:
    """The modules an import statement reaches (`package`: the dotted parts of the package the importing module is
    in, where relative imports start). `from a import b` reaches `a.b` when that is a module, else `a`."""
    if isinstance(node, ast.Import):
        return [a.name for a in node.names]
    if node.level:
        base = package[: len(package) - node.level + 1]
        origin = ".".join(base + ([node.module] if node.module else []))
    else:
        origin = node.module or ""
    return [f"{origin}.{a.name}" if is_module(root, f"{origin}.{a.name}") else origin for a in node.names]


def import_edges(root: Path = PACKAGE) -> list[Edge]:
    """Every import between two different packages of `root`, anywhere in a module (functions included), once per
    statement and imported package."""
    edges = []
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root.parent)
        parts = list(rel.with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        importer = package_of(".".join(parts))
        package = parts if path.name == "__init__.py" else parts[:-1]
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if not isinstance(node, ast.Import | ast.ImportFrom):
                continue
            for module in imported_modules(node, package, root):
                imported = package_of(module)
                if imported is not None and importer is not None and imported != importer:
                    edges.append(Edge(str(rel), node.lineno, importer, imported))
    return sorted(set(edges), key=lambda e: (e.source, e.line, e.imported))


def violations(edges: list[Edge]) -> list[str]:
    """Every edge that runs up the floors or across one, and every import of a package without a floor."""
    out = []
    for e in edges:
        missing = [p for p in (e.importer, e.imported) if p not in FLOOR]
        if missing:
            out.append(f"{e}: {', '.join(missing)} has no floor in tests/test_floors.py FLOORS")
        elif FLOOR[e.imported] > FLOOR[e.importer]:
            out.append(f"{e}: up from floor {FLOOR[e.importer]} to floor {FLOOR[e.imported]}")
        elif FLOOR[e.imported] == FLOOR[e.importer]:
            out.append(f"{e}: across floor {FLOOR[e.importer]} {FLOORS[FLOOR[e.importer]]}")
    return out


def test_no_import_runs_up_the_floors():
    bad = violations(import_edges())
    assert not bad, "imports against the floors (tests/test_floors.py says why each stands where it does):\n" + \
        "\n".join(bad)


def test_every_package_has_exactly_one_floor_and_every_floor_names_a_package():
    packages = {p.name for p in PACKAGE.iterdir() if (p / "__init__.py").is_file()} | \
        {p.stem for p in PACKAGE.glob("*.py") if p.name != "__init__.py"} | {"moe_monitor"}
    listed = [p for floor in FLOORS for p in floor]
    assert len(listed) == len(set(listed)), "a package stands on two floors"
    assert set(listed) == packages, (f"without a floor: {sorted(packages - set(listed))}; "
                                     f"no such package: {sorted(set(listed) - packages)}")


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    """A small moe_monitor with one import of each kind the scan must see."""
    root = tmp_path / "moe_monitor"

    def write(rel: str, text: str) -> None:
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)

    write("__init__.py", "__version__ = '0'\n")
    for pkg in ("schema", "channel", "sidecar", "client", "top", "newpkg"):
        write(f"{pkg}/__init__.py", "")
    write("schema/names.py", "def f():\n    from moe_monitor.sidecar import server\n")  # up, in a function
    write("channel/layout.py", "from ..client import http\n")  # up, relative
    write("sidecar/server.py", "from moe_monitor.client.http import HEADER\nfrom . import exposition\n")  # across
    write("sidecar/exposition.py", "from moe_monitor import __version__\nfrom moe_monitor.schema import names\n")
    write("client/http.py", "import moe_monitor.newpkg\n")  # a package without a floor
    write("top/core.py", "from moe_monitor.client import http\nfrom moe_monitor.channel.layout import X\n")  # down
    return root


def test_the_scan_names_every_edge_against_the_floors(tree: Path):
    bad = violations(import_edges(tree))
    assert bad == [
        "moe_monitor/channel/layout.py:1: channel imports client: up from floor 2 to floor 5",
        "moe_monitor/client/http.py:1: client imports newpkg: newpkg has no floor in tests/test_floors.py FLOORS",
        "moe_monitor/schema/names.py:2: schema imports sidecar: up from floor 0 to floor 5",
        "moe_monitor/sidecar/server.py:1: sidecar imports client: across floor 5 ('sidecar', 'plugin', 'client')",
    ], bad
