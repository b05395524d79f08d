"""Loading VLMs and building tiny offline ones for tests and the default run."""

from .tiny import TINY_CHAT_TEMPLATE, build_tiny_llava, tiny_llava_path

__all__ = ["TINY_CHAT_TEMPLATE", "build_tiny_llava", "tiny_llava_path"]
