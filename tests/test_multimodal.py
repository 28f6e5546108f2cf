"""Early fusion: herd's multimodal model against transformers' Llama4ForConditionalGeneration (logits, greedy
generation with images), the full multimodal checkpoint round trip, and the engine's image path."""

import pytest
import torch
from conftest import randomize_, small_config

from herd import checkpoint
from herd.config import VisionConfig, to_hf_dict
from herd.infer.engine import Engine
from herd.infer.sampling import SamplingParams

PATCH, BOI, EOI = 500, 501, 502  # <|patch|>, <|image_start|>, <|image_end|> in the tiny vocab
CFG = small_config(image_token_id=PATCH, boi_token_id=BOI, eoi_token_id=EOI, vision=VisionConfig(
    dim=64, n_layers=2, n_heads=4, hidden_dim=256, image_size=64, patch_size=8, pixel_shuffle_ratio=0.5,
    projector_input_dim=96, projector_output_dim=96, vision_output_dim=96))  # 16 <|patch|> per tile
PER_TILE = CFG.vision.tokens_per_tile


def hf_multimodal(seed: int = 0):
    from transformers import Llama4Config, Llama4ForConditionalGeneration

    d = to_hf_dict(CFG)
    hf_cfg = Llama4Config(**{k: v for k, v in d.items() if k not in ("model_type", "architectures")})
    assert (hf_cfg.image_token_index, hf_cfg.boi_token_index, hf_cfg.eoi_token_index) == (PATCH, BOI, EOI)
    hf_cfg._attn_implementation = "eager"
    hf_cfg.text_config._attn_implementation = hf_cfg.vision_config._attn_implementation = "eager"
    torch.manual_seed(seed)
    return randomize_(Llama4ForConditionalGeneration(hf_cfg).eval())


def hf_logits(hf, ids: torch.Tensor, pixels: torch.Tensor) -> torch.Tensor:
    """Llama4ForConditionalGeneration.forward's logits. transformers 5.24's forward computes them and then fails
    building its output object (MoeCausalLMOutputWithPast has no image_outputs); then run the same steps with its
    own modules: image features -> projector -> masked_scatter into the <|patch|> embeddings -> language model."""
    try:
        return hf(input_ids=ids, pixel_values=pixels).logits
    except AttributeError as e:
        if "image_outputs" not in str(e):
            raise
    embeds = hf.get_input_embeddings()(ids)
    features = hf.get_image_features(pixel_values=pixels, return_dict=True).last_hidden_state
    projected = hf.multi_modal_projector(features.view(-1, features.size(-1))).to(embeds.dtype)
    mask = hf.get_placeholder_mask(ids, inputs_embeds=embeds, image_features=projected)
    return hf.language_model(inputs_embeds=embeds.masked_scatter(mask, projected)).logits


def hf_greedy(hf, ids: list[int], pixels: torch.Tensor, n: int) -> list[int]:
    """Greedy continuation by the reference forward (no cache: the whole prompt again at every step)."""
    out = list(ids)
    for _ in range(n):
        out.append(int(hf_logits(hf, torch.tensor([out]), pixels)[0, -1].argmax()))
    return out[len(ids):]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    hf = hf_multimodal()
    d = tmp_path_factory.mktemp("mm") / "model"
    hf.save_pretrained(d)
    return hf, checkpoint.load(d).eval(), d


