"""The policy sharded with FSDP2 (``torch.distributed.fsdp.fully_shard``) over every rank of a data-parallel mesh.

What plain ``fully_shard`` leaves to its caller, each a silent wrong number or a crash when missed:

- **Identical start.** ``fully_shard`` keeps each rank's own values (rank r keeps its slice of what it built), and
  peft's LoRA initialisation is unseeded: :func:`make_identical` gives every rank rank 0's weights and buffers first.
- **Units.** One unit per block named by the model's ``_no_split_modules`` (decoder layers, vision blocks), the image
  path (vision tower, projector) as units of their own (transformers calls them outside the root's forward when it
  encodes images), the input embedding and the output head when they are not tied, and the transformers model as the
  root (under peft too: ``generate`` calls the transformers model's forward, never the peft wrapper's).
- **LoRA.** The frozen base is sharded; the adapter stays whole on every rank (``ignored_params``), so it keeps its
  own dtype (float32 beside a bfloat16 base: one FSDP unit holds one dtype) and its gradients are averaged like
  DDP's, while the frozen weights carry no gradient.
- **Generation.** Decoding through a sharded model all-gathers every unit at every new token; :func:`unsharded`
  gathers each unit once for the whole ``generate`` call and frees them after.
"""

from __future__ import annotations

import contextlib

import torch

from durian_lightning._distributed import all_gather_1d
from durian_lightning.models.loading import resolve_model_path
from durian_lightning.models.parts import inner_model, is_sharded, transformers_model

# the image path's modules, across the families: what ``get_image_features`` runs
IMAGE_PATH = ("vision_tower", "visual", "vision_model", "multi_modal_projector", "connector", "mm_projector",
              "embed_vision")


def no_split_modules(model, name: str) -> set[str]:
    """The block classes the model's authors name as never to be split (``_no_split_modules``); a model that names
    none is refused (``name``: how the user called it)."""
    names = set(getattr(transformers_model(model), "_no_split_modules", None) or ())
    if not names:
        raise ValueError(f"{name}: model type {transformers_model(model).config.model_type!r} "
                         f"({type(transformers_model(model)).__name__}) names no _no_split_modules, so fsdp2 cannot "
                         "tell its blocks apart to shard them one by one; train it with --trainer.strategy ddp")
    return names


def check_shardable(name_or_path: str) -> None:
    """Refuse, from the config alone (the model is built on the meta device: no weight is read or allocated), a model
    fsdp2 cannot cut into units: one that names no ``_no_split_modules`` (transformers gathers a composite model's from
    its parts when it is built, so the class attribute alone would not tell)."""
    from transformers import AutoConfig, AutoModelForImageTextToText

    config = AutoConfig.from_pretrained(resolve_model_path(name_or_path))
    try:
        with torch.device("meta"):
            model = AutoModelForImageTextToText.from_config(config)
    except ValueError:  # not an image-text-to-text model: loading it says so, with the families that are
        return
    no_split_modules(model, name_or_path)


def make_identical(model: torch.nn.Module) -> int:
    """Give every rank rank 0's parameters and buffers (non-persistent ones too, such as rotary ``inv_freq``).

    One all-gather of two checksums per tensor finds those that differ on some rank (on a checkpoint loaded alike
    everywhere, the LoRA adapter only), and only those are broadcast. Returns how many were."""
    tensors = [t for _, t in model.named_parameters()] + [t for _, t in model.named_buffers()]
    if not tensors:
        return 0
    device = _collective_device()
    sums = torch.stack([_checksum(t) for t in tensors]).to(device)
    every = all_gather_1d(sums.flatten(), torch.distributed.get_world_size()).view(-1, *sums.shape)
    differs = (every != every[0]).any(dim=0).any(dim=1).tolist()  # (tensors,): some rank holds other values
    with torch.no_grad():
        for tensor, different in zip(tensors, differs):
            if different:
                moved = tensor.data.to(device)
                torch.distributed.broadcast(moved, src=0)
                tensor.data.copy_(moved.to(tensor.device))
    return sum(differs)


