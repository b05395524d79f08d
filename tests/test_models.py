"""The tiny offline VLM builders: real transformers architectures that load, generate and rebuild identically."""

import pytest
import torch
from PIL import Image
from transformers import AutoModelForImageTextToText, AutoProcessor

from durian_lightning.models import build_tiny_llava, build_tiny_qwen2_5_vl, tiny_vlm_path


@pytest.mark.parametrize("builder", [build_tiny_llava, build_tiny_qwen2_5_vl])
def test_the_same_seed_rebuilds_the_same_weights(builder):
    a, _ = builder(seed=0)
    b, _ = builder(seed=0)
    c, _ = builder(seed=1)
    same = lambda x, y: all(torch.equal(v, y.state_dict()[k]) for k, v in x.state_dict().items())  # noqa: E731
    assert same(a, b) and not same(a, c)


@pytest.mark.parametrize("model_fixture", ["tiny_vlm_path", "tiny_qwen_path"])
def test_saved_tiny_model_loads_through_auto_classes_and_generates(request, model_fixture):
    path = request.getfixturevalue(model_fixture)
    model = AutoModelForImageTextToText.from_pretrained(path)
    processor = AutoProcessor.from_pretrained(path)
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "How many?"}]}]
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    inputs = processor(images=[Image.new("RGB", (64, 64), "red")], text=[prompt], return_tensors="pt")
    out = model.generate(**inputs, max_new_tokens=5, do_sample=True)
    assert out.shape[0] == 1 and inputs["input_ids"].shape[1] < out.shape[1] <= inputs["input_ids"].shape[1] + 5


def test_unknown_architecture(tmp_path):
    with pytest.raises(ValueError, match="unknown tiny architecture"):
        tiny_vlm_path(tmp_path / "x", "gpt")


def test_the_models_package_does_not_import_the_data_package():
    # data/ loads models (the entropy encoder); models/ must not load data/ back (the warm-start's prompts and scenes
    # live in durian_lightning.models.prompts and durian_lightning.synthetic.scenes)
    import subprocess
    import sys

    code = ("import sys, durian_lightning.models, durian_lightning.models.warmstart; "
            "print(sorted(m for m in sys.modules if m.startswith('durian_lightning.data')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "[]"


def _build_on_rank(rank: int, folder: str) -> None:
    """One of 2 gloo ranks asking for the same tiny model; rank 1 asks first (rank 0 arrives 3 s later)."""
    import json
    import os
    import time
    from pathlib import Path

    torch.distributed.init_process_group("gloo", init_method=f"file://{folder}/store", rank=rank, world_size=2)
    if rank == 0:
        time.sleep(3)
    path = tiny_vlm_path(Path(folder) / "tiny-qwen2_5_vl", "qwen2_5_vl")
    Path(folder, f"rank{rank}.json").write_text(json.dumps(sorted(os.listdir(path))))
    torch.distributed.destroy_process_group()


def test_ranks_building_a_tiny_model_at_once_all_get_the_whole_model(tmp_path):
    # under torch.distributed, transformers writes a model on rank 0 only: rank 1's own build has no weights, and
    # moving it into place first left a folder without them for every later run
    import json

    torch.multiprocessing.spawn(_build_on_rank, args=(str(tmp_path),), nprocs=2)
    for rank in (0, 1):
        files = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert {"config.json", "model.safetensors", "processor_config.json"} <= set(files), files
    assert not [p for p in tmp_path.iterdir() if p.name.startswith("tiny-qwen2_5_vl.")]  # no staging folder left


@pytest.mark.parametrize("use_lora", [True, False])
def test_gradient_checkpointing_recomputes_in_the_backward_with_lora_and_full_fine_tuning(tmp_path, use_lora):
    # transformers checkpoints only layers in train mode, and from_pretrained returns the model in eval mode (peft
    # switches on its adapter modules only): left so, every activation was kept while the recipes ask to recompute
    from durian_lightning.models import load_policy, resolve_model_path
    from durian_lightning.models.parts import transformers_model

    model, processor = load_policy(resolve_model_path("tiny:qwen2_5_vl", tmp_path), use_lora=use_lora,
                                   gradient_checkpointing=True)
    # a module inside a checkpointed layer, which transformers recomputes in the backward (the layer's own hooks
    # stay outside the checkpoint)
    mlp = transformers_model(model).model.language_model.layers[0].mlp
    calls = []
    forward = mlp.forward
    mlp.forward = lambda *args, **kwargs: calls.append(1) or forward(*args, **kwargs)
    ids = torch.tensor([[5, 6, 7, 8]])
    model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits.sum().backward()
    assert len(calls) == 2  # the forward, and its recomputation in the backward
