"""Code that runs inside vLLM's worker processes (``worker_extension_cls``): the in-place weight reload.

vLLM's own ``reload_weights`` copies each loaded tensor into the engine's weights, but an output layer tied to the
input embedding loads nothing (the checkpoint has no ``lm_head.weight``), so nothing re-processes it. On the CPU
backend the output layer multiplies with a packed copy of its weight made at load time: after a reload it would
keep the old embedding. :meth:`PolicyWeightSync.reload_policy` re-processes every tied output layer after the
reload, so the engine samples from exactly the weights just written.
"""

from __future__ import annotations

import torch


def refresh_tied_output_layers(model: torch.nn.Module) -> int:
    """Re-run the weight processing (the CPU backend's packing) of every output layer that shares its weight with an
    input embedding; returns how many it refreshed."""
    from vllm.model_executor.layers.vocab_parallel_embedding import ParallelLMHead, VocabParallelEmbedding

    embeddings = [module.weight for module in model.modules()
                  if type(module) is VocabParallelEmbedding and hasattr(module, "weight")]
    refreshed = 0
    for module in model.modules():
        if not isinstance(module, ParallelLMHead) or not hasattr(module, "weight"):
            continue
        if any(module.weight is weight or module.weight.data_ptr() == weight.data_ptr() for weight in embeddings):
            module.quant_method.process_weights_after_loading(module)
            refreshed += 1
    return refreshed


class PolicyWeightSync:
    """Mixed into vLLM's worker class; called with ``LLM.collective_rpc("reload_policy", ...)``."""

    def reload_policy(self, weights_path: str) -> int:
        self.reload_weights(weights_path=weights_path, is_checkpoint_format=True)
        return refresh_tied_output_layers(self.model_runner.get_model())
