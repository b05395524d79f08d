"""Lightning DDP on CPU (2 processes, gloo): every rank computes Durian over the global batch."""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from durian_lightning.core.advantages import durian_advantages

REPO = Path(__file__).resolve().parents[1]


def run_process_group(command, env, timeout):
    """Run the launcher and its rank processes in their own process group; a hang (a collective one rank never
    reaches) fails the test after ``timeout`` seconds and leaves no rank behind."""
    process = subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                               start_new_session=True)
    try:
        _, stderr = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        _, stderr = process.communicate()
        raise AssertionError(f"the DDP run hung for {timeout} s:\n{stderr[-3000:]}")
    return process.returncode, stderr


def fit_on_two_ranks(tmp_path, *args: str, returncode: int = 0, timeout: int = 300):
    """`durian fit` of tiny LLaVA (G = 4, 6 new tokens, 3 prompts per rank, 2 steps) on 2 gloo processes; returns the
    folder where tests/ddp_probe.py wrote what each rank computed (and, with ``returncode``, stderr)."""
    dump = tmp_path / "dump"
    command = [
        sys.executable, "-m", "durian_lightning.cli", "fit",
        "--model.model_name_or_path", "tiny:llava", "--model.rollout.num_generations", "4", "--model.rollout.max_new_tokens", "6",
        "--data.source", str(REPO / "data" / "synthetic"), "--data.batch_size", "3",
        "--data.cache_dir", str(tmp_path / "entropy"), "--data.progress", "false",
        "--trainer.strategy", "ddp", "--trainer.devices", "2", "--trainer.accelerator", "cpu", "--trainer.max_steps", "2",
        "--trainer.enable_progress_bar", "false", "--trainer.default_root_dir", str(tmp_path),
        "--trainer.callbacks+=tests.ddp_probe.DumpRolloutCallback", f"--trainer.callbacks.folder={dump}",
        *args,
    ]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "DURIAN_CACHE": str(tmp_path / "cache")}
    code, stderr = run_process_group(command, env, timeout=timeout)
    if returncode == 0:
        assert code == 0, stderr[-3000:]
        return dump
    assert code == returncode, f"exit status {code}, expected {returncode}:\n{stderr[-3000:]}"
    return dump, stderr


def test_ddp_ranks_compute_the_advantages_of_the_global_batch(tmp_path):
    dump = fit_on_two_ranks(
        tmp_path, "--model.advantages.num_reasoning_groups", "3", "--model.reward.functions", "[tests.test_training:length_reward]",
        "--data.eval_batch_size", "4", "--trainer.limit_val_batches", "1", "--trainer.val_check_interval", "2",
        "--model.optimization.max_grad_norm", "1e9",  # no clipping: the gradient below is the raw averaged one
        "--trainer.callbacks+=tests.ddp_probe.DumpGradientCallback", f"--trainer.callbacks.folder={tmp_path / 'dump'}",
    )
    for step in (1, 2):
        ranks = [json.loads((dump / f"rank{r}-step{step}.json").read_text()) for r in (0, 1)]
        assert all(r["world_size"] == 2 for r in ranks)
        assert not set(ranks[0]["ids"]) & set(ranks[1]["ids"]), "each rank rolls out its own prompts"
        # both ranks hold the global batch (2 ranks x 3 prompts x 4 rollouts) and the same advantages ...
        assert ranks[0]["global_rewards"] == ranks[1]["global_rewards"] and len(ranks[0]["global_rewards"]) == 24
        assert ranks[0]["global_advantages"] == ranks[1]["global_advantages"]
        # ... which are what one process computes from that global batch
        single = durian_advantages(
            torch.tensor(ranks[0]["global_rewards"]), torch.arange(6).repeat_interleave(4),
            visual_entropy=torch.tensor(ranks[0]["global_entropy"]),
            confidence=torch.tensor(ranks[0]["global_confidence"]), num_reasoning_groups=3,
        ).advantages
        torch.testing.assert_close(torch.tensor(ranks[0]["global_advantages"]), single)
        for r in ranks:  # each rank trains on its own rows of it
            torch.testing.assert_close(torch.tensor(r["local_advantages"]), single[r["rank"] * 12 : (r["rank"] + 1) * 12])
        # gradients are averaged across ranks, so both ranks hold the same adapter after every update
        assert ranks[0]["lora_sums"] == ranks[1]["lora_sums"]
    # validation: each rank scores its own 4 samples (whose perceptual groups differ between ranks: every rank still
    # logs the same metric keys, or the metric syncs would pair up wrongly and hang); metrics cover all 8
    validation = [json.loads((dump / f"rank{r}-validation-step2.json").read_text()) for r in (0, 1)]
    assert [v["local"] for v in validation] == [4, 4]
    assert validation[0]["ids"] == validation[1]["ids"] and len(set(validation[0]["ids"])) == 8
    assert validation[0]["metrics"] == validation[1]["metrics"]
    correct = validation[0]["correct"]
    assert validation[0]["metrics"]["val/accuracy"] == pytest.approx(sum(correct) / 8)
    assert (tmp_path / "lightning_logs" / "version_0" / "adapter" / "adapter_config.json").is_file()
    # the update both ranks apply is the gradient of one process's loss on the whole global batch
    for step in (0, 1):
        assert_gradient_is_the_whole_batch_gradient([torch.load(dump / f"rank{r}-gradient-step{step}.pt", weights_only=False)
                                                     for r in (0, 1)], tmp_path / "cache")


