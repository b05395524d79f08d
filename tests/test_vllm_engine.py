"""The vLLM rollout engine (rollout.engine: vllm) against the training forward, on real tiny VLMs and a real engine.

Runs where vLLM is installed (on a CPU: the environment scripts/make_vllm_env.sh builds); skipped elsewhere. The CPU
backend's attention needs a head size of 32 or more, so the Qwen families are built with wider heads than the
conformance suite's; tiny:llava-pretrained has 32.
"""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

pytest.importorskip("vllm")

from durian_lightning.models.loading import load_policy  # noqa: E402
from durian_lightning.models.prompts import build_messages, render_prompt  # noqa: E402
from durian_lightning.models.tiny_registry import tiny_vlm_path  # noqa: E402
from durian_lightning.stages.rollout import SamplingConfig, completion_logprobs  # noqa: E402
from durian_lightning.stages.vllm_engine import VLLMEngine  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
PRETRAINED = "tiny:llava-pretrained"
WIDE_HEADS = {"qwen2_vl": dict(text_hidden=128), "qwen2_5_vl": dict(text_hidden=128), "qwen3_vl": dict(head_dim=32)}
EXACT = 1e-4  # the support matrix's bound, float32


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, str]:
    """Every verified family's tiny model: name -> what model_name_or_path takes."""
    root = tmp_path_factory.mktemp("vllm-models")
    return {PRETRAINED: PRETRAINED, **{family: str(tiny_vlm_path(root / family, family, **kwargs))
                                       for family, kwargs in WIDE_HEADS.items()}}


def _prompts(processor):
    """One single-image and one two-image prompt (sizes that give each family several image tokens)."""
    images = [[Image.new("RGB", (64, 64), (200, 30, 30))],
              [Image.new("RGB", (64, 48), (20, 30, 230)), Image.new("RGB", (56, 56), (20, 200, 30))]]
    prompts = [render_prompt(processor, build_messages("How many shapes are there?", len(row), "You reason.", None))
               for row in images]
    return prompts, images


def _largest_gap(model, processor, rollout) -> float:
    with torch.no_grad():
        forward = completion_logprobs(model, processor, rollout, list(range(len(rollout))), share_prefill=False)
    return float(((forward - rollout.sampled_logprobs).abs() * rollout.completion_mask).max())


def _move(model, std: float, generator: torch.Generator) -> None:
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.requires_grad:
                parameter.add_(torch.randn(parameter.shape, generator=generator) * std)


@pytest.mark.parametrize("family", [PRETRAINED, *WIDE_HEADS])
def test_sampled_logprobs_equal_the_training_forward_and_follow_every_adapter_update(models, family):
    model, processor = load_policy(models[family], "float32", True, 8, 16)
    model.eval()
    generator = torch.Generator().manual_seed(0)
    _move(model, 0.05, generator)  # a trained adapter, not peft's zero-initialised one
    engine = VLLMEngine(model, processor, 1024, 2, lora_rank=8, temperature=1.0)
    try:
        prompts, images = _prompts(processor)
        sampling = SamplingConfig(max_new_tokens=16)
        engine.sync(model, 0)
        first = engine.generate(prompts, images, 3, sampling, 512, ["single", "double"])
        assert len(first) == 6 and int(first.completion_mask.sum()) > 6
        assert _largest_gap(model, processor, first) < EXACT
        placeholders = set(engine.placeholders)
        assert placeholders and not placeholders & set(first.completion_ids[first.completion_mask.bool()].tolist())

        _move(model, 0.05, generator)  # an update
        engine.sync(model, 1)
        second = engine.generate(prompts, images, 3, sampling, 512, ["single", "double"])
        assert _largest_gap(model, processor, second) < EXACT  # the updated policy's log-probs ...
        stale = first.select(range(6))
        assert _largest_gap(model, processor, stale) > 1e-3  # ... which the first rollout's are not

        with pytest.raises(ValueError, match="sample 'long'.*max_model_len 1024"):
            engine.generate(["word " * 1100], [[]], 2, sampling, None, ["long"])
        with pytest.raises(ValueError, match="sample 'many' has 3 images.*rollout.vllm_max_images"):
            engine.generate([prompts[1]], [images[1] + images[0]], 2, sampling, None, ["many"])
    finally:
        engine.close()


