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

import numpy as np

from .layout import (
    EPLB_HEALTH,
    HEADER_OFFSETS,
    HEADER_SIZE,
    SEQ_OFFSET,
    EplbHealth,
    Header,
    Ranks,
    Shape,
    pack_header,
    payload_parts,
    section_bytes,
    step_count_section,
)

_SEQ = struct.Struct("<Q")
_UPDATED, _CRC, _ERRORS = struct.Struct("<q"), struct.Struct("<I"), struct.Struct("<Q")
_NO_EPLB = EplbHealth(step_interval=1)  # published until the plugin gives a record: EPLB seen, nothing yet


def segment_filename(ranks: Ranks) -> str:
    return f"dp{ranks.dp_rank}-pp{ranks.pp_rank}-tp{ranks.tp_rank}.moeseg"


class SegmentWriter:
    """A publish runs on vLLM's side of the GIL, so it does no more than it must: the header is packed once and
    its four changing fields are patched in place; the arrays are checksummed and written as they come (no
    payload bytes are built), the header and payload in one pwritev between the two seqlock writes. The file also
    carries the step_count extension after the payload (layout.py), after the eplb_health one with `eplb_health`,
    in the same pwritev."""

    def __init__(self, directory: str, model: str, ranks: Ranks, shape: Shape, top_k: int,
                 eplb_health: bool = False):
        self.path = os.path.join(directory, segment_filename(ranks))
        self._shape = shape
        self._sections = shape.sections()
        self._eplb_size = EPLB_HEALTH.size if eplb_health else 0
        self._count_section = [step_count_section(shape)]
        count_size = section_bytes(self._count_section[0])
        self._size = HEADER_SIZE + shape.payload_size + self._eplb_size + count_size
        now = time.time_ns()
        self._header = Header(
            seq=0, generation=secrets.randbits(63) or 1, created_unix_ns=now, updated_unix_ns=now,
            pid=os.getpid(), top_k=top_k, ranks=ranks, shape=shape, payload_size=shape.payload_size,
            payload_crc32=0, publish_errors=0, model=model, eplb_health_size=self._eplb_size,
            step_count_size=count_size,
        )
        self._head = bytearray(pack_header(self._header))  # patched in place at each publish
        self._seq = 0
        self._fd: int | None = None
        self._file_id: tuple[int, int] | None = None  # (st_dev, st_ino) of the file we created

    @property
    def generation(self) -> int:
        return self._header.generation

    def _create(self, parts: list) -> None:
        os.makedirs(os.path.dirname(self.path) or ".", exist_ok=True)
        tmp = f"{self.path}.tmp{os.getpid()}"
        fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            os.posix_fallocate(fd, 0, self._size)  # ENOSPC now, not later
            _pwritev_all(fd, [self._head, *parts], 0, self._size)
            st = os.fstat(fd)
            os.replace(tmp, self.path)
        except BaseException:
            os.close(fd)
            _unlink_quietly(tmp)
            raise
        self._fd, self._file_id = fd, (st.st_dev, st.st_ino)

    def publish(self, arrays: dict[str, np.ndarray], publish_errors: int = 0,
                eplb: EplbHealth | None = None) -> None:
        """Write one cumulative snapshot. Raises OSError on I/O trouble; the caller counts and retries. Raises
        ValueError, writing nothing, when an array is missing (every section of Shape.sections() and "step_count",
        int64 [P, TB]) or has another shape. The arrays are written as they are, after their checksum: none may
        change until publish returns (the publisher passes copies). `eplb` is written only by a writer made with
        eplb_health."""
        parts = payload_parts(self._sections, self._shape.num_layers, arrays)
        (step_count,) = payload_parts(self._count_section, self._shape.num_layers, arrays)
        crc = 0
        for part in parts:
            crc = zlib.crc32(part.data, crc)  # the GIL is released for parts over 5 KiB (the counts)
        head = self._head
        if self._eplb_size:
            record = (eplb or _NO_EPLB).pack()
            parts.append(np.frombuffer(record, dtype=np.uint8))
            _CRC.pack_into(head, HEADER_OFFSETS["extension_crc32"], zlib.crc32(record))
        parts.append(step_count)
        _CRC.pack_into(head, HEADER_OFFSETS["step_count_crc32"], zlib.crc32(step_count.data))
        _UPDATED.pack_into(head, HEADER_OFFSETS["updated_unix_ns"], time.time_ns())
        _CRC.pack_into(head, HEADER_OFFSETS["payload_crc32"], crc)
        _ERRORS.pack_into(head, HEADER_OFFSETS["publish_errors"], publish_errors)
        if self._fd is not None and self._replaced_under_us():
            self.reset()
        if self._fd is None:
            self._seq = 0
            _SEQ.pack_into(head, SEQ_OFFSET, 0)
            self._create(parts)
            return
        seq = self._seq
        _pwrite_all(self._fd, _SEQ.pack(seq + 1), SEQ_OFFSET)  # odd: write in progress
        _SEQ.pack_into(head, SEQ_OFFSET, seq + 1)
        _pwritev_all(self._fd, [head, *parts], 0, self._size)  # the header (still odd) and the payload
        _pwrite_all(self._fd, _SEQ.pack(seq + 2), SEQ_OFFSET)  # even: consistent
        self._seq = seq + 2

    def _replaced_under_us(self) -> bool:
        """True when our file was deleted, replaced or truncated by someone else (one stat: while the path still
        names our file, its size is our file's)."""
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            return True
        return (st.st_dev, st.st_ino) != self._file_id or st.st_size < self._size

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


def _pwrite_all(fd: int, data, offset: int) -> None:
    view = memoryview(data).cast("B")
    while view:
        n = os.pwrite(fd, view, offset)
        view, offset = view[n:], offset + n


def _pwritev_all(fd: int, buffers: list, offset: int, size: int) -> None:
    """Write `buffers` (`size` bytes in all) at `offset`: one pwritev, and the rest of a short write after it."""
    n = os.pwritev(fd, buffers, offset)
    if n < size:  # not seen on tmpfs; joined only then
        _pwrite_all(fd, memoryview(b"".join(memoryview(b).cast("B") for b in buffers))[n:], offset + n)


def _unlink_quietly(path: str) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass
