"""Trace catalog: one directory per capture (its rank traces, metadata.json, breakdown.json), with retention
by count, bytes and age, and a byte quota that is never exceeded (a capture that cannot fit is refused).

Ids and file names are validated against strict patterns and against the capture's own file list, so
nothing outside the store can be named through the API. Only regular files are stored or served (a symlink
in the profile directory could otherwise expose any file the sidecar can read), and a capture is known by
its directory name: the `id` written in its metadata must match it, or the capture is ignored (retention
deletes directories of the store, never a path that metadata names).

A capture is stored atomically: its files and metadata go into `.tmp-<id>`, renamed to `<id>` once complete,
and removed on any failure. A temporary or partial directory left by a kill (or by an older version) is
removed when the catalog opens and before every store (`sweep`), so nothing unlisted holds disk.

A capture that stored no trace (vLLM without a profiler, a start that failed, ...) is kept as a *record*: its
directory holds metadata.json alone (its outcome and why, a few kB), so listings and `get` find it. Records are
bounded apart (`Retention.max_records`, the oldest go first) and never evict a capture that holds traces.

The catalog keeps an index in memory (~200 bytes a capture: its time, bytes, metadata size, whether it has a
breakdown), built when it opens and kept up to date by its own stores, evictions and sweeps; a change made by
anyone else is noticed by the directory's mtime (one stat per call), and then only the capture directories that
are new or replaced are read. The counts (`count`, `total_bytes`, `damaged`) and the newest capture with a
breakdown come from the index: a window tick reads no metadata. `list()` returns the newest `LIST_LIMIT` captures
(within `LIST_BYTES` of metadata) and keeps that listing, reading again only what changed. A metadata.json is read
up to `max_metadata_bytes` (1 MiB; real ones are ~2-10 kB): a bigger one makes its capture damaged, like invalid
JSON or a missing field (not listed, counted, kept for inspection, its reason in `damaged` and logged once).
"""

from __future__ import annotations

import json
import logging
import os
import re
import secrets
import shutil
import stat
import threading
import time
from dataclasses import dataclass
from typing import NamedTuple

from moe_monitor.schema.capture_record import ID_RE, NAME_RE, CaptureMeta, CaptureMetaError

__all__ = ["ID_RE", "NAME_RE", "Catalog", "CaptureMeta", "QuotaError", "Retention", "new_capture_id"]
METADATA = "metadata.json"
BREAKDOWN = "breakdown.json"
TMP = ".tmp-"  # a capture being stored: .tmp-<id>
MAX_METADATA_BYTES = 1 << 20  # a real metadata.json is ~2-10 kB (the window's per-layer statistics, the file list)
LIST_LIMIT = 1000  # captures list() returns by default, newest first (retention keeps 20 by default)
LIST_BYTES = 16 << 20  # metadata one listing holds (at ~2-10 kB a capture, LIST_LIMIT of them fit)
SETTLED_NS = 2_000_000_000  # a directory mtime this recent may change again within the timestamp's granularity
log = logging.getLogger(__name__)


def is_regular_file(path: str) -> bool:
    """A regular file that is not a symlink (lstat: the link itself is examined)."""
    try:
        return stat.S_ISREG(os.lstat(path).st_mode)
    except OSError:
        return False


class QuotaError(Exception):
    pass


@dataclass(frozen=True)
class Retention:
    max_count: int = 20  # captures with traces
    max_bytes: int = 2 * 1024**3
    max_age_s: float = 7 * 24 * 3600
    max_records: int | None = None  # captures that stored no trace (metadata only); None: as many as max_count

    @property
    def records(self) -> int:
        return self.max_count if self.max_records is None else self.max_records


def new_capture_id(reason: str, now: float) -> str:
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(now))
    return f"{stamp}-{re.sub('[^a-z_]', '_', reason.lower())[:32] or 'manual'}-{secrets.token_hex(3)}"


