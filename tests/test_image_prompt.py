"""Image prompts: ChatFormat.encode_dialog_with_images against transformers' Llama4Processor, id for id."""

import base64
import io
import re

import numpy as np
import pytest
import torch
from PIL import Image

from herd.chat import ChatFormat
from herd.errors import HerdError
from herd.images import ImageError
from herd.tokenizer import LLAMA4_PATTERN, Tokenizer, default_tokenizer_path

pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def tok():
    return Tokenizer.load()


@pytest.fixture(scope="module")
def chat(tok):
    return ChatFormat(tok)


@pytest.fixture(scope="module")
def processor(tok):
    """Llama4Processor over an HF tokenizer converted offline from the same tiktoken file (no hub)."""
    from transformers import Llama4ImageProcessor, Llama4Processor, PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import TikTokenConverter, bytes_to_unicode

    class VocabOnly(TikTokenConverter):
        # Deriving all 200k BPE merges costs ~2.5 s of Python, and these prompts never use them: the converted
        # tokenizer takes a word that is one vocab entry whole (ignore_merges), and every word here is one.
        # A word that is not would fall apart into bytes and fail the parity test, never pass it by luck.
        # test_tokenizer.py checks the fully converted tokenizer on real text.
        def extract_vocab_merges_from_model(self, tiktoken_url):
            byte_char = bytes_to_unicode()
            ranks = self.load_tiktoken_bpe(tiktoken_url)
            return {"".join(byte_char[b] for b in token): rank for token, rank in ranks.items()}, []

    specials = sorted(tok.special_tokens, key=tok.special_tokens.get)
    converted = VocabOnly(vocab_file=str(default_tokenizer_path()), pattern=LLAMA4_PATTERN,
                          extra_special_tokens=specials).converted()
    hf_tok = PreTrainedTokenizerFast(tokenizer_object=converted, bos_token="<|begin_of_text|>", eos_token="<|eot|>")
    return Llama4Processor(image_processor=Llama4ImageProcessor(), tokenizer=hf_tok)


def picture(width: int, height: int, seed: int = 0) -> Image.Image:
    # Smooth but not flat, so a tile or resize mix-up changes pixels; another pattern per seed.
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    rgb = [255 * x / width, 255 * y / height, 127.5 + 127 * np.sin((x + 7 * seed) / 9 + y / (13 + seed))]
    return Image.fromarray(np.stack(rgb, -1).astype(np.uint8))


def png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def image_spans(ids: list[int], tok: Tokenizer) -> list[list[int]]:
    """The ids of each <|image_start|> ... <|image_end|> span, in order."""
    start, end = tok.token_id("<|image_start|>"), tok.token_id("<|image_end|>")
    return [ids[i : ids.index(end, i) + 1] for i, t in enumerate(ids) if t == start]


def dialog(image_parts: list[dict], two_turns: bool = False) -> list[dict]:
    """A system prompt and user text around the image parts; with two_turns, the last image comes a turn later."""
    first = image_parts[:-1] if two_turns else image_parts
    content = [{"type": "text", "text": "Compare these:"}]
    for k, part in enumerate(first):
        content += [part, {"type": "text", "text": f" (picture {k})\n"}]
    messages = [{"role": "system", "content": "You describe images."}, {"role": "user", "content": content}]
    if two_turns:
        messages += [{"role": "assistant", "content": "Send the next one."},
                     {"role": "user", "content": [{"type": "text", "text": "Here:"}, image_parts[-1]]}]
    return messages


# (width, height) per image -> (rows, cols) grids: one and two images, one tile and many (+ thumbnail)
CASES = {
    "one_single": ([(300, 300)], [(1, 1)]),
    "one_multi": ([(700, 1000)], [(3, 3)]),
    "two_single": ([(300, 300), (200, 150)], [(1, 1), (1, 1)]),
    "two_mixed": ([(1000, 700), (300, 300)], [(3, 3), (1, 1)]),
    "two_multi_two_turns": ([(700, 1000), (700, 400)], [(3, 3), (2, 3)]),
}


@pytest.mark.parametrize("case", CASES)
def test_prompt_matches_transformers(tok, chat, processor, case):
    sizes, grids = CASES[case]
    pics = [picture(w, h, seed=k) for k, (w, h) in enumerate(sizes)]
    two_turns = case.endswith("two_turns")
    hf = processor.apply_chat_template(dialog([{"type": "image", "image": p} for p in pics], two_turns),
                                       add_generation_prompt=True, tokenize=True, return_dict=True)
    # herd gets the pictures as encoded PNG bytes, transformers as PIL images: the same pixels either way.
    ids, images = chat.encode_dialog_with_images(dialog([{"type": "image", "image": png(p)} for p in pics], two_turns),
                                                 dtype=torch.bfloat16)
    assert [im.aspect_ratio for im in images] == grids
    # The whole prompt, not only the image spans: transformers' chat template renders this dialog as herd does.
    assert ids == hf["input_ids"][0]
    hf_pixels = hf["pixel_values"]
    hf_pixels = torch.cat(hf_pixels) if isinstance(hf_pixels, list) else hf_pixels
    assert torch.equal(torch.cat([im.pixel_values for im in images]), hf_pixels)
    # Scatter contract: image k's span holds 144 <|patch|> per row of its pixel_values (thumbnail included).
    spans = image_spans(ids, tok)
    patch = tok.token_id("<|patch|>")
    assert len(spans) == len(images)
    for span, im in zip(spans, images):
        assert span.count(patch) == 144 * len(im.pixel_values)
        rows, cols = im.aspect_ratio
        assert len(im.pixel_values) == rows * cols + (rows * cols > 1)
    assert ids.count(patch) == 144 * sum(len(im.pixel_values) for im in images)


