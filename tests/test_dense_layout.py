"""The dense Llama 4 layout of Llama Guard 4 12B (Scout pruned to dense: no routed experts or routers, every layer
a SwiGLU FFN of intermediate_size_mlp, the vision tower kept), as transformers' dense convert script writes it:
text_config num_local_experts 0, interleave_moe_layer_step 0, moe_layers []. herd against transformers'
Llama4ForConditionalGeneration (text and image logits), the checkpoint round trip both ways, herd.load, and the
configs herd refuses."""

import json

import pytest
import torch
from conftest import greedy_without_cache, randomize_
from safetensors import safe_open
from test_multimodal import CFG, hf_logits, prompt, tiles

import herd
from herd import checkpoint
from herd.config import from_hf_dict, load_config, save_config, to_hf_dict
from herd.errors import ConfigError
from herd.info import census, render
from herd.model import Transformer
from herd.model.ffn import FeedForward
from herd.plan import plan
from herd.post.lora import LoRAConfig, apply_lora, save_peft_adapter

# test_multimodal's tiny model (its vision tower, so its prompt() and tiles() fit) made dense, 2 layers: one
# chunked RoPE layer, one global NoPE layer; the dense FFN (128) differs from the unused expert width (96)
DENSE = CFG.replace(n_layers=2, nope_layer_interval=2, n_experts=0, interleave_moe_layer_step=0)
LG4_TEXT_KEYS = {"num_local_experts": 0, "interleave_moe_layer_step": 0, "moe_layers": []}


def hf_dense(seed: int = 0):
    from transformers import Llama4Config, Llama4ForConditionalGeneration

    d = to_hf_dict(DENSE)
    assert {k: d["text_config"][k] for k in LG4_TEXT_KEYS} == LG4_TEXT_KEYS
    hf_cfg = Llama4Config(**{k: v for k, v in d.items() if k not in ("model_type", "architectures")})
    assert hf_cfg.text_config.moe_layers == [] and hf_cfg.text_config.num_local_experts == 0
    hf_cfg._attn_implementation = "eager"
    hf_cfg.text_config._attn_implementation = hf_cfg.vision_config._attn_implementation = "eager"
    torch.manual_seed(seed)
    return randomize_(Llama4ForConditionalGeneration(hf_cfg).eval())


def hf_text_logits(hf, ids: torch.Tensor) -> torch.Tensor:
    """The reference logits of a text prompt (transformers 5.24's forward fails building its output object, as
    test_multimodal.hf_logits explains: then its language model's, which is what that forward runs)."""
    try:
        return hf(input_ids=ids).logits
    except AttributeError as e:
        if "image_outputs" not in str(e):
            raise
    return hf.language_model(input_ids=ids).logits


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    hf = hf_dense()
    d = tmp_path_factory.mktemp("dense") / "model"
    hf.save_pretrained(d)
    return hf, checkpoint.load(d).eval(), d


def test_the_saved_lg4_config_reads_as_the_dense_config(models):
    _, ours, d = models
    text = json.loads((d / "config.json").read_text())["text_config"]
    assert {k: text[k] for k in LG4_TEXT_KEYS} == LG4_TEXT_KEYS
    assert ours.cfg == DENSE and ours.cfg.moe_layers == () and ours.cfg.n_experts == 0
    assert from_hf_dict(to_hf_dict(DENSE)) == DENSE


def test_every_layer_is_dense(models):
    _, ours, d = models
    assert all(not block.is_moe and type(block.feed_forward) is FeedForward for block in ours.layers)
    assert all(block.feed_forward.gate_proj.weight.shape == (DENSE.dense_hidden_dim, DENSE.dim)
               for block in ours.layers)
    names = [n for n, _ in ours.named_parameters()]
    assert not [n for n in names if "router" in n or "expert" in n]
    with safe_open(d / "model.safetensors", "pt") as f:
        stored = list(f.keys())
    assert not [n for n in stored if "router" in n or "expert" in n]
    assert sum(".feed_forward.gate_proj.weight" in n and "vision" not in n for n in stored) == DENSE.n_layers


def test_text_logits_equal_transformers(models):
    hf, ours, _ = models
    ids = torch.tensor([[1, 17, 42, 99, 63, 8, 250, 7, 300, 12, 5, 77, 400, 3, 9, 11, 200, 41, 20]])  # > 1 chunk
    with torch.no_grad():
        ref, got = hf_text_logits(hf, ids), ours(ids)
    assert (got - ref).abs().max() <= 1e-4 * ref.abs().max()


def test_image_logits_equal_transformers(models):
    hf, ours, _ = models
    ids, pixels = torch.tensor([prompt(1, 3)]), tiles(4)
    with torch.no_grad():
        ref = hf_logits(hf, ids, pixels)
        got, text_only = ours(ids, pixel_values=pixels), ours(ids)
    assert (got - ref).abs().max() <= 1e-4 * ref.abs().max()
    assert (text_only - ref).abs().max() > 1e-2 * ref.abs().max()  # the images do change the logits


