"""The training engine: recipe config, schedule, losses, document masking, exact resume, crash-safe checkpoints,
load balancing, a short run that learns, export to an HF directory, the BPE trainer."""

import json
import math
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from herd import checkpoint
from herd.config import preset
from herd.errors import ConfigError
from herd.model import Transformer
from herd.model.moe import MoE
from herd.tokenizer import Tokenizer
from herd.train import run_state
from herd.train.bpe import train_bpe
from herd.train.config import OptimSpec, TrainSpec, from_dict, load_run_config, to_toml
from herd.train.distributed import World
from herd.train.losses import cross_entropy, expert_load, load_balancing_loss
from herd.train.parallelize import parallelize
from herd.train.schedule import lr_at
from herd.train.trainer import Trainer

WORDS = ("the king queen sword crown river night day speak love death honour father son lord lady castle "
         "storm sea ghost friend enemy heart blood gold tower").split()


def _text(rng: np.random.Generator, n_sentences: int) -> str:
    # a repetitive synthetic language: learnable in a few dozen steps
    out = []
    for _ in range(n_sentences):
        k = rng.integers(3, 9)
        start = rng.integers(0, len(WORDS))
        out.append(" ".join(WORDS[(start + 3 * i) % len(WORDS)] for i in range(k)).capitalize() + ".")
    return " ".join(out)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("corpus")
    rng = np.random.default_rng(0)
    for i in range(6):
        (root / f"train_{i}.txt").write_text(_text(rng, 120))
    (root / "eval.txt").write_text(_text(rng, 80))
    train_bpe([(root / f"train_{i}.txt").read_text() for i in range(6)], 320, root / "tok")
    return root


def _recipe(corpus: Path, out: Path, **train) -> dict:
    return {
        "model": {"preset": "tiny", "dim": 32, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2, "head_dim": 8,
                  "n_experts": 4, "expert_hidden_dim": 32, "dense_hidden_dim": 64, "attention_chunk_size": 8,
                  "nope_layer_interval": 2},
        "tokenizer": {"path": str(corpus / "tok")},
        "data": {"seq_len": 32, "batch_size": 4, "seed": 0,
                 "sources": [{"files": [str(corpus / "train_*.txt")]}], "eval": {"files": [str(corpus / "eval.txt")]}},
        "optim": {"lr": 1e-2, "warmup_steps": 2},
        "train": {"out_dir": str(out), "steps": 6, "log_every": 1, "eval_every": 100, "ckpt_every": 100,
                  "tensorboard": False, **train},
    }


def _losses(out: Path) -> list[float]:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in rows if "loss" in r]


# -- config ------------------------------------------------------------------------------------------------------
def test_recipe_toml_and_overrides(tmp_path, corpus):
    raw = _recipe(corpus, tmp_path / "run")
    recipe = tmp_path / "r.toml"
    recipe.write_text(to_toml(raw))
    cfg = load_run_config(recipe, ["--optim.lr", "5e-4", "--train.steps=3", "--optim.betas", "[0.8, 0.9]",
                                   "--model.dim", "48"])
    assert cfg.optim.lr == 5e-4 and cfg.train.steps == 3 and cfg.optim.betas == (0.8, 0.9)
    assert cfg.model.overrides["dim"] == 48 and cfg.model.preset == "tiny"
    assert cfg.data.sources[0].files == [str(corpus / "train_*.txt")]
    assert load_run_config(recipe).to_dict() == from_dict(raw).to_dict()  # the TOML writer round-trips


@pytest.mark.parametrize("override, match", [
    (["--train.stepz", "3"], "unknown keys"),
    (["--train.steps", "three"], "train.steps must be int"),
    (["--optim.schedule", "linear"], "optim.schedule"),
    (["--model.widht", "3"], r"\[model\] has unknown keys"),
    (["--steps", "3"], "name the section"),
])
def test_recipe_errors_name_the_key(tmp_path, corpus, override, match):
    recipe = tmp_path / "r.toml"
    recipe.write_text(to_toml(_recipe(corpus, tmp_path / "run")))
    with pytest.raises(ConfigError, match=match):
        load_run_config(recipe, override)