def assert_gradient_is_the_whole_batch_gradient(ranks, cache, model_name="tiny:llava", aggregation="seq-mean-token-mean"):
    """Recompute, in this process, the default GRPO-preset loss (no KL, on-policy: ratio exp(logp - logp.detach()))
    over both ranks' rollouts at once: -mean over sequences of the token mean of A * ratio (seq-mean-token-mean), or
    -sum over all tokens of A * ratio / their number (token-mean)."""
    from durian_lightning.models import load_policy, resolve_model_path
    from durian_lightning.stages.rollout import Rollout, completion_logprobs

    for name in ranks[0]["weights"]:
        torch.testing.assert_close(ranks[0]["weights"][name], ranks[1]["weights"][name], rtol=0, atol=0)
        torch.testing.assert_close(ranks[0]["grads"][name], ranks[1]["grads"][name], rtol=0, atol=0)
    default = yaml.safe_load((REPO / "configs" / "default.yaml").read_text())["model"]["lora"]
    model, processor = load_policy(resolve_model_path(model_name, cache), use_lora=True, lora_r=default["r"],
                                   lora_alpha=default["alpha"], lora_target_modules=default["target_modules"])
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, value in ranks[0]["weights"].items():
            params[name].copy_(value)
    rollout = Rollout.concat([r["rollout"] for r in ranks])
    advantages = torch.cat([r["advantages"] for r in ranks]).unsqueeze(1)
    assert len(rollout) == 24
    logp = completion_logprobs(model, processor, rollout, range(24))
    mask = rollout.completion_mask.float()
    token_terms = advantages * torch.exp(logp - logp.detach()) * mask
    if aggregation == "token-mean":
        loss = -token_terms.sum() / mask.sum()
    else:
        loss = -(token_terms.sum(dim=1) / mask.sum(dim=1)).mean()
    names = list(ranks[0]["grads"])
    whole_batch = torch.autograd.grad(loss, [params[n] for n in names])
    assert any(bool(g.abs().sum() > 0) for g in whole_batch)
    for name, want in zip(names, whole_batch):
        torch.testing.assert_close(ranks[0]["grads"][name], want, atol=1e-6, rtol=1e-4, msg=name)


def test_ddp_whitens_reinforce_pp_baseline_over_the_global_batch(tmp_path):
    """REINFORCE++-baseline divides by one std over the whole batch, and its Durian form by stds within difficulty
    groups that span ranks: every rank gets what one process computes from all ranks' rollouts."""
    dump = fit_on_two_ranks(tmp_path, "--model.advantages.estimator", "durian_reinforce_pp_baseline",
                            "--model.advantages.num_reasoning_groups", "3", "--trainer.max_steps", "1",
                            "--model.reward.functions", "[tests.test_training:length_reward]")
    ranks = [json.loads((dump / f"rank{r}-step1.json").read_text()) for r in (0, 1)]
    assert ranks[0]["global_advantages"] == ranks[1]["global_advantages"]
    rewards = torch.tensor(ranks[0]["global_rewards"])
    single = durian_advantages(rewards, torch.arange(6).repeat_interleave(4),
                               visual_entropy=torch.tensor(ranks[0]["global_entropy"]),
                               confidence=torch.tensor(ranks[0]["global_confidence"]), num_reasoning_groups=3,
                               baseline="reinforce_pp_baseline").advantages
    torch.testing.assert_close(torch.tensor(ranks[0]["global_advantages"]), single)
    for r in ranks:
        torch.testing.assert_close(torch.tensor(r["local_advantages"]), single[r["rank"] * 12: (r["rank"] + 1) * 12])
    # one rank's rollouts alone would give other advantages: the statistics are the global batch's
    alone = durian_advantages(rewards[:12], torch.arange(3).repeat_interleave(4),
                              visual_entropy=torch.tensor(ranks[0]["global_entropy"][:3]),
                              confidence=torch.tensor(ranks[0]["global_confidence"][:3]), num_reasoning_groups=3,
                              baseline="reinforce_pp_baseline").advantages
    assert not torch.allclose(alone, single[:12])


