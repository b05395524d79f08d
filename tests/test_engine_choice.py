"""Choosing the rollout engine: what is refused before any engine starts (these run with or without vLLM)."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from durian_lightning.models.families import FAMILIES
from durian_lightning.models.loading import load_policy
from durian_lightning.settings import RolloutSettings
from durian_lightning.stages.vllm_engine import check_engine_supported, require_vllm


def test_a_family_not_verified_under_vllm_is_refused_with_the_verified_ones_named():
    model, _ = load_policy("tiny:gemma3", "float32", True, 8, 16)
    with pytest.raises(ValueError, match=r"not verified for model type 'gemma3' \(vLLM's CPU attention lacks .*4e-2.*"
                                         r"Verified: LLaVA \(llava\), Qwen2-VL .*rollout.engine: hf"):
        check_engine_supported(model, on_cpu=False)
    assert [f.model_type for f in FAMILIES.values() if f.vllm] == ["llava", "qwen2_vl", "qwen2_5_vl", "qwen3_vl"]


def test_a_head_size_the_cpu_backend_lacks_is_refused_on_the_cpu_only():
    model, _ = load_policy("tiny:qwen2_vl", "float32", True, 8, 16)  # 4 heads of 16
    with pytest.raises(ValueError, match="'qwen2_vl' has attention head size 16; vLLM's CPU attention supports 32, 64"):
        check_engine_supported(model, on_cpu=True)
    check_engine_supported(model, on_cpu=False)
    check_engine_supported(load_policy("tiny:llava-pretrained", "float32", True, 8, 16)[0], on_cpu=True)  # 32


@pytest.mark.skipif(importlib.util.find_spec("vllm") is not None, reason="vLLM is installed here")
def test_the_vllm_engine_without_vllm_names_how_to_install_it():
    with pytest.raises(ImportError, match=r'pip install -e "\.\[vllm\]".*scripts/make_vllm_env.sh'):
        require_vllm()


def test_engine_settings_are_checked():
    assert RolloutSettings().engine == "hf"
    with pytest.raises(ValueError, match="rollout.engine must be hf or vllm, got 'sglang'"):
        RolloutSettings(engine="sglang")
    with pytest.raises(ValueError, match=r"vllm_gpu_memory_utilization must be in \(0, 1\]"):
        RolloutSettings(vllm_gpu_memory_utilization=1.5)
    with pytest.raises(ValueError, match="rollout.vllm_max_images must be >= 1"):
        RolloutSettings(vllm_max_images=0)


@pytest.mark.parametrize("name", ["tiny:qwen2_vl", "tiny:llava-pretrained"])
def test_the_engine_gets_the_checkpoints_weights_without_the_adapter(name):
    """What a vLLM engine loads (its start, and every full sync) is the saved checkpoint, tensor for tensor: the
    base weights under the checkpoint's names, not the adapter, with LLaVA's vision tower under vLLM's name."""
    from safetensors.torch import load_file

    from durian_lightning.models.loading import resolve_model_path
    from durian_lightning.models.vllm_weights import base_weights

    saved = load_file(f"{resolve_model_path(name)}/model.safetensors")
    if name == "tiny:llava-pretrained":
        saved = {k.replace("vision_tower.", "vision_tower.vision_model.", 1): v for k, v in saved.items()}
    model, _ = load_policy(name, "float32", True, 8, 16)
    for parameter in model.parameters():
        if parameter.requires_grad:
            parameter.data.normal_()  # a trained adapter: it must not reach the base weights
    weights = base_weights(model)
    assert sorted(weights) == sorted(saved)
    for key, value in saved.items():
        assert torch.equal(weights[key], value), key
