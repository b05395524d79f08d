"""The data package, usable on its own: ``from durian_lightning.data import MultimodalReasoningDataModule``."""

from ..prompts import DEFAULT_INSTRUCTION, DEFAULT_SYSTEM_PROMPT, build_messages
from .datamodule import MultimodalReasoningDataModule, ReasoningDataset, Sample, collate_reasoning_batch
from .entropy_cache import EntropyCache
from .images import ImageError, open_image, to_rgb
from .sources import load_source
from .visual_entropy import PixelEntropyScorer, SpectralEntropyScorer

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