def test_herd_save_transformers_load_round_trip(models, tmp_path):
    from transformers import Llama4ForConditionalGeneration

    hf, ours, _ = models
    checkpoint.save(ours, tmp_path / "herd")
    text = json.loads((tmp_path / "herd" / "config.json").read_text())["text_config"]
    assert {k: text[k] for k in LG4_TEXT_KEYS} == LG4_TEXT_KEYS
    assert load_config(tmp_path / "herd") == DENSE
    reloaded = Llama4ForConditionalGeneration.from_pretrained(tmp_path / "herd").eval()
    assert all(not layer.is_moe_layer for layer in reloaded.language_model.model.layers)
    ids, pixels = torch.tensor([prompt(1)]), tiles(1)
    with torch.no_grad():
        ref = hf_logits(hf, ids, pixels)
        assert (hf_logits(reloaded, ids, pixels) - ref).abs().max() <= 1e-5 * ref.abs().max()
        assert torch.equal(checkpoint.load(tmp_path / "herd")(ids, pixel_values=pixels), ours(ids, pixel_values=pixels))


def test_herd_load_generates(models):
    _, ours, d = models
    llm = herd.load(d)
    assert llm.config == DENSE
    ids = [1, 17, 42, 99]
    (c,) = llm.complete([ids], max_new_tokens=5, temperature=0.0, stop_ids=frozenset())
    assert c.token_ids == greedy_without_cache(ours, ids, 5)
    assert isinstance(llm.generate(ids, max_new_tokens=3), str)


def test_dense_config_without_moe_layers_key_and_own_config_file(tmp_path):
    d = to_hf_dict(DENSE)
    del d["text_config"]["moe_layers"]  # step 0 alone derives no MoE layer (HF's range() would fail on it)
    assert from_hf_dict(d) == DENSE
    save_config(DENSE, tmp_path)
    assert load_config(tmp_path) == DENSE
    save_config(DENSE, tmp_path, text_only=True)  # llama4_text (which carries no image token ids)
    text = load_config(tmp_path)
    assert (text.moe_layers, text.n_experts, text.interleave_moe_layer_step, text.vision) == ((), 0, 0, None)


@pytest.mark.parametrize("changes,match", [
    ({"moe_layers": [0, 1]}, "num_local_experts=0"),  # MoE layers named, no experts
    ({"interleave_moe_layer_step": 1, "moe_layers": None}, "num_local_experts=0"),  # derived MoE layers
    ({"num_local_experts": 4, "moe_layers": [1], "num_experts_per_tok": 5}, "num_experts_per_tok"),
    ({"num_local_experts": 4, "moe_layers": [1], "num_experts_per_tok": 0}, "num_experts_per_tok=0"),
    ({"num_local_experts": -1}, "num_local_experts must be a non-negative integer"),
    ({"interleave_moe_layer_step": -2}, "interleave_moe_layer_step must be a non-negative integer"),
])
def test_moe_layers_without_experts_are_refused_by_name(changes, match):
    d = to_hf_dict(DENSE)
    d["text_config"] |= changes
    with pytest.raises(ConfigError, match=match):
        from_hf_dict(d)


def test_info_plan_and_lora_cope_with_no_experts(tmp_path):
    c = census(DENSE)
    assert "routed_experts" not in c.by_component and "router" not in c.by_component
    assert c.to_dict()["experts"] == 0 and c.to_dict()["moe_layers"] == []
    assert "experts: none" in render(c, "dense")
    for train in (False, True):
        for dtype in ("bf16", "fp8", "int4"):
            plan(DENSE, "dense", gpus=2, dtype=dtype, train=train)
    torch.manual_seed(0)
    model = Transformer(DENSE.replace(vision=None))
    with pytest.raises(ValueError, match="'experts'"):  # LoRA's default targets ask for routed experts
        apply_lora(model, LoRAConfig(rank=2))
    lora = LoRAConfig(rank=2, targets=tuple(t for t in LoRAConfig().targets if t != "experts"))
    assert len(apply_lora(model, lora)) == 7 * DENSE.n_layers  # q k v o, the dense FFN's gate up down
    save_peft_adapter(model, lora, tmp_path, "base")
    assert json.loads((tmp_path / "adapter_config.json").read_text())["target_parameters"] is None


def test_quantized_dense_checkpoint_round_trip(models, tmp_path):
    from herd.infer.quantize import quantize

    _, _, d = models
    q = quantize(checkpoint.load(d).eval(), "int8")
    checkpoint.save_quantized(q, tmp_path / "q")
    again = checkpoint.load(tmp_path / "q").eval()
    assert again.quantization.scheme == "int8"
    ids = torch.tensor([prompt(1)])
    with torch.no_grad():
        assert torch.equal(again(ids, pixel_values=tiles(1)), q(ids, pixel_values=tiles(1)))
