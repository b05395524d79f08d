"""Scenes described in words: the text a tiny VLM is pretrained and instruction-tuned on before RL.

A real VLM reaches RL already able to see (perception pretraining on captions) and to answer in format (instruction
tuning). :mod:`durian_lightning.models.pretrain` gives the tiny model the same two stages from the scenes made here.
They are drawn like the bundled data (:mod:`durian_lightning.synthetic.scenes`: same grid, backgrounds and clutter levels) but
with a wider world (six shapes, twelve colours) so that a user's own simple shapes-and-colours questions are in
reach too.

Question types are split in two, and the split is the point:

* ``INSTRUCTION_TYPES`` are taught supervised, with the reasoning (:func:`listing`) written inside ``<think>``;
* ``RL_TYPES`` (the bundled data's ``count``, ``total``, ``color``, ``sum``) are never given a supervised answer.
  What a model gains on them in ``durian fit`` is RL's.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from PIL import Image, ImageDraw

from durian_lightning.synthetic.scenes import COLORS as TASK_COLORS
from durian_lightning.synthetic.scenes import background, distractor_marks, draw_shape

COLORS = {
    **TASK_COLORS,
    "pink": (250, 120, 190),
    "brown": (130, 80, 30),
    "black": (20, 20, 20),
    "gray": (128, 128, 128),
    "cyan": (30, 200, 220),
    "teal": (0, 120, 120),
}
SHAPES = ("circle", "square", "triangle", "rectangle", "diamond", "cross")
BACKGROUNDS = ("plain", "gradient", "striped", "noisy")  # by clutter level 0-3
ROWS = ("top", "upper", "lower", "bottom")
COLUMNS = ("left", "center-left", "center-right", "right")
GRID = 4

RL_TYPES = ("count", "total", "color", "sum")
INSTRUCTION_TYPES = ("present", "all_same_color", "count_color", "distinct_colors", "shape_of_color", "shape_at", "color_at")


@dataclass(frozen=True)
class SceneObject:
    shape: str
    color: str
    row: int
    column: int

    @property
    def where(self) -> str:
        return f"{ROWS[self.row]} {COLUMNS[self.column]}"


@dataclass(frozen=True)
class Scene:
    objects: tuple[SceneObject, ...]
    clutter: int


def random_scene(rng: random.Random, size: int = 64) -> tuple[Image.Image, Scene]:
    """1-6 objects of any shape and colour on free grid cells, over a background of random clutter."""
    clutter = rng.randrange(4)
    image = background(rng, size, clutter)
    draw = ImageDraw.Draw(image)
    cells = rng.sample([(r, c) for r in range(GRID) for c in range(GRID)], rng.randint(1, 6))
    objects = []
    cell = size // GRID
    pad = max(1, cell // 8)
    for row, column in sorted(cells):
        obj = SceneObject(rng.choice(SHAPES), rng.choice(list(COLORS)), row, column)
        box = (column * cell + pad, row * cell + pad, (column + 1) * cell - pad - 1, (row + 1) * cell - pad - 1)
        draw_shape(draw, obj.shape, box, COLORS[obj.color])
        objects.append(obj)
    distractor_marks(rng, draw, size, clutter)
    return image, Scene(tuple(objects), clutter)


def plural(noun: str) -> str:
    return noun + "es" if noun.endswith("ss") else noun + "s"


def article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def _plural(n: int, noun: str) -> str:
    return f"{n} {noun}" if n == 1 else f"{n} {plural(noun)}"


def summary(scene: Scene) -> str:
    """How many of each coloured shape, in a fixed order: ``"2 red circles, 1 blue square"``."""
    counts: dict[tuple[str, str], int] = {}
    for obj in scene.objects:
        counts[(obj.shape, obj.color)] = counts.get((obj.shape, obj.color), 0) + 1
    order = sorted(counts, key=lambda k: (SHAPES.index(k[0]), list(COLORS).index(k[1])))
    return ", ".join(_plural(counts[k], f"{k[1]} {k[0]}") for k in order)


def description(scene: Scene) -> str:
    """Every object with its place, then the background: the perception-pretraining caption."""
    parts = [f"{article(o.color)} {o.color} {o.shape} at {o.where}" for o in scene.objects]
    return "; ".join(parts) + f"; {BACKGROUNDS[scene.clutter]} background."


def listing(label: str, matches: list[SceneObject]) -> str:
    """The reasoning the instruction data shows: the objects a question is about, numbered as they are found, so
    the last number is their count: ``"red shapes: red circle (1), red square (2)"``, or ``"...: none"``."""
    found = ", ".join(f"{o.color} {o.shape} ({i})" for i, o in enumerate(matches, 1))
    return f"{label}: {found or 'none'}"


def instruction_sample(rng: random.Random, scene: Scene) -> tuple[str, str, str, str]:
    """``(question_type, question, reasoning, answer)`` of an instruction type, answerable from the image alone.

    The reasoning lists every shape, then finds what the question is about (by colour and shape, by shape, by colour,
    or by place) and answers from what it found; RL question types need the same steps combined differently.
    """
    kind, question, focus, answer = _focused_sample(rng, scene)
    seen = listing("shapes", list(scene.objects))
    return kind, question, seen if focus == seen else f"{seen}. {focus}", answer


def _focused_sample(rng: random.Random, scene: Scene) -> tuple[str, str, str, str]:
    """One instruction question with the reasoning about its own subject only (:func:`instruction_sample` adds the
    full listing in front). Random draws happen in a fixed order: the shipped weights depend on it."""
    objects = scene.objects
    unique_colors = [o for o in objects if sum(p.color == o.color for p in objects) == 1]
    kinds = [k for k in INSTRUCTION_TYPES if k != "shape_of_color" or unique_colors]
    kind = rng.choice(kinds)
    if kind == "present":
        target = rng.choice(objects) if rng.random() < 0.5 else SceneObject(rng.choice(SHAPES), rng.choice(list(COLORS)), 0, 0)
        matches = [o for o in objects if (o.shape, o.color) == (target.shape, target.color)]
        reasoning = listing(f"{target.color} {plural(target.shape)}", matches)
        question = f"Is there {article(target.color)} {target.color} {target.shape} in the image?"
        return kind, question, reasoning, "yes" if matches else "no"
    if kind == "all_same_color":
        target = rng.choice(objects)
        color = target.color if rng.random() < 0.5 else rng.choice(list(COLORS))
        matches = [o for o in objects if o.shape == target.shape]
        answer = "yes" if all(o.color == color for o in matches) else "no"
        return kind, f"Are all the {plural(target.shape)} {color}?", listing(plural(target.shape), matches), answer
    if kind == "distinct_colors":
        answer = str(len({o.color for o in objects}))
        return kind, "How many different colors are there in the image?", listing("shapes", list(objects)), answer
    if kind == "count_color":
        color = rng.choice(objects).color if rng.random() < 0.8 else rng.choice(list(COLORS))
        matches = [o for o in objects if o.color == color]
        return kind, f"How many {color} shapes are there in the image?", listing(f"{color} shapes", matches), str(len(matches))
    if kind == "shape_of_color":
        target = rng.choice(unique_colors)
        return kind, f"What shape is {target.color}?", listing(f"{target.color} shapes", [target]), target.shape
    target = rng.choice(objects)
    reasoning = f"at the {target.where}: {target.color} {target.shape}"
    if kind == "shape_at":
        return kind, f"What shape is at the {target.where}?", reasoning, target.shape
    return kind, f"What color is the shape at the {target.where}?", reasoning, target.color


def vocabulary_corpus() -> list[str]:
    """Sentences holding every word the scenes, questions and answers use, so the tokenizer spells each as one
    or two tokens (numbers, yes/no, every shape and colour, places, backgrounds)."""
    words = [str(n) for n in range(13)] + ["yes", "no"] + list(COLORS) + list(SHAPES) + list(BACKGROUNDS)
    lines = [" ".join(words), " ".join(f"{s}s" for s in SHAPES)]
    lines += [f"{_plural(2, f'{c} {s}')}, an {c} {s} at {r} {col}" for c in COLORS for s in SHAPES for r in ROWS for col in COLUMNS[:1]]
    lines += [f"at the {r} {c}" for r in ROWS for c in COLUMNS] + [f"{c} shapes: {c} circle (1), none" for c in COLORS]
    return lines
