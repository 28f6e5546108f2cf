"""Logits and greedy continuations equal transformers' Llama 4 on random tiny configs."""

import pytest
import torch
from conftest import herd_from_hf, hf_text_model, small_config

CASES = {
    # MoE on every layer, top-1, QK norm, llama3 RoPE scaling, chunk 16: prompts cross >2 chunks,
    # floor_scale 8 so NoPE temperature tuning is active
    "moe-all-top1-qknorm": dict(),
    "interleaved-top2-noqknorm": dict(interleave_moe_layer_step=2, top_k=2, use_qk_norm=False, n_experts=8),
    "no-scaling-8layers": dict(n_layers=8, rope_scaling=None, attn_temperature_tuning=False),
    "no-chunking": dict(attention_chunk_size=None),
}


@pytest.mark.parametrize("case", CASES)
def test_logits_match_transformers(case):
    cfg = small_config(**CASES[case])
    hf = hf_text_model(cfg)
    ours = herd_from_hf(hf, cfg)
    tokens = torch.randint(0, cfg.vocab_size, (2, 50), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = hf(tokens).logits
        got = ours(tokens)
    scale = ref.abs().max()
    assert (got - ref).abs().max() <= 1e-4 * scale, f"max diff {(got - ref).abs().max():.3g} vs scale {scale:.3g}"


def test_bf16_close_to_transformers():
    cfg = small_config()
    hf = hf_text_model(cfg).to(torch.bfloat16)
    ours = herd_from_hf(hf, cfg)
    tokens = torch.randint(0, cfg.vocab_size, (1, 40), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ref, got = hf(tokens).logits.float(), ours(tokens).float()
    assert (got - ref).abs().max() <= 3e-2 * ref.abs().max()


@pytest.mark.parametrize("case", ["moe-all-top1-qknorm", "interleaved-top2-noqknorm"])
def test_greedy_continuation_matches_transformers(case):
    from herd.infer.engine import Engine
    from herd.infer.sampling import SamplingParams

    cfg = small_config(**CASES[case])
    hf = hf_text_model(cfg)
    ours = herd_from_hf(hf, cfg)
    prompt = torch.randint(0, cfg.vocab_size, (1, 20), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ref = hf.generate(prompt, max_new_tokens=32, do_sample=False, eos_token_id=None, pad_token_id=0,
                          min_new_tokens=32)[0, 20:].tolist()
    (c,) = Engine(ours).generate([prompt[0].tolist()], SamplingParams(max_new_tokens=32, stop_ids=frozenset()))
    got = c.token_ids
    assert got == ref