def tiles(n: int, seed: int = 1) -> torch.Tensor:
    v = CFG.vision
    return torch.rand(n, 3, v.image_size, v.image_size, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def prompt(*tiles_per_image: int) -> list[int]:
    """Text, then per image <|image_start|> + its <|patch|>es + <|image_end|>, then text (the layout's other
    tokens are ordinary embeddings: herd.chat and test_image_prompt check them)."""
    ids = [1, 17, 42, 99]
    for n in tiles_per_image:
        ids += [BOI, *[PATCH] * (n * PER_TILE), EOI, 7]
    return ids + [63, 8, 250]


@pytest.mark.parametrize("layout", [(1,), (1, 3)], ids=["one image", "two images"])
def test_logits_equal_transformers_with_images(models, layout):
    hf, ours, _ = models
    ids = torch.tensor([prompt(*layout)])
    pixels = tiles(sum(layout))
    with torch.no_grad():
        ref = hf_logits(hf, ids, pixels)
        got = ours(ids, pixel_values=pixels)
        text_only = ours(ids)
    assert (got - ref).abs().max() <= 1e-4 * ref.abs().max()
    assert (text_only - ref).abs().max() > 1e-2 * ref.abs().max()  # the images do change the logits


def test_greedy_generation_with_an_image_equals_transformers(models):
    hf, ours, _ = models
    ids, pixels = prompt(3), tiles(3)
    with torch.no_grad():
        ref = hf_greedy(hf, ids, pixels, 12)
    params = SamplingParams(max_new_tokens=12, temperature=0.0, stop_ids=[])
    engine = Engine(ours, prefill_chunk=16)  # chunks split the image's placeholders
    (out,) = engine.generate([ids], params, images=[pixels])
    assert out.token_ids == ref
    # batched with a text prompt and another image prompt: each row as alone
    text = [1, 5, 9, 11, 200]
    batch = engine.generate([text, ids, prompt(1)], params, images=[None, pixels, tiles(1, seed=5)])
    assert batch[1].token_ids == ref
    assert batch[0].token_ids == engine.generate([text], params)[0].token_ids
    assert batch[2].token_ids == engine.generate([prompt(1)], params, images=[tiles(1, seed=5)])[0].token_ids


def test_engine_encodes_an_image_set_once(models, monkeypatch):
    _, ours, _ = models
    calls = []
    real = ours.encode_images
    monkeypatch.setattr(ours, "encode_images", lambda px: calls.append(px.shape[0]) or real(px))
    engine, params = Engine(ours), SamplingParams(max_new_tokens=2, temperature=0.0)
    pixels = tiles(1)
    for _ in range(3):  # e.g. the turns of a chat that keep sending the same image
        engine.generate([prompt(1)], params, images=[pixels])
    engine.generate([prompt(1)], params, images=[tiles(1, seed=9)])
    assert calls == [1, 1]


def test_placeholder_count_must_match_the_tiles(models):
    _, ours, _ = models
    engine = Engine(ours)
    with pytest.raises(ValueError, match="16 <.patch.> placeholders but its 2 image tiles give 32"):
        engine.generate([prompt(1)], SamplingParams(max_new_tokens=1), images=[tiles(2)])
    with pytest.raises(ValueError, match=r"must be \[N, 3, 64, 64\]"):
        engine.generate([prompt(1)], SamplingParams(max_new_tokens=1), images=[torch.zeros(1, 3, 32, 32)])


def test_text_model_refuses_images(models):
    _, _, d = models
    text = checkpoint.load(d, text_only=True)
    assert text.vision is None and text.cfg.vision is None
    with pytest.raises(ValueError, match="no vision tower"):
        Engine(text).generate([prompt(1)], SamplingParams(max_new_tokens=1), images=[tiles(1)])


def test_multimodal_checkpoint_round_trip(models, tmp_path):
    from transformers import Llama4ForConditionalGeneration

    hf, ours, _ = models
    checkpoint.save(ours, tmp_path / "herd", max_shard_bytes=300_000)
    again = checkpoint.load(tmp_path / "herd").eval()
    reloaded = Llama4ForConditionalGeneration.from_pretrained(tmp_path / "herd").eval()
    ids, pixels = torch.tensor([prompt(1, 3)]), tiles(4)
    with torch.no_grad():
        ref = hf_logits(hf, ids, pixels)
        assert torch.equal(again(ids, pixel_values=pixels), ours(ids, pixel_values=pixels))
        assert (hf_logits(reloaded, ids, pixels) - ref).abs().max() <= 1e-5 * ref.abs().max()
    assert {k for k, _ in again.named_parameters()} == {k for k, _ in ours.named_parameters()}
