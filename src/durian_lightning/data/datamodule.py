"""The LightningDataModule: multimodal reasoning samples with their visual entropy precomputed and cached.

Batches are processor-agnostic: the policy module tokenizes (it owns padding side and max length). Each batch is a
dict of lists, one entry per sample: ``id``, ``images`` (RGB PIL images), ``problem``, ``answer``, ``messages`` (the
chat, with the system prompt and the thinking instruction), ``prompt`` (the chat rendered through the processor's
chat template, or None without a model), plus ``visual_entropy`` as a float tensor (mean over a sample's images).
"""

from __future__ import annotations

import functools
import logging
import math
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset

from durian_lightning.core.difficulty import percentile_thresholds
from durian_lightning.data.entropy_cache import EntropyCache
from durian_lightning.data.images import ImageError, content_hash, image_bytes, open_image
from durian_lightning.data.model_files import model_file_hashes
from durian_lightning.data.resumable import ResumableDataLoader
from durian_lightning.data.sources import UNREADABLE, RawSplit, check_columns, load_source
from durian_lightning.data.visual_entropy import PixelEntropyScorer, SpectralEntropyScorer, entropy_fingerprint
from durian_lightning.models.loading import DTYPES, load_image_encoder, resolve_model_path
from durian_lightning.models.prompts import DEFAULT_INSTRUCTION, DEFAULT_SYSTEM_PROMPT, build_messages, render_prompt

log = logging.getLogger(__name__)

@dataclass
class Sample:
    id: str
    split: str
    row: int  # 1-based position in its file (a JSONL file's line number)
    images: list[Any]  # raw values: paths, bytes, dicts or PIL images
    base_dir: Path | None
    image_hashes: list[str]
    problem: str
    answer: str
    extra: dict[str, Any] = field(default_factory=dict)
    visual_entropy: float = math.nan


class ReasoningDataset(Dataset):
    """Decodes a sample's images on access (never all in memory) and renders its prompt."""

    def __init__(self, samples: list[Sample], system_prompt, instruction, max_image_side, chat_template=None):
        self.samples = samples
        self.system_prompt, self.instruction = system_prompt, instruction
        self.max_image_side = max_image_side
        self.chat_template = chat_template  # callable(messages) -> str, or None

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> dict[str, Any]:
        s = self.samples[index]
        images = []
        for value in s.images:
            raw, decoded, name = image_bytes(value, s.base_dir)
            images.append(open_image(raw, decoded, name, self.max_image_side))
        messages = build_messages(s.problem, len(images), self.system_prompt, self.instruction)
        return {
            "id": s.id,
            "images": images,
            "problem": s.problem,
            "answer": s.answer,
            "messages": messages,
            "prompt": self.chat_template(messages) if self.chat_template else None,
            "visual_entropy": s.visual_entropy,
            **s.extra,
            "dataset_index": index,  # evaluation counts each sample once, whatever a distributed sampler repeats
        }


def collate_reasoning_batch(items: list[dict[str, Any]]) -> dict[str, Any]:
    """Lists per key; ``visual_entropy`` as a float32 tensor. A column some rows lack (an optional one, or null in
    parquet) is None for those rows, so a batch never depends on which rows it happens to hold."""
    keys = list(dict.fromkeys(key for item in items for key in item))
    batch = {key: [item.get(key) for item in items] for key in keys}
    batch["visual_entropy"] = torch.tensor(batch["visual_entropy"], dtype=torch.float32)
    return batch