def test_every_image_source_gives_the_same_prompt(tmp_path, chat):
    pic = picture(200, 100)  # one tile: cheap to load eight times (multi-tile layouts are tested above)
    data = png(pic)
    path = tmp_path / "pic.png"
    path.write_bytes(data)
    data_url = "data:image/png;base64," + base64.b64encode(data).decode()
    sources = [{"path": str(path)}, {"path": path}, {"url": data_url}, {"url": str(path)}, {"image": pic},
               {"image": data}, {"image": np.array(pic)}, {"image": torch.from_numpy(np.array(pic)).permute(2, 0, 1)}]
    expected_ids, expected = chat.encode_dialog_with_images(dialog([{"type": "image", "image": pic}]))
    for source in sources:
        ids, images = chat.encode_dialog_with_images(dialog([{"type": "image", **source}]))
        assert ids == expected_ids, source
        assert len(images) == 1 and torch.equal(images[0].pixel_values, expected[0].pixel_values), source


def test_video_is_one_image_per_frame(chat):
    frames = [picture(300, 300, seed=0), picture(700, 400, seed=1), picture(300, 300, seed=2)]
    video_ids, video = chat.encode_dialog_with_images([{"role": "user", "content": [
        {"type": "text", "text": "What happens?"}, {"type": "video", "frames": frames}]}])
    ids, images = chat.encode_dialog_with_images([{"role": "user", "content": [
        {"type": "text", "text": "What happens?"}, *({"type": "image", "image": f} for f in frames)]}])
    assert video_ids == ids
    assert [v.aspect_ratio for v in video] == [(1, 1), (2, 3), (1, 1)]
    assert len(video) == len(images) == 3
    assert all(torch.equal(v.pixel_values, im.pixel_values) for v, im in zip(video, images))


def test_layout_only_prompts_still_use_encode_dialog(chat):
    ids, images = chat.encode_dialog_with_images(dialog([{"type": "image", "image": picture(700, 1000)}]))
    assert chat.encode_dialog(dialog([{"type": "image", "tiles": images[0].aspect_ratio}])) == ids
    text_only = dialog([])
    assert chat.encode_dialog_with_images(text_only) == (chat.encode_dialog(text_only), [])
    assert chat.encode_dialog_with_images(text_only, add_generation_prompt=False)[0] == \
        chat.encode_dialog(text_only, add_generation_prompt=False)


def test_errors_name_the_message_and_part(chat):
    good = {"type": "image", "image": picture(300, 300)}
    bad = b"GIF89a, or so it claims"
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": [good]},
                {"role": "user", "content": [{"type": "text", "text": "and"}, {"type": "image", "image": bad}]}]
    with pytest.raises(ImageError, match=re.escape(f"messages[2].content[1]: image (bytes, {len(bad)} bytes)")):
        chat.encode_dialog_with_images(messages)
    remote = {"type": "image", "url": "https://example.com/cat.png"}
    with pytest.raises(ImageError, match=re.escape("messages[0].content[1]") + ".*remote URLs are not fetched"):
        chat.encode_dialog_with_images([{"role": "user", "content": [good, remote]}])
    video = {"type": "video", "frames": [picture(50, 50), "/no/such/frame.png"]}
    with pytest.raises(ImageError, match=re.escape("messages[0].content[0].frames[1]") + ".*cannot read file"):
        chat.encode_dialog_with_images([{"role": "user", "content": [video]}])
    # A single part dict (not a list) is numbered part 0, as encode_dialog treats it as a one-part list.
    with pytest.raises(ImageError, match=re.escape("messages[0].content[0]")):
        chat.encode_dialog_with_images([{"role": "user", "content": {"type": "image", "path": "/no/such.png"}}])


@pytest.mark.parametrize("part,match", [
    ({"type": "image"}, "needs exactly one of 'path', 'url', 'image'; got keys ['type']"),
    ({"type": "image", "src": "a.png"}, "got keys ['src', 'type']"),
    ({"type": "image", "path": "a.png", "image": b"x"}, "exactly one of"),
    ({"type": "image", "tiles": (1, 1)}, "'tiles' image part has no pixels"),
    ({"type": "video"}, "non-empty list of images"),
    ({"type": "video", "frames": []}, "non-empty list of images"),
])
def test_bad_image_parts(chat, part, match):
    messages = [{"role": "user", "content": [{"type": "text", "text": "hi"}, part]}]
    with pytest.raises(HerdError, match=re.escape("messages[0].content[1]: ") + ".*" + re.escape(match)):
        chat.encode_dialog_with_images(messages)


def test_encode_dialog_refuses_pixels(chat):
    with pytest.raises(HerdError, match="image part needs one of 'path', 'url', 'image' or 'tiles'"):
        chat.encode_dialog([{"role": "user", "content": [{"type": "image"}]}])
    for part in ({"type": "image", "path": "a.png"}, {"type": "video", "frames": ["a.png"]}):
        with pytest.raises(HerdError, match="need ChatFormat.encode_dialog_with_images"):
            chat.encode_dialog([{"role": "user", "content": [part]}])
