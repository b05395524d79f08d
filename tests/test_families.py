"""The conformance suite: every VLM family of models/families.py, built tiny from its transformers config, passes the
same checks. Exact log-probs (batched = alone, recorded while sampling = recomputed), LoRA on the language model only,
one finite visual entropy per image (tiled processors too), the fast paths exact where on and off elsewhere, the
family's own inputs in every pass, the system prompt in the rendered prompt, and a CLI fit / validate whose adapter
reloads with peft and exports as a merged model that completes alike."""

import dataclasses
import logging
import math
import re
from pathlib import Path

import pytest
import torch
from PIL import Image

from durian_lightning.core.difficulty import spectral_entropy
from durian_lightning.data import SpectralEntropyScorer
from durian_lightning.models import load_policy, resolve_model_path
from durian_lightning.models.families import FAMILIES
from durian_lightning.models.loading import load_image_encoder
from durian_lightning.models.prompts import build_messages, encode_prompts, render_prompt
from durian_lightning.stages.image_features import ImageFeatures
from durian_lightning.stages.rollout import SamplingConfig, completion_logprobs, generate_rollouts
from durian_lightning.stages.shared_prefill import can_share_prefill

from .test_shared_prefill import _logprobs_and_grads
from .test_training import _model_cache  # noqa: F401  (the autouse fixture pins the model cache)

SYSTEM = "You are a careful visual reasoner."
LANGUAGE_MODEL = re.compile(r".*\.(language_model|text_model)\..*")


@pytest.fixture(params=sorted(FAMILIES))
def family(request):
    return FAMILIES[request.param]


def load(family, use_lora=True):
    torch.manual_seed(0)
    model, processor = load_policy(resolve_model_path(f"tiny:{family.model_type}"), use_lora=use_lora)
    if use_lora:
        for name, parameter in model.named_parameters():
            if "lora_B" in name:  # a policy that has moved from the start, so the adapter changes the log-probs
                torch.nn.init.normal_(parameter, std=0.05)
    return model, processor


def images():
    """Two prompts: one with two images of different sizes (the second large enough to tile), one with a third."""
    return [[Image.new("RGB", (56, 56), "blue"), Image.effect_noise((112, 84), 40).convert("RGB")],
            [Image.effect_noise((70, 140), 30).convert("RGB")]]


def prompts(processor):
    return [render_prompt(processor, build_messages("Compare the two images.", 2, SYSTEM, None)),
            render_prompt(processor, build_messages("How many red circles are there?", 1, SYSTEM, None))]


def rollout(model, processor, num_generations=2, **kwargs):
    out = generate_rollouts(model, processor, prompts(processor), images(), num_generations,
                            SamplingConfig(max_new_tokens=6), **kwargs)
    mask = out.completion_mask.clone()
    mask[1, 3:] = 0  # a completion that ended early (a random tiny model rarely samples EOS)
    return dataclasses.replace(out, completion_mask=mask)


