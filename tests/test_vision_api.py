"""Images through the user-facing paths: LLM.generate/chat/stream, `herd generate --image`, `herd chat /image`."""

import io

import numpy as np
import pytest
import torch
from PIL import Image

import herd
from herd import checkpoint
from herd.cli import main
from herd.config import preset
from herd.errors import HerdError
from herd.infer.sampling import SamplingParams
from herd.model import Transformer


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("vision-api") / "tiny-vision"
    torch.manual_seed(0)
    checkpoint.save(Transformer(preset("tiny-vision")), d)
    return d


@pytest.fixture(scope="module")
def llm(model_dir):
    return herd.load(model_dir)


@pytest.fixture(scope="module")
def pictures(tmp_path_factory):
    """A wide (multi-tile) PNG and a small JPEG."""
    d, rng = tmp_path_factory.mktemp("pictures"), np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (300, 700, 3), dtype=np.uint8)).save(d / "wide.png")
    Image.fromarray(rng.integers(0, 255, (200, 150, 3), dtype=np.uint8)).save(d / "small.jpg")
    return d / "wide.png", d / "small.jpg"


def greedy(n: int = 6) -> dict:
    return dict(max_new_tokens=n, temperature=0.0, stop_ids=[])


def test_chat_with_content_lists_equals_the_engine_on_the_same_inputs(llm, pictures):
    wide, small = pictures
    messages = [{"role": "user", "content": [{"type": "image", "path": str(wide)},
                                             {"type": "image", "url": str(small)},
                                             {"type": "text", "text": "What differs?"}]}]
    ids, pixels = llm.chat_inputs(messages)
    assert pixels.shape[0] == ids.count(llm.config.image_token_id) // 144 == 3 + 1 + 1  # 1x3 + thumbnail, 1 tile
    (ref,) = llm.engine.generate([ids], SamplingParams(**greedy()), [pixels])
    assert llm.chat(messages, **greedy())["content"] == llm.tokenizer.decode(ref.token_ids)
    assert "".join(llm.chat_stream(messages, **greedy())) == llm.tokenizer.decode(ref.token_ids)
    # the images matter: without them the reply differs (random weights still see the features)
    text_only = [{"role": "user", "content": "What differs?"}]
    assert llm.engine.generate([llm.chat_ids(text_only)], SamplingParams(**greedy()))[0].token_ids != ref.token_ids


def test_generate_with_images_and_data_urls(llm, pictures):
    import base64

    wide, small = pictures
    url = "data:image/jpeg;base64," + base64.b64encode(small.read_bytes()).decode()
    a = llm.generate("Describe:", images=[wide, url], **greedy())
    b = llm.generate("Describe:", images=[str(wide), small.read_bytes()], **greedy())
    assert a == b and a != llm.generate("Describe:", **greedy())
    assert "".join(llm.stream("Describe:", images=[wide, small], **greedy())) == a


def test_cli_generate_with_images(capsys, model_dir, pictures, tmp_path):
    wide, small = pictures
    args = ["generate", str(model_dir), "Compare them", "--image", str(wide), "--image", str(small),
            "--max-new-tokens", "6", "--temperature", "0"]
    assert main(args + ["--chat"]) == 0
    out = capsys.readouterr().out.strip()
    llm = herd.load(model_dir)
    messages = [{"role": "user", "content": [{"type": "image", "path": str(wide)},
                                             {"type": "image", "path": str(small)},
                                             {"type": "text", "text": "Compare them"}]}]
    assert out == llm.chat(messages, max_new_tokens=6, temperature=0.0)["content"].strip()
    bad = tmp_path / "notes.png"
    bad.write_text("not an image")
    assert main(args[:3] + ["--image", str(bad)]) == 2
    err = capsys.readouterr().err
    assert "notes.png" in err and "not an image" in err and "Traceback" not in err


def test_chat_repl_images_and_bad_input_never_crash(llm, pictures, tmp_path):
    from herd.infer.repl import repl

    wide, _ = pictures
    broken = tmp_path / "broken.png"
    broken.write_bytes(wide.read_bytes()[:200])  # truncated PNG
    lines = iter(["/image " + str(broken), "/image", "/image /no/such/file.png", "/image " + str(wide),
                  "what is this?", "and now?", "/exit"])
    out = io.StringIO()
    messages = repl(llm, SamplingParams(**greedy(3)), read=lambda prompt: next(lines), out=out)
    text = out.getvalue()
    assert "broken.png" in text and "truncated" in text and "usage: /image PATH" in text and "file.png" in text
    assert [m["role"] for m in messages] == ["user", "assistant", "user", "assistant"]
    assert messages[0]["content"][0] == {"type": "image", "path": str(wide)}  # only the good image
    assert messages[2]["content"] == "and now?"  # an image goes with the next message only


def test_text_model_refuses_images_clearly(tmp_path, pictures):
    d = tmp_path / "tiny"
    checkpoint.save(Transformer(preset("tiny")), d)
    llm = herd.load(d)
    with pytest.raises(ValueError, match="no vision tower"):
        llm.generate("x", images=[pictures[0]], max_new_tokens=1)
    from herd.infer.repl import repl

    out, lines = io.StringIO(), iter(["/image " + str(pictures[0]), "/exit"])
    repl(llm, SamplingParams(max_new_tokens=1), read=lambda prompt: next(lines), out=out)
    assert "no vision tower" in out.getvalue()


def test_remote_urls_are_refused(llm):
    with pytest.raises(HerdError, match="remote URLs are not fetched"):
        llm.chat([{"role": "user", "content": [{"type": "image", "url": "https://example.com/cat.png"}]}])


def test_placeholders_and_tiles_follow_the_model_geometry(pictures):
    """A tower with 112 px tiles and 14 px patches has 4x4 = 16 <|patch|> per tile: the prompt must say so."""
    from herd.api import LLM
    from herd.config import VisionConfig
    from herd.tokenizer import Tokenizer

    torch.manual_seed(0)
    cfg = preset("tiny").replace(vision=VisionConfig(dim=64, n_layers=1, n_heads=4, hidden_dim=256, image_size=112,
                                                     projector_input_dim=128, projector_output_dim=128,
                                                     vision_output_dim=128))
    llm = LLM(Transformer(cfg).eval(), Tokenizer.load())
    ids, pixels = llm.chat_inputs([{"role": "user", "content": [{"type": "image", "path": str(pictures[0])}]}])
    assert pixels.shape[-2:] == (112, 112) and ids.count(cfg.image_token_id) == 16 * pixels.shape[0]
    assert llm.generate("x", images=[pictures[1]], max_new_tokens=2, temperature=0.0) is not None