def test_ddp_token_mean_is_the_mean_over_every_ranks_tokens(tmp_path):
    # DAPO's token-mean with completions of different lengths on the two ranks: the update is the global batch's
    # token mean (one denominator for all ranks), not the mean of the two ranks' own token means
    dump = fit_on_two_ranks(
        tmp_path, "--model.model_name_or_path", "tiny:llava-pretrained", "--model.rollout.max_new_tokens", "72",
        "--model.loss.aggregation", "token-mean", "--model.reward.functions", "[tests.test_training:length_reward]",
        "--trainer.max_steps", "1", "--trainer.limit_val_batches", "0", "--model.optimization.max_grad_norm", "1e9",
        "--trainer.callbacks+=tests.ddp_probe.DumpGradientCallback", f"--trainer.callbacks.folder={tmp_path / 'dump'}",
    )
    ranks = [torch.load(dump / f"rank{r}-gradient-step0.pt", weights_only=False) for r in (0, 1)]
    tokens = [int(r["rollout"].completion_mask.sum()) for r in ranks]
    assert tokens[0] != tokens[1], tokens  # otherwise both denominators agree and the test could not fail
    assert_gradient_is_the_whole_batch_gradient(ranks, tmp_path / "cache", "tiny:llava-pretrained", "token-mean")


def test_ddp_with_dynamic_sampling_updates_every_rank_at_the_same_step(tmp_path):
    # ranks keep different numbers of informative prompts; they update together, once the poorest has a full batch,
    # and the richer rank's surplus is dropped: no backlog grows
    dump = fit_on_two_ranks(
        tmp_path, "--model.loss.preset", "dapo", "--model.optimization.dynamic_sampling", "true",
        "--model.reward.functions", "[tests.ddp_probe:color_question_reward]", "--trainer.limit_val_batches", "0",
        "--model.optimization.dynamic_sampling_reward", "total",
    )
    for step in (1, 2):
        ranks = [json.loads((dump / f"rank{r}-step{step}.json").read_text()) for r in (0, 1)]
        assert len(ranks[0]["global_rewards"]) == 2 * 3 * 4  # every rank brought exactly one batch of 3 prompts
        assert [r["waiting"] for r in ranks] == [0, 0]
        assert ranks[0]["global_advantages"] == ranks[1]["global_advantages"]
        assert ranks[0]["lora_sums"] == ranks[1]["lora_sums"]


def preempt_and_resume(tmp_path, *common: str) -> Path:
    """The run three times on 2 ranks: straight; stopped by SIGTERM to rank 1 only after step 2 (both ranks stop after
    that step and write one last.ckpt together); resumed from that checkpoint. Returns the checkpoint."""
    fit_on_two_ranks(tmp_path / "straight", *common)
    records = tmp_path / "records"
    _, stderr = fit_on_two_ranks(tmp_path / "preempted", *common, "--trainer.callbacks+=tests.ddp_probe.SigtermAtStep",
                                 "--trainer.callbacks.step=2", "--trainer.callbacks.rank=1",
                                 "--trainer.callbacks+=tests.ddp_probe.RecordCheckpoints",
                                 f"--trainer.callbacks.folder={records}", returncode=143, timeout=120)
    assert "SIGTERM received: stopping after step 2 on every rank" in stderr
    saved = [json.loads(line) for line in (records / "checkpoints.jsonl").read_text().splitlines()]
    assert saved == [{"step": 2, "updates": 2}] * 2  # one checkpoint, both ranks at the same step
    (checkpoint,) = (tmp_path / "preempted").rglob("last.ckpt")
    fit_on_two_ranks(tmp_path / "resumed", *common, "--ckpt_path", str(checkpoint))
    return checkpoint


