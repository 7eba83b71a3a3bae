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
"""

from __future__ import annotations

import json
import logging
import os
import re
import secrets
import shutil
import stat
import time
from dataclasses import dataclass

ID_RE = re.compile(r"^\d{8}T\d{6}Z-[a-z_]{1,32}-[0-9a-f]{6}$")
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,254}$")
METADATA = "metadata.json"
TMP = ".tmp-"  # a capture being stored: .tmp-<id>
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
    max_count: int = 20
    max_bytes: int = 2 * 1024**3
    max_age_s: float = 7 * 24 * 3600


def new_capture_id(reason: str, now: float) -> str:
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(now))
    return f"{stamp}-{re.sub('[^a-z_]', '_', reason.lower())[:32] or 'manual'}-{secrets.token_hex(3)}"


class Catalog:
    def __init__(self, root: str, retention: Retention = Retention()):
        self.root, self.retention = root, retention
        os.makedirs(root, exist_ok=True)
        self.swept: list[str] = []  # ids of leftover directories removed (stores that did not finish)
        self.damaged: set[str] = set()  # ids whose metadata.json is unusable (not listed, never deleted)
        self._missing_logged = False
        self.sweep()

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
        return removed

    def _dir(self, capture_id: str) -> str | None:
        if not isinstance(capture_id, str) or not ID_RE.match(capture_id):
            return None
        path = os.path.join(self.root, capture_id)
        return path if not os.path.islink(path) and is_regular_file(os.path.join(path, METADATA)) else None

    def get(self, capture_id: str) -> dict | None:
        d = self._dir(capture_id)
        if d is None:
            return None
        try:
            with open(os.path.join(d, METADATA)) as f:
                meta = json.load(f)
        except (OSError, json.JSONDecodeError, UnicodeDecodeError):
            return None
        problem = metadata_problem(meta, capture_id)
        if problem is not None:
            if capture_id not in self.damaged:  # once per capture, not at every listing
                log.warning("capture %s: unusable metadata (%s); not listed, kept for inspection", capture_id,
                            problem)
            self.damaged.add(capture_id)
            return None
        self.damaged.discard(capture_id)
        return meta

    def list(self) -> list[dict]:
        """Every capture with usable metadata, newest first; [] while the directory is missing (it is made
        again by the next store)."""
        try:
            names = os.listdir(self.root)
        except FileNotFoundError:
            if not self._missing_logged:
                log.warning("catalog: %s is missing; it is created again by the next capture", self.root)
            self._missing_logged = True
            return []
        self._missing_logged = False
        out = []
        for name in sorted(names, reverse=True):
            meta = self.get(name)
            if meta is not None:
                out.append(meta)
        self.damaged &= set(names)
        return out

    def file_path(self, capture_id: str, name: str) -> str | None:
        """Path of one of the capture's own files, or None (unknown id, unknown or unsafe name)."""
        meta = self.get(capture_id)
        if meta is None or not NAME_RE.match(name or "") or name not in {f["name"] for f in meta["files"]}:
            return None
        path = os.path.join(self.root, capture_id, name)
        return path if is_regular_file(path) else None

    def used_bytes(self) -> int:
        return sum(m.get("total_bytes", 0) for m in self.list())

    def store(self, capture_id: str, files: list[str], metadata: dict,
              extra: dict[str, bytes] | None = None) -> dict:
        """Move `files` into the store with their metadata, all or nothing. Evicts the oldest captures to make
        room; raises QuotaError (and deletes nothing else) when this capture alone exceeds the byte quota, and
        OSError (ENOSPC, ...) or TypeError (metadata that is not JSON) with nothing of it left in the store:
        the files it moved are gone with it, the others are still where they were."""
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
        meta = dict(metadata, id=capture_id, total_bytes=total,
                    files=[{"name": n, "bytes": b} for n, b in sorted(sizes.items())]
                    + [{"name": n, "bytes": len(b)} for n, b in extra.items()])
        text = json.dumps(meta, indent=1)  # before anything moves
        os.makedirs(self.root, exist_ok=True)  # deleted while we ran: made again
        self.sweep()
        self.enforce(time.time(), incoming_bytes=total)
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
        return meta

    def enforce(self, now: float, incoming_bytes: int = 0) -> list[str]:
        """Drop captures over age, then the oldest until count and bytes leave room for the incoming one."""
        removed = []
        captures = sorted(self.list(), key=lambda m: m.get("created", 0))
        r = self.retention
        used = sum(m.get("total_bytes", 0) for m in captures)
        for m in list(captures):
            too_old = now - m.get("created", now) > r.max_age_s
            too_many = len(captures) + (1 if incoming_bytes else 0) > r.max_count
            too_big = used + incoming_bytes > r.max_bytes
            if not (too_old or too_many or too_big):
                continue
            shutil.rmtree(os.path.join(self.root, m["id"]), ignore_errors=True)  # id == a validated dir name
            captures.remove(m)
            used -= m.get("total_bytes", 0)
            removed.append(m["id"])
        return removed


def metadata_problem(meta, capture_id: str) -> str | None:
    """What makes a capture's metadata unusable by the API, the CLI and retention; None when it is whole."""
    if not isinstance(meta, dict):
        return f"a {type(meta).__name__}, not an object"
    if meta.get("id") != capture_id:
        return f"names another id ({meta.get('id')!r})"
    files = meta.get("files")
    if not isinstance(files, list) or not all(
            isinstance(f, dict) and isinstance(f.get("name"), str) and _number(f.get("bytes", 0)) for f in files):
        return "files is not a list of {name, bytes}"
    for key in ("created", "total_bytes"):
        if not _number(meta.get(key)):
            return f"{key} is not a number"
    for key in ("reason", "outcome"):
        if not isinstance(meta.get(key, ""), str):
            return f"{key} is not a string"
    if not isinstance(meta.get("evidence", {}), dict):
        return "evidence is not an object"
    return None


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)