def test_full_fine_tuning_sends_every_weight_to_the_engine(models):
    """Tied embeddings and LLaVA's renamed SigLIP tower included: every trained weight reaches the engine."""
    model, processor = load_policy(PRETRAINED, "float32", False)
    model.eval()
    engine = VLLMEngine(model, processor, 1024, 2, lora_rank=None, temperature=1.0)
    try:
        prompts, images = _prompts(processor)
        sampling = SamplingConfig(max_new_tokens=12)
        engine.sync(model, 0)
        before = engine.generate(prompts, images, 2, sampling, 512)
        assert _largest_gap(model, processor, before) < EXACT
        _move(model, 0.01, torch.Generator().manual_seed(1))
        engine.sync(model, 1)
        after = engine.generate(prompts, images, 2, sampling, 512)
        assert _largest_gap(model, processor, after) < EXACT
        assert _largest_gap(model, processor, before) > 1e-3
        assert len(engine.sync_seconds) == 2
    finally:
        engine.close()


def test_a_batch_over_one_steps_token_budget_is_sampled_whole_and_exactly(models):
    """More prompt tokens than one engine step takes (4096): on the CPU each prompt is still prefilled whole (a
    chunked prefill rewinds the seeded generators, which the CPU's cannot do: the engine died)."""
    model, processor = load_policy(PRETRAINED, "float32", True, 8, 16)
    model.eval()
    engine = VLLMEngine(model, processor, 1024, 2, lora_rank=8, temperature=1.0)
    try:
        prompts, images = _prompts(processor)
        prompts, images = prompts * 24, images * 24
        prompt_tokens = sum(len(ids) for ids in processor(text=prompts, images=images)["input_ids"])
        assert prompt_tokens * 4 > 2 * 4096
        engine.sync(model, 0)
        rollout = engine.generate(prompts, images, 4, SamplingConfig(max_new_tokens=3), 512)
        assert len(rollout) == 4 * len(prompts) and _largest_gap(model, processor, rollout) < EXACT
    finally:
        engine.close()