def test_ddp_preemption_of_one_rank_stops_every_rank_after_the_same_step_and_resumes_exactly(tmp_path):
    # SIGTERM reaches rank 1 only (one node of several preempted): the checkpoint holds each rank's generator (each
    # samples its rollouts from its own); resuming from it reproduces the uninterrupted run's adapter bit for bit
    checkpoint = preempt_and_resume(tmp_path, "--trainer.max_steps", "3", "--trainer.limit_val_batches", "0",
                                    "--seed_everything", "5", "--model.reward.functions",
                                    "[tests.test_training:length_reward]")
    assert len(torch.load(checkpoint, weights_only=False)["durian_rng"]) == 2
    from safetensors.torch import load_file

    adapters = [load_file(tmp_path / run / "lightning_logs" / "version_0" / "adapter" / "adapter_model.safetensors")
                for run in ("straight", "resumed")]
    assert adapters[0].keys() == adapters[1].keys()
    for key in adapters[0]:
        torch.testing.assert_close(adapters[0][key], adapters[1][key], rtol=0, atol=0, msg=key)


@pytest.mark.parametrize("failure, args, message, saved", [
    ("reward", ["--model.reward.functions", "[tests.ddp_probe:fails_on_rank_one]"], "'bbox'", "reward-failure.ckpt"),
    ("prompt too long", ["--trainer.callbacks+=tests.ddp_probe.PromptLimitOnRank", "--trainer.callbacks.rank=1",
                         "--trainer.callbacks.limit=8"], "over max_prompt_length=8", "failure.ckpt"),
])
def test_a_failure_on_one_rank_stops_every_rank_at_once_with_its_message(tmp_path, failure, args, message, saved):
    _, stderr = fit_on_two_ranks(tmp_path, "--trainer.max_steps", "3", "--trainer.limit_val_batches", "0", *args,
                                 returncode=1, timeout=120)  # seconds, not the process group's 30-minute timeout
    assert "rank 1 of 2: " in stderr and message in stderr
    (checkpoint,) = tmp_path.rglob(saved)  # written by both ranks together: the state after the last completed update
    state = torch.load(checkpoint, weights_only=False)
    assert len(state["durian_rng"]) == 2 and state["durian_updates"] == (0 if failure == "reward" else 1)


def test_ddp_logs_global_training_metrics_and_counts_each_validation_sample_once(tmp_path):
    # 7 validation samples on 2 ranks: the sampler gives each rank 4, repeating one; it must count once
    source = tmp_path / "data"
    source.mkdir()
    (source / "images").symlink_to(REPO / "data" / "synthetic" / "images")
    (source / "train.jsonl").write_text((REPO / "data" / "synthetic" / "train.jsonl").read_text())
    (source / "val.jsonl").write_text("".join((REPO / "data" / "synthetic" / "val.jsonl").read_text().splitlines(True)[:7]))
    dump = fit_on_two_ranks(
        tmp_path, "--data.source", str(source), "--data.eval_batch_size", "2", "--trainer.val_check_interval", "2",
        "--model.reward.functions", "[tests.test_training:length_reward]",
    )
    for step in (1, 2):
        ranks = [json.loads((dump / f"rank{r}-step{step}.json").read_text()) for r in (0, 1)]
        logged = ranks[0]["metrics"]
        assert logged == ranks[1]["metrics"]  # every rank logs the same, global numbers
        rewards = torch.tensor(ranks[0]["global_rewards"])
        assert logged["train/reward"] == pytest.approx(float(rewards.mean()))
        assert logged["train/reward_std"] == pytest.approx(float(rewards.std()))
        lengths = ranks[0]["lengths"] + ranks[1]["lengths"]
        assert logged["train/completion_length"] == pytest.approx(sum(lengths) / len(lengths))
        assert (logged["train/completion_length_min"], logged["train/completion_length_max"]) == (min(lengths), max(lengths))
        stats = [r["stats"] for r in ranks]
        assert logged["train/loss"] == pytest.approx(sum(s["loss"] for s in stats) / 2)  # each rank's share of one loss
        tokens = sum(s["tokens"] for s in stats)
        assert logged["train/clip_fraction_high"] == pytest.approx(sum(s["clip_fraction_high"] * s["tokens"] for s in stats) / tokens)
    validation = [json.loads((dump / f"rank{r}-validation-step2.json").read_text()) for r in (0, 1)]
    assert [v["local"] for v in validation] == [4, 4] and len(validation[0]["ids"]) == 8  # one sample twice ...
    by_id = dict(zip(validation[0]["ids"], validation[0]["correct"]))
    assert len(by_id) == 7
    assert validation[0]["metrics"]["val/accuracy"] == pytest.approx(sum(by_id.values()) / 7)  # ... counted once
    completions = (tmp_path / "lightning_logs" / "version_0" / "val_completions.jsonl").read_text().splitlines()
    assert len(completions) == 7
