"""The generation engine: chunk-aware cache, chunked prefill, batching, sampling, stop rules, streaming."""

import pytest
import torch
from conftest import greedy_without_cache, herd_from_hf, hf_text_model, random_model, small_config

from herd.config import preset
from herd.infer import core as core_module
from herd.infer.cache import KVCache
from herd.infer.engine import Engine
from herd.infer.sampling import SamplingParams, adjust_logits, filter_logits, sample
from herd.tokenizer import Tokenizer

NO_STOP = frozenset()


@pytest.mark.parametrize("prefill_chunk", [512, 7])
def test_greedy_equals_transformers_across_chunks(prefill_chunk):
    """chunk 16, prompt 50, 40 new tokens: prefill and decode cross several attention chunks and the ring
    buffer wraps; floor_scale 8 puts NoPE temperature tuning in play."""
    cfg = small_config(attention_chunk_size=16, floor_scale=8)
    hf = hf_text_model(cfg)
    ours = herd_from_hf(hf, cfg)
    prompt = torch.randint(0, cfg.vocab_size, (1, 50), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        ref = hf.generate(prompt, max_new_tokens=40, min_new_tokens=40, do_sample=False, eos_token_id=None,
                          pad_token_id=0)[0, 50:].tolist()
    (c,) = Engine(ours, prefill_chunk=prefill_chunk).generate([prompt[0].tolist()],
                                                              SamplingParams(max_new_tokens=40, stop_ids=NO_STOP))
    assert c.token_ids == ref and c.stop_reason == "length"


def test_chunked_cache_is_small():
    cfg = preset("tiny").replace(attention_chunk_size=64)
    chunked = KVCache(cfg, batch=1, max_len=4096, dtype=torch.bfloat16)
    full = KVCache(cfg, batch=1, max_len=4096, dtype=torch.bfloat16, chunked=False)
    assert chunked.nbytes() <= 0.3 * full.nbytes()
    # measured, not computed: what the allocator holds for the buffers
    held = sum(t.untyped_storage().nbytes() for t in (*chunked.k, *chunked.v))
    assert held <= 0.3 * sum(t.untyped_storage().nbytes() for t in (*full.k, *full.v))


def test_batched_greedy_equals_single():
    model = random_model(attention_chunk_size=8)
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(0, 512, (n,), generator=g).tolist() for n in (3, 17, 9, 30)]
    engine = Engine(model, prefill_chunk=5)
    params = SamplingParams(max_new_tokens=20, stop_ids=NO_STOP)
    batched = [c.token_ids for c in engine.generate(prompts, params)]
    single = [engine.generate([p], params)[0].token_ids for p in prompts]
    assert batched == single
    assert batched[1] == greedy_without_cache(model, prompts[1], 20)  # the cache changes nothing


def test_rows_stop_independently():
    model = random_model()
    prompts = [[1, 2, 3], [4, 5]]
    engine = Engine(model)
    free = engine.generate(prompts, SamplingParams(max_new_tokens=8, stop_ids=NO_STOP))
    stop_at = free[0].token_ids[2]
    out = engine.generate(prompts, SamplingParams(max_new_tokens=8, stop_ids=frozenset({stop_at})))
    for f, o in zip(free, out):
        first = f.token_ids.index(stop_at) if stop_at in f.token_ids else None
        assert o.token_ids == (f.token_ids if first is None else f.token_ids[:first + 1])
        assert o.stop_reason == ("length" if first is None else "stop_token")


def test_seeded_sampling_is_reproducible_and_top_k_1_is_greedy():
    model = random_model()
    engine = Engine(model)
    p = SamplingParams(max_new_tokens=12, temperature=1.0, seed=7, stop_ids=NO_STOP)
    a, b = engine.generate([[1, 2, 3]], p)[0], engine.generate([[1, 2, 3]], p)[0]
    assert a.token_ids == b.token_ids
    greedy = engine.generate([[1, 2, 3]], SamplingParams(max_new_tokens=12, stop_ids=NO_STOP))[0]
    topk1 = engine.generate([[1, 2, 3]], SamplingParams(max_new_tokens=12, temperature=1.5, top_k=1, seed=1,
                                                        stop_ids=NO_STOP))[0]
    assert topk1.token_ids == greedy.token_ids


def test_filters():
    logits = torch.tensor([[4.0, 3.0, 2.0, 1.0, 0.0]])
    keep = lambda **kw: torch.isfinite(filter_logits(logits, SamplingParams(temperature=1.0, **kw)))[0].tolist()  # noqa
    assert keep(top_k=2) == [True, True, False, False, False]
    probs = logits.softmax(-1)[0]  # 0.636, 0.234, 0.086, ...
    assert keep(top_p=0.5) == [True, False, False, False, False]
    assert keep(top_p=0.8) == [True, True, False, False, False]
    assert keep(min_p=0.3) == [True, True, False, False, False]  # 0.234 >= 0.3 * 0.636
    assert probs[2] < 0.3 * probs[0]
    seen = torch.tensor([[True, False, False, False, False]])
    assert sample(logits, SamplingParams(repetition_penalty=2.0), seen).item() == 1  # 4/2 = 2 < 3
    with pytest.raises(ValueError, match="top_p"):
        SamplingParams(top_p=0.0)


def test_openai_penalties_and_logit_bias():
    logits = torch.tensor([[4.0, 3.0, 2.0, 1.0, 0.0]])
    counts = torch.tensor([[2, 1, 0, 0, 0]])
    p = SamplingParams(presence_penalty=0.5, frequency_penalty=0.25, logit_bias={3: 10.0, 0: -100.0})
    # OpenAI's rule: logit - count * frequency - (count > 0) * presence, plus the bias
    assert adjust_logits(logits, p, counts).tolist() == [[4 - 100 - 0.5 - 0.5, 3 - 0.5 - 0.25, 2, 11, 0]]
    assert sample(logits, p, counts_BV=counts).item() == 3  # greedy over the adjusted logits


