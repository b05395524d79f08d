"""Each prompt's prefill run once for its rollouts: the same log-probs and gradients as the full forward, on tiny LLaVA
and tiny Qwen2.5-VL (3-D M-RoPE), with left-padded prompts of several images, early-ending completions, micro-batches
in any row order, and reused image features."""

import dataclasses

import pytest
import torch
from PIL import Image

from durian_lightning.models import load_policy, resolve_model_path
from durian_lightning.stages.image_features import ImageFeatures
from durian_lightning.stages.rollout import SamplingConfig, completion_logprobs, generate_rollouts
from durian_lightning.stages.shared_prefill import can_share_prefill, distinct_prompts

from .test_image_features import assert_same_steps, logged_steps, prompt
from .test_training import _model_cache  # noqa: F401  (the autouse fixture pins the model cache)


def test_distinct_prompts_by_hand():
    a, b = Image.new("RGB", (8, 8)), Image.new("RGB", (8, 8))
    prompts = ["p", "q", "p", "p", "q"]
    images = [[a], [a], [a], [b], [a]]  # row 3: the same text with another image is another prompt
    assert distinct_prompts(prompts, images) == ([0, 1, 3], [0, 1, 0, 2, 1])


def _rollout(model_name):
    torch.manual_seed(0)
    model, processor = load_policy(resolve_model_path(model_name), use_lora=True)
    for name, parameter in model.named_parameters():
        if "lora_B" in name:  # a policy that has moved from the start, so LoRA's gradients are not all alike
            torch.nn.init.normal_(parameter, std=0.05)
    images = [[Image.new("RGB", (56, 56), "blue"), Image.effect_noise((112, 84), 40).convert("RGB")],
              [Image.effect_noise((70, 140), 30).convert("RGB")]]
    prompts = [prompt(processor, 2, "Compare the two."), prompt(processor, 1, "How many red circles are there?")]
    rollout = generate_rollouts(model, processor, prompts, images, 3, SamplingConfig(max_new_tokens=8))
    mask = rollout.completion_mask.clone()
    mask[1, 3:] = 0  # completions that ended early (a random tiny model rarely samples EOS)
    mask[4, 1:] = 0
    return model, processor, dataclasses.replace(rollout, completion_mask=mask)


def _logprobs_and_grads(model, processor, rollout, rows, share_prefill, features=None):
    model.zero_grad()
    logprobs = completion_logprobs(model, processor, rollout, rows, share_prefill=share_prefill, image_features=features)
    (logprobs * rollout.completion_mask[rows]).sum().backward()
    grads = torch.cat([p.grad.flatten() for p in model.parameters() if p.requires_grad])
    return logprobs.detach(), grads


@pytest.mark.parametrize("model_name", ["tiny:llava", "tiny:qwen2_5_vl"])
def test_shared_prefill_gives_the_full_forwards_logprobs_and_gradients(model_name):
    model, processor, rollout = _rollout(model_name)
    assert can_share_prefill(model)
    prefills = []
    handle = model.register_forward_hook(lambda module, args, kwargs, out: prefills.append(kwargs["input_ids"].shape),
                                         with_kwargs=True)
    for rows, features in (([0, 1, 2, 3, 4, 5], None), ([5, 0, 3, 1], None), ([0, 1, 2, 3, 4, 5], ImageFeatures(model, processor))):
        full, full_grads = _logprobs_and_grads(model, processor, rollout, rows, False, features)
        prefills.clear()
        shared, shared_grads = _logprobs_and_grads(model, processor, rollout, rows, True, features)
        # two passes: the 2 distinct prompts, then the completions (all but the last token) on every row
        assert [shape[0] for shape in prefills] == [2, len(rows)] and prefills[1][1] == rollout.completion_ids.shape[1] - 1
        mask = rollout.completion_mask[rows].bool()
        torch.testing.assert_close(shared[mask], full[mask], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(shared_grads, full_grads, atol=1e-6, rtol=1e-4)
        assert full_grads.abs().sum() > 0
    handle.remove()


def test_text_only_prompts_on_qwen_vl():
    # no image grid: positions are plain, and a generate call before (which leaves M-RoPE deltas on the model)
    # must not shift them
    model, processor = load_policy(resolve_model_path("tiny:qwen2_5_vl"), use_lora=True)
    prompts = [prompt(processor, 0, "Say something."), prompt(processor, 0, "Count to three, please.")]
    rollout = generate_rollouts(model, processor, prompts, [[], []], 3, SamplingConfig(max_new_tokens=6))
    generate_rollouts(model, processor, [prompt(processor, 1, "hi")], [[Image.new("RGB", (56, 56))]], 2,
                      SamplingConfig(max_new_tokens=2))
    rows = list(range(6))
    full, full_grads = _logprobs_and_grads(model, processor, rollout, rows, False)
    shared, shared_grads = _logprobs_and_grads(model, processor, rollout, rows, True)
    torch.testing.assert_close(shared, full, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(shared_grads, full_grads, atol=1e-6, rtol=1e-4)


def test_gradient_checkpointing_runs_the_full_forward():
    model, _ = load_policy(resolve_model_path("tiny:llava"), use_lora=True, gradient_checkpointing=True)
    assert not can_share_prefill(model)
    assert can_share_prefill(load_policy(resolve_model_path("tiny:llava"), use_lora=True)[0])


def test_training_with_shared_prefill_logs_the_same_steps(tmp_path):
    shared, _ = logged_steps(tmp_path / "shared", "share_prompt_prefill", "true")
    per_row, _ = logged_steps(tmp_path / "per-row", "share_prompt_prefill", "false")
    assert_same_steps(shared, per_row)


def test_with_lora_dropout_the_no_grad_passes_are_the_policys_own_and_each_row_draws_its_mask():
    # LoRA dropout > 0: the old-policy / reference passes must be deterministic (eval mode), and the pass with gradients
    # must not share a prompt's prefill (one dropout mask for all its G rows) -- it falls back to the full forward
    from durian_lightning.module import DurianGRPO
    from durian_lightning.settings import LoraSettings, LossSettings
    from durian_lightning.stages.scoring import ScoredRollouts
    from durian_lightning.stages.update import old_and_reference_logprobs

    _, _, rollout = _rollout("tiny:llava")
    module = DurianGRPO("tiny:llava", lora=LoraSettings(dropout=0.5), loss=LossSettings(preset="grpo", kl_coef=0.1))
    module.configure_model()
    model, processor = module.model, module.processor
    for name, parameter in model.named_parameters():
        if "lora_B" in name:  # a moved adapter, so its dropout changes the log-probs
            torch.nn.init.normal_(parameter, std=0.05)
    n = len(rollout)
    scored = ScoredRollouts(rollout, 3, ["a", "b"], ["p", "q"], ["x", "y"], torch.zeros(2), torch.zeros(2),
                            torch.zeros(n), {})
    model.train()
    passes = [old_and_reference_logprobs(scored, model, module.policy_logprobs, module.reference_logprobs,
                                         module.optimization.micro_batch_size, old=True) for _ in range(2)]
    assert model.training  # the passes put every module back in its mode
    model.eval()
    with torch.no_grad():
        policy = completion_logprobs(model, processor, rollout, range(n), share_prefill=False)
        with model.disable_adapter():
            reference = completion_logprobs(model, processor, rollout, range(n), share_prefill=False)
    for computed in passes:
        torch.testing.assert_close(computed.old_logprobs, policy, rtol=0, atol=1e-6)
        torch.testing.assert_close(computed.ref_logprobs, reference, rtol=0, atol=1e-6)
    assert can_share_prefill(model)  # in eval mode the prefill is shared
    model.train()
    assert not can_share_prefill(model)
    torch.manual_seed(1)
    with_grad = module.policy_logprobs(rollout, torch.arange(n))
    torch.manual_seed(1)
    full = completion_logprobs(model, processor, rollout, range(n), share_prefill=False)
    torch.testing.assert_close(with_grad, full, rtol=0, atol=0)
    assert not torch.allclose(with_grad * rollout.completion_mask, policy * rollout.completion_mask)  # dropout is on
