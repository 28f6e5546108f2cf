"""herd dpo: the sigmoid DPO (+ RPO) loss and its gradient equal TRL's DPOTrainer on the same model and pair;
cached reference log-probs; a CI-sized run lifts held-out reward accuracy; exact resume; bad pairs named."""

import json
import random

import pytest
import torch
from conftest import check_resume_is_exact, herd_from_hf

from herd import checkpoint
from herd.cli import main
from herd.config import load_config
from herd.errors import HerdError
from herd.post.dpo import REFERENCE_FILE, DPOSpec, DPOTrainer, completion_logps, dpo_config, pair_loss

WORDS = "apple bread candle dragon eagle forest garden harbor island jungle kettle lemon mirror needle orange".split()


def _pair(rng: random.Random, w: str) -> dict:
    """A preference with a learnable style: the chosen answer hedges ("I think ... is fine."), the rejected one
    does not; the word varies, so held-out pairs need the style, not a memorised answer."""
    v = rng.choice(WORDS)
    return {"prompt": [{"role": "user", "content": f"Say something about {w}."}],
            "chosen": [{"role": "assistant", "content": f"I think {v} is fine."}],
            "rejected": [{"role": "assistant", "content": f"{v}."}]}


@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
    d, rng = tmp_path_factory.mktemp("pairs"), random.Random(0)
    train, held = d / "pairs.jsonl", d / "held_out.jsonl"
    train.write_text("".join(json.dumps(_pair(rng, w)) + "\n" for w in WORDS[:10] * 2))
    held.write_text("".join(json.dumps(_pair(rng, w)) + "\n" for w in WORDS[10:]))
    return train, held


@pytest.mark.parametrize("rpo_alpha", [0.0, 0.5])
def test_loss_and_gradient_equal_trl_dpo_trainer(base, tmp_path, rpo_alpha):
    """TRL's DPOTrainer (its reference a copy of the model before a change to the policy) and herd's pair_loss on
    the same weights and the same tokenized pair: equal loss, equal gradients."""
    pytest.importorskip("trl")
    from datasets import Dataset
    from transformers import AutoTokenizer, Llama4ForCausalLM
    from trl import DPOConfig
    from trl import DPOTrainer as TRLDPOTrainer

    torch.manual_seed(0)
    hf = Llama4ForCausalLM.from_pretrained(base, torch_dtype=torch.float32)
    # Llama4ForCausalLM names its backbone "language_model" (base_model_prefix, for loading multimodal checkpoints)
    # but holds it as .model, and TRL's fused LM head looks the backbone up by that prefix
    hf.base_model_prefix = "model"
    # no balancing term on either side (TRL's reads num_experts, which Llama 4's config does not have)
    args = DPOConfig(output_dir=str(tmp_path / "trl"), beta=0.1, report_to="none", use_cpu=True, bf16=False,
                     router_aux_loss_coef=0.0,
                     loss_type=["sigmoid", "sft"] if rpo_alpha else ["sigmoid"],
                     loss_weights=[1.0, rpo_alpha] if rpo_alpha else None)
    data = Dataset.from_list([{"prompt": "Say hello.", "chosen": " Hello there, friend.", "rejected": " No."}])
    trl = TRLDPOTrainer(model=hf, args=args, train_dataset=data,
                        processing_class=AutoTokenizer.from_pretrained(base))
    trl.ref_model.base_model_prefix = "model"
    inputs = next(iter(trl.get_train_dataloader()))
    with torch.no_grad():  # move the policy away from the reference, so the log-ratios are not zero
        for p in hf.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    hf.train()
    want = trl._compute_loss(hf, inputs, return_outputs=False)
    want.backward()

    ids, completion = inputs["input_ids"], inputs["completion_mask"]
    batch = {"targets": torch.cat([ids[:, 1:], ids[:, :1]], 1),  # the last position's target is masked
             "loss_mask": torch.cat([completion[:, 1:], torch.zeros_like(completion[:, :1])], 1).bool()
             & torch.cat([inputs["attention_mask"][:, 1:], torch.zeros_like(completion[:, :1])], 1).bool()}
    reference = checkpoint.load(base).float().eval()
    with torch.no_grad():
        batch["ref_logps"] = completion_logps(reference(ids), batch["targets"], batch["loss_mask"])[0]
    model = herd_from_hf(hf, load_config(base)).train()
    got, parts = pair_loss(model(ids), batch, DPOSpec(beta=0.1, rpo_alpha=rpo_alpha), n_pairs=1,
                           chosen_tokens=float(batch["loss_mask"][0].sum()))
    got.backward()
    torch.testing.assert_close(got, want.detach(), atol=1e-5, rtol=1e-5)
    hf_q = hf.model.layers[0].self_attn.q_proj.weight.grad
    torch.testing.assert_close(model.layers[0].self_attn.q_proj.weight.grad, hf_q, atol=1e-6, rtol=1e-4)
    hf_experts = hf.model.layers[1].feed_forward.experts.gate_up_proj.grad
    torch.testing.assert_close(model.layers[1].feed_forward.experts.gate_up_proj.grad, hf_experts.transpose(1, 2),
                               atol=1e-6, rtol=1e-4)
    assert set(parts) >= {"reward_accuracy", "reward_margin"}