def test_schedules():
    cos = OptimSpec(lr=1.0, warmup_steps=10, min_lr_ratio=0.1, schedule="cosine")
    assert lr_at(0, 100, cos) == pytest.approx(0.1) and lr_at(9, 100, cos) == pytest.approx(1.0)
    assert lr_at(10, 100, cos) == pytest.approx(1.0) and lr_at(99, 100, cos) == pytest.approx(0.1)
    assert lr_at(10, 100, cos) > lr_at(50, 100, cos) > lr_at(90, 100, cos)
    wsd = OptimSpec(lr=1.0, warmup_steps=10, min_lr_ratio=0.0, schedule="wsd", decay_fraction=0.2)
    assert [lr_at(s, 100, wsd) for s in (10, 50, 79)] == [1.0, 1.0, 1.0]
    assert lr_at(89, 100, wsd) == pytest.approx(0.5) and lr_at(99, 100, wsd) == pytest.approx(0.0)


# -- losses ------------------------------------------------------------------------------------------------------
def test_cross_entropy_mask_and_z_loss():
    torch.manual_seed(0)
    logits, targets = torch.randn(2, 5, 11), torch.randint(0, 11, (2, 5))
    mask = torch.ones(2, 5, dtype=torch.bool)
    mask[0, 3:] = False
    loss, parts = cross_entropy(logits, targets, mask, z_loss=1e-2)
    keep = mask.flatten()
    ref = torch.nn.functional.cross_entropy(logits.flatten(0, 1)[keep], targets.flatten()[keep])
    z = torch.logsumexp(logits.flatten(0, 1)[keep], -1).square().mean()
    torch.testing.assert_close(parts["ce"], ref)
    torch.testing.assert_close(loss, ref + 1e-2 * z)


def test_load_balancing_loss_equals_transformers():
    from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func

    torch.manual_seed(0)
    layers = [torch.randn(2 * 7, 8) * 2 for _ in range(3)]
    mask = torch.ones(2, 7, dtype=torch.long)
    mask[1, 4:] = 0
    for k in (1, 2):
        torch.testing.assert_close(load_balancing_loss(layers, 8, k), load_balancing_loss_func(tuple(layers), 8, k))
        torch.testing.assert_close(load_balancing_loss(layers, 8, k, mask),
                                   load_balancing_loss_func(tuple(layers), 8, k, attention_mask=mask))


def test_expert_load_metrics():
    balanced = torch.eye(4).repeat(5, 1) * 5  # each expert wins 5 of 20 tokens
    skewed = torch.zeros(20, 4)
    skewed[:, 2] = 5  # expert 2 takes all
    m = expert_load([balanced, skewed], 4, 1)
    assert m["moe/layer0/max_over_mean"] == pytest.approx(1.0) and m["moe/layer0/entropy"] == pytest.approx(1.0)
    assert m["moe/layer1/max_over_mean"] == pytest.approx(4.0) and m["moe/layer1/entropy"] == pytest.approx(0.0)
    assert m["moe/max_over_mean"] == pytest.approx(4.0) and m["moe/min_entropy"] == pytest.approx(0.0)


def test_load_balancing_lowers_skew():
    """A router that starts by sending nearly every token to expert 0: with the balancing term the load spreads,
    without it it stays skewed."""
    cfg = preset("tiny").replace(dim=16, expert_hidden_dim=16, n_experts=4)

    def train(coef: float) -> float:
        torch.manual_seed(0)
        moe = MoE(cfg)
        for p in moe.parameters():
            torch.nn.init.normal_(p, 0, 0.3)
        offset = torch.randn(16)
        with torch.no_grad():
            moe.router.weight[0] = offset * 2  # the common input direction favours expert 0
        opt = torch.optim.Adam(moe.parameters(), lr=3e-2)
        gen = torch.Generator().manual_seed(1)
        for _ in range(150):
            x = torch.randn(256, 16, generator=gen) * 0.5 + offset
            y = torch.sin(x @ torch.ones(16, 16))  # any target: balancing must not depend on it
            out, logits = moe(x)
            loss = (out - y).square().mean() + coef * load_balancing_loss([logits], 4, 1)
            opt.zero_grad()
            loss.backward()
            opt.step()
        with torch.no_grad():
            x = torch.randn(2048, 16, generator=gen) * 0.5 + offset
            return expert_load([moe(x)[1]], 4, 1)["moe/max_over_mean"]

    unbalanced, balanced = train(0.0), train(1.0)
    assert unbalanced > 2.5, unbalanced
    assert balanced < 1.6 and balanced < unbalanced - 1.0, (balanced, unbalanced)


