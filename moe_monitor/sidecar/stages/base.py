"""A stage is one step of the window loop: it takes the previous stage's frozen output and returns its own
(`run`), or, when it raised, what the next stage gets instead (`fallback`: its own part as of the last pass
that worked). The `Pipeline` runs them in order, times each and reports it like a collector
(`moe_monitor_collector_success{collector="stage:<name>"}` and its duration); a stage that raises is counted in
`moe_monitor_window_errors_total{stage}` under its `errors_as` row, logged once per cause, and only a
`required` one fails the pass (the previous exposition stays served)."""

from __future__ import annotations

import logging
import time
from collections import Counter
from dataclasses import dataclass
from typing import Any, Protocol

from ..exposition import Family
from ..once import OncePerCause

log = logging.getLogger(__name__)
ERROR_ROWS = ("read", "window", "detect", "breakdown", "render")  # moe_monitor_window_errors_total's rows


@dataclass(frozen=True)
class Tick:
    """The first stage's input: the window boundary of this pass (None: refresh the figures, close nothing)."""
    boundary: float | None


class Stage(Protocol):
    name: str
    errors_as: str  # its row in moe_monitor_window_errors_total (one of ERROR_ROWS)
    required: bool

    def run(self, value: Any) -> Any: ...

    def fallback(self, value: Any) -> Any: ...


class StageReport:
    """How each stage did on its latest run, and the stage errors so far (the render stage exports both)."""

    def __init__(self) -> None:
        self.errors: Counter[str] = Counter()
        self.runs: dict[str, tuple[int, float]] = {}  # stage -> (success, seconds) of its latest run
        self.started = time.perf_counter()  # when the current pass began
        self._logged = OncePerCause()

    def guard(self, stage: Stage, value: Any) -> Any:
        start = time.perf_counter()
        try:
            out = stage.run(value)
        except Exception as e:
            self.runs[stage.name] = (0, time.perf_counter() - start)
            self.errors[stage.errors_as] += 1
            if self._logged.first(stage.name, type(e).__name__):  # counted every window, logged once per cause
                log.exception("window stage %r failed; the previous figures stay served (counted in "
                              "moe_monitor_window_errors_total, logged again only for another error)", stage.name)
            if stage.required:
                raise
            return stage.fallback(value)
        self.runs[stage.name] = (1, time.perf_counter() - start)
        self._logged.recovered(stage.name)
        return out

    def add_to(self, success: Family, duration: Family) -> None:
        """The stages' rows, in the order they first ran, in the collectors' success/duration families (the
        render stage's own from the pass before: this one is still running)."""
        for name, (ok, seconds) in self.runs.items():
            success.add(ok, [("collector", f"stage:{name}")])
            duration.add(seconds, [("collector", f"stage:{name}")])


class Pipeline:
    def __init__(self, stages: tuple[Stage, ...], report: StageReport):
        self.stages, self.report = stages, report

    def run(self, value: Any) -> Any:
        self.report.started = time.perf_counter()
        for stage in self.stages:
            value = self.report.guard(stage, value)
        return value
