"""Segment reader: copy a segment file and decode it, retrying while a write is in progress."""

from __future__ import annotations

import io
import os
import stat
import time

from .layout import HEADER_SIZE, SEQ_OFFSET, SegmentError, Snapshot, decode_from

DEFAULT_MAX_PAYLOAD = 256 * 1024 * 1024  # 256 MiB: far above 61 layers x 256 experts (125 KiB of counts)
SUFFIX = ".moeseg"


def read_segment(path: str, max_payload: int = DEFAULT_MAX_PAYLOAD, attempts: int = 5,
                 backoff_s: float = 0.001) -> Snapshot:
    """Read one consistent snapshot. Raises SegmentError (kind: io/truncated/magic/version/corrupt/
    oversized/torn) when the file cannot give one after `attempts` tries. The file is read whole (at most
    HEADER_SIZE + max_payload bytes); only the sections its header allows are kept (layout.decode_from)."""
    last: SegmentError | None = None
    for attempt in range(attempts):
        try:
            with _open_regular(path) as f:
                size = os.fstat(f.fileno()).st_size
                if size > HEADER_SIZE + max_payload:
                    raise SegmentError("oversized", f"file of {size} bytes exceeds the limit")
                # One read, then the seqlock check at once: the window in which a publish tears the copy is one
                # read() long. Decoding while reading (a read per section, checks between them) made it so wide
                # that a writer publishing in a loop left 50-185 good reads of 2 s where one read gives 3,000-5,000.
                buf = f.read(size)
                seq_after = os.pread(f.fileno(), 8, SEQ_OFFSET)  # seqlock: unchanged while we copied?
        except FileNotFoundError:
            raise
        except OSError as e:
            raise SegmentError("io", f"cannot read: {e}") from None
        try:
            if len(buf) >= HEADER_SIZE and seq_after != buf[SEQ_OFFSET:SEQ_OFFSET + 8]:
                raise SegmentError("torn", "the writer published while we were reading")
            # a consistent copy (same even seq before and after) whose checksum is wrong is corrupt, not torn;
            # only the sections the header allows are kept (copied out of the file's bytes, which are then freed)
            payload = io.BytesIO(buf)
            payload.seek(HEADER_SIZE)
            return decode_from(buf[:HEADER_SIZE], payload.read, size, max_payload)
        except SegmentError as e:
            if e.kind != "torn":
                raise
            last = e
            if attempt + 1 < attempts:  # no pause after the last try
                time.sleep(backoff_s * (attempt + 1))
    assert last is not None
    raise last


def _open_regular(path: str):
    """Open without blocking and insist on a regular file: a FIFO named *.moeseg would otherwise block the
    reader (and the whole window loop) in open() until someone writes to it."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            raise SegmentError("io", f"not a regular file (mode {stat.filemode(mode)})")
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def list_segments(directory: str) -> list[str]:
    """Paths of the segment files in a directory, sorted; [] when the directory does not exist yet."""
    try:
        names = os.listdir(directory)
    except FileNotFoundError:
        return []
    return sorted(os.path.join(directory, n) for n in names if n.endswith(SUFFIX))
