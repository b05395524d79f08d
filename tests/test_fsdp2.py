"""fsdp2 on 2 gloo processes: the update equals DDP's, ranks start identical, checkpoints resume bit for bit, a run
exports, and a failure on one rank stops both with its message."""

import os
import sys
from pathlib import Path

import pytest
import torch

from durian_lightning.models.loading import resolve_model_path

from .test_ddp import REPO, fit_on_two_ranks, preempt_and_resume, run_process_group

CASES = ["llava:lora", "llava:full", "qwen2_5_vl:lora", "qwen2_5_vl:full", "qwen3_vl:lora", "qwen3_vl:full"]


def test_one_fsdp2_update_equals_one_ddp_update(tmp_path):
    # one update of 2 prompts per rank: 2 mini-batches x 2 PPO epochs = 4 optimizer steps, each over 2 micro-batches,
    # with clipping and weight decay on; LoRA (the adapter whole on every rank, the base sharded) and full fine-tuning
    # (all sharded, gradient checkpointing on), under the same seeds (tests/fsdp2_probe.py)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "DURIAN_CACHE": str(tmp_path / "cache")}
    code, stderr = run_process_group([sys.executable, "-m", "tests.fsdp2_probe", str(tmp_path / "out"), *CASES], env,
                                     timeout=420)
    assert code == 0, stderr[-3000:]
    for case in CASES:
        ddp, fsdp2 = (torch.load(tmp_path / "out" / f"{case.replace(':', '-')}-{s}.pt", weights_only=False)
                      for s in ("ddp", "fsdp2"))
        assert (ddp["sharded"], fsdp2["sharded"]) == (False, True), case
        assert torch.equal(ddp["ids"], fsdp2["ids"]), f"{case}: the rollouts differ"
        assert len(ddp["grads"]) == len(fsdp2["grads"]) == 4
        moved = 0.0
        for step, (want, got) in enumerate(zip(ddp["grads"], fsdp2["grads"])):
            assert want.keys() == got.keys()
            for name, grad in want.items():  # a weight no forward reached included: a zero gradient on both
                torch.testing.assert_close(got[name], grad, rtol=0, atol=1e-6, msg=f"{case} step {step}: {name}")
                moved = max(moved, float(grad.abs().max()))
        assert moved > 1e-3, case  # gradients that could differ
        for name, weight in ddp["weights"].items():
            torch.testing.assert_close(fsdp2["weights"][name], weight, rtol=0, atol=1e-5, msg=f"{case}: {name}")
        assert any(not torch.equal(ddp["start"][name], weight) for name, weight in ddp["weights"].items()), case


def _start_sharded(rank: int, folder: str, model_path: str) -> None:
    """One of 2 gloo ranks: seeded its own way, it builds the LoRA policy, spoils a non-persistent buffer on rank 1
    (as a build on the meta device leaves rotary ``inv_freq``), shards, and writes every weight and buffer whole."""
    from torch.distributed.device_mesh import init_device_mesh

    from durian_lightning.models import load_policy
    from durian_lightning.scale.fsdp2 import shard_policy
    from tests.fsdp2_probe import full

    torch.distributed.init_process_group("gloo", init_method=f"file://{folder}/store", rank=rank, world_size=2)
    torch.manual_seed(100 + rank)
    model, _ = load_policy(model_path, use_lora=True)
    buffers = dict(model.named_buffers())
    name = next(n for n in buffers if n.endswith("inv_freq"))
    if rank == 1:
        buffers[name].mul_(2)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    shard_policy(model, init_device_mesh("cpu", (2,)))
    after = {n: full(p) for n, p in model.named_parameters()}
    after.update({n: full(b) for n, b in model.named_buffers()})
    torch.save({"before": before, "after": after, "buffer": name}, f"{folder}/rank{rank}.pt")
    torch.distributed.destroy_process_group()