def test_each_row_gets_the_logprobs_it_gets_alone_and_the_ones_it_was_sampled_with(family):
    model, processor = load(family)
    sampled = rollout(model, processor)
    rows = list(range(len(sampled)))
    with torch.no_grad():
        batched = completion_logprobs(model, processor, sampled, rows, share_prefill=False)
        alone = torch.cat([completion_logprobs(model, processor, sampled, [row], share_prefill=False) for row in rows])
    mask = sampled.completion_mask.bool()
    torch.testing.assert_close(batched[mask], alone[mask], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(sampled.sampled_logprobs[mask], batched[mask], atol=1e-5, rtol=1e-5)


def test_default_lora_adapts_the_language_model_only(family):
    model, processor = load(family)
    trained = [name for name, p in model.named_parameters() if p.requires_grad]
    assert trained and all(LANGUAGE_MODEL.match(name) and "lora_" in name for name in trained), trained
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    sampled = rollout(model, processor)
    logprobs = completion_logprobs(model, processor, sampled, list(range(len(sampled))))
    (-(logprobs * sampled.completion_mask).sum()).backward()
    optimizer.step()
    changed = {name for name, p in model.named_parameters() if not torch.equal(p, before[name])}
    assert changed and changed <= set(trained)  # no vision-tower, projector or base weight moved


def test_one_finite_visual_entropy_per_image_from_the_familys_own_encoder(family):
    model, processor = load(family, use_lora=False)
    flat = [image for row in images() for image in row]
    for feature_source in ("vision_tower", "projector"):
        scorer = SpectralEntropyScorer(model, processor, -1, feature_source)
        values = scorer(flat)
        # the noise images have variance; the flat blue one may not (a RoPE encoder gives its patches one feature)
        assert len(values) == len(flat) and all(math.isfinite(v) and v >= 0 for v in values) and min(values[1:]) > 0
        alone = [scorer([image])[0] for image in flat]
        assert values == pytest.approx(alone, rel=1e-5)
        features = scorer.image_features(flat[1])  # a tiling processor's crops of one image are its patch set
        assert values[1] == pytest.approx(spectral_entropy(features.float()).item(), rel=1e-6)
    first_block = SpectralEntropyScorer(model, processor, 0, "vision_tower")(flat)
    assert len(first_block) == len(flat) and first_block != pytest.approx(values)


def test_the_scorer_needs_only_the_image_path_and_gets_the_full_models_entropies(family):
    model, processor = load(family, use_lora=False)
    lean = load_image_encoder(resolve_model_path(f"tiny:{family.model_type}"))
    names = [name for name, _ in lean.named_parameters()]
    assert names and not [name for name in names if LANGUAGE_MODEL.match(name) or name.startswith("lm_head")]
    flat = [image for row in images() for image in row]
    for feature_source, layer in (("vision_tower", -1), ("vision_tower", 1), ("projector", -1)):
        full = SpectralEntropyScorer(model, processor, layer, feature_source)(flat)
        assert SpectralEntropyScorer(lean, processor, layer, feature_source)(flat) == full


def test_fast_paths_are_exact_where_on_and_off_elsewhere(family, caplog):
    model, processor = load(family)
    with caplog.at_level(logging.INFO):
        features = ImageFeatures(model, processor)
    flat = [image for row in images() for image in row]
    assert features.reusable(flat) == family.reuse_image_features
    assert can_share_prefill(model) == family.share_prompt_prefill
    if not family.reuse_image_features:
        assert f"rollout.reuse_image_features is off for model type {family.model_type!r}" in caplog.text
    sampled = rollout(model, processor, 3)
    rows = [5, 0, 3, 1, 2, 4]
    plain, plain_grads = _logprobs_and_grads(model, processor, sampled, rows, False)
    mask = sampled.completion_mask[rows].bool()
    for share, reuse in ((True, False), (False, True), (True, True)):
        fast, fast_grads = _logprobs_and_grads(model, processor, sampled, rows, share, features if reuse else None)
        torch.testing.assert_close(fast[mask], plain[mask], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(fast_grads, plain_grads, atol=1e-5, rtol=1e-4)
    assert plain_grads.abs().sum() > 0


def test_the_familys_own_inputs_reach_every_pass(family):
    model, processor = load(family)
    calls = []
    base = model.get_base_model()
    handle = base.register_forward_pre_hook(lambda module, args, kwargs: calls.append(kwargs), with_kwargs=True)
    try:
        sampled = rollout(model, processor)
        encoded = encode_prompts(processor, sampled.prompts, sampled.images, None)
        generate_call = calls[0]
        calls.clear()
        with torch.no_grad():
            completion_logprobs(model, processor, sampled, list(range(len(sampled))), share_prefill=False)
    finally:
        handle.remove()
    (forward,) = calls
    width = encoded["input_ids"].shape[1] + sampled.completion_ids.shape[1]
    # generate (transformers 5.2x) encodes the images itself before its first forward and passes their features
    encoded_by_generate = "mm_encoder_outputs" in generate_call
    for key, value in encoded.items():  # e.g. token_type_ids, mm_token_type_ids, image_sizes, pixel_attention_mask
        per_token = isinstance(value, torch.Tensor) and value.shape == encoded["input_ids"].shape
        assert key in forward and (key in generate_call or (encoded_by_generate and not per_token)), key
        if per_token:
            assert forward[key].shape == (len(sampled), width), key
            if key not in ("input_ids", "attention_mask"):  # the completion's type ids say "text"
                assert (forward[key][:, encoded["input_ids"].shape[1]:] == 0).all(), key


def test_the_system_prompt_reaches_the_rendered_prompt(family):
    _, processor = load(family, use_lora=False)
    for rendered in prompts(processor):
        assert SYSTEM in rendered


def test_cli_fit_and_validate_and_the_adapter_reloads_with_peft_and_exports_merged(family, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForImageTextToText

    from durian_lightning.cli import run_cli
    from durian_lightning.export import export

    from .test_training import fit_args, small_data_folder

    model_name = f"tiny:{family.model_type}"
    data = ["--data.source", str(small_data_folder(tmp_path / "data", 4))]  # the family's encoder scores 4 images
    cli = run_cli(["fit", *fit_args(tmp_path, model_name, *data, "--trainer.max_steps", "2", "--trainer.limit_val_batches", "0",
                                    "--model.reward.functions", "[tests.test_training:length_reward]",
                                    "--model.rollout.num_generations", "4", "--seed_everything", "0")])
    assert cli.trainer.global_step == 2
    adapter = Path(cli.trainer.log_dir) / "adapter"
    base = AutoModelForImageTextToText.from_pretrained(resolve_model_path(model_name))
    reloaded = PeftModel.from_pretrained(base, str(adapter))
    trained, processor = cli.model.model, cli.model.processor
    greedy = SamplingConfig(max_new_tokens=8, do_sample=False)
    sample = cli.datamodule.dataset("validation")[0]
    rollout_of = lambda m, p, s: generate_rollouts(m, p, [s["prompt"]], [s["images"]], 1, greedy)  # noqa: E731
    after = [rollout_of(m, processor, sample).completion_ids for m in (trained, reloaded)]
    assert torch.equal(after[0], after[1])
    merged = AutoModelForImageTextToText.from_pretrained(export(adapter, tmp_path / "merged")).eval()  # alone
    assert torch.equal(rollout_of(merged, processor, sample).completion_ids, after[0])
    with torch.no_grad():  # the update moved the policy: the adapter is not a no-op
        adapted = completion_logprobs(reloaded, processor, rollout_of(reloaded, processor, sample), [0])
        with reloaded.disable_adapter():
            plain = completion_logprobs(reloaded, processor, rollout_of(reloaded, processor, sample), [0])
    assert (adapted - plain).abs().max() > 1e-4

    validated = run_cli(["validate", *fit_args(tmp_path / "validate", model_name, *data)])
    assert math.isfinite(validated.trainer.callback_metrics["val/accuracy"])


def test_a_model_the_library_cannot_drive_is_named_with_what_to_do(tmp_path):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from durian_lightning.models.tiny import _text_config, _train_tokenizer

    tokenizer = _train_tokenizer(300)
    Qwen2ForCausalLM(Qwen2Config(**_text_config(tokenizer, 32, 1))).save_pretrained(tmp_path / "text-only")
    tokenizer.save_pretrained(tmp_path / "text-only")
    with pytest.raises(ValueError, match="model type 'qwen2' is not an image-text-to-text model.*Qwen3-VL"):
        load_policy(str(tmp_path / "text-only"))
    model, processor = load(FAMILIES["gemma3"], use_lora=False)
    processor.chat_template = processor.tokenizer.chat_template = None  # e.g. a base (not instruction-tuned) checkpoint
    model.save_pretrained(tmp_path / "no-template")
    processor.save_pretrained(tmp_path / "no-template")
    with pytest.raises(ValueError, match="model type 'gemma3'.* has no chat template"):
        load_policy(str(tmp_path / "no-template"))


def record_generate_caches(model, monkeypatch) -> list:
    """The ``cache_implementation`` each ``generate`` call of ``model`` gets (None: transformers' dynamic default)."""
    seen, original = [], type(model).generate

    def recording(self, *args, **kwargs):
        seen.append(kwargs.get("cache_implementation"))
        return original(self, *args, **kwargs)

    monkeypatch.setattr(type(model), "generate", recording)
    return seen


def test_the_static_cache_decodes_exactly_as_the_dynamic_one_where_it_is_on(family, monkeypatch):
    model, processor = load(family)
    caches = record_generate_caches(model, monkeypatch)
    greedy, pictures = dict(max_new_tokens=6, do_sample=False), images()  # images() draws new noise each call
    dynamic, static = (generate_rollouts(model, processor, prompts(processor), pictures, 2,
                                         SamplingConfig(**greedy, cache_implementation=impl)) for impl in ("dynamic", "static"))
    assert family.static_cache and caches == [None, "static"]  # every family so far; a False one falls back (below)
    assert torch.equal(static.completion_ids, dynamic.completion_ids)
    torch.testing.assert_close(static.sampled_logprobs, dynamic.sampled_logprobs, atol=1e-5, rtol=1e-5)


def record_forward_shapes(model) -> list[tuple[int, int]]:
    """The ``input_ids`` shape of every forward of the transformers model under ``model`` (generate's steps too)."""
    shapes = []
    model.get_base_model().register_forward_hook(
        lambda module, args, kwargs, out: shapes.append(tuple(kwargs["input_ids"].shape)), with_kwargs=True)
    return shapes


def test_generate_prefills_each_prompt_once_and_decodes_as_if_every_row_ran_it(family):
    model, processor = load(family)
    shapes = record_forward_shapes(model)
    greedy, pictures = SamplingConfig(max_new_tokens=6, do_sample=False), images()
    plain = generate_rollouts(model, processor, prompts(processor), pictures, 3, dataclasses.replace(greedy, share_prefill=False))
    rows, width = shapes[0]
    assert rows == 6
    for features in (None, ImageFeatures(model, processor)):
        shapes.clear()
        shared = generate_rollouts(model, processor, prompts(processor), pictures, 3, greedy, image_features=features)
        assert family.share_generate_prefill and shapes[:2] == [(2, width - 1), (6, 1)]  # each prompt once, then rows
        assert torch.equal(shared.completion_ids, plain.completion_ids)
        torch.testing.assert_close(shared.sampled_logprobs, plain.sampled_logprobs, atol=1e-5, rtol=1e-5)


def test_generate_prefills_every_row_where_sharing_is_not_verified_or_a_prompt_ends_in_an_image(monkeypatch):
    from durian_lightning.models import families

    model, processor = load(FAMILIES["llava"])
    shapes = record_forward_shapes(model)
    greedy, pictures = SamplingConfig(max_new_tokens=2, do_sample=False), images()[1:]
    ends_in_image = [prompts(processor)[1] + processor.image_token]  # its last token is an image placeholder
    plain = generate_rollouts(model, processor, ends_in_image, [pictures[0] * 2], 2, dataclasses.replace(greedy, share_prefill=False))
    shapes.clear()
    shared = generate_rollouts(model, processor, ends_in_image, [pictures[0] * 2], 2, greedy)
    assert shapes[0][0] == 2 and torch.equal(shared.completion_ids, plain.completion_ids)
    monkeypatch.setitem(families.FAMILIES, "llava", dataclasses.replace(FAMILIES["llava"], share_generate_prefill=False))
    shapes.clear()
    generate_rollouts(model, processor, prompts(processor)[1:], pictures, 2, greedy)
    assert shapes[0][0] == 2


def test_an_unverified_family_decodes_with_the_dynamic_cache(monkeypatch, caplog):
    from durian_lightning.models import families
    from durian_lightning.module import DurianGRPO
    from durian_lightning.settings import RolloutSettings

    family = FAMILIES["llava"]
    monkeypatch.setitem(families.FAMILIES, "llava", dataclasses.replace(family, static_cache=False))
    module = DurianGRPO("tiny:llava", rollout=RolloutSettings(cache_implementation="static"))
    with caplog.at_level(logging.INFO):
        module.configure_model()
        seen = record_generate_caches(module.model, monkeypatch)
        for _ in range(2):
            generate_rollouts(module.model, module.processor, prompts(module.processor), images(), 2,
                              SamplingConfig(max_new_tokens=2, cache_implementation="static"))
    assert seen == [None, None]
    assert caplog.text.count("rollout.cache_implementation: static is off for model type 'llava'") == 1  # once
