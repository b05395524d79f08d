"""Reading multimodal reasoning data from a hub id, a `save_to_disk` folder, or local parquet / JSON / JSONL files.

Every source becomes ``{split: RawSplit}``: rows that can be indexed, the folder image paths are relative to, and a
name for error messages. Column names follow EasyR1 / Geometry3K (``images``, ``problem``, ``answer``); a mapping
renames others.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

FIELDS = ("images", "problem", "answer")
FILE_SUFFIXES = (".jsonl", ".json", ".parquet")
SPLIT_ALIASES = {"validation": ("validation", "val", "valid", "dev"), "train": ("train",), "test": ("test",)}


@dataclass
class RawSplit:
    rows: Sequence[dict[str, Any]]  # a list of dicts or a datasets.Dataset
    base_dir: Path | None  # relative image paths are resolved against this
    name: str  # file or dataset name, for messages

    @property
    def columns(self) -> list[str]:
        if hasattr(self.rows, "column_names"):
            return list(self.rows.column_names)
        seen: dict[str, None] = {}
        for row in self.rows:
            seen.update(dict.fromkeys(row))
        return list(seen)


UNREADABLE = "__unreadable_line__"  # a JSONL line that is not a JSON object: kept in place, reported as a bad row


def read_rows(path: Path) -> list[dict[str, Any]]:
    """Rows of one local file. JSON may be a list of objects or ``{"data": [...]}``; JSONL has one object a line.

    A JSONL line that is not UTF-8 JSON holding an object becomes a row ``{UNREADABLE: reason}`` at its place, so the
    datamodule's bad-row policy (raise or skip) applies to it like to any other bad row, and row numbers stay put.
    """
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        return pq.read_table(path).to_pylist()
    if path.suffix == ".jsonl":
        rows = []
        for number, line in enumerate(path.read_bytes().splitlines(), start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line.decode("utf-8"))
                reason = None if isinstance(row, dict) else f"holds a JSON {type(row).__name__}, not an object"
            except UnicodeDecodeError as error:
                reason = f"is not UTF-8 (byte {error.start})"
            except json.JSONDecodeError as error:
                reason = f"is not valid JSON ({error.msg})"
            rows.append(row if reason is None else {UNREADABLE: f"line {number} {reason}"})
        return rows
    try:
        payload = json.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as error:
        raise ValueError(f"{path}: not UTF-8 (byte {error.start})") from None
    except json.JSONDecodeError as error:
        raise ValueError(f"{path}: not valid JSON ({error.msg} at line {error.lineno})") from None
    rows = payload.get("data") if isinstance(payload, dict) else payload
    if not isinstance(rows, list) or not all(isinstance(r, dict) for r in rows):
        raise ValueError(f"{path}: expected a list of JSON objects (one per sample)")
    return rows


def _split_files(folder: Path) -> dict[str, Path]:
    found = {}
    for split, aliases in SPLIT_ALIASES.items():
        for alias in aliases:
            for suffix in FILE_SUFFIXES:
                if (folder / f"{alias}{suffix}").is_file():
                    found.setdefault(split, folder / f"{alias}{suffix}")
    return found


def load_source(source: str | os.PathLike | dict[str, str]) -> dict[str, RawSplit]:
    """All splits of a source.

    * ``{"train": "a.jsonl", "test": "b.parquet"}``: one file per split;
    * a file: its rows are the ``train`` split;
    * a folder written by ``datasets.save_to_disk`` (a DatasetDict or one Dataset, then ``train``);
    * a folder with ``train`` / ``val`` (``validation``) / ``test`` files in .jsonl, .json or .parquet;
    * anything else is a Hugging Face hub id, loaded with ``datasets.load_dataset`` (needs the network).
    """
    if isinstance(source, dict):
        return {split: _file_split(Path(path)) for split, path in source.items()}
    path = Path(source)
    if path.is_file():
        return {"train": _file_split(path)}
    if path.is_dir():
        if (path / "dataset_dict.json").is_file() or (path / "state.json").is_file():
            import datasets

            loaded = datasets.load_from_disk(str(path))
            if isinstance(loaded, datasets.Dataset):
                loaded = {"train": loaded}
            return {_canonical(name): RawSplit(ds, path, f"{path}[{name}]") for name, ds in loaded.items()}
        files = _split_files(path)
        if not files:
            raise ValueError(
                f"{path}: found neither a save_to_disk dataset nor train/val/test files ({', '.join(FILE_SUFFIXES)})"
            )
        return {split: _file_split(file) for split, file in files.items()}
    if str(source).endswith(FILE_SUFFIXES) or str(source).startswith((".", "/", "~")):
        raise ValueError(f"data source {source} does not exist")
    import datasets

    try:
        loaded = datasets.load_dataset(str(source))
    except Exception as error:  # offline, a typo, or a folder looked for in the wrong working directory
        raise ValueError(
            f"data source {str(source)!r} is neither a file nor a folder under the working directory {os.getcwd()} "
            f"nor a dataset the Hugging Face hub gave ({type(error).__name__}: {error}). Relative paths, like the "
            "offline default's data/synthetic, are read from the working directory: run from the repository root or "
            "pass --data.source with the data's full path"
        ) from error
    return {_canonical(name): RawSplit(ds, None, f"{source}[{name}]") for name, ds in loaded.items()}


def _canonical(split: str) -> str:
    for name, aliases in SPLIT_ALIASES.items():
        if split in aliases:
            return name
    return split


def _file_split(path: Path) -> RawSplit:
    if not path.is_file():
        raise ValueError(f"data file {path} does not exist")
    if path.suffix not in FILE_SUFFIXES:
        raise ValueError(f"{path}: unsupported file type {path.suffix!r}; use one of {', '.join(FILE_SUFFIXES)}")
    return RawSplit(read_rows(path), path.parent, str(path))


def check_columns(split: RawSplit, columns: dict[str, str]) -> None:
    """Raise if a needed column is absent, listing the columns that exist."""
    present = split.columns
    for field in FIELDS:
        column = columns.get(field, field)
        if column not in present:
            raise ValueError(
                f"{split.name}: column {column!r} (for {field!r}) not found; the columns are {present}. "
                f"Map yours with columns={{'{field}': '<your column>'}}"
            )
