"""The synthetic visual world: shapes in colours on backgrounds of varying clutter, with a question and its answer.

Both the bundled dataset (:mod:`durian_lightning.synthetic.dataset`) and the tiny model's warm-start
(:mod:`durian_lightning.models.warmstart`) draw from it, so it belongs to neither. Each image has a ``clutter`` level
0-3 that raises its perceptual complexity: a plain background (0), a colour gradient (1), stripes or checks plus a few
distractor marks (2), or pixel noise and many distractors (3). Everything is drawn with PIL from the given
``random.Random``: the same generator state gives the same scene.
"""

from __future__ import annotations

import random

from PIL import Image, ImageDraw

COLORS = {
    "red": (220, 30, 30),
    "green": (30, 170, 50),
    "blue": (40, 70, 220),
    "yellow": (235, 210, 20),
    "purple": (140, 40, 180),
    "orange": (245, 130, 20),
}
SHAPES = ("circle", "square", "triangle")


def background(rng: random.Random, size: int, clutter: int) -> Image.Image:
    base = tuple(rng.randint(200, 255) for _ in range(3))
    image = Image.new("RGB", (size, size), base)
    draw = ImageDraw.Draw(image)
    if clutter == 1:
        other = tuple(rng.randint(150, 230) for _ in range(3))
        for y in range(size):
            t = y / max(1, size - 1)
            draw.line([(0, y), (size, y)], fill=tuple(int(a + (b - a) * t) for a, b in zip(base, other)))
    elif clutter >= 2:
        step = rng.choice([4, 6, 8])
        tone = tuple(rng.randint(120, 200) for _ in range(3))
        for k in range(0, size, step):
            if rng.random() < 0.5:
                draw.line([(k, 0), (k, size)], fill=tone)
            else:
                draw.line([(0, k), (size, k)], fill=tone)
    if clutter == 3:
        pixels = image.load()
        for _ in range(size * size // 3):
            x, y = rng.randrange(size), rng.randrange(size)
            pixels[x, y] = tuple(rng.randint(0, 255) for _ in range(3))
    return image


def draw_shape(draw: ImageDraw.ImageDraw, shape: str, box: tuple[int, int, int, int], color) -> None:
    """One filled shape in its grid-cell ``box``: the bundled three, plus the pretraining world's other three."""
    x0, y0, x1, y1 = box
    mx, my = (x0 + x1) // 2, (y0 + y1) // 2
    if shape == "circle":
        draw.ellipse(box, fill=color)
    elif shape == "square":
        draw.rectangle(box, fill=color)
    elif shape == "triangle":
        draw.polygon([(mx, y0), (x1, y1), (x0, y1)], fill=color)
    elif shape == "rectangle":  # wide and flat
        h = (y1 - y0) // 4
        draw.rectangle((x0, my - h, x1, my + h), fill=color)
    elif shape == "diamond":
        draw.polygon([(mx, y0), (x1, my), (mx, y1), (x0, my)], fill=color)
    elif shape == "cross":
        w = max(1, (x1 - x0) // 6)
        draw.rectangle((mx - w, y0, mx + w, y1), fill=color)
        draw.rectangle((x0, my - w, x1, my + w), fill=color)
    else:
        raise ValueError(f"unknown shape {shape!r}")


def distractor_marks(rng: random.Random, draw: ImageDraw.ImageDraw, size: int, clutter: int) -> None:
    """Thin random strokes, not shapes: none at clutter 0-1, 3 at level 2, 8 at level 3."""
    for _ in range({0: 0, 1: 0, 2: 3, 3: 8}[clutter]):
        x, y = rng.randrange(size), rng.randrange(size)
        draw.line([(x, y), (x + rng.randint(-6, 6), y + rng.randint(-6, 6))], fill=tuple(rng.randint(0, 255) for _ in range(3)))


def _place(rng: random.Random, size: int, cell: int, taken: set) -> tuple[int, int, int, int]:
    """A free grid cell, so shapes never overlap and counts stay unambiguous."""
    cells = [(cx, cy) for cx in range(size // cell) for cy in range(size // cell) if (cx, cy) not in taken]
    cx, cy = rng.choice(cells)
    taken.add((cx, cy))
    pad = max(1, cell // 8)
    return cx * cell + pad, cy * cell + pad, (cx + 1) * cell - pad - 1, (cy + 1) * cell - pad - 1


def make_sample(rng: random.Random, size: int = 64) -> tuple[Image.Image, dict]:
    clutter = rng.randrange(4)
    image = background(rng, size, clutter)
    draw = ImageDraw.Draw(image)
    cell = size // 4
    taken: set = set()
    kind = rng.choice(["count", "total", "color", "sum"])
    shapes: list[tuple[str, str]] = []
    if kind == "color":
        shapes.append(("triangle" if rng.random() < 1 / 3 else rng.choice(SHAPES), rng.choice(list(COLORS))))
        target = shapes[0][0]
        others = [s for s in SHAPES if s != target]
        shapes += [(rng.choice(others), rng.choice(list(COLORS))) for _ in range(rng.randint(0, 3))]
    else:
        shapes += [(rng.choice(SHAPES), rng.choice(list(COLORS))) for _ in range(rng.randint(1, 6))]
    for shape, color in shapes:
        draw_shape(draw, shape, _place(rng, size, cell, taken), COLORS[color])
    distractor_marks(rng, draw, size, clutter)

    if kind == "count":
        shape, color = rng.choice(shapes) if rng.random() < 0.8 else (rng.choice(SHAPES), rng.choice(list(COLORS)))
        answer = sum(1 for s in shapes if s == (shape, color))
        problem = f"How many {color} {shape}s are there in the image?"
    elif kind == "total":
        answer = len(shapes)
        problem = "How many shapes are there in the image in total?"
    elif kind == "color":
        problem = f"What color is the {shapes[0][0]}?"
        answer = shapes[0][1]
    else:
        a, b = rng.sample(SHAPES, 2)
        answer = sum(1 for s, _ in shapes if s in (a, b))
        problem = f"How many {a}s and {b}s are there together in the image?"
    return image, {"problem": f"<image>{problem}", "answer": str(answer), "clutter": clutter, "question_type": kind}
