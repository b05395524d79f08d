"""Loading VLMs and building tiny offline ones for tests and the default run."""

from .loading import load_policy, resolve_model_path
from .tiny import (
    QWEN_CHAT_TEMPLATE,
    TINY_CHAT_TEMPLATE,
    build_tiny_llava,
    build_tiny_qwen2_5_vl,
    tiny_llava_path,
    tiny_vlm_path,
)

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
