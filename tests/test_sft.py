"""herd sft: full and LoRA fine-tuning on TRL-format chats through the pretraining trainer; the output directory
loads in herd and transformers; resume is exact; bad inputs name the problem."""

import json
import shutil
from pathlib import Path

import pytest
import torch
from conftest import check_resume_is_exact

from herd import checkpoint
from herd.cli import main
from herd.config import preset
from herd.errors import ConfigError
from herd.model import Transformer
from herd.post.sft import SFTTrainer, sft_config
from herd.tokenizer import Tokenizer

PICO = Path(__file__).resolve().parents[1] / "models" / "herd-pico"
WORDS = "apple bread candle dragon eagle forest garden harbor island jungle kettle lemon".split()


@pytest.fixture(scope="module")
def chats(base) -> Path:
    path = base.parent / "next.jsonl"
    path.write_text("".join(json.dumps({"messages": [{"role": "user", "content": f"What comes after {w}?"},
                                                     {"role": "assistant", "content": WORDS[(i + 1) % len(WORDS)]}]})
                            + "\n" for i, w in enumerate(WORDS)))
    return path


def _run(capsys, *argv) -> dict:
    assert main(["sft", *map(str, argv), "--json", "--train.tensorboard", "false"]) == 0
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def test_full_sft_writes_a_model_herd_and_transformers_load(base, chats, tmp_path, capsys):
    out = tmp_path / "out"
    result = _run(capsys, base, chats, "--out", out, "--steps", 3, "--batch-size", 2, "--lr", 1e-3,
                  "--data.seq_len", 64, "--eval-fraction", 0.25)
    assert set(result) == {"out", "steps", "examples", "train_loss", "eval_loss"}
    assert result["out"] == str(out) and result["steps"] == 3 and result["examples"] == 9  # 3 of 12 held out
    assert result["train_loss"] > 0 and result["eval_loss"] > 0
    tuned, original = checkpoint.load(out), checkpoint.load(base)
    assert not torch.equal(tuned.layers[0].self_attn.q_proj.weight, original.layers[0].self_attn.q_proj.weight)
    assert (out / "tokenizer.model").is_file() and (out / "checkpoints").is_dir() and (out / "TRAINING.md").is_file()
    from transformers import Llama4ForCausalLM

    hf = Llama4ForCausalLM.from_pretrained(out, torch_dtype=torch.float32).eval()
    ids = torch.tensor([Tokenizer.load(out / "tokenizer.model").encode("What comes after apple?")])
    with torch.no_grad():
        torch.testing.assert_close(hf(ids).logits, tuned.float().eval()(ids), atol=1e-4, rtol=1e-4)


def test_resume_is_exact(base, chats, tmp_path):
    """Stopped at step 2 and resumed, a run's losses and weights are those of the run that never stopped."""
    def cfg(out, steps):
        return sft_config(base, [chats], out, steps=steps, batch_size=2, lr=1e-3,
                          overrides=["--data.seq_len", "64", "--optim.schedule", "constant", "--train.log_every", "1",
                                     "--train.ckpt_every", "2", "--train.tensorboard", "false"])

    check_resume_is_exact(lambda out, steps, resume=False: SFTTrainer(cfg(out, steps), resume=resume,
                                                                      progress=False), tmp_path)


def test_epochs_decide_the_steps_and_bad_inputs_are_named(base, chats, tmp_path):
    trainer = SFTTrainer(sft_config(base, [chats], tmp_path / "e", batch_size=2,
                                    overrides=["--data.seq_len", "64", "--sft.epochs", "2"]), progress=False)
    assert trainer.cfg.train.steps == 2 * -(-len(trainer.loader.rows) // 2)
    with pytest.raises(ConfigError, match="MODEL_DIR itself"):
        sft_config(base, [chats], base)
    with pytest.raises(ConfigError, match="unknown keys"):
        sft_config(base, [chats], tmp_path / "x", overrides=["--lora.rnak", "4"])
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"messages": [{"role": "user", "content": "no answer"}]}) + "\n")
    with pytest.warns(UserWarning, match="line 1: the conversation has no assistant"), \
            pytest.raises(Exception, match="no usable sft record"):
        SFTTrainer(sft_config(base, [bad], tmp_path / "y"), progress=False)


def test_lora_sft_writes_a_merged_model_and_a_peft_adapter_with_the_same_logits(base, chats, tmp_path, capsys):
    """--lora: only the adapters train (the base weights outside them are untouched), OUT_DIR holds the merged
    model and OUT_DIR/adapter a PEFT adapter; peft + transformers on the base give herd's merged logits."""
    peft = pytest.importorskip("peft")
    from transformers import Llama4ForCausalLM

    out = tmp_path / "lora"
    result = _run(capsys, base, chats, "--out", out, "--steps", 3, "--batch-size", 2, "--lora", 4, "--lr", 1e-2,
                  "--data.seq_len", 64, "--sft.dtype", "fp32")
    assert result["steps"] == 3
    config = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert config["r"] == 4 and config["lora_alpha"] == 8 and config["peft_type"] == "LORA"
    tuned, original = checkpoint.load(out), checkpoint.load(base)
    assert torch.equal(tuned.lm_head.weight, original.lm_head.weight)  # not a LoRA target
    assert not torch.equal(tuned.layers[0].self_attn.q_proj.weight, original.layers[0].self_attn.q_proj.weight)
    hf = peft.PeftModel.from_pretrained(Llama4ForCausalLM.from_pretrained(base, torch_dtype=torch.float32),
                                        out / "adapter").eval()
    ids = torch.tensor([Tokenizer.load(out / "tokenizer.model").encode("What comes after apple?")])
    with torch.no_grad():
        torch.testing.assert_close(hf(input_ids=ids).logits, tuned.float().eval()(ids), atol=1e-4, rtol=1e-4)


def test_sft_teaches_a_tiny_model_a_task(base, chats, tmp_path, capsys):
    """A CI-sized run: pass@1 (herd eval tasks, greedy) on the task goes from <= 10% to >= 90%."""
    task = tmp_path / "next.jsonl"
    task.write_text("".join(json.dumps({"prompt": f"What comes after {w}?", "answer": WORDS[(i + 1) % len(WORDS)]})
                            + "\n" for i, w in enumerate(WORDS)))

    def pass_at_1(model_dir) -> float:
        assert main(["eval", "tasks", str(model_dir), "--tasks", f"{task}:matcher=normalised", "--n", "12",
                     "--max-new-tokens", "6", "--json", "--no-progress"]) == 0
        return json.loads(capsys.readouterr().out.strip().splitlines()[-1])["pass@1"]

    assert pass_at_1(base) <= 0.1
    out = tmp_path / "taught"
    _run(capsys, base, chats, "--out", out, "--steps", 200, "--batch-size", 4, "--lr", 5e-3, "--data.seq_len", 64,
         "--optim.schedule", "constant", "--no-progress")
    assert pass_at_1(out) >= 0.9


def test_a_model_without_room_for_the_chat_tokens_is_refused(base, chats, tmp_path):
    small = tmp_path / "small"
    tok = Tokenizer.load(PICO / "tokenizer.model")
    cfg = preset("tiny").replace(n_layers=1, vocab_size=tok.bos_id + 1)  # the BPE and <|begin_of_text|> only
    checkpoint.save(Transformer(cfg), small)
    for f in PICO.glob("tokenizer*"):
        shutil.copy(f, small / f.name)
    with pytest.raises(ConfigError, match="smaller than the tokenizer's 6144 ids .its special tokens, the chat tokens"):
        SFTTrainer(sft_config(small, [chats], tmp_path / "out"), progress=False)
