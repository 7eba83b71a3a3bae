"""The monitoring mixin: Prometheus recording and alerting rules, the Kubernetes PrometheusRule and the
Grafana dashboards, generated from code so they are reviewed, tested and checked for drift like code.

- `config.py`: every threshold and knob (`MixinConfig`, TOML overrides);
- `rules.py`: recording rules and alerts; `dashboards.py` / `queries.py`: the dashboards;
- `build.py`: the files they become (`moe-monitor mixin build`, `make mixin`; `moe-monitor mixin check`).

docs/alerts.md describes the alerts and rules, docs/runbooks.md what on-call does when one fires.
"""
