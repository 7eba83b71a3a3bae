"""Segment writer: one per rank, owned by the plugin's publisher thread.

The file is created under a temporary name, fully allocated, and renamed into place, so a reader never
sees a half-made header. Each publish rewrites it in place with pwrite under a seqlock: `seq` goes odd,
payload and header are written, `seq` goes even. pwrite rather than mmap because an I/O problem (a full
tmpfs, a file truncated under us) then surfaces as OSError, which the publisher counts and retries,
instead of SIGBUS, which would kill the vLLM worker.
"""

from __future__ import annotations

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
        self._fd: int | None = None

    @property
    def generation(self) -> int:
        return self._header.generation

    def _create(self, payload: bytes) -> None:
        os.makedirs(os.path.dirname(self.path) or ".", exist_ok=True)
        tmp = f"{self.path}.tmp{os.getpid()}"
        fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            os.posix_fallocate(fd, 0, HEADER_SIZE + len(payload))  # ENOSPC now, not later
            _pwrite_all(fd, payload, HEADER_SIZE)
            _pwrite_all(fd, pack_header(self._header), 0)
            os.replace(tmp, self.path)
        except BaseException:
            os.close(fd)
            _unlink_quietly(tmp)
            raise
        self._fd = fd

    def publish(self, arrays: dict[str, np.ndarray], publish_errors: int = 0) -> None:
        """Write one cumulative snapshot. Raises OSError on I/O trouble; the caller counts and retries."""
        payload = encode_payload(self._shape, arrays)
        h = replace(self._header, updated_unix_ns=time.time_ns(), payload_crc32=zlib.crc32(payload),
                    publish_errors=publish_errors)
        if self._fd is not None and self._replaced_under_us():
            self.reset()
        if self._fd is None:
            self._header = replace(h, seq=0)
            self._create(payload)
            return
        seq = self._header.seq
        _pwrite_all(self._fd, _SEQ.pack(seq + 1), SEQ_OFFSET)  # odd: write in progress
        _pwrite_all(self._fd, payload, HEADER_SIZE)
        _pwrite_all(self._fd, pack_header(replace(h, seq=seq + 1)), 0)
        _pwrite_all(self._fd, _SEQ.pack(seq + 2), SEQ_OFFSET)  # even: consistent
        self._header = replace(h, seq=seq + 2)

    def _replaced_under_us(self) -> bool:
        """True when our file was deleted, replaced or truncated by someone else."""
        try:
            st, ours = os.stat(self.path), os.fstat(self._fd)
        except FileNotFoundError:
            return True
        return st.st_ino != ours.st_ino or ours.st_size < HEADER_SIZE + self._shape.payload_size

    def close(self, remove: bool = False) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        if remove:
            _unlink_quietly(self.path)

    def reset(self) -> None:
        """Forget the file (after an I/O error): the next publish recreates it."""
        try:
            self.close()
        except OSError:
            self._fd = None


def _pwrite_all(fd: int, data: bytes, offset: int) -> None:
    view = memoryview(data)
    while view:
        n = os.pwrite(fd, view, offset)
        view, offset = view[n:], offset + n


def _unlink_quietly(path: str) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass
