"""Each image encoded once per step: the same rollouts and log-probs as encoding in every pass, on tiny LLaVA and
tiny Qwen2.5-VL, with several images per prompt and images of different sizes; never when the image path trains."""

import inspect

import pytest
import torch
from PIL import Image
from transformers.models.llava.modeling_llava import LlavaModel

from durian_lightning.cli import run_cli
from durian_lightning.models import load_policy, resolve_model_path
from durian_lightning.stages.image_features import ImageFeatures
from durian_lightning.stages.rollout import SamplingConfig, completion_logprobs, generate_rollouts

from .test_training import _model_cache, fit_args, metrics  # noqa: F401  (the autouse fixture pins the model cache)

VISION_AND_LANGUAGE = r".*(language_model|vision_tower|visual).*\.(q_proj|k_proj|v_proj|o_proj|qkv|proj)"


def prompt(processor, num_images: int, text: str) -> str:
    messages = [{"role": "user", "content": [*[{"type": "image"}] * num_images, {"type": "text", "text": text}]}]
    return processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)


def vision_tower(model):
    inner = model.get_base_model().model if hasattr(model, "get_base_model") else model.model
    return getattr(inner, "vision_tower", None) or inner.visual


class ImagesEncoded:
    """Counts the images the vision tower encodes (LLaVA: a pixel batch; Qwen-VL: one grid row per image)."""

    def __init__(self, model):
        self.count = 0
        self.handle = vision_tower(model).register_forward_pre_hook(self._seen, with_kwargs=True)

    def _seen(self, module, args, kwargs):
        grid = kwargs.get("grid_thw")
        self.count += len(grid) if grid is not None else args[0].shape[0]


needs_precomputed = pytest.mark.skipif(
    "mm_encoder_outputs" not in inspect.signature(LlavaModel.forward).parameters,
    reason="this transformers cannot take precomputed image features (5.18 and later can)",
)


@needs_precomputed
@pytest.mark.parametrize("model_name", ["tiny:llava", "tiny:qwen2_5_vl"])
def test_reused_features_give_the_same_rollouts_and_logprobs(model_name):
    # two prompts: one with two images of different sizes, one with a third (Qwen-VL: 4, 12 and 10 image tokens)
    model, processor = load_policy(resolve_model_path(model_name), use_lora=True)
    images = [[Image.new("RGB", (56, 56), "blue"), Image.effect_noise((112, 84), 40).convert("RGB")],
              [Image.effect_noise((70, 140), 30).convert("RGB")]]
    prompts = [prompt(processor, 2, "Compare the two."), prompt(processor, 1, "How many red circles are there?")]
    greedy = SamplingConfig(max_new_tokens=8, do_sample=False)
    plain = generate_rollouts(model, processor, prompts, images, 3, greedy)
    rows = torch.arange(6)
    with torch.no_grad():
        without = completion_logprobs(model, processor, plain, rows)

    features = ImageFeatures(model, processor)
    encoded = ImagesEncoded(model)
    reused = generate_rollouts(model, processor, prompts, images, 3, greedy, max_sequences_per_call=4,
                               image_features=features)
    with torch.no_grad():
        passes = [completion_logprobs(model, processor, reused, chunk, image_features=features)
                  for _ in range(3) for chunk in rows.split(4)]  # e.g. old, reference and policy, in micro-batches
    # three distinct images: encoded once each (plus once for the frozen-path probe), not 6 rows x 4 passes
    assert encoded.count == 3 + 1
    assert len(features) == 3
    assert reused.completions == plain.completions
    mask = plain.completion_mask.bool()
    torch.testing.assert_close(reused.sampled_logprobs[mask], plain.sampled_logprobs[mask], atol=1e-5, rtol=1e-5)
    for repeat in range(3):
        with_features = torch.cat(passes[2 * repeat : 2 * repeat + 2])
        torch.testing.assert_close(with_features[mask], without[mask], atol=1e-5, rtol=1e-5)
    features.clear()
    assert len(features) == 0


@needs_precomputed
def test_a_trained_image_path_is_encoded_in_every_pass():
    model, processor = load_policy(resolve_model_path("tiny:llava"), use_lora=True,
                                   lora_target_modules=VISION_AND_LANGUAGE)
    assert any("vision_tower" in name and p.requires_grad for name, p in model.named_parameters())
    image = [Image.new("RGB", (64, 64), "red")]
    features = ImageFeatures(model, processor)
    with torch.inference_mode():  # validation's grad mode must not make a trained tower look frozen
        assert not features.reusable(image)
    frozen_model, _ = load_policy(resolve_model_path("tiny:llava"), use_lora=True)
    assert ImageFeatures(frozen_model, processor).reusable(image)
    assert not ImageFeatures(frozen_model, processor, enabled=False).reusable(image)
    # with the image path trained, the pixels go to the model as they are
    encoded = processor(text=[prompt(processor, 1, "hi")], images=image, return_tensors="pt")
    assert "pixel_values" in features.model_inputs(encoded, [image]) and len(features) == 0


def logged_steps(root, option: str, value: str) -> tuple[list[list[float]], object]:
    """Loss, KL, reward and clip fraction of 2 updates with KL (a reference pass) and two PPO epochs (an old-policy
    pass) on the model that earns rewards from the start, with one rollout option set; and the CLI."""
    args = fit_args(root, "tiny:llava-pretrained", f"--model.rollout.{option}", value,
                    "--model.rollout.num_generations", "4", "--model.rollout.max_new_tokens", "72", "--data.batch_size", "4",
                    "--model.optimization.learning_rate", "3e-4",
                    "--model.loss.kl_coef", "0.1", "--model.optimization.ppo_epochs", "2",
                    "--trainer.max_steps", "4", "--trainer.limit_val_batches", "0", "--seed_everything", "3")
    cli = run_cli(["fit", *args])
    names = ("train/loss", "train/kl", "train/reward", "train/clip_fraction")
    return [[float(r[n]) for n in names] for r in metrics(cli.trainer) if r.get("train/loss")], cli


def assert_same_steps(steps, other_steps):
    assert len(steps) == 2 and steps[0][2] > 0 and steps[1][1] > 0  # rewarded, and the policy left the reference
    for a, b in zip(steps, other_steps):
        assert a == pytest.approx(b, abs=1e-5)


@needs_precomputed
def test_training_with_reused_features_logs_the_same_steps(tmp_path):
    # every pass reads the reused features, and training takes the same path
    reused, cli = logged_steps(tmp_path / "reused", "reuse_image_features", "true")
    assert cli.model.image_features.reusable(cli.datamodule.dataset("train")[0]["images"])
    encoded_each_pass, cli = logged_steps(tmp_path / "plain", "reuse_image_features", "false")
    assert not cli.model.image_features.reusable(cli.datamodule.dataset("train")[0]["images"])
    assert_same_steps(reused, encoded_each_pass)
