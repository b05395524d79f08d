import os

# No test may reach the Hugging Face hub: without this a hub name takes minutes to fail offline.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import pytest


@pytest.fixture(scope="session")
def tiny_vlm_path(tmp_path_factory):
    """A tiny LLaVA-style VLM (random weights, local tokenizer) saved once for the whole test session."""
    from durian_lightning.models import tiny_llava_path

    return str(tiny_llava_path(tmp_path_factory.mktemp("models") / "tiny-llava"))


@pytest.fixture(scope="session")
def tiny_qwen_path(tmp_path_factory):
    """A tiny model of the Qwen2.5-VL architecture (windowed ViT, patch merger, M-RoPE), saved once per session."""
    from durian_lightning.models import tiny_vlm_path

    return str(tiny_vlm_path(tmp_path_factory.mktemp("models") / "tiny-qwen2.5-vl", "qwen2_5_vl"))
