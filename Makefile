# The two commands of the README. Both create .venv first (scripts/setup-env) when it is missing or stale.
.PHONY: demo test
SHELL := /bin/bash

.venv/.ready: pyproject.toml scripts/setup-env
	scripts/setup-env

demo: .venv/.ready  ## tiny MoE on vLLM CPU + plugin + sidecar + a short workload; stays up until Ctrl-C
	.venv/bin/moe-monitor demo

# PYTHONDONTWRITEBYTECODE= : bytecode (moe_monitor's, and pytest's rewritten test modules) is cached in the
# gitignored __pycache__ folders even where the environment turns that off; otherwise every run, and every Python
# subprocess a test starts, compiles them again (about 3 s of the fast loop's collection alone).
test: .venv/.ready  ## the whole test suite, real vLLM server included (CI runs exactly this)
	PYTHONDONTWRITEBYTECODE= .venv/bin/python -m pytest -q -p no:cacheprovider

.PHONY: test-fast
test-fast: .venv/.ready  ## the edit-test loop (<= 60 s on 2 cores): no e2e, gpu or slow tests; `make test` runs them all
	PYTHONDONTWRITEBYTECODE= .venv/bin/python -m pytest -q -p no:cacheprovider -m "not e2e and not gpu and not slow"

.PHONY: dist
dist: .venv/.ready  ## dist/: the sdist and the wheel (LICENSE in both) that docs/install.md and deploy/docker install
	rm -rf dist
	.venv/bin/python -m build --no-isolation --outdir dist .

.PHONY: mixin
mixin: .venv/.ready  ## regenerate alert/recording rules, PrometheusRule and dashboards from moe_monitor/mixin/ (commit them)
	.venv/bin/moe-monitor mixin build