# -- document masking --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["tiny", "tiny-interleaved"])
def test_document_masking_on_outputs(name):
    """A packed row [doc A | doc B] with doc_ids and restarting positions gives B exactly the logits of B alone,
    whatever A holds: nothing crosses the boundary in chunked (16-token chunks) or global layers."""
    torch.manual_seed(0)
    cfg = preset(name).replace(vocab_size=97)
    model = Transformer(cfg).eval()
    a, b = torch.randint(0, 97, (1, 21)), torch.randint(0, 97, (1, 27))  # B spans a chunk boundary
    packed = torch.cat([a, b], 1)
    positions = torch.cat([torch.arange(21), torch.arange(27)])[None]
    doc_ids = torch.cat([torch.zeros(21, dtype=torch.long), torch.ones(27, dtype=torch.long)])[None]
    with torch.no_grad():
        out = model(packed, positions=positions, doc_ids=doc_ids)
        alone = model(b)
        other = model(torch.cat([torch.randint(0, 97, (1, 21)), b], 1), positions=positions, doc_ids=doc_ids)
        unmasked = model(packed)
    torch.testing.assert_close(out[:, 21:], alone, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(other[:, 21:], out[:, 21:], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out[:, :21], model(a), atol=1e-5, rtol=1e-5)
    assert (unmasked[:, 21:] - alone).abs().max() > 1e-3  # without the mask B does see A


def test_doc_ids_with_cache_is_an_error():
    from herd.infer.cache import KVCache

    cfg = preset("tiny").replace(vocab_size=97)
    model = Transformer(cfg)
    cache = KVCache(cfg, 1, 8, torch.float32)
    with pytest.raises(ValueError, match="doc_ids"):
        model(torch.zeros(1, 2, dtype=torch.long), cache=cache, doc_ids=torch.zeros(1, 2, dtype=torch.long))



def test_activation_checkpointing_recomputes_the_same_step():
    """parallelize picks the training backend of the experts' grouped matmuls; its activation checkpointing: the plain
    model's state dict names, loss and gradients, while
    autograd keeps a fraction of the tensors (each block's inputs; the rest is recomputed in the backward)."""
    tokens = torch.randint(0, 97, (2, 33), generator=torch.Generator().manual_seed(1))

    def step(checkpointed: bool) -> tuple[list[str], torch.Tensor, list[torch.Tensor], int]:
        torch.manual_seed(0)
        model = parallelize(Transformer(preset("tiny").replace(vocab_size=97)),
                            TrainSpec(activation_checkpointing=checkpointed), World())
        assert {m.experts.backend for m in model.modules() if isinstance(m, MoE)} == {"grouped_autograd"}  # CPU
        saved = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.shape) or t, lambda t: t):
            loss, _ = cross_entropy(model(tokens[:, :-1]), tokens[:, 1:])
        loss.backward()
        return list(model.state_dict()), loss, [p.grad for p in model.parameters()], len(saved)

    (names, loss, grads, n_saved), (names_ac, loss_ac, grads_ac, n_saved_ac) = step(False), step(True)
    assert names_ac == names and torch.equal(loss_ac, loss)
    assert all(torch.equal(a, b) for a, b in zip(grads_ac, grads))
    assert n_saved_ac < n_saved / 2, (n_saved_ac, n_saved)

# -- the loop ----------------------------------------------------------------------------------------------------
def test_resume_is_exact(tmp_path, corpus):
    """Stop at step 3 (checkpoint), resume in a new Trainer: steps 4-6 have bitwise the losses of a run that
    never stopped. Run with grad accumulation, bf16 autocast, z-loss, balancing and activation checkpointing."""
    opts = {"grad_accum": 2, "dtype": "bf16", "z_loss": 1e-4, "activation_checkpointing": True}
    whole = Trainer(from_dict(_recipe(corpus, tmp_path / "a", **opts)), progress=False)
    whole.fit()
    first = Trainer(from_dict(_recipe(corpus, tmp_path / "b", **opts, steps=3)), progress=False)
    first.fit()
    assert [p.name for p in run_state.list_checkpoints(tmp_path / "b" / "checkpoints")] == ["step_00000003"]
    resumed = Trainer(from_dict(_recipe(corpus, tmp_path / "b", **opts)), resume=True, progress=False)
    assert resumed.step == 3
    resumed.fit()
    a, b = _losses(tmp_path / "a"), _losses(tmp_path / "b")
    assert len(a) == len(b) == 6
    assert a == b
    for p, q in zip(whole.model.parameters(), resumed.model.parameters()):
        assert torch.equal(p, q)


def test_existing_run_needs_resume(tmp_path, corpus):
    Trainer(from_dict(_recipe(corpus, tmp_path / "a", steps=2)), progress=False).fit()
    with pytest.raises(ConfigError, match="--resume"):
        Trainer(from_dict(_recipe(corpus, tmp_path / "a", steps=4)), progress=False)