class _Entry(NamedTuple):
    """What the index keeps of a capture (not its metadata: memory stays ~200 bytes a capture)."""

    seen: tuple[int, int]  # its directory's (inode, mtime) when its metadata was read
    created: float
    total_bytes: int
    size: int  # bytes of its metadata.json
    breakdown: bool  # breakdown.json is one of its files
    record: bool  # no file at all: a capture that stored no trace, kept for its outcome


class Catalog:
    def __init__(self, root: str, retention: Retention = Retention(), max_metadata_bytes: int = MAX_METADATA_BYTES):
        self.root, self.retention, self.max_metadata_bytes = root, retention, max_metadata_bytes
        os.makedirs(root, exist_ok=True)
        self.swept: list[str] = []  # ids of leftover directories removed (stores that did not finish)
        self.damaged: dict[str, str] = {}  # id -> why its metadata.json is unusable (not listed, never deleted)
        self._index: dict[str, _Entry] = {}  # the captures with usable metadata
        self._read_damaged: dict[str, tuple[int, int]] = {}  # damaged id -> its directory as read
        self._listed: dict[str, tuple[_Entry, CaptureMeta]] = {}  # the last listing's metadata (at most LIST_BYTES)
        self._order: list[str] | None = None  # the index's ids, newest first (None: to sort again)
        self._newest_breakdown: str | None | bool = False  # id of the newest with a breakdown (False: to find)
        self._bytes = 0  # total_bytes of the indexed captures
        self._records = 0  # indexed captures without files
        self._stamp: tuple[int, int] | None = None  # the root's (inode, mtime) when the index last matched it
        self._lock = threading.RLock()
        self._missing_logged = False
        self.sweep()
        self.refresh()

    @property
    def count(self) -> int:
        """Captures with usable metadata that hold traces (all of them: list() returns at most its limit)."""
        return len(self._index) - self._records

    @property
    def records(self) -> int:
        """Captures that stored no trace, kept for their outcome (metadata only)."""
        return self._records

    @property
    def total_bytes(self) -> int:
        return self._bytes

    def refresh(self, blocking: bool = True) -> None:
        """Bring the index up to date with the directory: one stat when it has not changed since the last call,
        else a listing and a read of each capture directory that is new or replaced. `blocking=False` (the
        window loop): return at once, the index as it is, while another thread holds the catalog."""
        if not self._lock.acquire(blocking=blocking):
            return
        try:
            try:
                st = os.stat(self.root)
            except FileNotFoundError:
                if not self._missing_logged:
                    log.warning("catalog: %s is missing; it is created again by the next capture", self.root)
                self._missing_logged = True
                self._forget(set(self._index) | set(self.damaged))
                self._stamp = None
                return
            self._missing_logged = False
            stamp = (st.st_ino, st.st_mtime_ns)
            if stamp != self._stamp:
                settled = self._rescan() and time.time_ns() - st.st_mtime_ns > SETTLED_NS
                self._stamp = stamp if settled else None  # else listed again next time: it may change unseen
        finally:
            self._lock.release()

    def _rescan(self) -> bool:
        """Read the capture directories the index does not know as they are; False while one has no metadata
        yet (being made by someone else, or left by an older version for sweep())."""
        present: dict[str, tuple[int, int]] = {}
        try:
            with os.scandir(self.root) as entries:
                for entry in entries:
                    if ID_RE.match(entry.name) and entry.is_dir(follow_symlinks=False):
                        try:
                            present[entry.name] = (entry.inode(), entry.stat(follow_symlinks=False).st_mtime_ns)
                        except FileNotFoundError:
                            continue
        except FileNotFoundError:
            pass
        self._forget((set(self._index) | set(self.damaged)) - set(present))
        whole = True
        for capture_id, seen in present.items():
            known = self._index.get(capture_id)
            if (known is not None and known.seen == seen) or self._read_damaged.get(capture_id) == seen:
                continue
            whole &= self._load(capture_id) is not None or capture_id in self.damaged
        return whole

    def _changed(self) -> None:
        self._order, self._newest_breakdown = None, False

    def _forget(self, capture_ids) -> None:
        for capture_id in capture_ids:
            gone = self._index.pop(capture_id, None)
            if gone is not None:
                self._bytes -= gone.total_bytes
                self._records -= gone.record
                self._changed()
            self._listed.pop(capture_id, None)
            self.damaged.pop(capture_id, None)
            self._read_damaged.pop(capture_id, None)

    def _load(self, capture_id: str) -> CaptureMeta | None:
        """Read one capture's metadata and record it in the index (or in `damaged`, with why); None when it has
        no usable metadata."""
        return self._record(capture_id, *self._read_entry(capture_id))

    def _read_entry(self, capture_id: str) -> tuple[CaptureMeta | None, str | None, tuple[int, int], int]:
        """(metadata or None, why it is unusable or None, its directory's (inode, mtime), metadata bytes)."""
        d = os.path.join(self.root, capture_id)
        meta = problem = None
        seen, size = (0, 0), 0
        try:
            st = os.lstat(d)
            seen = (st.st_ino, st.st_mtime_ns)
            if stat.S_ISDIR(st.st_mode):  # a link is never followed
                meta, problem, size = self._read(os.path.join(d, METADATA), capture_id)
        except OSError:  # gone meanwhile (retention, an operator), unreadable
            pass
        return meta, problem, seen, size

    def _record(self, capture_id: str, meta: CaptureMeta | None, problem: str | None, seen: tuple[int, int],
                size: int) -> CaptureMeta | None:
        logged, before = capture_id in self.damaged, self._index.get(capture_id)
        if meta is None or before is None:
            self._forget([capture_id])
        if meta is None:
            if problem is not None:
                if not logged:  # once per capture, not at every listing
                    log.warning("capture %s: unusable metadata (%s); not listed, kept for inspection", capture_id,
                                problem)
                self.damaged[capture_id], self._read_damaged[capture_id] = problem, seen
            return None
        entry = _Entry(seen, meta.created, meta.total_bytes, size, BREAKDOWN in meta.file_names,
                       not meta.stored_traces)
        self._bytes += entry.total_bytes - (before.total_bytes if before else 0)
        self._records += entry.record - (before.record if before else 0)
        self._index[capture_id] = entry
        if before is None or before.breakdown != entry.breakdown:  # read again in place: it keeps its place
            self._changed()
        return meta

    def _read(self, path: str, capture_id: str) -> tuple[CaptureMeta | None, str | None, int]:
        """(metadata, None, bytes), (None, why it is unusable, bytes), or (None, None, 0) when there is none: no
        metadata.json, or not a regular file (never followed: O_NOFOLLOW; a FIFO cannot block: O_NONBLOCK)."""
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
        except OSError:
            return None, None, 0
        with open(fd, "rb") as f:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                return None, None, 0
            data = f.read(self.max_metadata_bytes + 1)
            if len(data) > self.max_metadata_bytes:
                return None, (f"metadata.json is {os.fstat(fd).st_size:,} bytes, over the "
                              f"{self.max_metadata_bytes:,}-byte limit"), len(data)
        try:
            doc = json.loads(data)
        except (ValueError, RecursionError) as e:  # JSONDecodeError, UnicodeDecodeError; nesting past the stack
            return None, f"not valid JSON: {type(e).__name__}: {str(e)[:200]}", len(data)
        try:
            return _checked(doc, capture_id), None, len(data)
        except CaptureMetaError as e:
            return None, str(e), len(data)

    def _sorted(self) -> list[str]:
        if self._order is None:
            self._order = sorted(self._index, reverse=True)
        return self._order

    def sweep(self) -> list[str]:
        """Remove the catalog's own directories that hold no capture: `.tmp-<id>` (a store killed half-way)
        and `<id>` without metadata.json (a store by an older version that failed half-way). Real directories
        with those names only: links, files, any other name, and a capture with damaged metadata (ignored by
        list(), kept for inspection) are left alone. Returns the ids removed."""
        removed = []
        for name in sorted(os.listdir(self.root)):
            capture_id, path = name.removeprefix(TMP), os.path.join(self.root, name)
            if not ID_RE.match(capture_id) or (capture_id == name and os.path.lexists(os.path.join(path, METADATA))):
                continue
            try:
                if not stat.S_ISDIR(os.lstat(path).st_mode):
                    continue
                shutil.rmtree(path)
            except OSError as e:
                log.warning("catalog: cannot remove %s, left by a store that did not finish: %s", name, e)
                continue
            log.warning("catalog: removed %s, left by a store that did not finish", name)
            removed.append(capture_id)
        self.swept += removed
        with self._lock:
            self._forget(removed)
        return removed

    def get(self, capture_id: str) -> dict | None:
        """One capture's metadata as JSON (what /api/captures/{id} serves); `meta` says what it holds."""
        meta = self.meta(capture_id)
        return None if meta is None else meta.to_json()

    def meta(self, capture_id: str) -> CaptureMeta | None:
        """One capture's metadata, read again from its file (so an edit in place is seen); None for an unknown
        or malformed id, or unusable metadata."""
        if not isinstance(capture_id, str) or not ID_RE.match(capture_id):
            return None
        read = self._read_entry(capture_id)  # outside the lock; recorded unless another thread holds the catalog
        if self._lock.acquire(blocking=False):
            try:
                self._record(capture_id, *read)
            finally:
                self._lock.release()
        return read[0]

    def list(self, limit: int | None = LIST_LIMIT) -> list[dict]:
        """`metas` as JSON (what /api/captures lists)."""
        return [meta.to_json() for meta in self.metas(limit)]

    def metas(self, limit: int | None = LIST_LIMIT) -> list[CaptureMeta]:
        """The newest captures with usable metadata, newest first: at most `limit` (None: no limit) and at most
        LIST_BYTES of metadata (at least one); `count` says how many there are. [] while the directory is missing
        (it is made again by the next store). Only the metadata that changed since the last listing is read; it
        blocks while another thread reads the directory: call it off the event loop."""
        self.refresh()
        with self._lock:
            out, listed, budget = [], {}, LIST_BYTES
            for capture_id in self._sorted()[:limit]:
                entry, cached = self._index.get(capture_id), self._listed.get(capture_id)
                if entry is not None and cached is not None and cached[0] == entry:
                    meta = cached[1]
                else:
                    meta = self._load(capture_id)
                    entry = self._index.get(capture_id)
                    if meta is None or entry is None:
                        continue
                budget -= entry.size
                if budget < 0 and out:
                    break
                listed[capture_id] = (entry, meta)
                out.append(meta)
            self._listed = listed
            return out

    def newest_with_breakdown(self) -> tuple[str, str] | None:
        """(id, path of its breakdown.json) of the newest capture that has one, a regular file; from the index
        as it is (no refresh, no metadata read), found again only when the index changed. None also while
        another thread holds the catalog: the window loop must not wait for it."""
        if not self._lock.acquire(blocking=False):
            return None
        try:
            if self._newest_breakdown is False:
                self._newest_breakdown = next(
                    (i for i in self._sorted() if self._index[i].breakdown
                     and is_regular_file(os.path.join(self.root, i, BREAKDOWN))), None)
            newest = self._newest_breakdown
            return None if newest is None else (newest, os.path.join(self.root, newest, BREAKDOWN))
        finally:
            self._lock.release()

    def file_path(self, capture_id: str, name: str) -> str | None:
        """Path of one of the capture's own files, or None (unknown id, unknown or unsafe name)."""
        meta = self.meta(capture_id)
        if meta is None or not NAME_RE.match(name or "") or name not in meta.file_names:
            return None
        path = os.path.join(self.root, capture_id, name)
        return path if is_regular_file(path) else None

    def used_bytes(self) -> int:
        self.refresh()
        return self._bytes

    def store(self, capture_id: str, files: list[str], metadata: dict,
              extra: dict[str, bytes] | None = None) -> CaptureMeta:
        """Move `files` into the store with their metadata, all or nothing. Evicts the oldest captures to make
        room; raises QuotaError (and deletes nothing else) when this capture alone exceeds the byte quota, and
        OSError (ENOSPC, ...) or TypeError (metadata that is not JSON) with nothing of it left in the store:
        the files it moved are gone with it, the others are still where they were; ValueError (CaptureMetaError)
        for metadata that reading it back would refuse. Without files and `extra` it stores a record (metadata
        only), which evicts only older records. Returns the metadata as stored."""
        extra = extra or {}
        if not ID_RE.match(capture_id):
            raise ValueError(f"bad capture id {capture_id!r}")
        refused = [p for p in files if not is_regular_file(p)]
        if refused:
            log.warning("capture %s: not storing %s: not regular files (symlinks are never followed)", capture_id,
                        ", ".join(os.path.basename(p) for p in refused))
            files = [p for p in files if p not in refused]
        sizes = {os.path.basename(p): os.path.getsize(p) for p in files}
        total = sum(sizes.values()) + sum(len(b) for b in extra.values())
        if total > self.retention.max_bytes:
            raise QuotaError(f"capture of {total} bytes exceeds the {self.retention.max_bytes}-byte quota")
        text = json.dumps(dict(metadata, id=capture_id, total_bytes=total,
                               files=[{"name": n, "bytes": b} for n, b in sorted(sizes.items())]
                               + [{"name": n, "bytes": len(b)} for n, b in extra.items()]),
                          indent=1)  # before anything moves
        meta = CaptureMeta.from_json(json.loads(text))
        if len(text.encode()) > self.max_metadata_bytes:
            raise ValueError(f"metadata of {len(text.encode()):,} bytes, over the {self.max_metadata_bytes:,}-byte "
                             "limit that reading it back applies")
        os.makedirs(self.root, exist_ok=True)  # deleted while we ran: made again
        self.sweep()
        self.enforce(time.time(), incoming_bytes=total, incoming="capture" if meta.stored_traces else "record")
        tmp = os.path.join(self.root, TMP + capture_id)
        os.mkdir(tmp)
        try:
            for p in files:
                shutil.move(p, os.path.join(tmp, os.path.basename(p)))
            for name, data in {**extra, METADATA: text.encode()}.items():
                with open(os.path.join(tmp, name), "wb") as f:
                    f.write(data)
            os.rename(tmp, os.path.join(self.root, capture_id))
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        with self._lock:
            self._load(capture_id)  # into the index, as it is on disk
        return meta

    def enforce(self, now: float, incoming_bytes: int = 0, incoming: str | None = None) -> list[str]:
        """Drop captures over age, then the oldest until count and bytes leave room for the incoming one
        (`incoming`: "capture" or "record"). Captures with traces and records (no file) are counted apart: a
        record never evicts a capture."""
        removed = []
        self.refresh()
        with self._lock:
            captures = sorted(self._sorted(), key=lambda i: self._index[i].created)  # ids: validated dir names
            r = self.retention
            used = self._bytes
            left = {False: self.count + (incoming == "capture"), True: self._records + (incoming == "record")}
            for capture_id in captures:
                entry = self._index[capture_id]
                too_old = now - entry.created > r.max_age_s
                too_many = left[entry.record] > (r.records if entry.record else r.max_count)
                too_big = used + incoming_bytes > r.max_bytes and not entry.record
                if not (too_old or too_many or too_big):
                    continue
                shutil.rmtree(os.path.join(self.root, capture_id), ignore_errors=True)
                self._forget([capture_id])
                left[entry.record], used = left[entry.record] - 1, used - entry.total_bytes
                removed.append(capture_id)
        return removed


def _checked(doc: object, capture_id: str) -> CaptureMeta:
    """The metadata of the capture stored under `capture_id`, checked (`CaptureMeta.from_json`): it must name that
    capture, so that no metadata names a path outside its own directory."""
    if isinstance(doc, dict) and doc.get("id") != capture_id:
        raise CaptureMetaError(f"names another id ({doc.get('id')!r})")
    return CaptureMeta.from_json(doc)