def test_ranks_seeded_differently_start_from_rank_zeros_weights(tmp_path):
    path = str(resolve_model_path("tiny:qwen2_5_vl", tmp_path / "models"))
    torch.multiprocessing.spawn(_start_sharded, args=(str(tmp_path), path), nprocs=2)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in (0, 1)]
    lora = [n for n in ranks[0]["before"] if "lora_A" in n]
    assert lora and all(not torch.equal(ranks[0]["before"][n], ranks[1]["before"][n]) for n in lora)  # peft's own init
    for name, value in ranks[0]["after"].items():
        assert torch.equal(ranks[1]["after"][name], value), name
        if name in ranks[0]["before"]:
            assert torch.equal(value, ranks[0]["before"][name]), name  # rank 0's, on both
    assert ranks[0]["buffer"] in ranks[0]["after"]


def read_checkpoint(path: Path) -> dict:
    from durian_lightning.export import read_sharded_checkpoint

    assert path.is_dir() and (path / "meta.pt").is_file(), f"{path}: not a sharded checkpoint"
    return read_sharded_checkpoint(path)


def greedy_ids(model, processor, samples):
    from durian_lightning.stages.rollout import SamplingConfig, generate_rollouts

    rollout = generate_rollouts(model.eval(), processor, [s["prompt"] for s in samples], [s["images"] for s in samples],
                                1, SamplingConfig(max_new_tokens=8, do_sample=False))
    return rollout.completion_ids


@pytest.mark.parametrize("mode", ["lora", "full"])
def test_fsdp2_fit_stops_on_a_sigterm_to_rank_one_resumes_bit_for_bit_and_exports(tmp_path, mode):
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from durian_lightning.data import MultimodalReasoningDataModule
    from durian_lightning.export import export, load_trained

    common = ["--trainer.strategy", "fsdp2", "--trainer.max_steps", "3", "--trainer.limit_val_batches", "0",
              "--seed_everything", "5", "--model.reward.functions", "[tests.test_training:length_reward]",
              "--model.lora.enabled", str(mode == "lora").lower(), "--model.optimization.learning_rate", "1e-3"]
    checkpoint = preempt_and_resume(tmp_path, *common)  # SIGTERM to rank 1 after step 2, and the resume
    stopped = read_checkpoint(checkpoint)
    assert len(stopped["durian_rng"]) == 2 and stopped["durian_updates"] == 2

    finals = [read_checkpoint(next((tmp_path / run).rglob("last.ckpt"))) for run in ("straight", "resumed")]
    assert finals[0]["state_dict"].keys() == finals[1]["state_dict"].keys()
    trained = [k for k in finals[0]["state_dict"] if k.startswith("model.")]
    assert trained and all(("lora_" in k) == (mode == "lora") for k in trained)  # the trainable weights only
    for key in finals[0]["state_dict"]:
        torch.testing.assert_close(finals[1]["state_dict"][key], finals[0]["state_dict"][key], rtol=0, atol=0, msg=key)
    assert not torch.equal(finals[0]["state_dict"][trained[0]], stopped["state_dict"][trained[0]])  # step 3 trained

    # the straight run's checkpoint, exported: transformers alone loads it and completes as the trained policy does
    data = MultimodalReasoningDataModule(str(REPO / "data" / "synthetic"), model_name_or_path="tiny:llava",
                                         entropy_method="pixel", cache_dir=str(tmp_path / "entropy"), progress=False)
    data.setup("validate")
    samples = [data.dataset("validation")[i] for i in range(4)]
    policy, processor, _ = load_trained(next((tmp_path / "straight").rglob("last.ckpt")))
    merged = export(next((tmp_path / "straight").rglob("last.ckpt")), tmp_path / "merged")
    alone = AutoModelForImageTextToText.from_pretrained(merged)
    assert {p.dtype for p in alone.parameters()} == {torch.float32}
    assert torch.equal(greedy_ids(alone, AutoProcessor.from_pretrained(merged), samples),
                       greedy_ids(policy, processor, samples))
    if mode == "lora":  # the adapter the run wrote at its end is the checkpoint's
        adapters = [tmp_path / run / "lightning_logs" / "version_0" / "adapter" / "adapter_model.safetensors"
                    for run in ("straight", "resumed")]
        from safetensors.torch import load_file

        assert load_file(adapters[0]).keys() == load_file(adapters[1]).keys()
        for key, value in load_file(adapters[0]).items():
            assert torch.equal(load_file(adapters[1])[key], value), key


