"""herd-pico, the embedded default model: shipped, small, trained, loadable by herd and transformers, and what
`herd generate` / `herd chat` / `herd.load()` use when no model is named."""

import math
from pathlib import Path

import pytest
import torch

import herd
from herd.api import default_model_dir
from herd.config import load_config
from herd.tokenizer import Tokenizer

PICO = Path(__file__).resolve().parents[1] / "models" / "herd-pico"
# Hamlet III.1 (public domain). Hamlet is held out of herd-pico's training data.
HAMLET = ("To be, or not to be: that is the question: Whether 'tis nobler in the mind to suffer The slings and "
          "arrows of outrageous fortune, Or to take arms against a sea of troubles, And by opposing end them?")


def test_shipped_files_and_size():
    assert default_model_dir() == PICO
    names = {p.name for p in PICO.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer.model", "README.md", "loss.png",
            "TRAINING.md"} <= names
    assert sum(p.stat().st_size for p in PICO.iterdir()) < 50 * 2**20


def test_is_a_llama4_moe_with_irope():
    cfg = load_config(PICO)
    assert cfg.n_experts > 1 and cfg.moe_layers  # routed experts (+ the shared expert every MoE layer has)
    assert 0 in cfg.rope_layers and 1 in cfg.rope_layers and cfg.attention_chunk_size  # chunked RoPE + NoPE global
    tok = Tokenizer.for_model(PICO)
    assert cfg.vocab_size == tok.vocab_size and cfg.bos_token_id == tok.bos_id == tok.vocab_size - 2048


def test_trained_on_held_out_shakespeare():
    """Mean next-token loss on a held-out passage is far below chance (ln vocab ~ 8.7 nats)."""
    llm = herd.load()
    ids = torch.tensor([[llm.tokenizer.bos_id] + llm.tokenizer.encode(HAMLET)])
    with torch.no_grad():
        logits = llm.model(ids[:, :-1])
    nll = torch.nn.functional.cross_entropy(logits[0].float(), ids[0, 1:]).item()
    assert nll < math.log(llm.model.cfg.vocab_size) - 3.0, nll


def test_transformers_gives_the_same_logits():
    from transformers import Llama4ForCausalLM

    llm = herd.load(dtype="fp32")
    hf = Llama4ForCausalLM.from_pretrained(PICO, torch_dtype=torch.float32).eval()
    ids = torch.tensor([[llm.tokenizer.bos_id] + llm.tokenizer.encode(HAMLET)])
    with torch.no_grad():
        torch.testing.assert_close(hf(ids).logits, llm.model(ids), atol=1e-4, rtol=1e-4)


def test_cli_defaults_to_pico(capsys):
    from herd.cli import main

    assert main(["generate", "ROMEO.", "--max-new-tokens", "8", "--json"]) == 0
    out = capsys.readouterr().out
    assert '"token_ids"' in out


def test_missing_default_is_a_clear_error(monkeypatch, tmp_path):
    monkeypatch.setenv("HERD_DEFAULT_MODEL", str(tmp_path / "nowhere"))
    with pytest.raises(FileNotFoundError, match="HERD_DEFAULT_MODEL"):
        herd.load()
