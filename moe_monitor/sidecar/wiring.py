"""The sidecar put together: `build(config, clock)` makes every collaborator once, in dependency order, and
hands them to the `Exporter`. `serve` and the tests call it; a test hands in a fake for an outside part (the
segment source, the detector, the catalog, the capturer, the breakdown source) and every stage uses it, e.g. a
capture test without vLLM or HTTP where neither is the subject."""

from __future__ import annotations

import time
from dataclasses import dataclass

from prometheus_client import CollectorRegistry, ProcessCollector

from moe_monitor.breakdown.latest import BreakdownSource, LatestBreakdown
from moe_monitor.capture.capturer import CaptureConfig, Capturer
from moe_monitor.capture.catalog import Catalog, Retention
from moe_monitor.capture.control import CaptureControl, RanksReported
from moe_monitor.capture.latest import CatalogLatest
from moe_monitor.detect.detector import Detector

from .collectors import ALL, Collector, Runner
from .config import SidecarConfig
from .exporter import Exporter
from .flight import FlightRecorder
from .segments import SegmentSource
from .stages import Pipeline, StageReport
from .stages.breakdown import PollBreakdown
from .stages.detect import Detect
from .stages.ep_load import EpLoad
from .stages.read import Read
from .stages.record import RecordFlight
from .stages.render import Render
from .stages.window import CloseWindow


@dataclass(frozen=True)
class Parts:
    source: SegmentSource
    detector: Detector
    catalog: Catalog | None
    capturer: Capturer | None
    latest: BreakdownSource | None  # the catalog's newest breakdown with captures on, else the profile dir's
    control: CaptureControl
    window: CloseWindow
    flight: RecordFlight
    read: Read
    render: Render
    pipeline: Pipeline


def parts(config: SidecarConfig, clock=time.time, process_metrics: bool = True,
          collectors: tuple[Collector, ...] = ALL, *, source: SegmentSource | None = None,
          detector: Detector | None = None, catalog: Catalog | None = None, capturer: Capturer | None = None,
          latest: BreakdownSource | None = None) -> Parts:
    """Every part, made once in dependency order; the keyword parts are made only when not handed in."""
    if source is None:
        source = SegmentSource(config.segment_dir, config.max_segment_bytes, config.stale_after_s)
    ep_load = EpLoad(config.placement_file)  # raises PlacementError for a --placement that cannot be used
    flight = RecordFlight(FlightRecorder(config.flight_windows, config.flight_max_bytes))
    detector = detector if detector is not None else Detector(config.detector)
    ranks = RanksReported()
    if config.captures_enabled and config.vllm_url and config.profile_dir:  # (the first says the others)
        if catalog is None:
            catalog = Catalog(config.capture_dir, Retention(config.max_captures, config.max_capture_bytes,
                                                            config.max_capture_age_s))
        capturer = capturer if capturer is not None else Capturer(CaptureConfig(
            vllm_url=config.vllm_url, profile_dir=config.profile_dir, api_key=config.vllm_api_key,
            iterations=config.capture_iterations, timeout_s=config.capture_timeout_s, run_s=config.capture_run_s),
            catalog, expected_ranks=ranks, clock=clock)
        latest = latest if latest is not None else CatalogLatest(catalog)
    elif config.profile_dir:
        latest = latest if latest is not None else LatestBreakdown(config.profile_dir, clock=clock)
    control = CaptureControl(detector, capturer, config.vllm_url, clock,
                             flight=flight.file if flight.recorder.enabled else None, ranks=ranks)
    process = CollectorRegistry(auto_describe=False)  # the sidecar's own CPU, memory, fds
    if process_metrics:
        ProcessCollector(namespace="moe_monitor", registry=process)
    report = StageReport()
    read = Read(config, source, clock)
    render = Render(Runner(collectors), report, flight.recorder, process)
    window = CloseWindow(config)
    pipeline = Pipeline((read, window, ep_load, flight, Detect(detector, control),
                         PollBreakdown(latest, capturer, catalog), render), report)
    return Parts(source, detector, catalog, capturer, latest, control, window, flight, read, render, pipeline)


def build(config: SidecarConfig, clock=time.time, process_metrics: bool = True,
          collectors: tuple[Collector, ...] = ALL, **fakes) -> Exporter:
    """The sidecar's window loop with every part made once (`fakes`: parts' keyword parts). Raises
    PlacementError (a --placement that cannot be used) or OSError (a capture directory that cannot be made)."""
    return Exporter(config, parts(config, clock, process_metrics, collectors, **fakes), clock)
