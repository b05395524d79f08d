"""On-disk cache of per-image visual entropies, safe against kills, corruption, a full disk and concurrent writers.

Layout: ``<root>/<fingerprint>/part-*.json``. The fingerprint names everything that changes the number (scorer,
encoder weights, layer, resolution); inside, entries map an image's content hash to its entropy. Every part is
written to a temporary file and renamed into place, so a reader sees whole parts or nothing: a precompute killed
half way keeps every finished part and resumes from there. Each part carries a SHA-256 of its entries, so a
corrupted or hand-edited part is detected and only its images are recomputed; parts hold at most
:data:`PART_SIZE` entries, so one bad part costs at most that many. Processes that precompute into one cache at
once take turns (:meth:`EntropyCache.lock`): the second finds the first one's values instead of recomputing them.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import os
import tempfile
import uuid
from pathlib import Path

log = logging.getLogger(__name__)

FORMAT_VERSION = 2  # 2: parts carry a checksum of their entries (version-1 parts are recomputed once)
PART_SIZE = 4096  # entries per part after compaction


def entries_checksum(entries: dict[str, float]) -> str:
    """SHA-256 of the entries in a canonical text form (sorted keys, floats by repr: exact)."""
    return hashlib.sha256(json.dumps(entries, sort_keys=True).encode()).hexdigest()


class EntropyCache:
    def __init__(self, root: str | os.PathLike, fingerprint: str):
        self.fingerprint = fingerprint
        self.dir = Path(root) / fingerprint[:32]

    def load(self) -> dict[str, float]:
        """All cached entries. An unreadable or foreign part is skipped with a warning (its images get recomputed)."""
        entries: dict[str, float] = {}
        if not self.dir.is_dir():
            return entries
        for part in sorted(self.dir.glob("part-*.json")):
            try:
                payload = json.loads(part.read_text())
                if payload.get("version") != FORMAT_VERSION or payload.get("fingerprint") != self.fingerprint:
                    raise ValueError("written for another fingerprint or format")
                values = {str(k): float(v) for k, v in payload["entries"].items()}
                if payload.get("sha256") != entries_checksum(values):
                    raise ValueError("its entries do not match its checksum (corrupted or edited)")
                if not all(math.isfinite(v) for v in values.values()):
                    raise ValueError("holds a non-finite entropy")
            except (OSError, ValueError, KeyError, TypeError, AttributeError) as error:
                log.warning("ignoring unreadable entropy cache part %s (%s); its images will be recomputed", part, error)
                continue
            entries.update(values)
        return entries

    def add(self, entries: dict[str, float]) -> None:
        """Atomically write one more part."""
        if not entries:
            return
        self._write(f"part-{uuid.uuid4().hex}.json", entries)

    def compact(self) -> None:
        """Merge the small parts of a precompute into parts of :data:`PART_SIZE` entries. The merged parts are all
        written before any old one is removed, so a kill or a full disk loses nothing: the values stay in the old
        parts (a failed merge is a warning, not an error)."""
        parts = sorted(self.dir.glob("part-*.json"))
        merged = self.load()
        if len(parts) <= max(1, math.ceil(len(merged) / PART_SIZE)):
            return
        keys = sorted(merged)
        written = []
        try:
            for start in range(0, len(keys), PART_SIZE):
                chunk = {k: merged[k] for k in keys[start : start + PART_SIZE]}
                written.append(self._write(f"part-{uuid.uuid4().hex}.json", chunk))
        except OSError as error:
            for part in written:
                part.unlink(missing_ok=True)
            log.warning("could not merge the entropy cache parts in %s (%s); they stay as they are", self.dir, error)
            return
        for part in parts:
            part.unlink(missing_ok=True)

    @contextlib.contextmanager
    def lock(self):
        """Hold this cache's lock file: one process at a time precomputes into it (waits for the holder). Where
        file locks are not available, a no-op."""
        self.dir.mkdir(parents=True, exist_ok=True)
        try:
            import fcntl
        except ImportError:  # not POSIX: concurrent writers still only add identical values
            yield
            return
        with open(self.dir / ".lock", "w") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)

    def _write(self, name: str, entries: dict[str, float]) -> Path:
        self.dir.mkdir(parents=True, exist_ok=True)
        payload = {"version": FORMAT_VERSION, "fingerprint": self.fingerprint, "sha256": entries_checksum(entries),
                   "entries": entries}
        fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".json", dir=self.dir)
        try:
            with os.fdopen(fd, "w") as f:
                json.dump(payload, f)  # json writes floats with repr: they read back bit-identical
                f.flush()
                os.fsync(f.fileno())
            target = self.dir / name
            os.replace(tmp, target)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        return target
