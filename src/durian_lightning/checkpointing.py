"""What a checkpoint of the training module holds (the trainable weights only, the sampling RNG, the update count),
and when one is written (every N updates)."""

from __future__ import annotations

from typing import Any

import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.utilities import rank_zero_info

from durian_lightning._distributed import all_gather_records


def trainable_state(state_dict: dict[str, torch.Tensor], model: torch.nn.Module, prefix: str = "model.") -> dict:
    """``state_dict`` without the frozen weights of ``model`` (the adapter, not a 7B base model, is saved)."""
    trainable = {prefix + name for name, p in model.named_parameters() if p.requires_grad}
    return {k: v for k, v in state_dict.items() if k in trainable or not k.startswith(prefix)}


def seed_rank(trainer) -> None:
    """Give every rank its own sampling stream (``seed_everything`` seeds all ranks alike, so their rollouts would
    draw the same random numbers): rank r continues from seed + r. One process is left as it is."""
    if trainer.world_size > 1:
        torch.manual_seed(torch.initial_seed() + trainer.global_rank)


def rng_states(trainer) -> list[dict[str, Any]]:
    """Every rank's torch (and CUDA) generator state, in rank order, so a resumed run samples what the uninterrupted
    one did on every rank (a collective under DDP: every rank saving a checkpoint calls it)."""
    local = {"torch": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}
    return all_gather_records(trainer, [local])


def restore_rng_state(saved: list[dict[str, Any]] | dict[str, Any] | None, rank: int) -> None:
    """This rank's saved state (a run resumed on a different number of ranks takes ``rank % saved ranks``)."""
    if saved is None:
        return
    states = [saved] if isinstance(saved, dict) else saved  # checkpoints of one process held one state
    state = states[rank % len(states)]
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


CHECKPOINT_CONTENTS = (
    "checkpoints hold the state after the last completed update: the trainable weights (the LoRA adapter, not the "
    "frozen base model), the optimizer and learning-rate schedule, every rank's sampling generator and the data "
    "position; --ckpt_path <file> resumes there"
)


class UpdateCheckpoint(ModelCheckpoint):
    """A checkpoint every ``every_n_updates`` updates (rollout batches trained on), plus ``last.ckpt``.

    Lightning's ``every_n_train_steps`` counts optimizer steps, and an update takes several (``ppo_epochs`` x
    mini-batches), while a step that only buffers prompts (dynamic sampling) takes none. Writing after the update, at
    the batch's end, the checkpoint holds the whole update (:data:`CHECKPOINT_CONTENTS`)."""

    def __init__(self, every_n_updates: int, **kwargs):
        if every_n_updates < 1:
            raise ValueError(f"every_n_updates must be >= 1, got {every_n_updates}")
        super().__init__(save_last=True, **kwargs)
        self.every_n_updates = every_n_updates

    def on_train_start(self, trainer, pl_module) -> None:
        rank_zero_info(f"A checkpoint every {self.every_n_updates} update(s) and last.ckpt: {CHECKPOINT_CONTENTS}.")

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if getattr(pl_module, "last_update", None) is None or pl_module.updates % self.every_n_updates:
            return
        if self._should_skip_saving_checkpoint(trainer):
            return
        candidates = self._monitor_candidates(trainer)
        self._save_topk_checkpoint(trainer, candidates)
        self._save_last_checkpoint(trainer, candidates)
