"""What a model folder holds, named by content without loading it: the SHA-256 of its config and weight files.

The visual-entropy cache is keyed by these, so a warm cache is found with no model in memory, and any changed
weight file (a fine-tuned encoder, another checkpoint in the same folder) still recomputes. Hashing 15 GB of
weights once takes a while, so it is done once per file: a file in the Hugging Face cache is already named by its
SHA-256 (the blob its snapshot links to), and any other file's hash is remembered by path, size and modification
time in a small JSON file beside the entropy cache.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import tempfile
from pathlib import Path

WEIGHT_PATTERNS = ("*.safetensors", "*.bin", "*.pt", "*.pth")
_SHA256_NAME = re.compile(r"[0-9a-f]{64}")


def local_model_folder(name_or_path: str) -> Path:
    """The folder of a local model, or of a hub model's snapshot (config and weights only; fetched if missing, as
    loading it would)."""
    if Path(name_or_path).is_dir():
        return Path(name_or_path)
    from huggingface_hub import snapshot_download

    folder = Path(snapshot_download(name_or_path, allow_patterns=["*.json", "*.safetensors"]))
    if not list(folder.glob("*.safetensors")):  # an older checkpoint with torch pickles only
        folder = Path(snapshot_download(name_or_path, allow_patterns=["*.json", *WEIGHT_PATTERNS[1:]]))
    return folder


def model_file_hashes(name_or_path: str, memo: str | os.PathLike | None = None) -> dict[str, str]:
    """``{file name: sha256}`` of the model's ``config.json`` and weight files."""
    folder = local_model_folder(name_or_path)
    files = sorted({f for pattern in ("config.json", *WEIGHT_PATTERNS) for f in folder.glob(pattern)})
    if not any(f.name != "config.json" for f in files):
        raise FileNotFoundError(f"{folder} has no weight files ({', '.join(WEIGHT_PATTERNS)}): nothing to score with")
    memo_path = Path(memo) if memo is not None else None
    known = _read_memo(memo_path)
    hashes, changed = {}, False
    for file in files:
        digest, fresh = _file_sha256(file, known)
        hashes[file.name] = digest
        changed |= fresh
    if changed and memo_path is not None:
        _write_memo(memo_path, known)
    return hashes


def _file_sha256(file: Path, known: dict) -> tuple[str, bool]:
    """The file's SHA-256 and whether it had to be computed (``known`` is updated)."""
    target = file.resolve()
    if file.is_symlink() and _SHA256_NAME.fullmatch(target.name):  # a hub blob: its name is its hash
        return target.name, False
    stat = target.stat()
    stamp = [stat.st_size, stat.st_mtime_ns]
    entry = known.get(str(target))
    if entry is not None and entry.get("stamp") == stamp:
        return entry["sha256"], False
    digest = hashlib.sha256()
    with open(target, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 24), b""):
            digest.update(block)
    known[str(target)] = {"stamp": stamp, "sha256": digest.hexdigest()}
    return digest.hexdigest(), True


def _read_memo(path: Path | None) -> dict:
    if path is None or not path.is_file():
        return {}
    try:
        memo = json.loads(path.read_text())
    except (OSError, ValueError):  # unreadable: every file is hashed again, nothing else is lost
        return {}
    return memo if isinstance(memo, dict) else {}


def _write_memo(path: Path, memo: dict) -> None:
    """Atomically (a reader sees the old memo or the new one); two writers at once lose at most a re-hash."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".json", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(memo, f)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
