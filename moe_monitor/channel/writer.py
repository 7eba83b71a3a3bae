"""Segment writer: one per rank, owned by the plugin's publisher thread.

The file is created under a temporary name and renamed into place, so a reader never sees a half-made
header. Each publish is a seqlock-protected in-place rewrite of the payload through mmap.
"""

from __future__ import annotations

import mmap
import os
import secrets
import struct
import time
import zlib
from dataclasses import replace

import numpy as np

from .layout import HEADER_SIZE, SEQ_OFFSET, Header, Ranks, Shape, encode_payload, pack_header

_SEQ = struct.Struct("<Q")


def segment_filename(ranks: Ranks) -> str:
    return f"dp{ranks.dp_rank}-pp{ranks.pp_rank}-tp{ranks.tp_rank}.moeseg"


class SegmentWriter:
    def __init__(self, directory: str, model: str, ranks: Ranks, shape: Shape, top_k: int):
        self.path = os.path.join(directory, segment_filename(ranks))
        self._shape = shape
        now = time.time_ns()
        self._header = Header(
            seq=0, generation=secrets.randbits(63) or 1, created_unix_ns=now, updated_unix_ns=now,
            pid=os.getpid(), top_k=top_k, ranks=ranks, shape=shape, payload_size=shape.payload_size,
            payload_crc32=0, publish_errors=0, model=model,
        )
        self._mm: mmap.mmap | None = None
        self._fd: int | None = None

    @property
    def generation(self) -> int:
        return self._header.generation

    def _open(self, first_payload: bytes) -> None:
        os.makedirs(os.path.dirname(self.path) or ".", exist_ok=True)
        tmp = f"{self.path}.tmp{os.getpid()}"
        size = HEADER_SIZE + self._shape.payload_size
        fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            os.ftruncate(fd, size)
            mm = mmap.mmap(fd, size)
            mm[HEADER_SIZE:size] = first_payload
            mm[0:HEADER_SIZE] = pack_header(self._header)
            os.replace(tmp, self.path)
        except BaseException:
            os.close(fd)
            _unlink_quietly(tmp)
            raise
        self._fd, self._mm = fd, mm

    def publish(self, arrays: dict[str, np.ndarray], publish_errors: int = 0) -> None:
        """Write one cumulative snapshot. Raises OSError on I/O trouble; the caller counts and retries."""
        payload = encode_payload(self._shape, arrays)
        h = replace(self._header, updated_unix_ns=time.time_ns(), payload_crc32=zlib.crc32(payload),
                    publish_errors=publish_errors)
        if self._mm is None:
            self._header = replace(h, seq=0)
            self._open(payload)
            return
        if self._replaced_under_us():
            self.reset()
            self._header = replace(h, seq=0)
            self._open(payload)
            return
        mm = self._mm
        seq = self._header.seq
        mm[SEQ_OFFSET:SEQ_OFFSET + 8] = _SEQ.pack(seq + 1)  # odd: write in progress
        mm[HEADER_SIZE:HEADER_SIZE + len(payload)] = payload
        self._header = replace(h, seq=seq + 2)
        header = pack_header(replace(self._header, seq=seq + 1))
        mm[0:SEQ_OFFSET] = header[0:SEQ_OFFSET]
        mm[SEQ_OFFSET + 8:HEADER_SIZE] = header[SEQ_OFFSET + 8:HEADER_SIZE]
        mm[SEQ_OFFSET:SEQ_OFFSET + 8] = _SEQ.pack(seq + 2)  # even: consistent

    def _replaced_under_us(self) -> bool:
        """True when our file was deleted or replaced by someone else (then readers cannot see us)."""
        try:
            return os.stat(self.path).st_ino != os.fstat(self._fd).st_ino
        except FileNotFoundError:
            return True

    def close(self, remove: bool = False) -> None:
        if self._mm is not None:
            self._mm.close()
            os.close(self._fd)
            self._mm = self._fd = None
        if remove:
            _unlink_quietly(self.path)

    def reset(self) -> None:
        """Forget the mapping (after an I/O error): the next publish recreates the file."""
        try:
            self.close()
        except OSError:
            self._mm = self._fd = None


def _unlink_quietly(path: str) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass
