"""The training module end to end on tiny VLMs: CLI fit/validate, what changes, step counts, callbacks, bad config."""

import csv
import json
import math
from pathlib import Path

import lightning as L
import pytest
import torch

from durian_lightning.cli import run_cli
from durian_lightning.core.advantages import ESTIMATORS
from durian_lightning.core.losses import PolicyLossConfig
from durian_lightning.models import load_policy
from durian_lightning.module import DurianGRPO
from durian_lightning.settings import (
    AdvantageSettings,
    EvaluationSettings,
    LossSettings,
    OptimizationSettings,
    RewardSettings,
    RolloutSettings,
)
from durian_lightning.stages.rollout import (
    SamplingConfig,
    completion_logprobs,
    completion_mask_after_eos,
    generate_rollouts,
    token_logprobs,
)

REPO = Path(__file__).resolve().parents[1]
DATA = str(REPO / "data" / "synthetic")


@pytest.fixture(autouse=True)
def _model_cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("DURIAN_CACHE", str(tmp_path_factory.getbasetemp() / "durian-cache"))


def fit_args(tmp_path, model="tiny:llava", *extra):
    return [
        "--model.model_name_or_path", model,
        "--model.rollout.num_generations", "2",
        "--model.rollout.max_new_tokens", "6",
        "--model.optimization.learning_rate", "1e-2",
        "--data.source", DATA,
        "--data.batch_size", "2",
        "--data.eval_batch_size", "4",
        "--data.cache_dir", str(tmp_path / "entropy"),
        "--data.progress", "false",
        "--trainer.default_root_dir", str(tmp_path),
        "--trainer.limit_val_batches", "1",
        "--trainer.enable_progress_bar", "false",
        *extra,
    ]


def one_image_prompt(processor, text: str = "hi") -> str:
    """A chat prompt with one image and a question, rendered by the model's own template."""
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": text}]}]
    return processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)


def callback(trainer, kind):
    """The trainer's callback of this type (added with --trainer.callbacks+=...)."""
    (found,) = [c for c in trainer.callbacks if isinstance(c, kind)]
    return found


def metrics(trainer) -> list[dict]:
    return list(csv.DictReader(open(Path(trainer.log_dir) / "metrics.csv")))


@pytest.mark.parametrize("model", ["tiny:llava", "tiny:qwen2_5_vl"])
def test_fit_and_validate_through_the_cli(tmp_path, model):
    cli = run_cli(["fit", *fit_args(tmp_path, model, "--trainer.max_steps", "2", "--trainer.val_check_interval", "2")])
    trainer = cli.trainer
    assert trainer.global_step == 2
    rows = metrics(trainer)
    columns = set().union(*rows)
    for name in ["train/loss", "train/reward", "train/reward_format", "train/reward_accuracy", "difficulty/all_equal_ratio",
                 "train/reward_std", "train/completion_length_min", "train/completion_length_max", "train/truncated_fraction",
                 "train/clip_fraction_low", "train/clip_fraction_high", "train/entropy",
                 "difficulty/extreme_ratio", "difficulty/max_abs_advantage_grpo", "difficulty/perceptual_0/shared_std",
                 "val/accuracy", "error/entropy_group_0"]:
        assert name in columns, name
    entropies = [float(r["train/entropy"]) for r in rows if r.get("train/entropy")]
    assert entropies and all(0 < e <= math.log(len(cli.model.processor.tokenizer)) for e in entropies)
    gaps = [(float(r["train/logprob_gap_mean"]), float(r["train/logprob_gap_max"])) for r in rows
            if r.get("train/logprob_gap_mean")]
    assert len(gaps) == 2 and all(0 <= mean <= high < 1e-4 for mean, high in gaps)  # float32: the same numbers
    assert (Path(trainer.log_dir) / "error_vs_difficulty.png").is_file()
    import json

    answers = {sample.id: sample.answer for sample in cli.datamodule.samples["train"] + cli.datamodule.samples["validation"]}
    trained = [json.loads(line) for line in open(Path(trainer.log_dir) / "completions.jsonl")]
    evaluated = [json.loads(line) for line in open(Path(trainer.log_dir) / "val_completions.jsonl")]
    assert trained and len(evaluated) == 4 and {e["step"] for e in evaluated} == {2}
    for row in trained + evaluated:  # readable alone: the question and the gold answer beside the completion
        assert row["answer"] == answers[row["id"]] and row["problem"] and "completion" in row
    adapter = Path(trainer.log_dir) / "adapter"
    assert (adapter / "adapter_config.json").is_file()
    assert Path(json.loads((adapter / "adapter_config.json").read_text())["base_model_name_or_path"]).is_absolute()
    card = (adapter / "README.md").read_text()  # says what it was trained from and with
    base = json.loads((adapter / "adapter_config.json").read_text())["base_model_name_or_path"]
    assert f"base model: `{base}`" in card and f"data: `{DATA}`" in card and "advantages: `durian`, alphas [0.1, 0.2, 0.7]" in card
    assert "trained for 2 updates" in card and "config.yaml" in card

    from peft import PeftModel
    from transformers import AutoModelForImageTextToText

    from durian_lightning.models import resolve_model_path

    base = AutoModelForImageTextToText.from_pretrained(resolve_model_path(model))
    loaded = PeftModel.from_pretrained(base, str(adapter))
    trained = {k: v for k, v in cli.model.model.state_dict().items() if "lora_" in k}
    for key, value in loaded.state_dict().items():
        if "lora_" in key:
            torch.testing.assert_close(value, trained[key])

    validated = run_cli(["validate", *fit_args(tmp_path / "v", model)])
    assert "val/accuracy" in validated.trainer.callback_metrics


def test_validation_before_the_first_update_is_logged_at_step_zero(tmp_path):
    extra = ["--model.reward.functions", "[tests.test_training:length_reward]", "--seed_everything", "4"]
    cli = run_cli(["fit", *fit_args(tmp_path / "fit", "tiny:llava", *extra, "--trainer.max_steps", "2",
                                    "--trainer.val_check_interval", "2", "--validate_before_fit", "true")])
    validations = [(int(r["step"]), float(r["val/reward"])) for r in metrics(cli.trainer) if r.get("val/reward")]
    assert [step for step, _ in validations] == [0, 1]  # before the first update, then after the second
    untrained = run_cli(["validate", *fit_args(tmp_path / "validate", "tiny:llava", *extra)])
    assert validations[0][1] == pytest.approx(float(untrained.trainer.callback_metrics["val/reward"]))
    assert validations[1][1] != pytest.approx(validations[0][1])  # training moved it: the two are not one pass


def test_checkpoints_every_n_steps_keep_the_latest_and_last(tmp_path):
    from lightning.pytorch.callbacks import ModelCheckpoint

    with pytest.raises(ValueError, match="checkpoint_every_n_steps must be >= 0"):
        run_cli(["fit", *fit_args(tmp_path / "neg", "tiny:llava", "--checkpoint_every_n_steps", "-1")])

    args = ["--trainer.limit_val_batches", "0", "--trainer.max_steps", "4", "--checkpoint_every_n_steps", "2"]
    cli = run_cli(["fit", *fit_args(tmp_path / "a", "tiny:llava", *args)])
    folder = Path(cli.trainer.checkpoint_callback.dirpath)
    assert sorted(p.name for p in folder.iterdir()) == ["epoch=0-step=4.ckpt", "last.ckpt"]
    assert torch.load(folder / "last.ckpt", map_location="cpu", weights_only=False)["global_step"] == 4
    # a checkpoint callback of the user's own wins; no checkpointing at all is respected
    own = run_cli(["fit", *fit_args(tmp_path / "b", "tiny:llava", *args,
                                    "--trainer.callbacks+=lightning.pytorch.callbacks.ModelCheckpoint",
                                    "--trainer.callbacks.every_n_train_steps=3")])
    (only,) = [c for c in own.trainer.callbacks if isinstance(c, ModelCheckpoint)]
    assert only._every_n_train_steps == 3
    off = run_cli(["fit", *fit_args(tmp_path / "c", "tiny:llava", *args, "--trainer.enable_checkpointing", "false")])
    assert off.trainer.checkpoint_callback is None


def test_checkpoints_count_updates_not_optimizer_steps(tmp_path):
    # ppo_epochs 2: two optimizer steps per update, so 8 steps are 4 updates and "every 2" means steps 4 and 8
    cli = run_cli(["fit", *fit_args(tmp_path, "tiny:llava", "--trainer.limit_val_batches", "0", "--trainer.max_steps", "8",
                                    "--model.optimization.ppo_epochs", "2", "--checkpoint_every_n_steps", "2",
                                    "--trainer.callbacks+=tests.ddp_probe.RecordCheckpoints",
                                    f"--trainer.callbacks.folder={tmp_path}")])
    saved = [json.loads(line) for line in (tmp_path / "checkpoints.jsonl").read_text().splitlines()]
    assert {(s["step"], s["updates"]) for s in saved} == {(4, 2), (8, 4)}, saved
    last = torch.load(Path(cli.trainer.checkpoint_callback.dirpath) / "last.ckpt", map_location="cpu", weights_only=False)
    assert (last["global_step"], last["durian_updates"]) == (8, 4)
    assert "trained for 4 updates (8 optimizer steps)" in (Path(cli.trainer.log_dir) / "adapter" / "README.md").read_text()


def test_a_full_disk_while_checkpointing_leaves_the_previous_checkpoint_whole(tmp_path, monkeypatch):
    import errno

    from fsspec.implementations.local import LocalFileOpener

    original = LocalFileOpener.write

    def write(self, data):
        if "step=2" in str(self.path):  # step 2's checkpoint: half of it, then the disk is full
            original(self, data[: len(data) // 2])
            raise OSError(errno.ENOSPC, "No space left on device")
        return original(self, data)

    monkeypatch.setattr(LocalFileOpener, "write", write)
    args = ["--trainer.limit_val_batches", "0", "--trainer.max_steps", "3", "--checkpoint_every_n_steps", "1"]
    with pytest.raises(OSError, match="No space left"):
        run_cli(["fit", *fit_args(tmp_path, "tiny:llava", *args)])
    folder = next(tmp_path.glob("lightning_logs/version_*/checkpoints"))
    assert sorted(p.name for p in folder.iterdir()) == ["epoch=0-step=1.ckpt", "last.ckpt"]  # no truncated step=2 file
    for path in folder.iterdir():
        assert torch.load(path, map_location="cpu", weights_only=False)["global_step"] == 1


def test_a_run_does_not_warn_about_the_projects_own_choices(tmp_path, capfd, caplog):
    import warnings

    # checkpoints at every update, by the default's own setting and by a ModelCheckpoint of the user's
    for name, extra in (("ours", []), ("own", ["--trainer.callbacks+=lightning.pytorch.callbacks.ModelCheckpoint",
                                               "--trainer.callbacks.every_n_train_steps=1"])):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            run_cli(["fit", *fit_args(tmp_path / name, "tiny:llava", "--trainer.max_steps", "3",
                                      "--trainer.limit_val_batches", "0", "--checkpoint_every_n_steps", "1", *extra)])
        messages = [str(w.message) for w in caught]
        assert not [m for m in messages if "in eval mode" in m or "is_gradient_checkpointing" in m
                    or "manual optimization" in m], messages
    out = "".join(capfd.readouterr()) + caplog.text
    assert "manual optimization" not in out
    assert out.count("checkpoints hold the state after the last completed update") == 1  # said once, by our checkpoint


class SnapshotAtTrainStart(L.Callback):
    """Every weight of the policy as it was when training started."""

    def on_train_start(self, trainer, pl_module):
        self.weights = {name: value.clone() for name, value in pl_module.model.state_dict().items()}


def test_only_lora_parameters_change(tmp_path):
    args = fit_args(tmp_path, "tiny:llava", "--trainer.max_steps", "2", "--trainer.limit_val_batches", "0",
                    "--model.reward.functions", "[tests.test_training:length_reward]",
                    "--trainer.callbacks+=tests.test_training.SnapshotAtTrainStart")
    cli = run_cli(["fit", *args])
    snapshot = callback(cli.trainer, SnapshotAtTrainStart)
    after = cli.model.model.state_dict()
    lora = [name for name in after if "lora_" in name]
    assert lora and all(name.endswith(("lora_A.default.weight", "lora_B.default.weight")) for name in lora)
    # B starts at 0, so step 1 moves B only and step 2 moves A too: after two steps every LoRA matrix has moved
    unchanged = [name for name in lora if torch.equal(after[name], snapshot.weights[name])]
    assert not unchanged, unchanged
    for name, value in after.items():
        if name not in lora:
            torch.testing.assert_close(value, snapshot.weights[name], rtol=0, atol=0, msg=name)


def test_policy_and_reference_logprobs_are_equal_at_step_zero(tmp_path):
    from durian_lightning.models import resolve_model_path

    model, processor = load_policy(resolve_model_path("tiny:llava"), use_lora=True)
    from PIL import Image

    prompt = one_image_prompt(processor)
    rollout = generate_rollouts(model, processor, [prompt], [[Image.new("RGB", (64, 64), "blue")]], 3, SamplingConfig(max_new_tokens=5))
    policy = completion_logprobs(model, processor, rollout, range(3))
    with model.disable_adapter():
        reference = completion_logprobs(model, processor, rollout, range(3))
    assert torch.equal(policy, reference)
    assert bool((policy <= 0).all())


@pytest.mark.parametrize("model_name", ["tiny:llava", "tiny:qwen2_5_vl"])
@pytest.mark.parametrize("sampling", [SamplingConfig(max_new_tokens=8, temperature=0.7),
                                      SamplingConfig(max_new_tokens=8, do_sample=False)], ids=["sampled", "greedy"])
def test_left_padded_rows_get_the_logprobs_they_get_alone(model_name, sampling):
    # prompts of different lengths and images of different sizes (Qwen-VL: 4 vs 12 image tokens), so rows are
    # left-padded by different amounts; a row's log-probs must not depend on its neighbours
    from PIL import Image

    from durian_lightning.models import resolve_model_path
    from durian_lightning.stages.rollout import multimodal_token_ids

    torch.manual_seed(0)
    model, processor = load_policy(resolve_model_path(model_name), use_lora=False)
    prompts = [one_image_prompt(processor, "hi"),
               one_image_prompt(processor, "How many red circles are in the image? Reason step by step.")]
    images = [[Image.new("RGB", (56, 56), "blue")], [Image.effect_noise((112, 84), 40).convert("RGB")]]
    rollout = generate_rollouts(model, processor, prompts, images, 3, sampling)
    lengths = [len(processor(text=[p], images=im)["input_ids"][0]) for p, im in zip(prompts, images)]
    assert lengths[0] < lengths[1] - 5, lengths  # the first prompt is padded
    temperature = sampling.temperature if sampling.do_sample else 1.0
    mask = rollout.completion_mask.bool()
    with torch.no_grad():
        batched = completion_logprobs(model, processor, rollout, range(6), temperature)
        alone = torch.cat([completion_logprobs(model, processor, rollout, [row], temperature) for row in range(6)])
    torch.testing.assert_close(batched[mask], alone[mask], atol=1e-4, rtol=1e-4)
    # generate records the log-prob of each sampled token as it goes: the same numbers as a full forward
    assert rollout.sampled_logprobs.shape == batched.shape
    torch.testing.assert_close(rollout.sampled_logprobs[mask], alone[mask], atol=1e-4, rtol=1e-4)
    assert bool((rollout.sampled_logprobs[~mask] == 0).all())
    # a completion "ended" iff it holds the EOS token; the others were cut off at max_new_tokens
    eos = processor.tokenizer.eos_token_id
    assert rollout.ended.tolist() == [eos in row for row in rollout.completion_ids.tolist()]
    assert all(int(m.sum()) == 8 for m, e in zip(rollout.completion_mask, rollout.ended) if not e)
    # the placeholder ban still holds (it moved into the recording processor)
    assert not torch.isin(rollout.completion_ids, torch.tensor(multimodal_token_ids(model))).any()


def test_rollouts_in_chunks_are_the_rollouts_of_one_call():
    from PIL import Image

    from durian_lightning.models import resolve_model_path

    model, processor = load_policy(resolve_model_path("tiny:llava"), use_lora=False)
    prompt = one_image_prompt(processor)
    images = [[Image.new("RGB", (64, 64), c)] for c in ("red", "blue", "green")]
    greedy = SamplingConfig(max_new_tokens=8, do_sample=False)
    whole = generate_rollouts(model, processor, [prompt] * 3, images, 2, greedy)
    calls = []
    generate = model.generate
    model.generate = lambda **kw: calls.append(kw["input_ids"].shape[0]) or generate(**kw)
    chunked = generate_rollouts(model, processor, [prompt] * 3, images, 2, greedy, max_sequences_per_call=4)
    assert calls == [4, 2]  # 6 rows, at most 4 per call
    assert chunked.completions == whole.completions and chunked.images == whole.images
    mask = chunked.completion_mask.bool()
    torch.testing.assert_close(chunked.sampled_logprobs[mask], whole.sampled_logprobs[whole.completion_mask.bool()],
                               atol=1e-5, rtol=1e-5)
    with torch.no_grad():
        forward = completion_logprobs(model, processor, chunked, range(6))
    torch.testing.assert_close(chunked.sampled_logprobs[mask], forward[mask], atol=1e-4, rtol=1e-4)


def test_the_checkpoint_generation_config_does_not_reshape_sampling():
    # real checkpoints ship sampling defaults (Qwen2.5-VL-Instruct: repetition_penalty 1.05, top_k 1, ...); rollouts
    # must still come from softmax(logits / T), the distribution the loss's log-probs are computed under
    from PIL import Image

    from durian_lightning.models import resolve_model_path

    torch.manual_seed(0)
    model, processor = load_policy(resolve_model_path("tiny:llava"), use_lora=True)
    inner = model.get_base_model()
    inner.generation_config.repetition_penalty = 5.0
    inner.generation_config.no_repeat_ngram_size = 1
    prompt = one_image_prompt(processor)
    rollout = generate_rollouts(model, processor, [prompt], [[Image.new("RGB", (64, 64), "red")]], 4, SamplingConfig(max_new_tokens=12))
    with torch.no_grad():
        forward = completion_logprobs(model, processor, rollout, range(4))
    mask = rollout.completion_mask.bool()
    torch.testing.assert_close(rollout.sampled_logprobs[mask], forward[mask], atol=1e-4, rtol=1e-4)
    assert inner.generation_config.repetition_penalty == 5.0  # the model's own config is left as it was


def test_on_policy_steps_skip_the_old_logprob_pass(tmp_path):
    # one optimizer step per rollout batch: old log-probs are the update's own (ratio exactly 1, nothing clipped)
    cli = run_cli(["fit", *fit_args(tmp_path, "tiny:llava", "--trainer.max_steps", "2", "--trainer.limit_val_batches", "0")])
    rows = [r for r in metrics(cli.trainer) if r.get("train/loss")]
    assert len(rows) == 2
    assert all(not r.get("perf/old_logprobs_s") and float(r["train/clip_fraction"]) == 0.0 for r in rows)
    # two PPO epochs re-use the batch after an update: the old pass runs
    cli = run_cli(["fit", *fit_args(tmp_path / "two", "tiny:llava", "--model.optimization.ppo_epochs", "2", "--trainer.max_steps", "2",
                                    "--trainer.limit_val_batches", "0")])
    assert all(r.get("perf/old_logprobs_s") for r in metrics(cli.trainer) if r.get("train/loss"))


class ByHandGradientCheck(L.Callback):
    """Before every optimizer step of the module, compares the gradient it accumulated (micro-batched, through
    losses.policy_loss) with the gradient of the GRPO-preset loss written out by hand on the same mini-batch:
    per token -min(r A, clip(r, 0.8, 1.2) A) + 0.05 * (exp(d) - d - 1), d = ref - logp, r = exp(logp - old),
    averaged over each sequence's real tokens, then over sequences."""

    def __init__(self, mini_batch_size: int):
        self.mini_batch_size = mini_batch_size  # prompts
        self.compared = 0
        self.step_in_batch = 0
        self.record = None

    def on_train_start(self, trainer, pl_module):
        pl_module.optimizers().optimizer.register_step_pre_hook(lambda *_: self.compare(pl_module))

    def compare(self, module):
        record = module.last_update
        if record is not self.record:
            self.record, self.step_in_batch = record, 0
        scored, g = record.local, record.local.num_generations
        minibatches = scored.num_prompts // self.mini_batch_size
        first = (self.step_in_batch % minibatches) * self.mini_batch_size * g
        rows = torch.arange(first, first + self.mini_batch_size * g)
        self.step_in_batch += 1

        params = [p for p in module.model.parameters() if p.requires_grad]
        accumulated = [p.grad.clone() for p in params]
        logp = completion_logprobs(module.model, module.processor, scored.rollout, rows)
        old = logp.detach() if scored.old_logprobs is None else scored.old_logprobs[rows]
        ref = scored.ref_logprobs[rows]
        advantage = record.local_advantages[rows].unsqueeze(1)
        mask = scored.rollout.completion_mask[rows].float()
        ratio = torch.exp(logp - old)
        surrogate = -torch.minimum(ratio * advantage, torch.clamp(ratio, 0.8, 1.2) * advantage)
        d = ref - logp
        per_token = surrogate + 0.05 * (torch.exp(d) - d - 1)
        loss = ((per_token * mask).sum(dim=1) / mask.sum(dim=1)).mean()
        by_hand = torch.autograd.grad(loss, params)
        for got, want in zip(accumulated, by_hand):
            torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-4)
        assert any(bool(w.abs().sum() > 0) for w in by_hand)
        self.compared += 1


@pytest.mark.parametrize("micro_batch_size, ppo_epochs, mini_batch_size", [
    (64, 1, 4),  # on-policy: one optimizer step, no old-log-prob pass
    (3, 1, 4),  # micro-batches straddle prompts (G = 2)
    (64, 2, 2),  # 2 mini-batches x 2 epochs: old log-probs from before the first step, ratios away from 1
    (3, 2, 2),
])
def test_the_optimized_gradient_is_the_gradient_of_the_loss_by_hand(tmp_path, micro_batch_size, ppo_epochs, mini_batch_size):
    cli = run_cli(["fit", *fit_args(
        tmp_path, "tiny:llava", "--data.batch_size", "4", "--trainer.limit_train_batches", "2", "--trainer.max_epochs", "1",
        "--trainer.limit_val_batches", "0", "--model.reward.functions", "[tests.test_training:length_reward]",
        "--model.loss.preset", "grpo", "--model.loss.kl_coef", "0.05", "--model.optimization.max_grad_norm", "1e9",
        "--model.optimization.micro_batch_size", str(micro_batch_size), "--model.optimization.ppo_epochs", str(ppo_epochs),
        "--model.optimization.mini_batch_size", str(mini_batch_size),
        "--trainer.callbacks+=tests.test_training.ByHandGradientCheck",
        f"--trainer.callbacks.mini_batch_size={mini_batch_size}",
    )])
    steps = 2 * ppo_epochs * (4 // mini_batch_size)
    assert cli.trainer.global_step == steps
    assert callback(cli.trainer, ByHandGradientCheck).compared == steps


def small_data_folder(folder: Path, n: int, extra=lambda i: {}) -> Path:
    """The first ``n`` bundled validation rows as a train and a validation split (images by absolute path)."""
    import json

    folder.mkdir(parents=True, exist_ok=True)
    rows = [json.loads(line) for line in open(REPO / "data" / "synthetic" / "val.jsonl")][:n]
    for split in ("train", "validation"):
        with open(folder / f"{split}.jsonl", "w") as f:
            for i, row in enumerate(rows):
                f.write(json.dumps({**row, "images": [str(REPO / "data" / "synthetic" / row["images"][0])], **extra(i)}) + "\n")
    return folder


def test_a_short_last_batch_trains_with_a_short_last_mini_batch(tmp_path):
    # 5 prompts in batches of 4: the epoch ends on a batch of 1, which mini-batches of 2 do not divide
    cli = run_cli(["fit", *fit_args(tmp_path, "tiny:llava", "--data.source", str(small_data_folder(tmp_path / "data", 5)),
                                    "--data.batch_size", "4", "--model.optimization.mini_batch_size", "2",
                                    "--trainer.max_epochs", "1", "--trainer.limit_val_batches", "0",
                                    "--model.reward.functions", "[tests.test_training:length_reward]")])
    assert cli.trainer.global_step == 2 + 1  # the full batch in 2 optimizer steps, the short one in 1


def test_one_rollout_batch_gives_the_configured_number_of_optimizer_steps(tmp_path):
    # 4 prompts per rollout batch, 2 per mini-batch, 2 PPO epochs -> 4 optimizer steps from one batch
    cli = run_cli(["fit", *fit_args(tmp_path, "tiny:llava", "--data.batch_size", "4", "--model.optimization.mini_batch_size", "2",
                                    "--model.optimization.ppo_epochs", "2", "--model.optimization.micro_batch_size", "3",
                                    "--trainer.limit_train_batches", "1", "--trainer.limit_val_batches", "0",
                                    "--trainer.max_epochs", "1")])
    assert cli.trainer.global_step == 4


def test_token_logprobs_by_hand():
    # logits (0, ln 3): softmax (1/4, 3/4). At T = 2: (0, ln 3 / 2) -> p = (1, sqrt 3) / (1 + sqrt 3)
    logits = torch.tensor([[[0.0, math.log(3.0)], [0.0, math.log(3.0)]]])
    tokens = torch.tensor([[1, 0]])
    assert token_logprobs(logits, tokens).tolist()[0] == pytest.approx([math.log(0.75), math.log(0.25)], abs=1e-7)
    at_t2 = token_logprobs(logits, tokens, temperature=2.0).tolist()[0]
    assert at_t2 == pytest.approx([math.log(math.sqrt(3) / (1 + math.sqrt(3))), math.log(1 / (1 + math.sqrt(3)))], abs=1e-7)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_token_logprobs_equal_log_softmax_with_the_same_gradient(dtype, temperature):
    torch.manual_seed(0)
    logits = (3 * torch.randn(3, 5, 50)).to(dtype).requires_grad_()
    tokens = torch.randint(0, 50, (3, 5))
    weights = torch.randn(3, 5)
    ours = token_logprobs(logits, tokens, temperature)
    (grad_ours,) = torch.autograd.grad((ours * weights).sum(), logits)
    plain = torch.log_softmax(logits.float() / temperature, dim=-1).gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
    (grad_plain,) = torch.autograd.grad((plain * weights).sum(), logits)
    assert ours.dtype == torch.float32
    torch.testing.assert_close(ours, plain, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(grad_ours.float(), grad_plain.float(), atol=1e-5, rtol=1e-3)


def test_completion_mask_stops_after_the_first_eos():
    ids = torch.tensor([[5, 9, 2, 7, 2], [2, 4, 4, 4, 4], [1, 1, 1, 1, 1]])
    assert completion_mask_after_eos(ids, [2]).tolist() == [[1, 1, 1, 0, 0], [1, 0, 0, 0, 0], [1, 1, 1, 1, 1]]


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda: RolloutSettings(num_generations=1), "num_generations must be >= 2"),
        (lambda: RolloutSettings(temperature=0.0), "temperature must be > 0"),
        (lambda: RolloutSettings(top_p=0.9), "truncated distribution"),
        (lambda: RolloutSettings(top_k=50), "truncated distribution"),
        (lambda: RolloutSettings(max_sequences_per_generate=0), "max_sequences_per_generate must be >= 1"),
        (lambda: OptimizationSettings(rollout_batch_size=6, mini_batch_size=4), "must divide rollout_batch_size=6"),
        (lambda: OptimizationSettings(micro_batch_size=0), "micro_batch_size must be >= 1"),
        (lambda: OptimizationSettings(learning_rate=-1e-5), "learning_rate must be a finite number > 0"),
        (lambda: OptimizationSettings(max_grad_norm=float("inf")), "max_grad_norm must be a finite number > 0"),
        (lambda: OptimizationSettings(mini_batch_size=0), "mini_batch_size must be >= 1"),
        (lambda: OptimizationSettings(warmup_steps=-1), "warmup_steps must be >= 0"),
        (lambda: AdvantageSettings(alphas=(0.1, -0.2, 0.7)), "alphas must be finite and >= 0"),
        (lambda: AdvantageSettings(alphas=(float("inf"), 0.2, 0.7)), "alphas must be finite and >= 0"),
        (lambda: AdvantageSettings(num_reasoning_groups=0), "num_reasoning_groups must be >= 1"),
        (lambda: AdvantageSettings(percentiles=(0.75, 0.25)), "percentiles must satisfy"),
        (lambda: AdvantageSettings(eps=0.0), "eps must be > 0"),
        (lambda: OptimizationSettings(mini_batch_size=3).batch_sizes(8), "mini_batch_size=3 must divide the rollout batch of 8"),
        (lambda: DurianGRPO(advantages=AdvantageSettings(estimator="ppo")), "unknown estimator 'ppo'"),
        (lambda: DurianGRPO(reward=RewardSettings(functions=["no_such_module:fn"])), "cannot import module"),
        (lambda: RewardSettings(functions=["durian_lightning.core.rewards:format_reward"], weights=[1.0, 2.0]),
         "1 reward functions but 2 reward weights"),
        (lambda: LossSettings(preset="ppo"), "unknown loss preset"),
        (lambda: LossSettings(ratio_level="prompt"), "ratio_level must be 'token' or 'sequence'"),
        (lambda: LossSettings(preset="sapo", sapo_tau_neg=0.0), "SAPO's temperatures must be > 0"),
        (lambda: LossSettings(preset="dapo", eps_low=1.0), "clip range needs 0 <= eps_low < 1"),
        (lambda: RewardSettings(on_error="ignore"), "reward.on_error must be one of"),
        (lambda: EvaluationSettings(samples=-1), "evaluation.samples must be >= 0"),
    ],
)
def test_impossible_settings_are_refused_when_built(make, message):
    with pytest.raises(ValueError, match=message):
        make()


def test_impossible_settings_fail_before_data_or_model(tmp_path):
    with pytest.raises(ValueError, match="num_generations must be >= 2"):
        run_cli(["fit", *fit_args(tmp_path, "tiny:llava", "--model.rollout.num_generations", "1")])
    assert not (tmp_path / "entropy").exists()  # the visual-entropy precompute never started


def test_bf16_mixed_trains_the_adapter_in_float32_and_16_bit_training_is_refused(tmp_path):
    args = ["--trainer.max_steps", "3", "--trainer.limit_val_batches", "0", "--model.optimization.learning_rate", "1e-6",
            "--model.reward.functions", "[tests.test_training:length_reward]"]
    cli = run_cli(["fit", *fit_args(tmp_path / "mixed", "tiny:llava", *args, "--trainer.precision", "bf16-mixed",
                                    "--model.dtype", "bfloat16", "--trainer.callbacks+=tests.test_training.SnapshotAtTrainStart")])
    weights, before = cli.model.model.state_dict(), callback(cli.trainer, SnapshotAtTrainStart).weights
    lora_a = [k for k in weights if "lora_A" in k]
    assert all(weights[k].dtype == torch.float32 for k in weights if "lora_" in k)
    assert weights[next(k for k in weights if k.endswith("q_proj.base_layer.weight"))].dtype == torch.bfloat16
    changed = sum(int((weights[k] != before[k]).sum()) for k in lora_a)
    assert changed > 0.9 * sum(weights[k].numel() for k in lora_a)  # in bf16 only ~0.2% of the entries moved
    for precision, dtype, message in (("bf16-true", "float32", "torch.bfloat16 .*bf16-mixed"),
                                      ("32-true", "bfloat16", "torch.bfloat16 .*without LoRA")):
        extra = ["--model.lora.enabled", "false"] if precision == "32-true" else []
        with pytest.raises(ValueError, match=message):
            run_cli(["fit", *fit_args(tmp_path / precision, "tiny:llava", *args, *extra, "--trainer.precision", precision,
                                      "--model.dtype", dtype)])


def test_unknown_config_key_is_rejected_by_the_cli(tmp_path, capsys):
    with pytest.raises(SystemExit):
        run_cli(["fit", *fit_args(tmp_path), "--model.num_generationz", "4"])
    assert "num_generationz" in capsys.readouterr().err


def test_a_prompt_over_the_limit_is_named(tmp_path):
    with pytest.raises(ValueError, match=r"sample 'train-\d+' has \d+ prompt tokens .* over max_prompt_length=10"):
        run_cli(["fit", *fit_args(tmp_path, "tiny:llava", "--model.rollout.max_prompt_length", "10", "--trainer.max_steps", "1")])


def test_a_broken_reward_function_stops_the_step_with_its_name(tmp_path, monkeypatch):
    import sys
    import types

    module = types.ModuleType("broken_rewards")
    module.nan_reward = lambda completions, answers, **kw: [float("nan")] * len(completions)
    monkeypatch.setitem(sys.modules, "broken_rewards", module)
    with pytest.raises(ValueError, match=r"reward function 'broken_rewards:nan_reward' returned nan for completion 0 of "
                                         r"sample 'train-\d+' \('.*'\); expected a finite number"):
        run_cli(["fit", *fit_args(tmp_path, "tiny:llava", "--model.reward.functions", "[broken_rewards:nan_reward]",
                                  "--trainer.max_steps", "1")])


REWARD_CALLS = {"count": 0, "fail_on": ()}


def flaky_reward(completions, answers, **fields):
    """A dense reward that raises on the calls numbered in ``REWARD_CALLS["fail_on"]`` (one call per training step
    while nothing fails)."""
    REWARD_CALLS["count"] += 1
    if REWARD_CALLS["count"] in REWARD_CALLS["fail_on"]:
        raise ConnectionError("the grading service is down")
    return [len(c) / 100 for c in completions]


def test_a_failed_reward_stops_with_a_checkpoint_that_resumes(tmp_path):
    from durian_lightning.core.rewards import RewardError

    args = fit_args(tmp_path, "tiny:llava", "--model.reward.functions", "[tests.test_training:flaky_reward]",
                    "--trainer.limit_val_batches", "0", "--trainer.max_steps", "3", "--seed_everything", "5")
    REWARD_CALLS.update(count=0, fail_on=(2,))
    with pytest.raises(RewardError, match="grading service is down") as raised:
        run_cli(["fit", *args])
    saved = Path(str(raised.value).rsplit("--ckpt_path ", 1)[1])
    assert saved.name == "reward-failure.ckpt" and saved.is_file()
    assert torch.load(saved, map_location="cpu", weights_only=False)["global_step"] == 1  # the completed update
    REWARD_CALLS.update(count=0, fail_on=())
    resumed = run_cli(["fit", *args, "--ckpt_path", str(saved)])
    assert resumed.trainer.global_step == 3 and REWARD_CALLS["count"] == 2  # the failed step is retried, then step 3


def test_on_error_zero_trains_on_and_counts_the_failures(tmp_path):
    REWARD_CALLS.update(count=0, fail_on=(2, 3))
    cli = run_cli(["fit", *fit_args(tmp_path, "tiny:llava", "--model.reward.functions", "[tests.test_training:flaky_reward]",
                                    "--model.reward.on_error", "zero", "--trainer.limit_val_batches", "0",
                                    "--trainer.max_steps", "3")])
    REWARD_CALLS.update(fail_on=())
    assert cli.trainer.global_step == 3
    failures = [float(r["train/reward_failures"]) for r in metrics(cli.trainer) if r.get("train/reward_failures") not in (None, "")]
    # step 2's batch call (call 2) failed; retried one completion at a time, only the first (call 3) failed again
    assert failures == [0.0, 1.0, 0.0]


class RecordUpdates(L.Callback):
    """The prompts and rewards of every update."""

    def __init__(self):
        self.updates = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if pl_module.last_update is not None:
            local = pl_module.last_update.local
            component = local.reward_components["tests.ddp_probe:color_question_reward"]
            self.updates.append((list(local.ids), component.view(-1, local.num_generations), local.old_logprobs,
                                 len(pl_module.buffer)))


def test_dapo_preset_with_dynamic_sampling_trains_on_informative_prompts_only(tmp_path):
    # the filter compares a named reward component: only color questions can earn the color reward (a dense one), so
    # every other prompt must be dropped, although the length reward makes nearly every prompt's totals differ
    cli = run_cli(["fit", *fit_args(tmp_path, "tiny:llava", "--model.loss.preset", "dapo",
                                    "--model.optimization.dynamic_sampling", "true", "--data.batch_size", "4",
                                    "--model.optimization.rollout_batch_size", "2",
                                    "--model.reward.functions",
                                    "[tests.ddp_probe:color_question_reward, tests.test_training:length_reward]",
                                    "--model.optimization.dynamic_sampling_reward", "tests.ddp_probe:color_question_reward",
                                    "--trainer.max_steps", "3", "--trainer.limit_val_batches", "0",
                                    "--trainer.callbacks+=tests.test_training.RecordUpdates")])
    assert cli.trainer.global_step == 3
    problems = {sample.id: sample.problem for sample in cli.datamodule.samples["train"]}
    updates = callback(cli.trainer, RecordUpdates).updates
    assert len(updates) == 3
    for ids, rewards, old_logprobs, waiting in updates:
        assert len(ids) == 2  # exactly rollout_batch_size prompts
        assert all("color" in problems[i] for i in ids), [problems[i] for i in ids]
        assert bool((rewards.amax(dim=1) > rewards.amin(dim=1)).all())
        # the surplus is dropped at every update, so every prompt was sampled by the policy being updated: on-policy
        assert waiting == 0 and old_logprobs is None
    trained = [i for ids, *_ in updates for i in ids]
    assert len(set(trained)) == len(trained)  # no prompt twice
    dropped = [float(r["train/dynamic_sampling_dropped"]) for r in metrics(cli.trainer) if r.get("train/dynamic_sampling_dropped")]
    assert dropped and all(d >= 0 and d.is_integer() for d in dropped)


def test_dataset_entropy_thresholds_group_the_batch_by_the_training_sets_percentiles(tmp_path):
    from durian_lightning.core.difficulty import perceptual_groups

    cli = run_cli(["fit", *fit_args(tmp_path, "tiny:llava", "--model.advantages.entropy_thresholds", "dataset",
                                    "--data.batch_size", "4", "--model.reward.functions", "[tests.test_training:length_reward]",
                                    "--trainer.max_steps", "1", "--trainer.limit_val_batches", "0")])
    record = cli.model.last_update
    thresholds = cli.datamodule.entropy_thresholds((0.25, 0.75))
    expected = perceptual_groups(record.batch.scores.visual_entropy, thresholds=thresholds)
    assert record.advantages.groups["perceptual"].view(-1, 2)[:, 0].tolist() == expected.tolist()


def test_a_registered_estimator_is_looked_up_by_name(tmp_path, monkeypatch):
    from tests.test_advantages import std_floor

    monkeypatch.setitem(ESTIMATORS, "std_floor", std_floor)
    cli = run_cli(["fit", *fit_args(tmp_path, "tiny:llava", "--model.advantages.estimator", "std_floor",
                                    "--model.reward.functions", "[tests.test_training:length_reward]",
                                    "--trainer.max_steps", "1", "--trainer.limit_val_batches", "0")])
    record = cli.model.last_update
    expected = std_floor(record.batch.rewards, record.batch.prompt_index, None, None).advantages
    torch.testing.assert_close(record.advantages.advantages, expected)
    assert "difficulty/max_abs_advantage" in cli.trainer.callback_metrics


@pytest.mark.parametrize("estimator, preset", [("durian_rloo", "gspo"), ("reinforce_pp", "cispo"),
                                               ("durian_reinforce_pp_baseline", "sapo")])
def test_every_estimator_and_loss_preset_trains_from_the_command_line(tmp_path, estimator, preset):
    cli = run_cli(["fit", *fit_args(tmp_path, "tiny:llava", "--model.advantages.estimator", estimator,
                                    "--model.loss.preset", preset,
                                    "--model.reward.functions", "[tests.test_training:length_reward]",
                                    "--trainer.max_steps", "1", "--trainer.limit_val_batches", "0")])
    record = cli.model.last_update
    expected = ESTIMATORS[estimator](record.batch.rewards, record.batch.prompt_index, record.batch.scores,
                                     cli.model.advantages).advantages
    torch.testing.assert_close(record.advantages.advantages, expected)
    assert cli.model.loss_config == PolicyLossConfig.preset(preset, normalizer=6.0)
    assert math.isfinite(float(cli.trainer.callback_metrics["train/loss"]))


def length_reward(completions, answers, **fields):
    """A dense reward so that random tiny models produce prompts with unequal rewards."""
    return [len(c) / 100 for c in completions]


def test_resuming_from_a_checkpoint_reproduces_the_uninterrupted_run(tmp_path):
    common = ["--seed_everything", "7", "--model.reward.functions", "[tests.test_training:length_reward]",
              "--trainer.limit_val_batches", "0", "--trainer.max_steps", "3"]
    checkpointing = ["--trainer.callbacks+=lightning.pytorch.callbacks.ModelCheckpoint",
                     "--trainer.callbacks.every_n_train_steps=2", "--trainer.callbacks.save_top_k=-1",
                     f"--trainer.callbacks.dirpath={tmp_path / 'ckpt'}"]
    straight = run_cli(["fit", *fit_args(tmp_path / "a", "tiny:llava", *common, *checkpointing)])
    checkpoint = tmp_path / "ckpt" / "epoch=0-step=2.ckpt"
    assert checkpoint.is_file()
    saved = torch.load(checkpoint, weights_only=False)
    assert all("lora_" in k for k in saved["state_dict"]), "only trainable weights are checkpointed"
    # the checkpoint alone rebuilds the module: settings from its hyper-parameters, the adapter from its weights
    loaded = DurianGRPO.load_from_checkpoint(checkpoint)
    assert loaded.rollout == RolloutSettings(num_generations=2, max_new_tokens=6)
    weights = loaded.model.state_dict()
    for key, value in saved["state_dict"].items():
        torch.testing.assert_close(weights[key.removeprefix("model.")], value, rtol=0, atol=0)
    resumed = run_cli(["fit", *fit_args(tmp_path / "b", "tiny:llava", *common), "--ckpt_path", str(checkpoint)])
    assert resumed.trainer.global_step == 3
    a = {k: v for k, v in straight.model.model.state_dict().items() if "lora_" in k}
    b = {k: v for k, v in resumed.model.model.state_dict().items() if "lora_" in k}
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=0, msg=key)


def test_sigterm_checkpoints_the_exact_position_and_exits_non_zero(tmp_path):
    common = ["--seed_everything", "7", "--model.reward.functions", "[tests.test_training:length_reward]",
              "--trainer.limit_val_batches", "0", "--trainer.max_steps", "4"]
    straight = run_cli(["fit", *fit_args(tmp_path / "a", "tiny:llava", *common)])
    with pytest.raises(SystemExit) as stopped:  # a scheduler's preemption after step 2
        run_cli(["fit", *fit_args(tmp_path / "b", "tiny:llava", *common, "--trainer.callbacks+=tests.ddp_probe.SigtermAtStep",
                                  "--trainer.callbacks.step=2")])
    assert stopped.value.code == 143
    run = tmp_path / "b" / "lightning_logs" / "version_0"
    assert (run / "adapter" / "adapter_config.json").is_file()
    resumed = run_cli(["fit", *fit_args(tmp_path / "c", "tiny:llava", *common),
                       "--ckpt_path", str(run / "checkpoints" / "last.ckpt")])
    assert resumed.trainer.global_step == 4
    a = {k: v for k, v in straight.model.model.state_dict().items() if "lora_" in k}
    b = {k: v for k, v in resumed.model.model.state_dict().items() if "lora_" in k}
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=0, msg=key)


def test_a_first_ctrl_c_stops_after_the_step_with_a_checkpoint(tmp_path):
    args = ["--model.reward.functions", "[tests.test_training:length_reward]", "--trainer.limit_val_batches", "0",
            "--trainer.max_steps", "4", "--trainer.callbacks+=tests.ddp_probe.SigtermAtStep", "--trainer.callbacks.step=2",
            "--trainer.callbacks.signal_name=SIGINT"]
    import signal

    before = signal.getsignal(signal.SIGINT)  # Python's default, or SIG_IGN when started in the background
    with pytest.raises(SystemExit) as stopped:
        run_cli(["fit", *fit_args(tmp_path, "tiny:llava", *args)])
    assert stopped.value.code == 130  # 128 + SIGINT: interrupted, not a success
    run = tmp_path / "lightning_logs" / "version_0"
    assert torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)["global_step"] == 2
    assert (run / "adapter" / "adapter_config.json").is_file()
    assert signal.getsignal(signal.SIGINT) is before  # the handler is put back after fit


@pytest.mark.parametrize("content, message", [
    (b"not a checkpoint at all", "is not a readable checkpoint"),
    (None, "is not a Lightning training checkpoint \\(no state_dict, loops\\)"),
])
def test_a_file_that_is_not_a_checkpoint_is_named(tmp_path, content, message):
    path = tmp_path / "broken.ckpt"
    if content is None:
        torch.save({"weights": torch.zeros(2)}, path)
    else:
        path.write_bytes(content)
    with pytest.raises(ValueError, match=f"--ckpt_path {path} {message}"):
        run_cli(["fit", *fit_args(tmp_path, "tiny:llava", "--trainer.max_steps", "1"), "--ckpt_path", str(path)])


def test_full_fine_tuning_with_a_frozen_reference_copy(tmp_path):
    cli = run_cli(["fit", *fit_args(tmp_path, "tiny:llava", "--model.lora.enabled", "false", "--model.loss.kl_coef", "0.05",
                                    "--model.reward.functions", "[tests.test_training:length_reward]",
                                    "--trainer.max_steps", "2", "--trainer.limit_val_batches", "0")])
    module = cli.model
    reference = module.reference.frozen
    changed = [n for (n, p), (_, q) in zip(module.model.named_parameters(), reference.named_parameters()) if not torch.equal(p, q)]
    assert changed, "full fine-tuning changed no weight"
    assert not any(p.requires_grad for p in reference.parameters())
    kl = [float(r["train/kl"]) for r in metrics(cli.trainer) if r.get("train/kl")]
    assert kl[0] == 0.0 and kl[-1] > 0.0  # policy == reference before the first update, then they part


def test_predict_and_test_subcommands(tmp_path):
    from durian_lightning.core.rewards import WeightedReward, extract_answer

    tested = run_cli(["test", *fit_args(tmp_path, "tiny:llava", "--trainer.limit_test_batches", "1")])
    assert len(tested.model.eval_records) == 4
    assert float(tested.trainer.callback_metrics["test/accuracy"]) == pytest.approx(
        sum(r["correct"] for r in tested.model.eval_records) / 4)
    chosen = tmp_path / "out" / "predicted.jsonl"
    predicted = run_cli(["predict", *fit_args(tmp_path / "p", "tiny:llava", "--trainer.limit_predict_batches", "1"),
                         "--predictions_path", str(chosen)])
    (rows,) = predicted.trainer.predict_loop.predictions
    import json

    written = [json.loads(line) for line in open(chosen)]
    assert written == rows
    test_samples = predicted.datamodule.samples["test"]
    assert [r["id"] for r in rows] == [s.id for s in test_samples[:4]]  # the first batch of the test split, in order
    assert [r["answer"] for r in rows] == [s.answer for s in test_samples[:4]]
    paper = WeightedReward.paper_default()
    entropy = {s.id: s.visual_entropy for s in test_samples}
    for row in rows:
        assert row["visual_entropy"] == pytest.approx(entropy[row["id"]]) and row["prompt"].endswith("<|im_start|>assistant\n")
        assert row["prediction"] == extract_answer(row["completion"])
        assert row["reward"] == pytest.approx(float(paper([row["completion"]], [row["answer"]]).total))


def test_accuracy_per_source_and_question_type_with_the_answer_prior_beside_it(tmp_path):
    import json

    from durian_lightning.stages.answer_prior import answer_prior_accuracy, most_frequent_answers

    rows = [json.loads(line) for line in open(REPO / "data" / "synthetic" / "val.jsonl")][:8]
    data = small_data_folder(tmp_path / "data", 8, lambda i: {"source": f"bench{i % 2}"})  # two made-up benchmarks
    # a graded reward (not 0 / 1 accuracy) so the per-source means differ
    cli = run_cli(["validate", *fit_args(tmp_path, "tiny:llava", "--data.source", str(data), "--data.eval_batch_size", "8",
                                         "--model.reward.functions", "[tests.test_training:length_reward]",
                                         "--model.evaluation.do_sample", "true", "--seed_everything", "1")])
    records = cli.model.eval_records
    assert len(records) == 8 and len({r["correct"] for r in records}) > 1
    metrics = cli.trainer.callback_metrics
    for column in ("source", "question_type"):
        values = {r[column] for r in records}
        assert len(values) > 1
        for value in values:
            chosen = [r["correct"] for r in records if r[column] == value]
            assert float(metrics[f"val/accuracy_{column}_{value}"]) == pytest.approx(sum(chosen) / len(chosen))
    assert float(metrics["val/accuracy"]) == pytest.approx(sum(r["correct"] for r in records) / 8)
    # the answer prior of the train split (the same 8 rows here), on the evaluated samples
    pairs = [(row["question_type"], row["answer"]) for row in rows]
    prior = answer_prior_accuracy(most_frequent_answers(pairs), pairs)
    assert float(metrics["val/answer_prior"]) == pytest.approx(prior["overall"])
    for question_type in {row["question_type"] for row in rows}:
        assert float(metrics[f"val/answer_prior_question_type_{question_type}"]) == pytest.approx(prior[question_type])


def even_length_reward(completions, answers, **fields):
    """A 0/1 reward that random tiny models get right about half of the time."""
    return [float(len(c) % 2 == 0) for c in completions]


