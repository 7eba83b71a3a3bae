"""The window loop's stages, in order: read → window → ep_load → flight → detect → breakdown → render. Each
takes the previous one's frozen `Reading` (the first a `Tick`) and returns its own; base.py runs, times and
guards them (wiring.py puts them together)."""

from __future__ import annotations

from .base import ERROR_ROWS, Pipeline, Stage, StageReport, Tick

__all__ = ["ERROR_ROWS", "Pipeline", "Stage", "StageReport", "Tick"]
