"""Runs one update under ``ddp`` and then under ``fsdp2`` in the same two gloo processes, for each case given, and
writes what each optimizer step applied: ``python -m tests.fsdp2_probe OUT CASE [CASE ...]`` with CASE
``<family>:<lora|full>`` (Lightning starts rank 1 by running this script again). Read by tests/test_fsdp2.py."""

import sys
from pathlib import Path

import lightning as L
import torch

REPO = Path(__file__).resolve().parents[1]


def full(tensor: torch.Tensor) -> torch.Tensor:
    from torch.distributed.tensor import DTensor

    return (tensor.full_tensor() if isinstance(tensor, DTensor) else tensor).detach().clone()


class DumpSteps(L.Callback):
    """Before every optimizer step: the trainable weights and the gradients about to be applied (whole tensors: a
    collective under fsdp2, which every rank reaches in the same step); at the end of fit, the weights."""

    def __init__(self, out: Path):
        self.out, self.steps = out, []

    def on_train_start(self, trainer, pl_module) -> None:
        self.start = self.snapshot(pl_module, False)
        pl_module.optimizers().optimizer.register_step_pre_hook(lambda *_: self.steps.append(self.snapshot(pl_module, True)))

    @staticmethod
    def snapshot(pl_module, grads: bool) -> dict:
        named = [(n, p) for n, p in pl_module.model.named_parameters() if p.requires_grad]
        return {n: full(p.grad if grads else p) for n, p in named}

    def on_fit_end(self, trainer, pl_module) -> None:
        from durian_lightning.scale.fsdp2 import is_sharded

        weights = self.snapshot(pl_module, False)
        rollout = pl_module.last_update.local.rollout
        if trainer.global_rank == 0:
            torch.save({"grads": self.steps, "start": self.start, "weights": weights, "ids": rollout.completion_ids,
                        "sharded": is_sharded(pl_module.model)}, self.out)


def run(case: str, strategy: str, out: Path) -> None:
    from durian_lightning.data import MultimodalReasoningDataModule
    from durian_lightning.module import DurianGRPO
    from durian_lightning.settings import LoraSettings, OptimizationSettings, RewardSettings, RolloutSettings

    family, mode = case.split(":")
    L.seed_everything(5, verbose=False)
    model = DurianGRPO(
        f"tiny:{family}", lora=LoraSettings(enabled=mode == "lora"),
        gradient_checkpointing=mode == "full",  # recomputed activations under both strategies, as the recipes run
        rollout=RolloutSettings(num_generations=4, max_new_tokens=5),
        reward=RewardSettings(functions=["tests.test_training:length_reward"]),
        # 2 prompts a rank: 2 mini-batches of 1 prompt x 2 epochs = 4 optimizer steps, each over 2 micro-batches
        optimization=OptimizationSettings(mini_batch_size=1, micro_batch_size=2, ppo_epochs=2, learning_rate=1e-3,
                                          weight_decay=0.1,  # decays a weight no forward reached, as DDP does
                                          max_grad_norm=0.05),  # clipping on: the global norm of sharded gradients
    )
    data = MultimodalReasoningDataModule(str(REPO / "data" / "synthetic"), model_name_or_path=f"tiny:{family}",
                                         batch_size=2, cache_dir=str(out.parent / "entropy"), progress=False)
    trainer = L.Trainer(accelerator="cpu", devices=2, strategy=strategy, max_steps=1, limit_val_batches=0,
                        logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, callbacks=[DumpSteps(out)], default_root_dir=str(out.parent))
    trainer.fit(model, datamodule=data)


if __name__ == "__main__":
    folder = Path(sys.argv[1])
    folder.mkdir(parents=True, exist_ok=True)
    for name in sys.argv[2:]:
        for strategy in ("ddp", "fsdp2"):
            run(name, strategy, folder / f"{name.replace(':', '-')}-{strategy}.pt")
