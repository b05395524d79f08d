"""The strategies a multi-process run trains under: ``ddp`` (every rank holds the whole policy) and ``fsdp2`` (the
policy sharded over every rank, :mod:`durian_lightning.scale.fsdp2`).

``fsdp2`` is Lightning's ``ModelParallelStrategy`` with every device data-parallel: that strategy's own defaults make
every device of a node tensor-parallel, under which all ranks would train on the same data. It runs on CPUs (gloo)
and GPUs (NCCL), on one node or several. Checkpoints are sharded (a folder, one file per rank, plus the run's
metadata in ``meta.pt``) and hold the trainable weights only, as under DDP.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.strategies import ModelParallelStrategy, StrategyRegistry

FSDP2 = "fsdp2"


class FSDP2Strategy(ModelParallelStrategy):
    """FSDP2 over every device (data parallel = world size, tensor parallel = 1); ``durian fit --trainer.strategy
    fsdp2``. The module shards the policy in ``configure_model`` (:func:`~durian_lightning.scale.fsdp2.shard_policy`)."""

    strategy_name = FSDP2

    def __init__(self, save_distributed_checkpoint: bool = True, **kwargs: Any):
        super().__init__(data_parallel_size="auto", tensor_parallel_size=1,
                         save_distributed_checkpoint=save_distributed_checkpoint, **kwargs)

    def setup_environment(self) -> None:
        world = self.num_nodes * self.num_processes
        if world < 2:
            raise ValueError(f"--trainer.strategy {FSDP2} shards the policy over several devices, got {world} "
                             f"({self.num_nodes} node(s) x {self.num_processes} device(s)); one device trains without "
                             "a strategy (or --trainer.devices 2 and more for fsdp2)")
        model = (getattr(self.lightning_module, "hparams", None) or {}).get("model_name_or_path")
        if model is not None:  # refused from its config, before the entropy precompute or the policy loads it
            from durian_lightning.scale.fsdp2 import check_shardable

            check_shardable(model)
        self._data_parallel_size, self._tensor_parallel_size = world, 1
        super().setup_environment()

    @classmethod
    def register_strategies(cls, strategy_registry) -> None:
        strategy_registry.register(FSDP2, cls, description="FSDP2 over every device, all data-parallel (durian)",
                                   override=True)

    def load_checkpoint(self, checkpoint_path, weights_only: bool | None = None) -> dict[str, Any]:
        """A sharded checkpoint holds the trainable weights only (the frozen base comes from the model, as under DDP):
        exactly those are read back, and every one of them must be there."""
        path = Path(self.broadcast(checkpoint_path))
        if not path.is_dir():
            return super().load_checkpoint(checkpoint_path, weights_only)
        from torch.distributed.checkpoint import load
        from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                             get_optimizer_state_dict, set_optimizer_state_dict)

        from durian_lightning.checkpointing import trainable_state

        module = self.lightning_module
        state = {"state_dict": trainable_state(get_model_state_dict(module), module.model)}
        load(state, checkpoint_id=path)
        module.load_state_dict(state["state_dict"], strict=False)
        for index, optimizer in enumerate(self.optimizers):
            key = f"optimizer_{index}"
            optimizer_state = {key: get_optimizer_state_dict(module, optimizer)}
            load(optimizer_state, checkpoint_id=path)
            set_optimizer_state_dict(module, optimizer, optim_state_dict=optimizer_state[key],
                                     options=StateDictOptions(cpu_offload=True))
        return torch.load(path / "meta.pt", weights_only=weights_only)


FSDP2Strategy.register_strategies(StrategyRegistry)


def shard_under_fsdp2(trainer, models: list, full_fine_tuning: bool) -> None:
    """Under ``fsdp2``, shard each model given (the policy, a full fine-tuning reference copy; None is skipped) over
    the data-parallel mesh; under bf16-mixed, full fine-tuning computes in bf16 over float32 sharded weights (a LoRA
    run's base is already in its dtype, and its float32 adapter is not sharded)."""
    if trainer is None or not isinstance(trainer.strategy, FSDP2Strategy):
        return
    from durian_lightning.scale.fsdp2 import shard_policy

    mixed = torch.bfloat16 if full_fine_tuning and trainer.precision == "bf16-mixed" else None
    for model in models:
        if model is not None:
            shard_policy(model, trainer.strategy.device_mesh["data_parallel"], mixed)


def check_strategy(trainer) -> None:
    """Several processes train under ``ddp`` or ``fsdp2`` only: anything else is refused before the policy loads."""
    from lightning.pytorch.strategies import DDPStrategy

    strategy = trainer.strategy
    if trainer.world_size <= 1 or isinstance(strategy, (DDPStrategy, FSDP2Strategy)):
        return
    name = type(strategy).__name__
    if isinstance(strategy, ModelParallelStrategy):
        raise ValueError(f"{name}: tensor parallelism is not supported (that strategy's defaults make every device of "
                         f"a node tensor-parallel, so they would all train on the same data); use --trainer.strategy "
                         f"{FSDP2} (every device data-parallel) or ddp")
    raise ValueError(f"multi-process training supports --trainer.strategy ddp or {FSDP2}, got {name} (Lightning's "
                     f"fsdp is FSDP1, DeepSpeed shards gradients its own way: use {FSDP2} to shard the policy; "
                     "see docs/larger-models.md)")
