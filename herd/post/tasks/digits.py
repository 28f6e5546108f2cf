"""``digits``: a picture of a number written in one colour on white, and a question about it (multimodal curriculum).

The picture is one SIZE x SIZE tile, as in ``shapes``; the number has ``difficulty`` digits (levels 1 to 4) and is
written in Pillow's built-in scalable font (no font files), in one of shapes.COLOURS, without anti-aliasing (one
flat colour, as the shapes), at a random size and position that keep it whole inside the picture. The question
is either
  number  "What number is written in the picture?", answered by the number (the last one in the completion), or
  colour  "What colour is the number in the picture?" (one item in four), answered by the colour's name (the
          completion must name it and no other colour).
"""

from __future__ import annotations

import functools
import random
from dataclasses import dataclass

from PIL import Image, ImageDraw, ImageFont

from herd.post.tasks.base import Item, Task, choice, number_equal
from herd.post.tasks.shapes import COLOURS, SIZE

MARGIN, MIN_FONT = 8, 32  # a font of 32 px writes digits about 23 px tall: still over one 14-px patch


def random_number(rng: random.Random, digits: int) -> str:
    """A number of exactly ``digits`` digits (0 to 9 for one), as text."""
    return str(rng.randrange(10 ** (digits - 1) if digits > 1 else 0, 10**digits))


@functools.cache
def font(size: int) -> ImageFont.FreeTypeFont:
    return ImageFont.load_default(size=size)


@functools.lru_cache(maxsize=4096)
def ink_box(text: str, size: int) -> tuple[int, int, int, int]:
    """(left, top, right, bottom) of the pixels ``text`` covers, relative to where it is drawn from. Drawn to be
    exact: the font's own bbox spans the glyphs' advances, wider than their ink."""
    pad = size // 2  # room for ink beyond the advance box (a glyph may overhang its origin)
    _, _, right, bottom = font(size).getbbox(text, mode="1")
    mask = Image.new("1", (right + 2 * pad, bottom + 2 * pad))
    pen = ImageDraw.Draw(mask)
    pen.fontmode = "1"
    pen.text((pad, pad), text, fill=1, font=font(size))
    x0, y0, x1, y1 = mask.getbbox()
    return x0 - pad, y0 - pad, x1 - pad, y1 - pad


def extent(text: str, size: int) -> int:
    x0, y0, x1, y1 = ink_box(text, size)
    return max(x1 - x0, y1 - y0)


def place_number(rng: random.Random, text: str) -> dict:
    """A random colour, font size and position for ``text``, its ink wholly inside the picture: the layout
    ``draw_number`` takes, shared with the captioned pictures of herd.train.synthetic_images."""
    colour = rng.choice(list(COLOURS))
    room = SIZE - 2 * MARGIN
    largest = 100 * room // extent(text, 100)  # ink scales with the font, near enough: checked below
    while largest > MIN_FONT and extent(text, largest) > room:
        largest -= 1
    size = rng.randint(MIN_FONT, max(MIN_FONT, largest))
    ink_x0, ink_y0, ink_x1, ink_y1 = ink_box(text, size)
    w, h = ink_x1 - ink_x0, ink_y1 - ink_y0
    x0, y0 = rng.randint(MARGIN, SIZE - MARGIN - w), rng.randint(MARGIN, SIZE - MARGIN - h)
    return {"text": text, "colour": colour, "size": size, "box": [x0, y0, x0 + w, y0 + h]}


def draw_number(number: dict) -> Image.Image:
    img = Image.new("RGB", (SIZE, SIZE), "white")
    pen = ImageDraw.Draw(img)
    pen.fontmode = "1"  # no anti-aliasing: every inked pixel is the colour asked about
    ink_x0, ink_y0, _, _ = ink_box(number["text"], number["size"])
    x0, y0 = number["box"][:2]  # where the ink starts: drawn from there less the ink's offset from the origin
    pen.text((x0 - ink_x0, y0 - ink_y0), number["text"], fill=COLOURS[number["colour"]], font=font(number["size"]))
    return img


@dataclass
class Digits(Task):
    name = "digits"
    levels = range(1, 5)

    def make(self, rng: random.Random, difficulty: int) -> Item:
        value = random_number(rng, difficulty)
        question = "colour" if rng.random() < 0.25 else "number"
        number = place_number(rng, value)
        if question == "number":
            text, answer = "What number is written in the picture? Answer with the number.", value
        else:
            text, answer = "What colour is the number in the picture? Answer with one word.", number["colour"]
        content = [{"type": "image", "image": draw_number(number)}, {"type": "text", "text": text}]
        return Item(self.name, [{"role": "user", "content": content}], answer, difficulty,
                    {"question": question, **number})

    def score(self, item: Item, completion: str) -> float:
        if item.meta["question"] == "number":
            return float(number_equal(completion, item.answer))
        return choice(completion, item.answer, list(COLOURS))
