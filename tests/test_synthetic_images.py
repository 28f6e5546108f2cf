"""Generated image-caption pairs (herd.train.synthetic_images): determinism, the all-or-nothing write and its rerun,
captions that name what is drawn, and the set through herd.train.image_text's tokeniser."""

import json
import random
import re
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import herd.train.synthetic_images as synthetic
from herd.config import preset
from herd.errors import HerdError
from herd.images import ImageConfig
from herd.post.tasks.base import NUMBER_WORDS
from herd.post.tasks.shapes import COLOURS, KINDS, place
from herd.tokenizer import Tokenizer
from herd.train.image_text import ImageTextSet, tokenize_image_text
from herd.train.synthetic_images import shapes_caption, write_caption_set

PICO = Path(__file__).resolve().parents[1] / "models" / "herd-pico"


def _records(d: Path) -> list[dict]:
    return [json.loads(line) for line in (d / "captions.jsonl").read_text().splitlines()]


def _named(text: str, words) -> set[str]:
    return {w for w in words if re.search(rf"\b{w}s?\b", text, re.IGNORECASE)}  # "circle" names "circles" too


def _says(text: str, k: int) -> bool:
    return bool(_named(text, [str(k), NUMBER_WORDS[k]]))


def test_caption_set_is_deterministic_and_names_what_is_drawn(tmp_path):
    info = write_caption_set(tmp_path / "a", 16, seed=1, progress=False)
    assert info["samples"] == 16 and info["by_kind"] == {"shapes": 8, "digits": 8}
    assert json.loads((tmp_path / "a" / "index.json").read_text()) == info
    write_caption_set(tmp_path / "b", 16, seed=1, progress=False)
    a, b = _records(tmp_path / "a"), _records(tmp_path / "b")
    assert a == b and len(a) == 16
    assert all((tmp_path / "a" / r["images"][0]).read_bytes() == (tmp_path / "b" / r["images"][0]).read_bytes()
               for r in a)
    write_caption_set(tmp_path / "c", 16, seed=2, progress=False)
    assert _records(tmp_path / "c") != a
    assert [r["images"] for r in a] == [[f"images/{i:06d}.png"] for i in range(16)]
    for i, r in enumerate(a):
        image = Image.open(tmp_path / "a" / r["images"][0])
        assert image.mode == "RGB" and image.size == (336, 336)
        pixels = np.asarray(image)
        drawn = {tuple(c) for c in np.unique(pixels[(pixels != 255).any(-1)], axis=0).tolist()}  # flat: no blending
        assert drawn and _named(r["text"], COLOURS) == {n for n, c in COLOURS.items() if c in drawn}, r["text"]
        if i % 2:  # digits: the number, as written
            assert re.search(r"\b\d{1,4}\b", r["text"]), r["text"]
        else:
            assert _named(r["text"], KINDS) and "shape" in r["text"], r["text"]
    assert len({r["text"] for r in a}) == 16  # no two alike


def test_shape_captions_carry_counts_and_colours():
    forms = set()
    for i in range(60):
        rng = random.Random(i)
        shapes = place(rng, [rng.choice(KINDS) for _ in range(rng.randint(1, 10))])
        text = shapes_caption(rng, shapes)
        forms.add(":" in text)
        counts = Counter(s["kind"] for s in shapes)
        assert _says(text.split(".")[0], len(shapes)), text  # the first sentence gives the total
        for kind in KINDS:
            k = counts[kind]
            if k > 1:
                assert any(f"{w} {kind}s" in text.lower() for w in (str(k), NUMBER_WORDS[k])), text
            elif k == 1:
                assert re.search(rf"\b(1|one|only|the) {kind}\b", text, re.IGNORECASE), text
            else:
                assert kind not in text or f"no {kind}s" in text, text
        assert _named(text, COLOURS) == {s["colour"] for s in shapes}, text
    assert forms == {True, False}  # both wordings occur


def test_digit_captions():
    number = {"text": "47", "colour": "orange", "size": 60, "box": [10, 10, 80, 50]}
    texts = {synthetic.digits_caption(random.Random(i), number) for i in range(40)}
    assert len(texts) > 5 and all(re.search(r"\b47\b", t) and "orange" in t for t in texts)
    assert any("top left corner" in t for t in texts) and any("two digits" in t or "2 digits" in t for t in texts)
    assert not any("a orange" in t.lower() for t in texts)


def test_caption_set_is_atomic_and_reruns_return_the_index(tmp_path, monkeypatch):
    out = tmp_path / "set"
    real, calls = synthetic.picture_and_caption, []

    def failing(rng, kind):
        calls.append(kind)
        if len(calls) == 5:
            raise KeyboardInterrupt  # a run interrupted half way
        return real(rng, kind)

    monkeypatch.setattr(synthetic, "picture_and_caption", failing)
    with pytest.raises(KeyboardInterrupt):
        write_caption_set(out, 8, progress=False)
    assert not out.exists() and list(tmp_path.iterdir()) == []  # no half set, no temporary left
    monkeypatch.setattr(synthetic, "picture_and_caption", real)
    info = write_caption_set(out, 8, progress=False)

    def no_drawing(rng, kind):
        raise AssertionError("a complete set is not redrawn")

    monkeypatch.setattr(synthetic, "picture_and_caption", no_drawing)
    assert write_caption_set(out, 8, progress=False) == info
    with pytest.raises(HerdError, match="another caption set"):
        write_caption_set(out, 9, progress=False)
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "x.txt").write_text("x")
    with pytest.raises(HerdError, match="not a caption set"):
        write_caption_set(tmp_path / "other", 2, progress=False)
    with pytest.raises(HerdError, match="kinds"):
        write_caption_set(tmp_path / "bad", 2, kinds=("faces",), progress=False)


def test_caption_set_tokenises_as_image_text(tmp_path):
    info = write_caption_set(tmp_path / "caps", 6, kinds=("digits", "shapes"), progress=False)
    assert info["by_kind"] == {"digits": 3, "shapes": 3}
    tok = Tokenizer.load(PICO / "tokenizer.model")
    vision = preset("tiny-vision").vision
    data = tokenize_image_text([tmp_path / "caps" / info["jsonl"]], tmp_path / "set", tok, vision.tokens_per_tile,
                               ImageConfig(tile_size=vision.image_size), seq_len=320)
    assert data["samples"] == 6 and data["tiles"] == 6 and not any(data["bad_records"].values())  # none lost
    rows = ImageTextSet(tmp_path / "set").rows(320)
    row = rows.window(0)
    assert row["pixel_values"].shape == (1, 3, 336, 336) and row["loss_mask"].any()
    text = tok.decode([int(t) for t, m in zip(row["targets"], row["loss_mask"]) if m])
    assert text.strip().startswith(_records(tmp_path / "caps")[0]["text"][:20])