def _checksum(tensor: torch.Tensor) -> torch.Tensor:
    """The sum and a position-weighted sum, in float64 (a permutation changes the second)."""
    flat = tensor.detach().reshape(-1).double().cpu()
    weights = torch.linspace(1.0, 2.0, flat.numel(), dtype=torch.float64) if flat.numel() else flat
    return torch.stack([flat.sum(), (flat * weights).sum()])


def _collective_device() -> torch.device:
    if torch.distributed.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def shard_units(model) -> list[torch.nn.Module]:
    """The modules that become FSDP units, children before parents, the root (the transformers model) last."""
    base = transformers_model(model)
    names = no_split_modules(model, getattr(base, "name_or_path", "") or "the policy")
    units = [m for m in base.modules() if type(m).__name__ in names]
    inner = inner_model(model)
    units += [m for name in IMAGE_PATH if isinstance(m := getattr(inner, name, None), torch.nn.Module)]
    embedding, head = base.get_input_embeddings(), base.get_output_embeddings()
    if head is not None and embedding is not None and head.weight is not embedding.weight:
        units += [embedding, head]
    unique = list({id(unit): unit for unit in units}.values())  # a unit named twice (an image block) once
    # children first: a unit's parameters are those not already in a unit below it
    depth = {id(m): len(name.split(".")) for name, m in base.named_modules()}
    unique.sort(key=lambda m: -depth.get(id(m), 0))
    return [*unique, base]


def shard_policy(model, mesh, mixed_precision: torch.dtype | None = None) -> None:
    """Shard ``model`` in place over ``mesh`` (1-D, data-parallel): the trainable weights when every weight trains,
    the frozen base when a LoRA adapter trains (the adapter stays whole on every rank). ``mixed_precision``: the
    dtype the forward and backward compute in (bf16 under ``bf16-mixed``, over float32 sharded weights); gradients
    are reduced in float32."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    make_identical(model)
    adapter = {p for name, p in model.named_parameters() if "lora_" in name}
    policy = MixedPrecisionPolicy(param_dtype=mixed_precision, reduce_dtype=torch.float32) if mixed_precision else \
        MixedPrecisionPolicy()
    for unit in shard_units(model):
        recorded = _recorded_outputs(unit)
        fully_shard(unit, mesh=mesh, mp_policy=policy, ignored_params=adapter or None)
        _recorded_outputs(unit, recorded)
    # the root initialised now, not by its first forward: the image path may run alone first (image features encoded
    # for reuse when a vLLM engine generates), and a unit run alone before the root would take the root's role
    transformers_model(model)._get_fsdp_state()._lazy_init()


def _recorded_outputs(module, outputs: dict | None = None) -> dict:
    """transformers (5.x) finds which layers' outputs a model records (``output_hidden_states``, which LLaVA's image
    features are read from) by the model's class name, and ``fully_shard`` gives each unit a new class
    (``FSDP<name>``): read the entry before sharding, write it for the new class after."""
    try:
        from transformers.utils.output_capturing import _CAN_RECORD_REGISTRY
    except ImportError:  # older transformers: the outputs are recorded by the modules themselves
        return {}
    # a plain dict keyed by the class's name up to transformers 5.19 (the vLLM CPU environment's); later, a registry
    # that takes the module
    key = str(module.__class__) if type(_CAN_RECORD_REGISTRY) is dict else module
    if outputs is None:
        return _CAN_RECORD_REGISTRY.get(key)
    if outputs:
        _CAN_RECORD_REGISTRY[key] = outputs
    return outputs


@contextlib.contextmanager
def unsharded(model):
    """Every unit gathered once for what runs inside (``generate``, no gradients) and freed after: decoding then runs
    no collective per token, so ranks may stop at different lengths. A no-op for a model that is not sharded."""
    from torch.distributed.fsdp import FSDPModule

    if not is_sharded(model):
        yield
        return
    root = transformers_model(model)
    root._get_fsdp_state()._lazy_init()  # the root first: an image unit run alone must not take the root's role
    units = [m for m in root.modules() if isinstance(m, FSDPModule)]
    for unit in units:
        unit.unshard()
        unit.set_reshard_after_forward(False, recurse=False)
    try:
        yield
    finally:
        for unit in units:
            unit.set_reshard_after_forward(unit is not root, recurse=False)
            unit.reshard()

