"""Loading VLMs and building tiny offline ones for tests and the default run."""

from durian_lightning.models.loading import load_policy, resolve_model_path
from durian_lightning.models.tiny import QWEN_CHAT_TEMPLATE, TINY_CHAT_TEMPLATE, build_tiny_llava, build_tiny_qwen2_5_vl
from durian_lightning.models.tiny_registry import tiny_llava_path, tiny_vlm_path

__all__ = [
    "load_policy",
    "resolve_model_path",
    "QWEN_CHAT_TEMPLATE",
    "TINY_CHAT_TEMPLATE",
    "build_tiny_llava",
    "build_tiny_qwen2_5_vl",
    "tiny_llava_path",
    "tiny_vlm_path",
]
