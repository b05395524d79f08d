"""``durian export``: a trained run as a merged model folder that transformers loads alone, or as its peft adapter."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from durian_lightning.cli import run_cli
from durian_lightning.export import export
from durian_lightning.models.prompts import render_prompt
from durian_lightning.stages.rollout import SamplingConfig, completion_logprobs, generate_rollouts

from .test_training import REPO, fit_args

GREEDY = SamplingConfig(max_new_tokens=12, do_sample=False)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """Two updates of the shipped model at a high learning rate: an adapter that has moved the policy."""
    root = tmp_path_factory.mktemp("run")
    cli = run_cli(["fit", *fit_args(root, "tiny:llava-pretrained", "--trainer.max_steps", "2",
                                    "--trainer.limit_val_batches", "0", "--checkpoint_every_n_steps", "2",
                                    # the shipped model is confident: hot sampling and a dense reward make rewards differ
                                    "--model.reward.functions", "[tests.test_training:length_reward]",
                                    "--model.rollout.temperature", "4", "--model.rollout.num_generations", "4",
                                    "--seed_everything", "0")])
    return cli, Path(cli.trainer.log_dir)


def rollouts(model, processor, samples):
    return generate_rollouts(model, processor, [s["prompt"] for s in samples], [s["images"] for s in samples], 1, GREEDY)


def test_the_merged_model_loads_alone_and_completes_the_val_split_as_the_adapter_model(trained, tmp_path):
    from transformers import AutoModelForImageTextToText, AutoProcessor

    cli, run = trained
    out = tmp_path / "merged"
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    done = subprocess.run([sys.executable, "-m", "durian_lightning.cli", "export", str(run / "checkpoints" / "last.ckpt"),
                           "--out", str(out)], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    merged = AutoModelForImageTextToText.from_pretrained(out).eval()
    processor = AutoProcessor.from_pretrained(out)
    assert not any("lora" in name for name in merged.state_dict())
    assert (out / "chat_template.jinja").is_file() or processor.chat_template
    samples = list(cli.datamodule.dataset("validation"))
    assert len(samples) == 100  # the bundled val split, every row
    assert render_prompt(processor, samples[0]["messages"]) == samples[0]["prompt"]  # the same chat template
    adapter_model = cli.model.model.eval()
    expected, got = rollouts(adapter_model, cli.model.processor, samples), rollouts(merged, processor, samples)
    assert got.completions == expected.completions
    assert torch.equal(got.completion_ids, expected.completion_ids)
    rows = list(range(8))
    with torch.no_grad():
        merged_logprobs = completion_logprobs(merged, processor, got, rows)
        assert torch.allclose(merged_logprobs, completion_logprobs(adapter_model, cli.model.processor, got, rows), atol=1e-5)
        with adapter_model.disable_adapter():  # the adapter is not a no-op: the export carries what training changed
            base_logprobs = completion_logprobs(adapter_model, cli.model.processor, got, rows)
    assert (merged_logprobs - base_logprobs).abs().max() > 1e-4
    assert "merged into the base weights" in (out / "README.md").read_text()


def test_an_adapter_folder_and_a_checkpoint_export_the_same_policy(trained, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForImageTextToText

    cli, run = trained
    from_folder = export(run / "adapter", tmp_path / "from-folder")
    from_checkpoint = export(run / "checkpoints" / "last.ckpt", tmp_path / "adapter", format="adapter")
    assert (from_checkpoint / "adapter_config.json").is_file() and not (from_checkpoint / "model.safetensors").exists()
    merged = AutoModelForImageTextToText.from_pretrained(from_folder).eval()
    base = PeftModel.from_pretrained(AutoModelForImageTextToText.from_pretrained(
        cli.model.model.peft_config["default"].base_model_name_or_path), str(from_checkpoint)).eval()
    sample = [cli.datamodule.dataset("validation")[0]]
    rollout = rollouts(merged, cli.model.processor, sample)
    with torch.no_grad():
        assert torch.allclose(completion_logprobs(merged, cli.model.processor, rollout, [0]),
                              completion_logprobs(base, cli.model.processor, rollout, [0]), atol=1e-5)


def test_a_source_that_is_not_a_run_is_named(tmp_path):
    with pytest.raises(ValueError, match="neither a checkpoint .a file, or an fsdp2 run.s folder. nor an adapter folder"):
        export(tmp_path / "nothing-here", tmp_path / "out")
    torch.save({"weights": torch.zeros(1)}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match=r"other.pt is not a checkpoint of a durian-lightning run"):
        export(tmp_path / "other.pt", tmp_path / "out")
    with pytest.raises(ValueError, match="--format must be one of merged, adapter"):
        export(tmp_path / "other.pt", tmp_path / "out", format="gguf")


def test_a_bf16_runs_adapter_is_merged_and_saved_in_float32_without_rounding_its_delta(tmp_path):
    # an RL adapter at a small learning rate: lora_B of std 3e-4 over a bf16 base; folded into bf16 weights, the delta
    # would be rounded to bf16's 8-bit mantissa (about 17% of it here), so the merge and the saved model are float32
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from durian_lightning.models import resolve_model_path

    tiny = resolve_model_path("tiny:llava", tmp_path / "cache")
    base_dir = tmp_path / "base-bf16"
    AutoModelForImageTextToText.from_pretrained(tiny, dtype=torch.bfloat16).save_pretrained(base_dir)
    AutoProcessor.from_pretrained(tiny).save_pretrained(base_dir)
    base = AutoModelForImageTextToText.from_pretrained(base_dir, dtype=torch.bfloat16)
    model = get_peft_model(base, LoraConfig(r=8, lora_alpha=16, target_modules=r".*language_model.*\.q_proj"))
    torch.manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn_like(p) * 3e-4)
    model.save_pretrained(tmp_path / "adapter")
    AutoProcessor.from_pretrained(tiny).save_pretrained(tmp_path / "adapter")
    layer = model.base_model.model.model.language_model.layers[0].self_attn.q_proj
    a, b = layer.lora_A["default"].weight.double(), layer.lora_B["default"].weight.double()
    delta = (b @ a) * layer.scaling["default"]
    base_weight = layer.base_layer.weight.double()

    merged = AutoModelForImageTextToText.from_pretrained(export(tmp_path / "adapter", tmp_path / "merged"))
    weight = merged.model.language_model.layers[0].self_attn.q_proj.weight
    assert weight.dtype == torch.float32
    error = ((weight.double() - base_weight) - delta).norm() / delta.norm()
    assert error < 1e-3, float(error)
    rounded = ((base_weight + delta).to(torch.bfloat16).double() - base_weight - delta).norm() / delta.norm()
    assert rounded > 0.05, float(rounded)  # what a bf16 merge would have lost: the test tells the two apart
