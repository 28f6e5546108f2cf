"""Long context (iRoPE): temperature tuning as transformers computes it, and a KV cache whose memory grows with
the context only in the global (NoPE) layers, checked at a scaled-down chunk and context."""

import math

import pytest
import torch
from conftest import herd_from_hf, hf_text_model, small_config

from herd.infer.cache import KVCache
from herd.infer.engine import Engine
from herd.infer.sampling import SamplingParams
from herd.model.attention import temperature_scale


@pytest.mark.parametrize("floor_scale,attn_scale", [(8192, 0.1), (8, 0.1), (4, 0.5)])
def test_temperature_scale_is_one_below_floor_then_logarithmic(floor_scale, attn_scale):
    positions = torch.tensor([[0, 1, floor_scale - 2, floor_scale - 1, floor_scale, 3 * floor_scale + 7,
                               2**17, 10_000_000]])
    got = temperature_scale(positions, floor_scale, attn_scale).flatten().tolist()
    assert got[:3] == [1.0, 1.0, 1.0]  # exactly 1 while (position + 1) < floor_scale
    for p, g in zip(positions[0].tolist(), got):
        assert g == pytest.approx(math.log1p(math.floor((p + 1) / floor_scale)) * attn_scale + 1.0, rel=1e-6)
    assert got[-1] > got[-2] > got[4] > 1.0


def test_temperature_tuning_matches_transformers_far_past_the_floor():
    """floor 4 and scale 0.5: at 96 positions the NoPE layers' queries are scaled by up to 2.6x; the logits equal
    transformers' Llama4ForCausalLM, and turning the tuning off in herd alone changes them."""
    cfg = small_config(floor_scale=4, attn_scale=0.5, attention_chunk_size=16)
    hf = hf_text_model(cfg)
    ours = herd_from_hf(hf, cfg)
    tokens = torch.randint(0, cfg.vocab_size, (1, 96), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ref, got = hf(tokens).logits, ours(tokens)
        untuned = herd_from_hf(hf, cfg.replace(attn_temperature_tuning=False))(tokens)
    scale = ref.abs().max()
    assert (got - ref).abs().max() <= 1e-4 * scale
    assert (untuned - ref).abs().max() > 1e-2 * scale


def _layer_bytes(cache: KVCache) -> list[int]:
    return [k.numel() * k.element_size() + v.numel() * v.element_size() for k, v in zip(cache.k, cache.v)]


def test_kv_memory_grows_only_in_global_layers():
    """Scout's 1M-token layout scaled down: chunk 16 for the RoPE layers, every 4th layer NoPE/global. From 1K
    to 16K positions the global layers' cache grows 16x and the local layers' stays one chunk."""
    cfg = small_config(n_layers=8, attention_chunk_size=16)
    small, large = (KVCache(cfg, 1, n, torch.bfloat16) for n in (1024, 16384))
    per_position = 2 * cfg.n_kv_heads * cfg.head_dim * 2  # k and v, bf16
    for layer, (a, b) in enumerate(zip(_layer_bytes(small), _layer_bytes(large))):
        if cfg.is_chunked(layer):
            assert a == b == 16 * per_position
        else:
            assert (a, b) == (1024 * per_position, 16384 * per_position)
    assert sum(not cfg.is_chunked(i) for i in range(8)) == 2


def test_long_prompt_decode_equals_full_forward():
    """A 1200-token prompt (75 chunks) through the chunked prefill and the ring-buffer cache: greedy tokens
    equal argmax of full forwards without a cache."""
    cfg = small_config(attention_chunk_size=16, floor_scale=8, max_seq_len=2048)
    torch.manual_seed(0)
    model = herd_from_hf(hf_text_model(cfg), cfg)
    prompt = torch.randint(0, cfg.vocab_size, (1200,), generator=torch.Generator().manual_seed(4)).tolist()
    (c,) = Engine(model, prefill_chunk=256).generate(
        [prompt], SamplingParams(max_new_tokens=3, stop_ids=frozenset()))
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(3):
            ids.append(int(model(torch.tensor([ids]))[0, -1].argmax()))
    assert c.token_ids == ids[1200:]
