"""The data package, usable on its own: ``from durian_lightning.data import MultimodalReasoningDataModule``."""

from durian_lightning.data.datamodule import (
    MultimodalReasoningDataModule,
    ReasoningDataset,
    Sample,
    collate_reasoning_batch,
)
from durian_lightning.data.entropy_cache import EntropyCache
from durian_lightning.data.images import ImageError, open_image, to_rgb
from durian_lightning.data.sources import load_source
from durian_lightning.data.visual_entropy import PixelEntropyScorer, SpectralEntropyScorer
from durian_lightning.models.prompts import DEFAULT_INSTRUCTION, DEFAULT_SYSTEM_PROMPT, build_messages

__all__ = [
    "DEFAULT_INSTRUCTION",
    "DEFAULT_SYSTEM_PROMPT",
    "EntropyCache",
    "ImageError",
    "MultimodalReasoningDataModule",
    "PixelEntropyScorer",
    "ReasoningDataset",
    "Sample",
    "SpectralEntropyScorer",
    "build_messages",
    "collate_reasoning_batch",
    "load_source",
    "open_image",
    "to_rgb",
]
