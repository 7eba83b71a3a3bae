"""The shared-memory channel between the plugin (writer) and the sidecar (reader). numpy only."""

from .layout import LAYER_HOOKED, LAYER_UNOBSERVABLE, PHASES, Ranks, Refusal, SegmentError, Shape, Snapshot
from .reader import list_segments, read_segment
from .writer import SegmentWriter, segment_filename

__all__ = ["LAYER_HOOKED", "LAYER_UNOBSERVABLE", "PHASES", "Ranks", "Refusal", "SegmentError", "SegmentWriter",
           "Shape", "Snapshot", "list_segments", "read_segment", "segment_filename"]
