"""Generated image-caption pairs for early-fusion pretraining: the pictures of the ``shapes`` and ``digits`` tasks
(herd.post.tasks), drawn by the tasks' own code, each with a plain English caption that states what the tasks
later ask about (how many shapes of each kind, their colours, the number written and its colour), so that
post-training on those tasks starts from a model that has seen the pictures described.

    info = write_caption_set("data/captions", n=20_000, seed=0)
    # data/captions/captions.jsonl: {"text": caption, "images": ["images/000000.png"]} per line, the format of
    # herd.train.image_text (a recipe source {"files": [".../captions.jsonl"], "images_key": "images"})

The set is written into a sibling temporary directory and renamed into place at the end, so an interrupted run
leaves no half set (the next run starts over); ``index.json`` describes a finished set, and a rerun with the same
arguments returns it without drawing anything. Sample i depends only on (seed, i), as the tasks' items do.
Wording varies (counts as digits or words, several sentence forms), so that captions teach the pictures rather
than one template.
"""

from __future__ import annotations

import json
import random
import shutil
from collections import Counter
from pathlib import Path
from typing import Any

from PIL import Image
from tqdm import tqdm

from herd.errors import HerdError
from herd.post.tasks.base import NUMBER_WORDS
from herd.post.tasks.digits import draw_number, place_number, random_number
from herd.post.tasks.shapes import GRID, KINDS, SIZE, draw, place

KIND_NAMES = ("shapes", "digits")
JSONL, INDEX = "captions.jsonl", "index.json"