def test_short_run_learns(tmp_path, corpus):
    """The CI-sized run (seconds): 80 steps of a 2-layer MoE on the synthetic corpus take the held-out loss from
    ~ln(vocab) = 7.8 nats to less than a third of that (0.9 nats measured)."""
    out = tmp_path / "run"
    trainer = Trainer(from_dict(_recipe(corpus, out, steps=80, eval_every=80, log_every=10, tensorboard=True)),
                      progress=False)
    initial = trainer.evaluate()
    final = trainer.fit()
    assert initial > math.log(trainer.model.cfg.vocab_size) - 0.5
    assert final["eval_loss"] < initial / 3, (initial, final)
    assert final["moe/max_over_mean"] < 4.0  # every expert still gets tokens on some layer: not collapsed
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert {"lr", "grad_norm", "tokens_per_s", "aux", "moe/layer1/entropy"} <= rows[0].keys()
    assert any(f.name.startswith("events.out.tfevents") for f in (out / "tb").iterdir())


def test_export_loads_in_herd_and_transformers(tmp_path, corpus):
    from transformers import AutoTokenizer, Llama4ForCausalLM

    import herd

    out = tmp_path / "run"
    trainer = Trainer(from_dict(_recipe(corpus, out, steps=4)), progress=False)
    trainer.fit()
    exported = tmp_path / "exported"
    from herd.cli import main

    assert main(["export", str(out), str(exported), "--dtype", "fp32"]) == 0
    assert (exported / "loss.png").stat().st_size > 0 and "final eval loss" in (exported / "TRAINING.md").read_text()
    model = checkpoint.load(exported)
    for (n, p), q in zip(trainer.model.named_parameters(), model.parameters()):
        assert torch.equal(p, q), n
    ids = torch.tensor([[trainer.tokenizer.bos_id] + trainer.tokenizer.encode("The king speak love")])
    hf = Llama4ForCausalLM.from_pretrained(exported).eval()
    with torch.no_grad():
        torch.testing.assert_close(hf(ids).logits, model(ids), atol=2e-4, rtol=1e-4)
    hf_tok = AutoTokenizer.from_pretrained(exported)
    text = "The sword of the king, 42 times!"
    assert hf_tok(text, add_special_tokens=False)["input_ids"] == trainer.tokenizer.encode(text)
    llm = herd.load(exported)
    assert isinstance(llm.generate("The king", max_new_tokens=4, temperature=0), str)


# -- crash safety ------------------------------------------------------------------------------------------------
_KILLED_SAVE = textwrap.dedent("""
    import json, sys, time
    from pathlib import Path
    from herd.train import run_state
    from herd.train.config import from_dict
    from herd.train.trainer import Trainer

    recipe, marker = json.loads(Path(sys.argv[1]).read_text()), Path(sys.argv[2])
    trainer = Trainer(from_dict(recipe), progress=False)
    trainer.fit()  # steps 1-2, checkpoint at step 2
    real_fsync = run_state._fsync_tree

    def stall(root):  # every file of the new checkpoint is written; now wait to be killed before the rename
        real_fsync(root)
        marker.write_text(str(root))
        time.sleep(120)

    run_state._fsync_tree = stall
    trainer.cfg.train.steps = 4
    trainer.fit()
""")


def test_sigkill_during_save_keeps_previous_checkpoint(tmp_path, corpus):
    recipe = _recipe(corpus, tmp_path / "run", steps=2, ckpt_every=2)
    (tmp_path / "recipe.json").write_text(json.dumps(recipe))
    script, marker = tmp_path / "killed.py", tmp_path / "saving"
    script.write_text(_KILLED_SAVE)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, str(script), str(tmp_path / "recipe.json"), str(marker)], env=env)
    try:
        deadline = time.time() + 240
        while not marker.exists() and proc.poll() is None and time.time() < deadline:
            time.sleep(0.1)
        assert marker.exists(), "the child never reached the second save"
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
    finally:
        proc.kill()
    root = tmp_path / "run" / "checkpoints"
    assert Path(marker.read_text()).exists()  # the half-made checkpoint is there...
    assert [p.name for p in run_state.list_checkpoints(root)] == ["step_00000002"]  # ...but not listed
    model = checkpoint.load(root / "step_00000002" / "model")
    assert isinstance(model, Transformer)
    with pytest.warns(UserWarning, match="unfinished checkpoint"):
        trainer = Trainer(from_dict(_recipe(corpus, tmp_path / "run", steps=4)), resume=True, progress=False)
    assert trainer.step == 2 and not Path(marker.read_text()).exists()
    trainer.fit()
    assert run_state.latest(root).name == "step_00000004"