class MultimodalReasoningDataModule(L.LightningDataModule):
    """Multimodal reasoning data (image(s), problem, answer) with cached per-image visual entropy.

    Args:
        source: a folder with train/val/test files (.jsonl/.json/.parquet), one file, a save_to_disk folder, a
            {split: file} mapping, or a Hugging Face hub id.
        model_name_or_path: the VLM whose vision encoder scores images (linked to the module's in the CLI;
            tiny:llava / tiny:qwen2_5_vl build a tiny offline one, tiny:llava-pretrained is the shipped one).
        columns: column renames, e.g. {"images": "image", "problem": "question", "id": "pid"}; a row's id column is its
            sample id (in batches and errors), else "split-row".
        val_fraction: share of train carved out as validation when the source has no validation split.
        test_fraction: share of train carved out as test when the source has no test split.
        split_seed: seed of that carving.
        system_prompt: the chat's system prompt (None for none).
        instruction: the thinking instruction appended to every problem (None for none).
        entropy_method: spectral (the paper's, needs the model) or pixel (model-free histogram entropy).
        vision_layer: which hidden state of the vision encoder (0 = patch embeddings, -1 = last block).
        feature_source: vision_tower (before any projector / patch merger) or projector (after it).
        image_processor_kwargs: passed to the image processor, e.g. {"max_pixels": 1003520}; sets the resolution.
        entropy_batch_size: images per encoder call during the precompute.
        dtype: the encoder's dtype while scoring (the CLI sets it to model.dtype, the run's).
        cache_dir: where entropies are cached (keyed by image content and by everything else the value depends on:
            the model files' hashes, layer, feature source, image processor, dtype, max_image_side).
        bad_rows: raise stops at the first bad row; skip drops it, counts it and warns with its name.
        max_image_side: images are shrunk so their longer side is at most this before any processing.
        batch_size: prompts per training batch (the rollout batch).
        eval_batch_size: prompts per validation / test batch (default: batch_size).
        num_workers: DataLoader worker processes.
        shuffle_seed: seed of the per-epoch training order.
        progress: show a progress bar during the entropy precompute.
    """

    def __init__(
        self,
        source: str | dict[str, str] = "data/synthetic",
        model_name_or_path: str | None = None,
        columns: dict[str, str] | None = None,
        val_fraction: float = 0.0,
        test_fraction: float = 0.0,
        split_seed: int = 0,
        system_prompt: str | None = DEFAULT_SYSTEM_PROMPT,
        instruction: str | None = DEFAULT_INSTRUCTION,
        entropy_method: Literal["spectral", "pixel"] = "spectral",
        vision_layer: int = -1,
        feature_source: Literal["vision_tower", "projector"] = "vision_tower",
        image_processor_kwargs: dict[str, Any] | None = None,
        entropy_batch_size: int = 32,
        dtype: Literal["float32", "bfloat16", "float16"] = "float32",
        cache_dir: str = ".cache/durian/entropy",
        bad_rows: Literal["raise", "skip"] = "raise",
        max_image_side: int = 2048,
        batch_size: int = 8,
        eval_batch_size: int | None = None,
        num_workers: int = 0,
        shuffle_seed: int = 0,
        progress: bool = True,
    ):
        super().__init__()
        if entropy_method not in ("spectral", "pixel"):
            raise ValueError(f"entropy_method must be 'spectral' or 'pixel', got {entropy_method!r}")
        if entropy_method == "spectral" and not model_name_or_path:
            raise ValueError("entropy_method='spectral' needs model_name_or_path (the VLM whose encoder scores images)")
        if dtype not in DTYPES:
            raise ValueError(f"data.dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
        if bad_rows not in ("raise", "skip"):
            raise ValueError(f"bad_rows must be 'raise' or 'skip', got {bad_rows!r}")
        for name, value in (("val_fraction", val_fraction), ("test_fraction", test_fraction)):
            if not 0.0 <= value < 1.0:
                raise ValueError(f"{name} must be in [0, 1), got {value}")
        for name, value in (("batch_size", batch_size), ("eval_batch_size", 1 if eval_batch_size is None else eval_batch_size),
                            ("entropy_batch_size", entropy_batch_size)):
            if value < 1:
                raise ValueError(f"data.{name} must be >= 1, got {value}")
        self.save_hyperparameters()
        self.source = source
        self.model_name_or_path = resolve_model_path(model_name_or_path) if model_name_or_path else None
        self.columns = dict(columns or {})
        self.samples: dict[str, list[Sample]] = {}
        self.skipped_rows: list[str] = []
        self._processor = None
        self.scorer_loads = self.encoder_calls = self.images_scored = 0  # what the precompute cost: 0 on a warm cache

    # ------------------------------------------------------------------------------------------ loading

    def load_samples(self) -> dict[str, list[Sample]]:
        """Read and check every row of every split; bad rows raise or are skipped (counted and named)."""
        raw = load_source(self.source)
        self.skipped_rows = []
        samples = {split: self._read_split(split, data) for split, data in raw.items()}
        samples = self._carve_splits(samples)
        if self.skipped_rows:
            shown = "; ".join(self.skipped_rows[:10]) + (" ..." if len(self.skipped_rows) > 10 else "")
            message = f"skipped {len(self.skipped_rows)} bad row(s): {shown}"
            empty = [split for split, rows in samples.items() if not rows]
            if empty:  # nothing would train or evaluate there, and the run would still end "successfully"
                raise ValueError(f"no usable rows left in split(s) {empty} of {self.source}: {message}")
            warnings.warn(message, stacklevel=2)
            log.warning(message)
        return samples

    def _read_split(self, split: str, data: RawSplit) -> list[Sample]:
        check_columns(data, self.columns)
        col = lambda field: self.columns.get(field, field)  # noqa: E731
        id_column = col("id")  # a row without one gets a positional id
        used = {col("images"), col("problem"), col("answer"), id_column}
        out = []
        for row_number, row in enumerate(data.rows, start=1):  # 1-based: a JSONL row's number is its line number
            sample_id = str(row[id_column]) if row.get(id_column) is not None else f"{split}-{row_number}"
            try:
                out.append(self._read_row(split, row_number, row, sample_id, data, col, used))
            except (ImageError, ValueError) as error:
                message = f"{data.name}: row {row_number} (id {sample_id}): {error}"
                if self.hparams.bad_rows == "raise":
                    raise ValueError(message) from None
                self.skipped_rows.append(message)
        return out

    def _read_row(self, split, row_number, row, sample_id, data: RawSplit, col, used) -> Sample:
        if UNREADABLE in row:
            raise ValueError(row[UNREADABLE])
        answer = row.get(col("answer"))
        if answer is None or not str(answer).strip():
            raise ValueError(f"field {col('answer')!r} is empty or missing")
        problem = row.get(col("problem"))
        if not isinstance(problem, str) or not problem.strip():
            raise ValueError(f"field {col('problem')!r} must be a non-empty string, got {problem!r}")
        images = row.get(col("images"))
        if images is None or (isinstance(images, (list, tuple)) and not images):
            raise ValueError(f"field {col('images')!r} holds no image")
        if not isinstance(images, (list, tuple)):
            images = [images]
        hashes = []
        for position, value in enumerate(images):
            try:
                raw, decoded, name = image_bytes(value, data.base_dir)
                open_image(raw, decoded, name, self.hparams.max_image_side)  # fails now, not mid-training
            except ImageError as error:
                raise ImageError(f"field {col('images')!r}[{position}]: {error}") from None
            hashes.append(content_hash(raw, decoded))
        build_messages(problem, len(images), None, None)  # placeholder count check
        extra = {k: v for k, v in row.items() if k not in used and isinstance(v, (str, int, float, bool))}
        return Sample(sample_id, split, row_number, list(images), data.base_dir, hashes, problem, str(answer).strip(), extra)

    def _carve_splits(self, samples: dict[str, list[Sample]]) -> dict[str, list[Sample]]:
        train = samples.get("train", [])
        generator = torch.Generator().manual_seed(self.hparams.split_seed)
        order = torch.randperm(len(train), generator=generator).tolist()
        taken = 0
        for split, fraction in (("validation", self.hparams.val_fraction), ("test", self.hparams.test_fraction)):
            if fraction > 0 and split not in samples:
                count = max(1, round(fraction * len(train)))
                samples[split] = [train[i] for i in order[taken : taken + count]]
                taken += count
        if taken:
            held_out = set(order[:taken])
            samples["train"] = [s for i, s in enumerate(train) if i not in held_out]
        return samples

    # ------------------------------------------------------------------------------------------ entropy

    def _device(self) -> torch.device:
        trainer = getattr(self, "trainer", None)
        if trainer is not None:
            return trainer.strategy.root_device
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")

    def entropy_fingerprint(self) -> str:
        """The entropy cache's key besides the image bytes (:func:`.visual_entropy.entropy_fingerprint`); needs the
        model's files and processor, not the model."""
        hp = self.hparams
        if hp.entropy_method == "pixel":
            return entropy_fingerprint("pixel", max_image_side=hp.max_image_side)
        return entropy_fingerprint(
            "spectral",
            model_files=model_file_hashes(self.model_name_or_path, Path(hp.cache_dir) / "model-file-hashes.json"),
            vision_layer=hp.vision_layer,
            feature_source=hp.feature_source,
            image_processor=self.processor().image_processor.to_dict(),
            image_processor_kwargs=hp.image_processor_kwargs or {},
            dtype=hp.dtype,
            max_image_side=hp.max_image_side,
        )

    def build_scorer(self):
        """A visual-entropy scorer; the spectral one loads the VLM's image path only, in ``dtype``, on the device."""
        if self.hparams.entropy_method == "pixel":
            return PixelEntropyScorer()
        self.scorer_loads += 1
        dtype = DTYPES[self.hparams.dtype]
        return SpectralEntropyScorer(
            load_image_encoder(self.model_name_or_path, dtype),
            self.processor(),
            vision_layer=self.hparams.vision_layer,
            feature_source=self.hparams.feature_source,
            image_processor_kwargs=self.hparams.image_processor_kwargs,
            device=self._device(),
            dtype=dtype,
        )

    def processor(self):
        if self._processor is None and self.model_name_or_path:
            from transformers import AutoProcessor

            self._processor = AutoProcessor.from_pretrained(self.model_name_or_path)
        return self._processor

    def compute_visual_entropy(self, samples: dict[str, list[Sample]]) -> None:
        """Fill ``visual_entropy`` of every sample from the cache, computing (and caching) only what is missing."""
        cache = EntropyCache(self.hparams.cache_dir, self.entropy_fingerprint())
        known = cache.load()
        todo: dict[str, tuple[Sample, int]] = {}
        for split_samples in samples.values():
            for sample in split_samples:
                for position, digest in enumerate(sample.image_hashes):
                    if digest not in known:
                        todo.setdefault(digest, (sample, position))
        if todo:
            with cache.lock():  # another process precomputing into this cache finishes first ...
                known.update(cache.load())  # ... and what it computed is not computed again
                todo = {digest: item for digest, item in todo.items() if digest not in known}
                if todo:
                    self._score_missing(todo, cache, known)
                    cache.compact()
        for split_samples in samples.values():
            for sample in split_samples:
                values = [known[d] for d in sample.image_hashes]
                sample.visual_entropy = sum(values) / len(values)

    def _score_missing(self, todo, cache: EntropyCache, known: dict[str, float]) -> None:
        """Score ``todo`` in batches, caching each batch (a kill loses at most one); the scorer and its model are
        freed when done, before training needs the memory."""
        from tqdm.auto import tqdm

        items = list(todo.items())
        size = self.hparams.entropy_batch_size
        scorer = self.build_scorer()
        bar = tqdm(total=len(items), desc="visual entropy", unit="img", disable=not self.hparams.progress)
        try:
            for start in range(0, len(items), size):
                chunk = items[start : start + size]
                images = []
                for _, (sample, position) in chunk:
                    raw, decoded, name = image_bytes(sample.images[position], sample.base_dir)
                    images.append(open_image(raw, decoded, name, self.hparams.max_image_side))
                values = [float(v) for v in scorer(images)]
                self.encoder_calls += 1
                self.images_scored += len(images)
                for (digest, (sample, _)), value in zip(chunk, values):
                    if not math.isfinite(value):
                        raise ValueError(f"visual entropy of sample {sample.id} came out {value}; nothing was cached for it")
                entries = {digest: value for (digest, _), value in zip(chunk, values)}
                cache.add(entries)
                known.update(entries)
                bar.update(len(chunk))
        finally:
            bar.close()
            del scorer  # the last reference: the model goes now (no cycles hold it, a test checks)
            if torch.cuda.is_initialized():
                torch.cuda.empty_cache()  # and its blocks go back to the device, not only to torch's cache

    def entropy_thresholds(self, percentiles=(0.25, 0.75), split: str = "train") -> torch.Tensor:
        """Dataset-level entropy percentiles (for perceptual groups that do not move with the batch)."""
        values = [s.visual_entropy for s in self.samples.get(split, [])]
        if not values:
            raise ValueError(f"no {split} samples loaded; call setup() first")
        return percentile_thresholds(torch.tensor(values, dtype=torch.float64), percentiles)

    # ------------------------------------------------------------------------------------------ Lightning hooks

    def prepare_data(self) -> None:
        """On one process per node: read and check everything, precompute missing entropies into the cache."""
        samples = self.load_samples()
        self.compute_visual_entropy(samples)

    def setup(self, stage: str | None = None) -> None:
        """On every process: read the (now warm) cache; a cold entry is computed here too, with the same result."""
        if self.samples:
            return
        samples = self.load_samples()
        self.compute_visual_entropy(samples)
        self.samples = samples
        trainer = getattr(self, "trainer", None)
        if trainer is not None and trainer.logger is not None and self.skipped_rows:
            trainer.logger.log_metrics({"data/skipped_rows": float(len(self.skipped_rows))}, step=0)

    def dataset(self, split: str) -> ReasoningDataset:
        if split not in self.samples:
            raise ValueError(f"split {split!r} not available; have {sorted(self.samples)} (set val_fraction / test_fraction?)")
        processor = self.processor()
        template = functools.partial(render_prompt, processor) if processor else None
        return ReasoningDataset(
            self.samples[split], self.hparams.system_prompt, self.hparams.instruction, self.hparams.max_image_side, template
        )

    def train_dataloader(self) -> DataLoader:
        """Shuffled per epoch from ``shuffle_seed``; resumable mid-epoch from a checkpoint."""
        return ResumableDataLoader(
            self.dataset("train"), self.hparams.batch_size, self.hparams.shuffle_seed,
            num_workers=self.hparams.num_workers, collate_fn=collate_reasoning_batch,
        )

    def _eval_loader(self, split: str) -> DataLoader:
        return DataLoader(
            self.dataset(split),
            batch_size=self.hparams.eval_batch_size or self.hparams.batch_size,
            num_workers=self.hparams.num_workers,
            collate_fn=collate_reasoning_batch,
        )

    def val_dataloader(self) -> DataLoader:
        return self._eval_loader("validation")

    def test_dataloader(self) -> DataLoader:
        return self._eval_loader("test")

    def predict_dataloader(self) -> DataLoader:
        return self._eval_loader("test" if "test" in self.samples else "validation")
