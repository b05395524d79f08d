"""On-disk cache of per-image visual entropies, safe against kills and concurrent writers.

Layout: ``<root>/<fingerprint>/part-*.json``. The fingerprint names everything that changes the number (scorer,
encoder weights, layer, resolution); inside, entries map an image's content hash to its entropy. Every part is
written to a temporary file and renamed into place, so a reader sees whole parts or nothing: a precompute killed
half way keeps every finished part and resumes from there. Concurrent writers (several ranks) only ever add parts
with identical values for the same keys.
"""

from __future__ import annotations

import json
import logging
import math
import os
import tempfile
import uuid
from pathlib import Path

log = logging.getLogger(__name__)

FORMAT_VERSION = 1


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
        """Merge all parts into one (written before the old ones are removed, so nothing is lost on a kill)."""
        parts = sorted(self.dir.glob("part-*.json"))
        if len(parts) <= 1:
            return
        merged = self.load()
        keep = self._write(f"part-{uuid.uuid4().hex}.json", merged)
        for part in parts:
            if part != keep:
                part.unlink(missing_ok=True)

    def _write(self, name: str, entries: dict[str, float]) -> Path:
        self.dir.mkdir(parents=True, exist_ok=True)
        payload = {"version": FORMAT_VERSION, "fingerprint": self.fingerprint, "entries": entries}
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