# -- tokenizer ---------------------------------------------------------------------------------------------------
def test_bpe_tokenizer_layout_and_parity(corpus):
    from tokenizers import Tokenizer as HFTokenizer

    tok = Tokenizer.load(corpus / "tok")  # tokenizer.model (tiktoken)
    assert tok.vocab_size == 320 + 2048
    assert tok.bos_id == 320 and tok.token_id("<|eot|>") == 320 + 8 and tok.token_id("<|patch|>") == 320 + 92
    hf = HFTokenizer.from_file(str(corpus / "tok" / "tokenizer.json"))
    from_json = Tokenizer.load(corpus / "tok" / "tokenizer.json")
    for text in [(corpus / "eval.txt").read_text(), "Ünïcödé ✓ and 123456 numbers\n\n  spaced"]:
        ids = tok.encode(text)
        assert ids == hf.encode(text, add_special_tokens=False).ids == from_json.encode(text)
        assert tok.decode(ids) == text
    assert hf.token_to_id("<|begin_of_text|>") == tok.bos_id


# -- image+text samples ------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def image_corpus(corpus, tmp_path_factory) -> Path:
    from PIL import Image

    root = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    for i in range(4):  # small pictures: one tile each
        Image.fromarray(rng.integers(0, 255, (120, 160, 3), dtype=np.uint8)).save(root / f"pic{i}.png")
    Image.fromarray(rng.integers(0, 255, (340, 700, 3), dtype=np.uint8)).save(root / "wide.png")  # 1x2 tiles + thumb
    (root / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    lines = [json.dumps({"text": _text(rng, 3), "images": [f"pic{i % 4}.png"]}) for i in range(8)]
    lines += [json.dumps({"text": "a wide one", "images": ["wide.png"]}),  # too long for seq_len 192
              json.dumps({"text": "broken", "images": ["broken.png"]}),
              json.dumps({"text": "no such file", "images": ["missing.png"]}),
              "{not json"]
    (root / "samples.jsonl").write_text("\n".join(lines) + "\n")
    return root


def test_image_text_set_and_rows(tmp_path, corpus, image_corpus):
    from herd.images import ImageConfig
    from herd.train.data import PackedLoader
    from herd.train.image_text import ImageTextSet, tokenize_image_text

    tok = Tokenizer.load(corpus / "tok")
    with pytest.warns(UserWarning, match="skipped bad records"):
        info = tokenize_image_text([image_corpus / "samples.jsonl"], tmp_path / "set", tok, 144, ImageConfig(), 192)
    assert info["samples"] == 8 and info["tiles"] == 8
    assert info["bad_records"]["too_long"] == 1 and info["bad_records"]["bad_image"] == 2
    assert info["bad_records"]["invalid_json"] == 1
    data = ImageTextSet(tmp_path / "set")
    batch = PackedLoader([(data, 1.0)], seq_len=192, batch_size=3, seed=0).next_batch()
    patch = tok.token_id("<|patch|>")
    assert batch["pixel_values"].shape == (3, 3, 336, 336)
    assert int((batch["tokens"] == patch).sum()) == 3 * 144
    assert float(batch["pixel_values"].min()) >= -1 and float(batch["pixel_values"].max()) <= 1
    # the loss covers the text: no target inside the image span, none on padding
    span = (batch["targets"] == patch) | (batch["targets"] == tok.token_id("<|image_end|>"))
    assert not (batch["loss_mask"] & span).any()
    assert not (batch["loss_mask"] & (batch["targets"] == tok.pad_id)).any()
    assert batch["loss_mask"].sum() > 0


def test_training_on_image_text_and_text_mixture(tmp_path, corpus, image_corpus):
    recipe = _recipe(corpus, tmp_path / "run", steps=3)
    recipe["model"] = {"preset": "tiny-vision", "n_layers": 2}
    recipe["data"]["seq_len"] = 192
    recipe["data"]["sources"].append({"files": [str(image_corpus / "samples.jsonl")], "images_key": "images",
                                      "weight": 2.0})
    with pytest.warns(UserWarning, match="skipped bad records"):
        trainer = Trainer(from_dict(recipe), progress=False)
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if n.startswith("vision.")}
    batch = trainer.loader.next_batch()
    assert "pixel_values" in batch and (batch["source"] == 1).any()
    trainer.fit()
    changed = [n for n, p in trainer.model.named_parameters() if n in before and not torch.equal(p, before[n])]
    assert len(changed) == len(before)  # every vision weight was trained through the fused sequence
