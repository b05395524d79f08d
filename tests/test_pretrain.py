"""The tiny model that can see: scene text, the instruction / RL question split, and the pretraining script."""

import json
import random
import re

import pytest
import torch

from durian_lightning.synthetic.scene_text import (
    INSTRUCTION_TYPES,
    RL_TYPES,
    SHAPES,
    Scene,
    SceneObject,
    description,
    instruction_sample,
    listing,
    random_scene,
    summary,
)


def test_summary_and_description_by_hand():
    scene = Scene(
        (SceneObject("circle", "red", 0, 0), SceneObject("square", "blue", 1, 2), SceneObject("circle", "red", 3, 3),
         SceneObject("circle", "orange", 2, 1)),
        clutter=2,
    )
    assert summary(scene) == "2 red circles, 1 orange circle, 1 blue square"
    assert description(scene) == (
        "a red circle at top left; a blue square at upper center-right; a red circle at bottom right; "
        "an orange circle at lower center-left; striped background."
    )


def test_instruction_reasoning_and_answers_follow_from_the_scene():
    scene = Scene((SceneObject("cross", "teal", 0, 1), SceneObject("diamond", "teal", 2, 2),
                   SceneObject("circle", "red", 3, 0)), clutter=0)
    every = "shapes: teal cross (1), teal diamond (2), red circle (3)"  # every reasoning starts by listing all
    seen = {}
    rng = random.Random(0)
    for _ in range(600):
        kind, question, reasoning, answer = instruction_sample(rng, scene)
        seen.setdefault(kind, set()).add((question, reasoning, answer))
    assert ("What shape is at the top center-left?", f"{every}. at the top center-left: teal cross", "cross") in seen["shape_at"]
    assert ("What color is the shape at the lower center-right?", f"{every}. at the lower center-right: teal diamond", "teal") in seen["color_at"]
    assert ("How many teal shapes are there in the image?", f"{every}. teal shapes: teal cross (1), teal diamond (2)", "2") in seen["count_color"]
    assert any(r.endswith("shapes: none") and a == "0" for _, r, a in seen["count_color"])
    assert ("Is there a teal diamond in the image?", f"{every}. teal diamonds: teal diamond (1)", "yes") in seen["present"]
    assert ("Are all the crosses teal?", f"{every}. crosses: teal cross (1)", "yes") in seen["all_same_color"]
    assert seen["distinct_colors"] == {("How many different colors are there in the image?", every, "2")}
    # only red is a colour held by one shape
    assert seen["shape_of_color"] == {("What shape is red?", f"{every}. red shapes: red circle (1)", "circle")}
    present = {q: a for q, _, a in seen["present"]}
    assert all(a == "no" for q, a in present.items() if q not in {f"Is there a {o} in the image?" for o in ("teal cross", "teal diamond", "red circle")})


def test_listing_numbers_what_it_finds():
    found = [SceneObject("circle", "red", 0, 0), SceneObject("square", "red", 1, 1)]
    assert listing("red shapes", found) == "red shapes: red circle (1), red square (2)"
    assert listing("blue shapes", []) == "blue shapes: none"


def _rl_question_patterns():
    """The bundled data's question forms, read from the generator's own problems."""
    from durian_lightning.synthetic.scenes import make_sample

    rng = random.Random("questions")
    problems = {make_sample(rng)[1]["problem"].replace("<image>", "") for _ in range(2000)}
    return problems


def test_instruction_data_never_asks_an_rl_question_type():
    assert not set(INSTRUCTION_TYPES) & set(RL_TYPES)
    rl_questions = _rl_question_patterns()
    assert len(rl_questions) == 18 + 1 + 3 + 6  # count colour x shape, total, colour of each shape, sum pairs
    shape = "(" + "|".join(SHAPES) + ")"
    rl_forms = re.compile(rf"What color is the {shape}\?|How many \w+ {shape}e?s are there|in total|together")
    assert all(rl_forms.search(q) for q in rl_questions)
    rng = random.Random(1)
    for _ in range(2000):
        _, scene = random_scene(rng)
        kind, question, _, _ = instruction_sample(rng, scene)
        assert kind in INSTRUCTION_TYPES
        assert question not in rl_questions and not rl_forms.search(question), question


TINY = dict(hidden=32, num_layers=1, vocab_size=600, caption_steps=2, instruction_steps=2, batch_size=4)


def test_pretraining_is_deterministic_and_trains_every_part(tmp_path):
    from durian_lightning.models.pretrain import (
        PretrainSettings,
        base_model,
        build_pretrained_llava,
        save,
        weights_sha256,
    )

    settings = PretrainSettings(**TINY)
    first = save(*build_pretrained_llava(settings), tmp_path / "a", settings)
    second = save(*build_pretrained_llava(settings), tmp_path / "b", settings)
    assert weights_sha256(first) == weights_sha256(second)
    assert json.loads((first / "manifest.json").read_text())["sha256"] == weights_sha256(first)
    trained, _ = build_pretrained_llava(settings)
    untrained, _ = base_model(settings)
    before = dict(untrained.named_parameters())
    for part in ("vision_tower", "multi_modal_projector", "language_model"):
        changed = [n for n, p in trained.named_parameters() if part in n and not torch.equal(p, before[n])]
        assert changed, f"{part} was not trained"


def test_the_shipped_model_sees_and_the_random_one_does_not():
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from durian_lightning.models import resolve_model_path
    from durian_lightning.models.pretrain import PretrainSettings, base_model, caption_color_overlap

    path = resolve_model_path("tiny:llava-pretrained")
    model = AutoModelForImageTextToText.from_pretrained(path).eval()
    assert caption_color_overlap(model, AutoProcessor.from_pretrained(path)) >= 0.7
    random_model, processor = base_model(PretrainSettings())
    assert caption_color_overlap(random_model.eval(), processor) == 0.0


def test_missing_shipped_weights_say_how_to_rebuild(tmp_path, monkeypatch):
    from durian_lightning.models import pretrain, resolve_model_path

    monkeypatch.setattr(pretrain, "SHIPPED", tmp_path / "llava")
    with pytest.raises(FileNotFoundError, match="python -m durian_lightning.models.pretrain"):
        resolve_model_path("tiny:llava-pretrained")
