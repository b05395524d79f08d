"""Data-parallel training for RL steps that run many backward passes per ``training_step``.

Plain ``DDPStrategy`` wraps the module in ``DistributedDataParallel``, whose reducer expects one backward per forward
of the wrapper; a GRPO step runs a generate, several log-prob passes and one backward per micro-batch and optimizer
step. ``RolloutDDPStrategy`` (``--trainer.strategy ddp_rollout``) keeps DDP's process group, launcher and samplers but
leaves the module unwrapped; :class:`~durian_lightning.module.DurianGRPO` averages its trainable gradients across
ranks itself, once before each optimizer step.
"""

from __future__ import annotations

from lightning.pytorch.strategies import DDPStrategy, StrategyRegistry


class RolloutDDPStrategy(DDPStrategy):
    strategy_name = "ddp_rollout"

    def configure_ddp(self) -> None:
        """Leave the module unwrapped (gradients are all-reduced by the module)."""


def register() -> None:
    """Make ``--trainer.strategy ddp_rollout`` known to Lightning (idempotent)."""
    if RolloutDDPStrategy.strategy_name not in StrategyRegistry:
        StrategyRegistry.register(RolloutDDPStrategy.strategy_name, RolloutDDPStrategy,
                                  description="DDP without the module wrapper, for RL steps")
