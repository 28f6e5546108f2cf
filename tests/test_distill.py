"""Distillation losses (herd.train.distill) against hand formulas, and the offline teacher cache
(herd.train.distill_cache) against the online teacher."""

import argparse
import base64
import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import PICO

from herd import checkpoint
from herd.config import preset
from herd.errors import ConfigError
from herd.model import Transformer
from herd.tokenizer import Tokenizer
from herd.train.data import PackedLoader, TokenShards, tokenize_to_shards
from herd.train.distill import (
    DistillSpec,
    TeacherTargets,
    check_compatible,
    distill_loss,
    schedule_value,
    soft_term,
    topk_error_bound,
)
from herd.train.distill_cache import (
    MANIFEST,
    DistillLoader,
    TeacherCache,
    add_arguments,
    main,
    measure_cache_error,
    write_cache,
)
from herd.train.losses import cross_entropy

B, T, V = 2, 5, 11


def _inputs(seed=0, scale=2.0):
    g = torch.Generator().manual_seed(seed)
    student = (scale * torch.randn(B, T, V, generator=g, dtype=torch.float64)).requires_grad_()
    teacher = 3.0 * torch.randn(B, T, V, generator=g, dtype=torch.float64)
    targets = torch.randint(0, V, (B, T), generator=g)
    mask = torch.ones(B, T, dtype=torch.bool)
    mask[0, 0] = mask[1, 3] = False
    return student, teacher, targets, mask


# ---------------------------------------------------------------------------------------------- hand formulas


def hand_divergence(z_s, z_t, kind, beta, tau):
    """D per token [B, T] from explicit probabilities (float64)."""
    p = torch.exp(z_t / tau) / torch.exp(z_t / tau).sum(-1, keepdim=True)
    q = torch.exp(z_s / tau) / torch.exp(z_s / tau).sum(-1, keepdim=True)
    if kind == "forward_kl":
        return (p * torch.log(p / q)).sum(-1)
    if kind == "reverse_kl":
        return (q * torch.log(q / p)).sum(-1)
    m = beta * p + (1 - beta) * q
    return beta * (p * torch.log(p / m)).sum(-1) + (1 - beta) * (q * torch.log(q / m)).sum(-1)


def hand_loss(z_s, z_t, targets, mask, a, kind, beta, tau):
    probs = torch.exp(z_s) / torch.exp(z_s).sum(-1, keepdim=True)
    ce = -torch.log(probs.gather(-1, targets[..., None])[..., 0])
    per = (1 - a) * ce + a * tau ** 2 * hand_divergence(z_s, z_t, kind, beta, tau)
    m = mask.double()
    return (per * m).sum() / m.sum()


def grad(loss, x):
    return torch.autograd.grad(loss, x)[0]