def write_caption_set(out_dir: Path | str, n: int, seed: int = 0, kinds: tuple[str, ...] = KIND_NAMES,
                      progress: bool = True) -> dict[str, Any]:
    """Draw n captioned pictures into ``out_dir`` (images/NNNNNN.png, captions.jsonl, index.json); returns the
    index. Picture i is of kind ``kinds[i % len(kinds)]``. All or nothing (see the module doc)."""
    out_dir, kinds = Path(out_dir), tuple(kinds)
    if n < 1 or not kinds or set(kinds) - set(KIND_NAMES):
        raise HerdError(f"caption set: n >= 1 and kinds among {KIND_NAMES}, got n={n}, kinds={kinds}")
    want = {"kind": "captions", "samples": n, "seed": seed, "kinds": list(kinds), "version": 1}
    if (out_dir / INDEX).is_file():
        info = json.loads((out_dir / INDEX).read_text())
        if {k: info.get(k) for k in want} != want:
            raise HerdError(f"{out_dir} holds another caption set ({info}); remove it or write elsewhere")
        return info
    if out_dir.exists() and any(out_dir.iterdir()):
        raise HerdError(f"{out_dir} exists and is not a caption set: write it elsewhere")
    tmp = out_dir.with_name(f".{out_dir.name}.partial")
    shutil.rmtree(tmp, ignore_errors=True)  # what an interrupted run left
    (tmp / "images").mkdir(parents=True)
    try:
        by_kind: Counter[str] = Counter()
        with open(tmp / JSONL, "w") as f:
            for i in tqdm(range(n), desc="captions", unit="picture", disable=not progress):
                kind = kinds[i % len(kinds)]
                image, caption = picture_and_caption(random.Random(f"captions/{seed}/{i}"), kind)
                name = f"images/{i:06d}.png"
                image.save(tmp / name)
                f.write(json.dumps({"text": caption, "images": [name]}) + "\n")
                by_kind[kind] += 1
        info = {**want, "by_kind": dict(by_kind), "jsonl": JSONL}
        (tmp / INDEX).write_text(json.dumps(info, indent=1))
        if out_dir.exists():
            out_dir.rmdir()  # empty (checked above): the rename needs the name free
        tmp.rename(out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return info


def picture_and_caption(rng: random.Random, kind: str) -> tuple[Image.Image, str]:
    """One picture of ``kind`` ("shapes": 1 to 10 shapes; "digits": a number of 1 to 4 digits) and its caption."""
    if kind == "shapes":
        shapes = place(rng, [rng.choice(KINDS) for _ in range(rng.randint(1, 10))])
        return draw(shapes), shapes_caption(rng, shapes)
    number = place_number(rng, random_number(rng, rng.randint(1, 4)))
    return draw_number(number), digits_caption(rng, number)


# -- captions -------------------------------------------------------------------------------------------------------
def count(rng: random.Random, k: int) -> str:
    """k as digits or, half the time, as a word: the tasks accept both, so the captions use both."""
    return NUMBER_WORDS[k] if k < len(NUMBER_WORDS) and rng.random() < 0.5 else str(k)


def things(rng: random.Random, k: int, noun: str) -> str:
    return f"{count(rng, k)} {noun}" + ("" if k == 1 else "s")


def a(word: str) -> str:
    return ("an " if word[0] in "aeiou" else "a ") + word


def join(words: list[str]) -> str:
    return words[0] if len(words) == 1 else ", ".join(words[:-1]) + " and " + words[-1]


def sentence(text: str) -> str:
    return text[0].upper() + text[1:] + "."


def shapes_caption(rng: random.Random, shapes: list[dict]) -> str:
    """E.g. "Three shapes on a white background: a red circle, a blue square and a green triangle. There is one
    circle." Shapes are named in reading order (row by row of the grid, left to right)."""
    cell = SIZE // GRID
    shapes = sorted(shapes, key=lambda s: (s["box"][1] // cell, s["box"][0] // cell))
    n, kinds = len(shapes), Counter(s["kind"] for s in shapes)
    intro = rng.choice(["{} on a white background", "a picture of {}", "{} on white", "a white picture with {}"])
    intro = intro.format(things(rng, n, rng.choice(["shape", "flat shape"])))
    if rng.random() < 0.5:  # each shape in turn, then the counts
        parts = [f"{intro}: " + join([a(f"{s['colour']} {s['kind']}") for s in shapes])]
        for kind in KINDS:
            k = kinds[kind]
            if k:
                parts.append(f"there {'is' if k == 1 else 'are'} {things(rng, k, kind)}")
    else:  # kind by kind, with their colours
        parts = [intro]
        for kind in KINDS:
            colours = [s["colour"] for s in shapes if s["kind"] == kind]
            if len(colours) == 1:
                parts.append(rng.choice([f"there is {count(rng, 1)} {kind}, and it is {colours[0]}",
                                         f"the only {kind} is {colours[0]}", f"the {kind} is {colours[0]}"]))
            elif colours:
                many = things(rng, len(colours), kind)
                parts.append(rng.choice([f"there are {many}: {join(colours)}",
                                         f"{many} are {join(colours)}"]))
    for kind in KINDS:  # the counting question is never about an absent kind; saying so still grounds "how many"
        if not kinds[kind] and rng.random() < 0.3:
            parts.append(f"there are no {kind}s")
    return " ".join(sentence(p) for p in parts)


def where(box: list[int]) -> str:
    """Where in the picture the box's centre lies, by ninths: "in the top left corner", "at the top", ..."""
    col, row = (int((lo + hi) / 2 * 3 // SIZE) for lo, hi in ((box[0], box[2]), (box[1], box[3])))
    row, col = ("top", "", "bottom")[row], ("left", "", "right")[col]
    if row and col:
        return f"in the {row} {col} corner"
    return f"at the {row}" if row else f"on the {col}" if col else "in the middle"


def digits_caption(rng: random.Random, number: dict) -> str:
    """E.g. "The number 47 written in purple." with, sometimes, how many digits and where it is."""
    text, colour = number["text"], number["colour"]
    parts = [rng.choice([f"the number {text} written in {colour}", f"{a(colour)} {text} on a white background",
                         f"the picture shows the number {text} in {colour}", f"{text}, written in {colour} on white",
                         f"a white picture with the number {text} written on it in {colour}"])]
    if rng.random() < 0.4:
        parts.append("it is a single digit" if len(text) == 1 else f"it has {things(rng, len(text), 'digit')}")
    if rng.random() < 0.4:
        parts.append(f"it is written {where(number['box'])}")
    return " ".join(sentence(p) for p in parts)