def test_dpo_lifts_held_out_reward_accuracy(base, pairs, tmp_path, capsys):
    """A CI-sized run: reward accuracy on held-out pairs (0 before: every reward is 0) ends above 0.9; the
    reference log-probs are computed once and cached; --lora trains adapters only."""
    train, held = pairs
    out = tmp_path / "dpo"
    assert main(["dpo", str(base), str(train), "--eval", str(held), "--out", str(out), "--steps", "30", "--lr",
                 "1e-3", "--batch-size", "4", "--data.seq_len", "64", "--json", "--train.tensorboard", "false",
                 "--train.eval_every", "30"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert {"out", "steps", "examples", "train_loss", "eval_loss", "reward_accuracy", "reward_margin",
            "eval_reward_accuracy", "eval_reward_margin"} <= set(result)
    assert result["examples"] == 20 and result["steps"] == 30
    assert result["eval_reward_accuracy"] > 0.9 and result["eval_reward_margin"] > 0
    cached = torch.load(out / REFERENCE_FILE, weights_only=True)
    assert cached["train"].shape == (20, 2) and cached["eval"].shape == (5, 2)
    assert checkpoint.load(out) is not None and (out / "TRAINING.md").is_file()

    lora = tmp_path / "dpo-lora"
    assert main(["dpo", str(base), str(train), "--eval", str(held), "--out", str(lora), "--steps", "30", "--lr",
                 "1e-2", "--batch-size", "4", "--lora", "8", "--data.seq_len", "64", "--json",
                 "--train.tensorboard", "false", "--train.eval_every", "30"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["eval_reward_accuracy"] > 0.9 and (lora / "adapter" / "adapter_config.json").is_file()


def test_resume_is_exact_with_the_cached_reference(base, pairs, tmp_path):
    train, _ = pairs

    def cfg(out, steps):
        return dpo_config(base, [train], out, steps=steps, batch_size=2, lr=1e-3,
                          overrides=["--data.seq_len", "64", "--optim.schedule", "constant", "--train.log_every", "1",
                                     "--train.ckpt_every", "2", "--train.tensorboard", "false",
                                     "--dpo.rpo_alpha", "0.5"])

    def make(out, steps, resume=False):
        if resume:  # the reference log-probs lost: recomputed from the initial weights, not the checkpoint's
            (out / REFERENCE_FILE).unlink()
        return DPOTrainer(cfg(out, steps), resume=resume, progress=False)

    whole, resumed = check_resume_is_exact(make, tmp_path)
    torch.testing.assert_close(resumed.loader.reference, whole.loader.reference, atol=0, rtol=0)


def test_bad_pairs_are_named(base, tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps({"chosen": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}],
                                "rejected": [{"role": "user", "content": "c"},
                                             {"role": "assistant", "content": "d"}]}) + "\n"
                    + json.dumps({"messages": [{"role": "user", "content": "x"}]}) + "\n")
    with pytest.warns(UserWarning, match="line 1: chosen and rejected must share their prompt.*line 2: a "
                                         "conversational record where preference pairs"), \
            pytest.raises(HerdError, match="no usable preference record"):
        DPOTrainer(dpo_config(base, [path], tmp_path / "out"), progress=False)
    with pytest.raises(HerdError, match="dpo.beta must be > 0"):
        dpo_config(base, [path], tmp_path / "out", beta=0.0)


def test_on_policy_pairs_best_against_worst(tmp_path):
    """make_pairs: per item the best answer is chosen and the worst rejected; items whose answers all score alike
    are counted, not written; pictures become PNG files the pairs file references, and herd dpo's loader reads
    the file back."""
    from herd.chat import ChatFormat
    from herd.post.data import load_examples
    from herd.post.pairs import make_pairs, write_pairs
    from herd.post.tasks import get_task
    from herd.tokenizer import Tokenizer

    tasks = {"arithmetic": get_task("arithmetic:ops=+"), "shapes": get_task("shapes")}

    def complete(items, samples):  # right, wrong, wrong ... for arithmetic; the same answer twice for shapes
        return [[item.answer] + ["-1"] * (samples - 1) if item.task == "arithmetic" else ["3"] * samples
                for item in items]

    records, counts = make_pairs(complete, tasks, n=3, samples=3, progress=False)
    assert counts["items"] == 6 and counts["pairs"] == 3 and counts["no_preference"] == 3
    assert counts["by_task"] == {"arithmetic": {"items": 3, "pairs": 3}, "shapes": {"items": 3, "pairs": 0}}
    assert all(r["score_chosen"] == 1.0 and r["score_rejected"] == 0.0 for r in records)
    assert all(r["rejected"][0]["content"] == "-1" for r in records)

    shapes = get_task("shapes").items(1, seed=0)[0]
    records.append({"prompt": shapes.prompt, "chosen": [{"role": "assistant", "content": shapes.answer}],
                    "rejected": [{"role": "assistant", "content": "nothing"}], "task": "shapes"})
    out = write_pairs(records, tmp_path / "pairs.jsonl")
    assert len(list((tmp_path / "pairs.images").glob("*.png"))) == 1
    pairs = load_examples(out, ChatFormat(Tokenizer.load()), kind="preference")
    assert len(pairs) == 4 and len(pairs[-1][0].images) == 1
    with pytest.raises(HerdError, match="--samples must be >= 2"):
        make_pairs(complete, tasks, n=1, samples=1, progress=False)


def test_herd_pairs_then_herd_dpo(base, tmp_path, capsys, monkeypatch):
    """End to end: herd pairs samples the model on a user task scored by a reward function, herd dpo trains on
    what it wrote."""
    (tmp_path / "longer_is_better.py").write_text(
        "def reward(prompt, completion, answer):\n    return min(1.0, len(completion) / 400)\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    task = tmp_path / "task.jsonl"
    task.write_text("".join(json.dumps({"prompt": f"Tell me about {w}.", "answer": ""}) + "\n" for w in WORDS[:4]))
    pairs = tmp_path / "pairs.jsonl"
    assert main(["pairs", str(base), "--tasks", f"{task}:reward=longer_is_better:reward", "--n", "4", "--samples",
                 "3", "--max-new-tokens", "12", "--out", str(pairs), "--json", "--no-progress"]) == 0
    counts = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert counts["items"] == 4 and counts["pairs"] >= 1 and counts["out"] == str(pairs)
    written = [json.loads(line) for line in pairs.read_text().splitlines()]
    assert all(r["score_chosen"] > r["score_rejected"] for r in written)
    assert main(["dpo", str(base), str(pairs), "--out", str(tmp_path / "dpo"), "--steps", "2", "--batch-size", "1",
                 "--json", "--train.tensorboard", "false"]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["steps"] == 2