@pytest.mark.parametrize("kind,beta", [("forward_kl", 0.5), ("reverse_kl", 0.5), ("jsd", 0.3), ("jsd", 0.5)])
@pytest.mark.parametrize("tau", [1.0, 2.0])
def test_divergences_equal_the_hand_formula_with_gradients(kind, beta, tau):
    z_s, z_t, y, mask = _inputs()
    spec = DistillSpec(divergence=kind, beta=beta, temperature=tau, weight="fixed", alpha=0.3)
    loss, parts = distill_loss(z_s, y, mask, TeacherTargets(logits=z_t), spec)
    want = hand_loss(z_s, z_t, y, mask, 0.3, kind, beta, tau)
    torch.testing.assert_close(loss.double(), want, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(grad(loss, z_s).double(), grad(want, z_s), rtol=1e-5, atol=1e-7)
    assert not parts["ce"].requires_grad and not parts["soft"].requires_grad
    assert parts["alpha"] == pytest.approx(0.3 * mask.sum() / mask.sum())


def test_kl_gradients_equal_the_analytic_ones():
    """∂/∂z_S of the loss: (1-a)(softmax(z) - onehot) + a·τ·(q - p) (forward KL), and a·τ·q(log q/p - KL(q‖p))
    (reverse KL), per unmasked token over n."""
    z_s, z_t, y, mask = _inputs(1)
    a, tau = 0.4, 1.5
    n = mask.sum()
    p, q = F.softmax(z_t / tau, -1), F.softmax(z_s.detach() / tau, -1)
    hard = F.softmax(z_s.detach(), -1) - F.one_hot(y, V)
    m = mask[..., None].double() / n
    for kind, soft in (("forward_kl", tau * (q - p)),
                       ("reverse_kl", tau * q * (torch.log(q / p) - (q * torch.log(q / p)).sum(-1, keepdim=True)))):
        spec = DistillSpec(divergence=kind, temperature=tau, alpha=a)
        loss, _ = distill_loss(z_s, y, mask, TeacherTargets(logits=z_t), spec)
        torch.testing.assert_close(grad(loss, z_s).double(), m * ((1 - a) * hard + a * soft), rtol=1e-5, atol=1e-8)


def test_jsd_endpoints_are_the_kls():
    z_s, z_t, _, _ = _inputs(2)
    t = TeacherTargets(logits=z_t)
    for beta, kind in ((0.0, "forward_kl"), (1.0, "reverse_kl")):
        got = soft_term(z_s, t, DistillSpec(divergence="jsd", beta=beta, temperature=1.3))
        want = soft_term(z_s, t, DistillSpec(divergence=kind, temperature=1.3))
        torch.testing.assert_close(got, want)


@pytest.mark.parametrize("beta", [0.0, 0.3, 1.0])
def test_jsd_equals_trl_generalized_jsd_loss(beta):
    gkd = pytest.importorskip("trl.experimental.gkd.gkd_trainer", reason="TRL's GKD trainer is not installed")
    z_s, z_t, y, mask = _inputs(3)
    z_s, z_t = z_s.detach().float(), z_t.float()
    labels = torch.where(mask, y, -100)
    tau = 0.9
    trl = gkd.GKDTrainer.generalized_jsd_loss(z_s, z_t, labels=labels, beta=beta, temperature=tau)
    ours, _ = distill_loss(z_s, y, mask, TeacherTargets(logits=z_t),
                           DistillSpec(divergence="jsd", beta=beta, temperature=tau, alpha=1.0))
    torch.testing.assert_close(ours, tau ** 2 * trl, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------------------------- weights


def test_schedules():
    s = DistillSpec(weight="scheduled", alpha0=0.9, alpha1=0.3, schedule="cosine")
    assert schedule_value(s, 0, 11) == pytest.approx(0.9)
    assert schedule_value(s, 5, 11) == pytest.approx(0.6)
    assert schedule_value(s, 10, 11) == pytest.approx(0.3)
    assert schedule_value(s, 99, 11) == pytest.approx(0.3)
    lin = DistillSpec(weight="scheduled", alpha0=0.9, alpha1=0.3, schedule="linear")
    assert schedule_value(lin, 2, 11) == pytest.approx(0.9 - 0.6 * 0.2)
    z_s, z_t, y, mask = _inputs(4)
    loss, _ = distill_loss(z_s, y, mask, TeacherTargets(logits=z_t), s, step=3, total_steps=11)
    a = 0.3 + 0.6 * 0.5 * (1 + math.cos(math.pi * 0.3))
    torch.testing.assert_close(loss.double(), hand_loss(z_s, z_t, y, mask, a, "forward_kl", 0.5, 1.0))


@pytest.mark.parametrize("confidence", ["teacher_prob", "teacher_entropy", "gap"])
@pytest.mark.parametrize("kind", ["forward_kl", "jsd"])
def test_dynamic_weights_equal_the_hand_formula_and_are_detached(confidence, kind):
    z_s, z_t, y, mask = _inputs(5)
    tau, step, total = 2.0, 1, 4
    spec = DistillSpec(divergence=kind, beta=0.4, temperature=tau, weight="dynamic", alpha0=1.0, alpha1=0.5,
                       schedule="linear", confidence=confidence)
    s = 1.0 - 0.5 * step / (total - 1)
    with torch.no_grad():  # the hand weights: constants
        p1 = torch.exp(z_t) / torch.exp(z_t).sum(-1, keepdim=True)
        pt_y = p1.gather(-1, y[..., None])[..., 0]
        if confidence == "teacher_prob":
            c = pt_y
        elif confidence == "teacher_entropy":
            c = 1 - (-(p1 * torch.log(p1)).sum(-1)) / math.log(V)
        else:
            ce_s = -torch.log_softmax(z_s, -1).gather(-1, y[..., None])[..., 0]
            c = 1 - torch.exp(-ce_s / -torch.log(pt_y))
        a = (s * c).clamp(0, 1)
    loss, parts = distill_loss(z_s, y, mask, TeacherTargets(logits=z_t), spec, step=step, total_steps=total)
    want = hand_loss(z_s, z_t, y, mask, a, kind, 0.4, tau)
    torch.testing.assert_close(loss.double(), want, rtol=1e-6, atol=1e-7)
    # the hand loss holds a constant: equal gradients mean none flows through a_t
    torch.testing.assert_close(grad(loss, z_s).double(), grad(want, z_s), rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(parts["alpha"].double(), (a * mask).sum() / mask.sum())


@pytest.mark.parametrize("spec", [DistillSpec(weight="fixed", alpha=0.0, divergence="jsd"),
                                  DistillSpec(weight="scheduled", alpha0=0.0, alpha1=0.0, temperature=2.0),
                                  DistillSpec(weight="dynamic", alpha0=0.0, alpha1=0.0, confidence="gap")])
def test_weight_zero_is_plain_cross_entropy_exactly(spec):
    z_s, z_t, y, mask = _inputs(6)
    z = z_s.detach().float().requires_grad_()
    for n_tokens, z_loss in ((None, 0.0), (17.0, 1e-3)):
        for teacher in (TeacherTargets(logits=z_t.float()), None):
            want, want_parts = cross_entropy(z, y, mask, z_loss=z_loss, n_tokens=n_tokens)
            got, parts = distill_loss(z, y, mask, teacher, spec, n_tokens=n_tokens, z_loss=z_loss)
            assert torch.equal(got, want) and torch.equal(parts["ce"], want_parts["ce"])
            assert torch.equal(grad(got, z), grad(want, z))


def test_invalid_tokens_train_on_cross_entropy_alone():
    z_s, z_t, y, mask = _inputs(7)
    valid = torch.zeros(B, T, dtype=torch.bool)
    valid[1] = True
    got, _ = distill_loss(z_s, y, mask, TeacherTargets(logits=z_t, valid=valid), DistillSpec(alpha=0.5))
    a = torch.where(valid, 0.5, 0.0).double()
    torch.testing.assert_close(got.double(), hand_loss(z_s, z_t, y, mask, a, "forward_kl", 0.5, 1.0))


def test_spec_errors_name_the_key():
    with pytest.raises(ConfigError, match="distill.divergence"):
        DistillSpec(divergence="kl")
    with pytest.raises(ConfigError, match="distill.alpha0"):
        DistillSpec(alpha0=1.5)
    with pytest.raises(ConfigError, match="unknown keys.*'tau'"):
        DistillSpec.from_dict({"tau": 2.0})
    assert DistillSpec.from_dict({"temperature": 2.0}).temperature == 2.0


# ---------------------------------------------------------------------------------------------- top-k targets


@pytest.mark.parametrize("kind", ["forward_kl", "reverse_kl", "jsd"])
@pytest.mark.parametrize("weight", ["fixed", "dynamic"])
def test_topk_with_k_equal_to_v_is_the_online_loss(kind, weight):
    z_s, z_t, y, mask = _inputs(8)
    z = z_s.detach().float().requires_grad_()
    spec = DistillSpec(divergence=kind, temperature=1.7, weight=weight, alpha=0.6, confidence="gap")
    online, p_on = distill_loss(z, y, mask, TeacherTargets(logits=z_t.float()), spec)
    cached, p_ca = distill_loss(z, y, mask, TeacherTargets.topk(z_t.float(), y, V, 1.7), spec)
    torch.testing.assert_close(cached, online, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(p_ca["alpha"], p_on["alpha"])
    torch.testing.assert_close(grad(cached, z), grad(online, z), rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("kind,beta", [("forward_kl", 0.5), ("jsd", 0.5), ("jsd", 0.9), ("reverse_kl", 0.5)])
def test_small_k_is_a_lower_bound_within_the_documented_bound(kind, beta):
    z_s, z_t, y, mask = _inputs(9, scale=1.0)
    spec = DistillSpec(divergence=kind, beta=beta, temperature=1.0)
    full = soft_term(z_s.detach().float(), TeacherTargets(logits=z_t.float()), spec)
    for k in (1, 3, 6, V - 1):
        top = TeacherTargets.topk(z_t.float(), y, k)
        approx = soft_term(z_s.detach().float(), top, spec)
        gap = full - approx
        assert (gap >= -1e-6).all()
        bound = topk_error_bound(z_s.detach().float(), top, spec)
        if kind != "reverse_kl":
            assert (gap <= bound + 1e-6).all(), (k, gap, bound)
            if kind == "jsd":
                m = beta * top.tail_logprob.exp().flatten() + (1 - beta) * 1.0
                assert (bound <= m * math.log(2) + 1e-6).all()
        else:
            assert torch.isinf(bound).all()
    top = TeacherTargets.topk(z_t.float(), y, V)
    assert torch.equal(topk_error_bound(z_s.float(), top, spec), torch.zeros(B * T))


def test_cache_temperature_must_match():
    z_s, z_t, y, mask = _inputs(10)
    with pytest.raises(ConfigError, match="temperature 1.0"):
        distill_loss(z_s, y, mask, TeacherTargets.topk(z_t, y, 4), DistillSpec(temperature=2.0))


# ---------------------------------------------------------------------------------------------- the cache

SMALL_V = 64


def tiny_model(seed, vocab=SMALL_V, std=0.3):
    cfg = preset("tiny").replace(vocab_size=vocab, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=8,
                                 expert_hidden_dim=32, dense_hidden_dim=64, attention_chunk_size=8, max_seq_len=256,
                                 bos_token_id=vocab - 2, eos_token_id=vocab - 1, pad_token_id=None)
    torch.manual_seed(seed)
    model = Transformer(cfg).eval()
    model.init_weights(std=std)
    return model


class SmallTok:
    """ids 1..59 from characters; bos 62, eos 63."""

    bos_id, eos_id = SMALL_V - 2, SMALL_V - 1

    def encode(self, text):
        return [ord(c) % 59 + 1 for c in text]


@pytest.fixture(scope="module")
def small_data(tmp_path_factory):
    d = tmp_path_factory.mktemp("distill")
    rng = np.random.default_rng(0)
    words = ["the", "king", "queen", "speaks", "of", "love", "and", "death", "now"]
    texts = [" ".join(rng.choice(words, int(rng.integers(3, 20)))) for _ in range(24)]
    (d / "a.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    tokenize_to_shards([d / "a.jsonl"], d / "shards", SmallTok(), shard_tokens=300, bos_id=SmallTok.bos_id,
                       eos_id=SmallTok.eos_id)
    return TokenShards(d / "shards")


def _files(path):
    return {f.name: f.read_bytes() for f in sorted(path.glob("shard_*.npy"))}


def test_cache_round_trip_k_equal_v_matches_online(tmp_path, small_data):
    assert len(small_data) >= 3
    teacher, student = tiny_model(0), tiny_model(1, std=0.1)
    seq = 16
    manifest = write_cache(teacher, small_data, tmp_path / "c", SMALL_V, seq, tokenizer="small", dtype="fp32",
                           batch_size=3, progress=False, chunk_bytes=7 * 4 * SMALL_V)  # chunks of 7 tokens
    assert manifest["complete"] and manifest["bytes_per_token"] == SMALL_V * 8 + 12
    cache = TeacherCache(tmp_path / "c")
    loader = DistillLoader([(small_data, 1.0)], seq, 4, seed=3, caches=[cache])
    plain = PackedLoader([(small_data, 1.0)], seq, 4, seed=3)
    spec = DistillSpec(divergence="jsd", beta=0.5, weight="dynamic", confidence="teacher_entropy", alpha0=1.0,
                       alpha1=1.0)
    for _ in range(3):
        batch, ref = loader.next_batch(), plain.next_batch()
        for k, v in ref.items():
            assert torch.equal(batch[k], v), k
        assert batch["teacher_valid"].all()
        online = TeacherTargets(logits=teacher(batch["tokens"], positions=batch["positions"],
                                               doc_ids=batch["doc_ids"]).detach())
        want = TeacherTargets.topk(online.logits, batch["targets"], SMALL_V)
        got = TeacherTargets.from_batch(batch, cache.temperature)
        torch.testing.assert_close(got.logprobs, want.logprobs, rtol=0, atol=1e-5)
        torch.testing.assert_close(got.target_logprob, want.target_logprob, rtol=0, atol=1e-5)
        torch.testing.assert_close(got.entropy, want.entropy, rtol=0, atol=1e-5)
        z = student(batch["tokens"], positions=batch["positions"], doc_ids=batch["doc_ids"]).detach()
        l_on, _ = distill_loss(z, batch["targets"], batch["loss_mask"], online, spec)
        l_ca, _ = distill_loss(z, batch["targets"], batch["loss_mask"], got, spec)
        torch.testing.assert_close(l_ca, l_on, rtol=1e-5, atol=1e-6)
    assert loader.state_dict() == plain.state_dict()
    m = measure_cache_error(student, teacher, cache, small_data, DistillSpec(alpha=1.0), batches=2)
    assert m["abs_diff"] < 1e-5 and m["bound"] == 0.0 and m["tail_mass_mean"] == 0.0


def test_small_k_cache_difference_is_bounded_and_measured(tmp_path, small_data):
    teacher, student = tiny_model(0), tiny_model(1, std=0.1)
    write_cache(teacher, small_data, tmp_path / "c", 8, 16, tokenizer="small", dtype="fp16", progress=False)
    cache = TeacherCache(tmp_path / "c")
    assert cache.bytes_per_token == 8 * 6 + 12
    for spec in (DistillSpec(divergence="jsd", alpha=1.0), DistillSpec(divergence="forward_kl", alpha=1.0)):
        m = measure_cache_error(student, teacher, cache, small_data, spec, batches=3)
        assert 0 < m["tail_mass_mean"] < 1
        # the cached soft term is a lower bound (up to fp16 rounding) within the documented bound
        assert m["soft_cache"] <= m["soft_online"] + 1e-3
        assert m["soft_abs_diff"] <= m["bound"] + 1e-3
        assert m["abs_diff"] == pytest.approx(m["soft_abs_diff"], abs=1e-6)  # the hard term is exact


def test_cache_resumes_a_half_written_cache(tmp_path, small_data):
    teacher = tiny_model(0)
    kw = dict(tokenizer="small", top_k=5, seq_len=16, progress=False)
    write_cache(teacher, small_data, tmp_path / "whole", **kw)
    first = write_cache(teacher, small_data, tmp_path / "half", stop_after_shards=1, **kw)
    assert [s["done"] for s in first["shards"]][:2] == [True, False] and not first["complete"]
    with pytest.raises(ConfigError, match="unfinished"):
        TeacherCache(tmp_path / "half")
    # an interrupted second shard: a partial temporary file, no manifest entry
    (tmp_path / "half" / "shard_00001.ids.npy.tmp").write_bytes(b"partial")
    with pytest.raises(ConfigError, match="top_k=5, not 6"):
        write_cache(teacher, small_data, tmp_path / "half", **{**kw, "top_k": 6})
    done = write_cache(teacher, small_data, tmp_path / "half", **kw)
    assert done["complete"] and not list((tmp_path / "half").glob("*.tmp"))
    assert _files(tmp_path / "half") == _files(tmp_path / "whole")
    whole = json.loads((tmp_path / "whole" / MANIFEST).read_text())
    assert done["shards"] == whole["shards"]


def test_cache_refuses_other_data_and_seq_len(tmp_path, small_data):
    write_cache(tiny_model(0), small_data, tmp_path / "c", 4, 16, tokenizer="small", progress=False)
    with pytest.raises(ConfigError, match="seq_len 16"):
        DistillLoader([(small_data, 1.0)], 8, 2, caches=[tmp_path / "c"])
    tokenize_to_shards([small_data.path.parent / "a.jsonl"], tmp_path / "other", SmallTok(), shard_tokens=500)
    with pytest.raises(ConfigError, match="fingerprint"):
        DistillLoader([(TokenShards(tmp_path / "other"), 1.0)], 16, 2, caches=[tmp_path / "c"])
    with pytest.raises(ConfigError, match="outside the teacher's vocabulary of 32"):
        write_cache(tiny_model(0, vocab=32), small_data, tmp_path / "d", 4, 16, tokenizer="small", progress=False)


def test_loader_mixes_cached_and_uncached_sources(tmp_path, small_data):
    write_cache(tiny_model(0), small_data, tmp_path / "c", 4, 16, tokenizer="small", progress=False)
    loader = DistillLoader([(small_data, 1.0), (small_data, 1.0)], 16, 6, seed=1, caches=[tmp_path / "c", None])
    batch = loader.next_batch()
    rows_valid = batch["teacher_valid"].all(-1)
    assert torch.equal(rows_valid, batch["source"] == 0) and batch["teacher_ids"].shape == (6, 16, 4)


# ---------------------------------------------------------------------------------------------- tokenizers


def byte_tokenizer_dir(path):
    path.mkdir(parents=True, exist_ok=True)
    (path / "tokenizer.model").write_text("".join(f"{base64.b64encode(bytes([i])).decode()} {i}\n"
                                                  for i in range(256)))
    return Tokenizer.load(path / "tokenizer.model")


def model_dir(path, tok_src, vocab, seed):
    tok = byte_tokenizer_dir(path) if tok_src is None else None
    if tok_src is not None:
        path.mkdir(parents=True, exist_ok=True)
        (path / "tokenizer.model").write_bytes(tok_src.read_bytes())
        tok = Tokenizer.load(path / "tokenizer.model")
    model = tiny_model(seed, vocab=vocab)
    model.cfg = model.cfg.replace(bos_token_id=tok.bos_id, eos_token_id=tok.eos_id)
    checkpoint.save(model, path)
    return path


def test_mismatched_tokenizer_or_vocabulary_is_refused_naming_both(tmp_path):
    byte = model_dir(tmp_path / "byte", None, 2304, 0)
    pico = model_dir(tmp_path / "pico", PICO / "tokenizer.model", 6144, 0)
    wide = model_dir(tmp_path / "wide", byte / "tokenizer.model", 2400, 1)
    assert check_compatible(byte, model_dir(tmp_path / "b2", byte / "tokenizer.model", 2304, 2))
    with pytest.raises(ConfigError, match=f"tokenizers differ: student {byte}.*teacher {pico}"):
        check_compatible(byte, pico)
    with pytest.raises(ConfigError, match=f"vocabulary sizes differ: student {byte} has 2304.*teacher {wide} 2400"):
        check_compatible(byte, wide)
    tok = Tokenizer.load(byte / "tokenizer.model")
    with pytest.raises(ConfigError, match="vocabulary sizes differ"):
        check_compatible((tok, 2304), (tok, 2400))


def test_command_writes_and_measures(tmp_path, capsys):
    teacher = model_dir(tmp_path / "teacher", None, 2304, 0)
    student = model_dir(tmp_path / "student", teacher / "tokenizer.model", 2304, 1)
    tok = Tokenizer.load(teacher / "tokenizer.model")
    (tmp_path / "a.txt").write_text("the king and the queen speak of love and death. " * 8)
    tokenize_to_shards([tmp_path / "a.txt"], tmp_path / "data", tok, bos_id=tok.bos_id, eos_id=tok.eos_id)
    p = argparse.ArgumentParser()
    add_arguments(p)
    args = p.parse_args([str(teacher), str(tmp_path / "data"), "--top-k", "8", "--seq-len", "32", "--out",
                         str(tmp_path / "cache"), "--measure", str(student), "--measure-batches", "1",
                         "--divergence", "jsd", "--no-progress", "--json"])
    assert main(args) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["manifest"]["complete"] and out["manifest"]["top_k"] == 8
    assert out["measure"]["soft_abs_diff"] <= out["measure"]["bound"] + 1e-3
    cache = TeacherCache(tmp_path / "cache")
    cache.check_student(student)
    other = model_dir(tmp_path / "other", PICO / "tokenizer.model", 6144, 3)
    with pytest.raises(ConfigError, match=f"tokenizers differ: student {other}.*teacher {teacher}"):
        cache.check_student(other)
    args.measure = other
    with pytest.raises(ConfigError, match="tokenizers differ"):
        main(args)

