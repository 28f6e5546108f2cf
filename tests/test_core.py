"""The decode core under generate and serve: any batch mix = one request alone = a no-cache argmax (fp32), with
and without the compiled step; batched and shared prefill; weights that change under a live engine."""

import pytest
import torch
from conftest import greedy_without_cache, random_model

from herd.infer.core import Sequence
from herd.infer.engine import Engine
from herd.infer.sampling import SamplingParams
from herd.serve.scheduler import Scheduler
from herd.serve.scheduler import Sequence as ServerSequence

NO_STOP = frozenset()


def _prompts():
    g = torch.Generator().manual_seed(3)
    rand = lambda n: torch.randint(3, 512, (n,), generator=g).tolist()  # noqa: E731
    same = rand(9)
    # lengths across prefill chunks of 4 and the 8-token attention chunk; two of equal length (batched prefill),
    # two identical (one prefill, the row copied)
    return [rand(13), rand(5), rand(5), same, same, rand(21), rand(2)]


def _serve(engine, prompts, params, max_batch, arrivals):
    """Greedy outputs through the scheduler; prompt i is submitted before iteration arrivals[i]."""
    sched, out = Scheduler(engine, max_batch=max_batch, max_len=64), {}
    if engine.compiled:  # what `herd serve --compile` does at start-up: it must leave the cache as it found it
        assert engine.warmup(sched.core.cache) == {2: [1, 2], 3: [1, 2, 3], 7: [1, 2, 4, 7]}[max_batch]
    seqs = [ServerSequence(p, sp, lambda ev, i=i: out.setdefault(i, []).append(ev))
            for i, (p, sp) in enumerate(zip(prompts, params))]
    for k in range(10_000):
        for i, when in enumerate(arrivals):
            if when == k:
                sched.submit([seqs[i]])
        if not sched.step() and k > max(arrivals):
            break
    assert not sched.core.busy and not sched.waiting
    return [s.row.ids for s in seqs], sched


@pytest.mark.parametrize("compile", [False, True], ids=["eager", "compiled"])
def test_any_batch_mix_equals_alone_and_no_cache_argmax(compile):
    model = random_model(attention_chunk_size=8, n_layers=4)
    engine = Engine(model, prefill_chunk=4, compile=compile)
    prompts = _prompts()
    params = [SamplingParams(max_new_tokens=6 + i % 4, stop_ids=NO_STOP) for i in range(len(prompts))]
    truth = [greedy_without_cache(model, p, sp.max_new_tokens) for p, sp in zip(prompts, params)]
    alone = [engine.generate([p], sp)[0].token_ids for p, sp in zip(prompts, params)]
    assert alone == truth
    same_params = SamplingParams(max_new_tokens=8, stop_ids=NO_STOP)
    batch = [c.token_ids for c in engine.generate(prompts, same_params)]
    assert batch == [t[:8] if len(t) >= 8 else greedy_without_cache(model, p, 8) for t, p in zip(truth, prompts)]
    mixes = [(3, [0, 0, 0, 1, 1, 4, 9]), (7, [0] * 7), (2, [0, 5, 5, 5, 6, 6, 20])]
    for max_batch, arrivals in mixes[:1] if compile else mixes:  # compiled: one mix (each bucket compiles)
        served, sched = _serve(engine, prompts, params, max_batch, arrivals)
        assert served == truth, (max_batch, arrivals)
        assert 2 <= sched.stats.max_running <= max_batch


def test_prefill_is_batched_and_shared_where_exact():
    model = random_model()
    engine = Engine(model, prefill_chunk=64)
    g = torch.Generator().manual_seed(0)
    a, b, c = (torch.randint(3, 512, (7,), generator=g).tolist() for _ in range(3))
    params = SamplingParams(max_new_tokens=5, stop_ids=NO_STOP)
    core = engine.core(4, 32)
    seqs = [Sequence(p, params) for p in (a, b, c, c)]
    steps = list(core.run(seqs))
    assert core.prefill_forwards == 1  # four prompts of 7 tokens: one [3, 7] forward, and the copy of c's row
    assert len(steps) == 1 + 4 and [s.row.ids for s in seqs] == [greedy_without_cache(model, p, 5) for p in
                                                                (a, b, c, c)]
    assert not core.busy and core.free_rows == 4


@pytest.mark.parametrize("compile", [False, True], ids=["eager", "compiled"])
def test_weight_update_on_a_live_engine_equals_a_fresh_engine(compile):
    old, new = random_model(seed=0), random_model(seed=1)
    engine = Engine(old, compile=compile)
    prompts = [[1, 5, 9, 2], [7, 3]]
    params = SamplingParams(max_new_tokens=8, stop_ids=NO_STOP)
    before = [c.token_ids for c in engine.generate(prompts, params)]
    engine.update_weights(new.state_dict())
    after = [c.token_ids for c in engine.generate(prompts, params)]
    assert after == [c.token_ids for c in Engine(new).generate(prompts, params)]
    assert after != before
    assert all(torch.equal(p, q) for p, q in zip(old.state_dict().values(), new.state_dict().values()))


def test_weight_update_mid_flight_re_prefills_what_the_core_holds():
    old, new = random_model(seed=0), random_model(seed=1)
    fresh = {k: v.clone() for k, v in new.state_dict().items()}
    prompt, params = [1, 5, 9, 2, 7], SamplingParams(max_new_tokens=10, stop_ids=NO_STOP)
    sched = Scheduler(Engine(old), max_batch=2, max_len=32)
    seq = ServerSequence(prompt, params, lambda ev: None)
    sched.submit([seq])
    for _ in range(4):
        sched.step()
    head = list(seq.row.ids)  # the prefill's token + 4 decoded
    assert len(head) == 5 and head == greedy_without_cache(old, prompt, 5)
    sched.update_weights(fresh)
    while sched.step():
        pass
    # the rest is what the new weights give after prompt + head
    assert seq.row.ids == head + greedy_without_cache(new, prompt + head, 5)


def test_a_bad_weight_update_changes_nothing():
    model = random_model()
    engine = Engine(model)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    bad = {"norm.weight": torch.zeros(model.cfg.dim), "lm_head.weight": torch.zeros(3, 3)}
    with pytest.raises(ValueError, match="lm_head.weight"):
        engine.update_weights(bad)
    with pytest.raises(KeyError, match="no parameter or buffer 'nope'"):
        engine.update_weights({"norm.weight": torch.zeros(model.cfg.dim), "nope": torch.zeros(1)})
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    assert engine.weights_version == 0


def test_a_sequence_that_cannot_start_fails_alone():
    engine = Engine(random_model())
    sched, events = Scheduler(engine, max_batch=2, max_len=32), {}
    good = ServerSequence([1, 2, 3], SamplingParams(max_new_tokens=3, stop_ids=NO_STOP),
                          lambda ev: events.setdefault("good", []).append(ev))
    bad = ServerSequence([1, 2, 3], SamplingParams(max_new_tokens=3, stop_ids=NO_STOP),
                         lambda ev: events.setdefault("bad", []).append(ev))
    bad.params.temperature = float("nan")  # a value that gets past validation and breaks sampling
    bad.params.seed = 1
    sched.submit([bad, good])
    while sched.step():
        pass
    assert events["good"][-1].finish_reason == "length" and events["good"][-1].n_tokens == 3
    assert events["bad"][-1].finish_reason == "error" and events["bad"][-1].error
