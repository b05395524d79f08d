"""A callback for tests/test_vllm_engine.py: kills one rank's vLLM engine processes after its first update."""

from __future__ import annotations

import lightning as L
import psutil


class KillEngine(L.Callback):
    """After update 1, SIGKILL every process that rank ``rank`` started (its engine's; rank 1 starts no rank)."""

    def __init__(self, rank: int = 1):
        self.rank = rank

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_rank == self.rank and pl_module.updates == 1:
            for child in psutil.Process().children(recursive=True):
                child.kill()
