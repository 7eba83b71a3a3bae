"""Limits of the segment format (moe_monitor/channel/layout.py describes the format) that the vocabulary's help
texts name: the writer, the reader and the reference all read the same numbers."""

MAX_EP_SIZE = 4096  # EP ranks a segment may describe: wide EP runs at 32-320 (DeepSeek-V3 serving)
MAX_REDUNDANT_SLOTS = 1024  # see channel.layout.max_slots