def _fit(tmp_path: Path, model: str, *args: str, command: str = "fit", devices: int = 1,
         returncode: int | tuple[int, ...] = 0):
    """A ``durian`` command in a process of its own; its folder, or (with nonzero ``returncode``s, any of which
    may end it) its stderr."""
    root = tmp_path / f"{command}-{len(list(tmp_path.iterdir()))}"
    cli = [sys.executable, "-m", "durian_lightning.cli", command, "--model.model_name_or_path", model,
           "--model.rollout.num_generations", "4", "--model.rollout.max_new_tokens", "12",
           "--data.source", str(REPO / "data" / "synthetic"), "--data.batch_size", "3", "--data.eval_batch_size", "6",
           "--data.cache_dir", str(tmp_path / "entropy"), "--data.progress", "false", "--trainer.devices", str(devices),
           "--trainer.enable_progress_bar", "false", "--trainer.default_root_dir", str(root), "--seed_everything", "3",
           *(["--trainer.strategy", "ddp"] if devices > 1 else []), *args]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "DURIAN_CACHE": str(tmp_path / "cache")}
    done = subprocess.run(cli, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode in (returncode if isinstance(returncode, tuple) else (returncode,)), done.stderr[-4000:]
    return root if returncode == 0 else done.stderr


def _metrics(root: Path) -> list[dict[str, str]]:
    return list(csv.DictReader(next(root.rglob("metrics.csv")).open()))


@pytest.mark.parametrize("family", [PRETRAINED, "qwen2_5_vl"])
def test_fit_with_the_vllm_engine_trains_on_the_policys_own_log_probs(models, tmp_path, family):
    # 40 tokens: the shipped model's 12-token completions of a prompt are often all alike (no advantage, no update)
    root = _fit(tmp_path, models[family], "--model.rollout.engine", "vllm", "--trainer.max_steps", "3",
                "--model.rollout.max_new_tokens", "40",
                "--trainer.limit_val_batches", "0", "--model.reward.functions", "[tests.test_training:length_reward]",
                "--model.optimization.learning_rate", "0.01", "--model.adapter_dir", str(tmp_path / "adapter"))
    steps = [row for row in _metrics(root) if row.get("train/logprob_gap_max")]
    assert len(steps) == 3
    assert all(float(row["train/logprob_gap_max"]) < EXACT for row in steps)  # updates 2 and 3 after a sync
    assert all(float(row["perf/weight_sync_s"]) > 0 for row in steps)
    from safetensors.torch import load_file

    adapter = load_file(tmp_path / "adapter" / "adapter_model.safetensors")
    assert any(float(value.abs().max()) > 0 for key, value in adapter.items() if "lora_B" in key)  # the adapter moved


def test_greedy_evaluation_with_the_vllm_engine_gives_the_answers_of_hf(tmp_path):
    answers = {}
    for engine in ("hf", "vllm"):
        path = tmp_path / f"{engine}.jsonl"
        _fit(tmp_path, PRETRAINED, "--model.rollout.engine", engine, "--predictions_path", str(path),
             "--trainer.limit_predict_batches", "2", command="predict")
        answers[engine] = [json.loads(line)["completion"] for line in path.read_text().splitlines()]
    assert len(answers["hf"]) > 5 and answers["vllm"] == answers["hf"]


def test_two_ddp_ranks_each_sample_from_an_engine_of_their_own(tmp_path):
    root = _fit(tmp_path, PRETRAINED, "--model.rollout.engine", "vllm", "--trainer.max_steps", "2",
                "--trainer.limit_val_batches", "0", "--model.reward.functions", "[tests.test_training:length_reward]",
                "--trainer.accelerator", "cpu", devices=2)
    steps = [row for row in _metrics(root) if row.get("train/logprob_gap_max")]
    assert len(steps) == 2 and all(float(row["train/logprob_gap_max"]) < EXACT for row in steps)  # over both ranks


def test_an_engine_that_dies_stops_every_rank_with_its_error(tmp_path):
    """Rank 1's engine processes are killed after its first update: both ranks stop, none hangs."""
    stderr = _fit(tmp_path, PRETRAINED, "--model.rollout.engine", "vllm", "--trainer.max_steps", "3",
                  "--trainer.limit_val_batches", "0", "--trainer.accelerator", "cpu",
                  "--trainer.callbacks+=tests.vllm_probe.KillEngine", "--trainer.callbacks.rank=1",
                  devices=2, returncode=(1, -9))
    # rank 0 closes its own engine on the way out: when that takes longer than Lightning's launcher waits after
    # rank 1 exited, the launcher ends it with SIGKILL (-9) instead of its own exit status 1
    assert "rank 1" in stderr and "EngineDeadError" in stderr, stderr[-3000:]


def test_fsdp2_full_fine_tuning_gathers_every_weight_for_each_ranks_engine(tmp_path):
    """Each rank's engine gets the whole of every sharded weight after every update."""
    root = _fit(tmp_path, PRETRAINED, "--model.rollout.engine", "vllm", "--trainer.max_steps", "2",
                "--trainer.limit_val_batches", "0", "--model.reward.functions", "[tests.test_training:length_reward]",
                "--model.rollout.max_new_tokens", "40", "--model.lora.enabled", "false",
                "--model.optimization.learning_rate", "0.001", "--trainer.accelerator", "cpu",
                "--trainer.strategy", "fsdp2", devices=2)
    steps = [row for row in _metrics(root) if row.get("train/logprob_gap_max")]
    assert len(steps) == 2 and all(float(row["train/logprob_gap_max"]) < EXACT for row in steps)
    assert float(steps[0]["train/grad_norm"]) > 0  # the second rollout is from moved weights
