"""What must hold on a CUDA device: generation and log-probs there agree with the CPU, and the recipes' precision
(bf16 base weights, bf16-mixed autocast) trains the LoRA adapter in float32. Skipped without a GPU; the GPU check
(benchmarks/gpu_check.py) runs them."""

from __future__ import annotations

import json
from pathlib import Path

import lightning as L
import pytest
import torch

from durian_lightning.stages.rollout import SamplingConfig, completion_logprobs, generate_rollouts

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

REPO = Path(__file__).resolve().parents[1]


def length_reward(completions, answers, **fields):
    """A dense reward, so that a random tiny model's rollouts get unequal rewards (defined here: this file must not
    import the CLI, whose jsonargparse a bare GPU machine may lack)."""
    return [len(c) / 100 for c in completions]


def _bundled_rows(n: int) -> list[dict]:
    with open(REPO / "data" / "synthetic" / "val.jsonl") as f:
        return [json.loads(line) for line in f][:n]


def _prompts(processor, rows):
    from PIL import Image

    from durian_lightning.models.prompts import (
        DEFAULT_INSTRUCTION,
        DEFAULT_SYSTEM_PROMPT,
        build_messages,
        render_prompt,
    )

    texts = [render_prompt(processor, build_messages(r["problem"], 1, DEFAULT_SYSTEM_PROMPT, DEFAULT_INSTRUCTION)) for r in rows]
    images = [[Image.open(REPO / "data" / "synthetic" / r["images"][0]).convert("RGB")] for r in rows]
    return texts, images


@pytest.mark.parametrize("model_path", ["tiny_vlm_path", "tiny_qwen_path"])
def test_cuda_logprobs_match_the_cpu(model_path, request):
    from durian_lightning.models import load_policy

    model, processor = load_policy(request.getfixturevalue(model_path), dtype="float32")
    model.eval()
    texts, images = _prompts(processor, _bundled_rows(3))
    torch.manual_seed(0)
    rollout = generate_rollouts(model, processor, texts, images, 2, SamplingConfig(max_new_tokens=12))
    rows = torch.arange(len(rollout.completions))
    with torch.no_grad():
        on_cpu = completion_logprobs(model, processor, rollout, rows)
        on_cuda = completion_logprobs(model.cuda(), processor, rollout, rows).cpu()
    mask = rollout.completion_mask.bool()
    torch.testing.assert_close(on_cuda[mask], on_cpu[mask], atol=1e-4, rtol=1e-4)


def test_bf16_generation_on_cuda_gives_valid_rollouts(tiny_qwen_path):
    from durian_lightning.models import load_policy

    model, processor = load_policy(tiny_qwen_path, dtype="bfloat16")
    model.cuda().eval()
    texts, images = _prompts(processor, _bundled_rows(4))
    rollout = generate_rollouts(model, processor, texts, images, 4, SamplingConfig(max_new_tokens=16), max_sequences_per_call=8)
    assert len(rollout.completions) == 16 and rollout.completion_ids.shape[0] == 16
    recorded = rollout.sampled_logprobs[rollout.completion_mask.bool()]
    assert torch.isfinite(recorded).all() and (recorded <= 0).all()
    # the mask ends at the first EOS: every row is a run of ones then zeros
    mask = rollout.completion_mask
    assert torch.equal(mask, mask.cummin(dim=1).values)


def test_bf16_mixed_trains_the_lora_adapter_in_float32_on_cuda(tmp_path, tiny_vlm_path):
    from durian_lightning.data import MultimodalReasoningDataModule
    from durian_lightning.module import DurianGRPO
    from durian_lightning.settings import OptimizationSettings, RewardSettings, RolloutSettings

    folder = tmp_path / "data"
    folder.mkdir()
    with open(folder / "train.jsonl", "w") as f:
        for row in _bundled_rows(8):
            f.write(json.dumps({**row, "images": [str(REPO / "data" / "synthetic" / row["images"][0])]}) + "\n")
    data = MultimodalReasoningDataModule(str(folder), model_name_or_path=tiny_vlm_path, cache_dir=str(tmp_path / "cache"),
                                         batch_size=4, progress=False)
    module = DurianGRPO(tiny_vlm_path, dtype="bfloat16", rollout=RolloutSettings(num_generations=4, max_new_tokens=8),
                        reward=RewardSettings(functions=["tests.test_cuda:length_reward"]),
                        optimization=OptimizationSettings(learning_rate=1e-3))
    L.seed_everything(0)
    trainer = L.Trainer(accelerator="gpu", devices=1, precision="bf16-mixed", max_steps=2, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, limit_val_batches=0,
                        default_root_dir=str(tmp_path))
    module.configure_model()
    before = {n: p.detach().float().cpu().clone() for n, p in module.model.named_parameters() if p.requires_grad}
    trainer.fit(module, datamodule=data)
    trained = {n: p for n, p in module.model.named_parameters() if p.requires_grad}
    assert trained and all(p.dtype == torch.float32 for p in trained.values())  # (Lightning moves the module back to the CPU after fit)
    assert any(not torch.equal(before[n], p.detach().cpu()) for n, p in trained.items())
    frozen = [p for p in module.model.parameters() if not p.requires_grad]
    assert frozen and all(p.dtype == torch.bfloat16 for p in frozen)
