"""``shapes``: a picture of flat shapes on a white background, and a question about it (multimodal curriculum).

The picture is SIZE x SIZE pixels, a grid of 4 x 4 cells holding at most one shape each (circle, square or
triangle, drawn without anti-aliasing in one of COLOURS), so shapes never touch. ``difficulty`` d puts 2d shapes
in it (levels 1 to 5: 2 to 10 shapes). The question is either
  count   "How many circles are in the picture?", answered by a number (digits or "zero" to "twenty"; the last
          one in the completion counts), or
  colour  "What colour is the triangle?", about the only shape of its kind, answered by the colour's name (the
          completion must name it and no other colour).
The image goes into the prompt as a chat image part {"type": "image", "image": <PIL.Image>}.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from PIL import Image, ImageDraw

from herd.post.tasks.base import Item, Task, choice, number_equal

SIZE, GRID = 336, 4  # one 336-px tile: Llama 4's tile size, so the picture is not rescaled
COLOURS = {"red": (230, 25, 25), "green": (30, 150, 40), "blue": (30, 70, 230), "yellow": (245, 200, 10),
           "orange": (255, 130, 0), "purple": (130, 50, 180), "black": (20, 20, 20)}
KINDS = ("circle", "square", "triangle")


def place(rng: random.Random, kinds: list[str]) -> list[dict]:
    """Shapes of ``kinds`` (at most GRID * GRID), each in its own random cell, of random size and colour: the
    layout ``draw`` takes, shared with the captioned pictures of herd.train.synthetic_images."""
    cell, shapes = SIZE // GRID, []
    for kind, c in zip(kinds, rng.sample(range(GRID * GRID), len(kinds))):
        side = rng.randint(cell * 2 // 5, cell * 4 // 5)
        x0 = (c % GRID) * cell + rng.randint(2, cell - side - 2)
        y0 = (c // GRID) * cell + rng.randint(2, cell - side - 2)
        shapes.append({"kind": kind, "colour": rng.choice(list(COLOURS)), "box": [x0, y0, x0 + side, y0 + side]})
    return shapes


def draw(shapes: list[dict]) -> Image.Image:
    img = Image.new("RGB", (SIZE, SIZE), "white")
    pen = ImageDraw.Draw(img)
    for s in shapes:
        x0, y0, x1, y1 = s["box"]
        fill = COLOURS[s["colour"]]
        if s["kind"] == "circle":
            pen.ellipse((x0, y0, x1, y1), fill=fill)
        elif s["kind"] == "square":
            pen.rectangle((x0, y0, x1, y1), fill=fill)
        else:
            pen.polygon([(x0, y1), (x1, y1), ((x0 + x1) // 2, y0)], fill=fill)
    return img


@dataclass
class Shapes(Task):
    name = "shapes"
    levels = range(1, 6)

    def make(self, rng: random.Random, difficulty: int) -> Item:
        n = min(2 * difficulty, GRID * GRID)
        question = rng.choice(["count", "colour"])
        target = rng.choice(KINDS)
        kinds = [rng.choice(KINDS) for _ in range(n)]
        if question == "colour":  # exactly one shape of the asked kind
            kinds = [target] + [rng.choice([k for k in KINDS if k != target]) for _ in range(n - 1)]
        else:
            target = rng.choice(kinds)
        shapes = place(rng, kinds)
        if question == "count":
            text = f"How many {target}s are in the picture? Answer with a number."
            answer = str(kinds.count(target))
        else:
            text = f"What colour is the {target} in the picture? Answer with one word."
            answer = shapes[0]["colour"]
        content = [{"type": "image", "image": draw(shapes)}, {"type": "text", "text": text}]
        return Item(self.name, [{"role": "user", "content": content}], answer, difficulty,
                    {"question": question, "kind": target, "shapes": shapes})

    def score(self, item: Item, completion: str) -> float:
        if item.meta["question"] == "count":
            return float(number_equal(completion, item.answer, words=True))
        return choice(completion, item.answer, list(COLOURS))