def test_the_sampling_distribution_entropy_by_hand():
    import math

    from durian_lightning.stages.rollout import Rollout, SampledTokenLogprobs

    # two rows, vocabulary of 2; step 1: p = (3/4, 1/4) and (1/2, 1/2); step 2: one token certain, then (1/2, 1/2)
    steps = [torch.tensor([[math.log(3), 0.0], [0.0, 0.0]]), torch.tensor([[0.0, -math.inf], [5.0, 5.0]])]
    recorder = SampledTokenLogprobs(temperature=1.0)
    for step, scores in enumerate(steps):
        recorder(torch.zeros(2, 3 + step, dtype=torch.long), scores)
    entropy = recorder.entropy(torch.zeros(2, 2, dtype=torch.long))
    quarter = -(0.75 * math.log(0.75) + 0.25 * math.log(0.25))  # 0.5623
    assert entropy.flatten().tolist() == pytest.approx([quarter, 0.0, math.log(2), math.log(2)])
    # at temperature 2 the first row's logits halve: p = (sqrt 3, 1) / (1 + sqrt 3)
    hot = SampledTokenLogprobs(temperature=2.0)
    hot(torch.zeros(1, 3, dtype=torch.long), steps[0][:1])
    p = math.sqrt(3) / (1 + math.sqrt(3))
    assert hot.entropy(torch.zeros(1, 1, dtype=torch.long)).item() == pytest.approx(-(p * math.log(p) + (1 - p) * math.log(1 - p)))
    # the logged mean is over completion tokens only: (1 + 2 + 4) / 3
    rollout = Rollout(prompts=["a", "b"], images=[[], []], completion_ids=torch.zeros(2, 3, dtype=torch.long),
                      completion_mask=torch.tensor([[1, 1, 0], [1, 0, 0]]), completions=["", ""],
                      sampled_logprobs=torch.zeros(2, 3), ended=torch.tensor([True, True]),
                      token_entropy=torch.tensor([[1.0, 2.0, 9.0], [4.0, 9.0, 9.0]]))
    assert rollout.mean_token_entropy() == pytest.approx(7 / 3)
    assert Rollout.concat([rollout.select([1]), rollout.select([0])]).mean_token_entropy() == pytest.approx(7 / 3)


def test_sampled_mean_and_pass_at_k_by_hand():
    from durian_lightning.stages.evaluation import sampled_accuracy

    # 3 prompts x k = 4: two right of four; none; all four
    correct = torch.tensor([1.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 0.0, 1.0, 1.0, 1.0, 1.0])
    values = sampled_accuracy(correct, 4)
    assert values["mean@k"].tolist() == [0.5, 0.0, 1.0]
    assert values["pass@k"].tolist() == [1.0, 0.0, 1.0]
    with pytest.raises(ValueError, match="not k = 4 per prompt"):
        sampled_accuracy(correct[:10], 4)


def test_validation_logs_mean_and_pass_at_k_of_sampled_completions(tmp_path):
    data = small_data_folder(tmp_path / "data", 8)
    cli = run_cli(["validate", *fit_args(tmp_path, "tiny:llava", "--data.source", str(data), "--data.eval_batch_size", "8",
                                         "--model.reward.functions", "[tests.test_training:even_length_reward]",
                                         "--model.evaluation.samples", "4", "--seed_everything", "2")])
    records = cli.model.eval_records
    metrics = cli.trainer.callback_metrics
    means, passes = [r["mean@k"] for r in records], [r["pass@k"] for r in records]
    n = 8
    assert len(records) == n and {m * 4 for m in means} <= {0.0, 1.0, 2.0, 3.0, 4.0}
    assert 0.0 < sum(means) / n < 1.0  # the samples disagree, so the checks below can fail
    assert passes == [float(m > 0) for m in means]
    assert float(metrics["val/mean@4"]) == pytest.approx(sum(means) / n)
    assert float(metrics["val/pass@4"]) == pytest.approx(sum(passes) / n)
    assert "val/accuracy" in metrics  # the greedy accuracy is still there


def test_gradient_checkpointing_gives_the_same_update(tmp_path):
    args = ["--seed_everything", "3", "--model.reward.functions", "[tests.test_training:length_reward]",
            "--trainer.max_steps", "1", "--trainer.limit_val_batches", "0"]
    # checkpointing runs the full forward (no cache while training), so the plain run does too: same arithmetic, and
    # Adam's first step, about lr * sign(gradient), would magnify float noise (the shared prefill's own test is
    # tests/test_shared_prefill.py)
    plain = run_cli(["fit", *fit_args(tmp_path / "a", "tiny:llava", *args, "--model.rollout.share_prompt_prefill", "false")])
    checkpointed = run_cli(["fit", *fit_args(tmp_path / "b", "tiny:llava", *args, "--model.gradient_checkpointing", "true")])
    a = {k: v for k, v in plain.model.model.state_dict().items() if "lora_" in k}
    b = {k: v for k, v in checkpointed.model.model.state_dict().items() if "lora_" in k}
    for key in a:
        torch.testing.assert_close(a[key], b[key], msg=key)


class GradientNormAtEveryStep(L.Callback):
    """The norm of the gradients the optimizer applies, at every optimizer step (the torch optimizer's step pre-hook:
    after the fp16 plugin's unscale and the module's clip, which run before the plugin calls the step)."""

    def on_train_start(self, trainer, pl_module):
        self.norms = []

        def record(*_):
            grads = [p.grad for p in pl_module.model.parameters() if p.requires_grad]
            self.norms.append(float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))))

        pl_module.optimizers().optimizer.register_step_pre_hook(record)


def test_16_mixed_clips_the_unscaled_gradient(tmp_path):
    # fp16 autocast scales the loss (x 65,536) in backward; clipping before the unscale would shrink every update to
    # max_grad_norm / 65,536. The gradient applied must have the clip norm itself, and the logged norm be the real one.
    # (Lightning turns 16-mixed into bf16-mixed on a CPU, so the fp16 plugin and its scaler are built here by hand)
    from lightning.pytorch.loggers import CSVLogger
    from lightning.pytorch.plugins.precision import MixedPrecision

    from durian_lightning.data import MultimodalReasoningDataModule

    data = MultimodalReasoningDataModule(DATA, model_name_or_path="tiny:llava", cache_dir=str(tmp_path / "entropy"),
                                         batch_size=2, progress=False)
    module = DurianGRPO("tiny:llava", rollout=RolloutSettings(num_generations=2, max_new_tokens=6),
                        reward=RewardSettings(functions=["tests.test_training:length_reward"]),
                        optimization=OptimizationSettings(max_grad_norm=1e-3))
    applied = GradientNormAtEveryStep()
    L.seed_everything(0)
    trainer = L.Trainer(accelerator="cpu", devices=1, max_steps=2, limit_val_batches=0, enable_checkpointing=False,
                        enable_progress_bar=False, logger=CSVLogger(tmp_path), log_every_n_steps=1, callbacks=[applied],
                        plugins=[MixedPrecision("16-mixed", "cpu", torch.amp.GradScaler("cpu"))])
    trainer.fit(module, datamodule=data)
    assert applied.norms and all(norm == pytest.approx(1e-3, rel=1e-3) for norm in applied.norms), applied.norms
    logged = [float(r["train/grad_norm"]) for r in metrics(trainer) if r.get("train/grad_norm")]
    assert logged and all(1e-3 < norm < 1e3 for norm in logged), logged  # scaled, it would be ~65,536 x larger