def test_penalties_and_logprobs_in_generation():
    """Frequency / presence penalties count the generated tokens (greedy with a large frequency penalty never
    repeats within the vocabulary); logprobs are the model's own (a forward over the whole text without a
    cache), and the top alternatives are sorted with the greedy token first."""
    model = random_model()
    prompt = [1, 5, 9, 2]
    engine = Engine(model)
    (c,) = engine.generate([prompt], SamplingParams(max_new_tokens=12, frequency_penalty=2.0, presence_penalty=100.0,
                                                     stop_ids=NO_STOP))
    assert len(set(c.token_ids)) == 12
    (c,) = engine.generate([prompt], SamplingParams(max_new_tokens=6, logprobs=3, stop_ids=NO_STOP))
    with torch.no_grad():
        logp = model(torch.tensor([prompt + c.token_ids[:-1]]))[0, len(prompt) - 1:].float().log_softmax(-1)
    assert [e.token for e in c.logprobs] == c.token_ids
    for j, e in enumerate(c.logprobs):
        assert e.logprob == pytest.approx(logp[j, e.token].item(), abs=1e-4)
        assert [i for i, _ in e.top] == logp[j].topk(3).indices.tolist() and e.top[0] == (e.token, e.logprob)
    (biased,) = engine.generate([prompt], SamplingParams(max_new_tokens=5, logit_bias={7: 100.0}, stop_ids=NO_STOP))
    assert biased.token_ids == [7] * 5

    # prompt logprobs, prefilled in chunks of 3 (a chunk's last position predicts the next chunk's first token)
    long_prompt = [1, 5, 9, 2, 7, 7, 3, 11, 4, 6, 8]
    engine.prefill_chunk = 3
    seq = core_module.Sequence(long_prompt, SamplingParams(max_new_tokens=1, stop_ids=NO_STOP), prompt_logprobs=2)
    for _ in engine.core(1, 32).run([seq]):
        pass
    with torch.no_grad():
        logp = model(torch.tensor([long_prompt]))[0].float().log_softmax(-1)
    assert [e.token for e in seq.scored] == long_prompt[1:]
    assert [e.logprob for e in seq.scored] == pytest.approx([logp[t, long_prompt[t + 1]].item() for t in range(10)],
                                                            abs=1e-4)


def test_stop_strings_cut_text_and_streaming_holds_back_prefixes(monkeypatch):
    tok = Tokenizer.load()
    text = "Hello world. END of story"
    script = tok.encode(text)
    model = random_model(vocab_size=202048)
    engine = Engine(model, tok)
    steps = iter(script + [tok.eot_id])
    monkeypatch.setattr(core_module, "sample", lambda logits, *a: torch.tensor([next(steps)]))  # scripted draws
    params = SamplingParams(max_new_tokens=50, stop=["END"], temperature=1.0)
    pieces = list(engine.stream([tok.bos_id], params))
    assert "".join(pieces) == "Hello world. "
    assert all("E" not in p for p in pieces)


def test_streaming_never_breaks_utf8(monkeypatch):
    tok = Tokenizer.load()
    text = "héllo 世界 🎉🐘 Ωμέγα"
    # one token per byte: every multi-byte character arrives split across several tokens
    ids = [tok.model.encode_single_token(bytes([b])) for b in text.encode()]
    assert tok.decode(ids) == text and len(ids) == len(text.encode())
    steps = iter(ids + [tok.eot_id])
    monkeypatch.setattr(core_module, "sample", lambda logits, *a: torch.tensor([next(steps)]))  # scripted draws
    engine = Engine(random_model(vocab_size=202048), tok)
    pieces = list(engine.stream([tok.bos_id], SamplingParams(max_new_tokens=100, temperature=1.0)))
    assert "".join(pieces) == text
    assert all("\ufffd" not in p for p in pieces) and len(pieces) < len(ids)


def test_bad_prompts_are_rejected_clearly():
    engine = Engine(random_model())
    with pytest.raises(ValueError, match="empty"):
        engine.generate([[]])
    with pytest.raises(ValueError, match="vocabulary"):
        engine.generate([[10_000]])
    with pytest.raises(ValueError, match="context"):
        engine.generate([[1]], SamplingParams(max_new_tokens=10**6))
    with pytest.raises(ValueError, match="no prompts"):
        engine.generate([])
    # a seeded batch draws row i from seed + i, wrapping at 2^64 as torch's generators do
    p = SamplingParams(max_new_tokens=3, temperature=1.0, seed=2**64 - 1, stop_ids=NO_STOP)
    wrapped = engine.generate([[1, 2], [1, 2]], p)
    assert wrapped[1].token_ids == engine.generate([[1, 2]], SamplingParams(**{**vars(p), "seed": 0}))[0].token_ids


def test_compiled_decode_equals_eager():
    """The fixed-shape cache step + torch.compile (fused matvec, fused attention, expert gather) changes nothing."""
    model = random_model(attention_chunk_size=8, n_layers=4)
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(0, 512, (n,), generator=g).tolist() for n in (11, 4)]
    params = SamplingParams(max_new_tokens=12, stop_ids=NO_STOP)
    eager = [c.token_ids for c in Engine(model).generate(prompts, params)]
    compiled = [c.token_ids for c in Engine(model, compile=True).generate(prompts, params)]
    assert compiled == eager