@pytest.mark.parametrize("failure, args, message, saved", [
    ("backward", ["--trainer.callbacks+=tests.ddp_probe.FailInBackward", "--trainer.callbacks.rank=1"],
     "out of memory in this rank's backward (simulated)", None),
    ("reward", ["--model.reward.functions", "[tests.ddp_probe:fails_on_rank_one]"], "'bbox'", "reward-failure.ckpt"),
])
def test_a_failure_on_rank_one_stops_both_fsdp2_ranks_with_its_message(tmp_path, failure, args, message, saved):
    _, stderr = fit_on_two_ranks(tmp_path, "--trainer.strategy", "fsdp2", "--trainer.max_steps", "3",
                                 "--trainer.limit_val_batches", "0", *args, returncode=1, timeout=120)
    for rank in (0, 1):  # each rank's own last error line is rank 1's, not a collective's
        last = [line for line in stderr.splitlines() if line.startswith(f"[rank{rank}]: ") and "Error: " in line][-1]
        assert "Error: rank 1 of 2: " in last and message in last, last
    checkpoints = {path.name for path in tmp_path.rglob("*.ckpt")}
    if saved is None:  # the update stopped part-way: nothing of it is saved
        assert not checkpoints & {"failure.ckpt", "reward-failure.ckpt"}
    else:  # both ranks saved the state after the last completed update, together
        state = read_checkpoint(next(tmp_path.rglob(saved)))
        assert len(state["durian_rng"]) == 2 and state["durian_updates"] == 0


def test_a_model_without_no_split_modules_is_refused_from_its_config(tmp_path):
    from transformers import GitConfig

    from durian_lightning.scale.fsdp2 import check_shardable

    # GIT, an image-text-to-text model of transformers whose class names no _no_split_modules: only its config is read
    GitConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64, vocab_size=64,
              vision_config={"hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2,
                             "intermediate_size": 64, "image_size": 32, "patch_size": 16}).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match=r"model type 'git' .* names no _no_split_modules.*--trainer.strategy ddp"):
        check_shardable(str(tmp_path))
    check_shardable(str(resolve_model_path("tiny:llava", tmp_path / "models")))  # a composite model gathers its parts'


def test_one_device_under_fsdp2_is_refused_before_any_model_loads(tmp_path):
    from durian_lightning.cli import run_cli

    from .test_training import fit_args

    with pytest.raises(ValueError, match="fsdp2 shards the policy over several devices, got 1"):
        run_cli(["fit", *fit_args(tmp_path, "tiny:llava", "--trainer.accelerator", "cpu", "--trainer.strategy", "fsdp2")])
    assert not (tmp_path / "entropy").exists()  # refused before the entropy precompute loaded the encoder


def test_strategies_other_than_ddp_and_fsdp2_are_refused_naming_fsdp2():
    import lightning as L
    from lightning.pytorch.strategies import ModelParallelStrategy

    from durian_lightning.strategy import FSDP2Strategy, check_strategy

    for ok in ("ddp", "fsdp2"):
        trainer = L.Trainer(accelerator="cpu", devices=2, strategy=ok, logger=False)
        check_strategy(trainer)
        assert isinstance(trainer.strategy, FSDP2Strategy) == (ok == "fsdp2")
    trainer = L.Trainer(accelerator="cpu", devices=2, strategy=ModelParallelStrategy(), logger=False)
    with pytest.raises(ValueError, match="ModelParallelStrategy: tensor parallelism is not supported.*fsdp2"):
        check_strategy(trainer)
