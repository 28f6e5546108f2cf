"""iRoPE length-generalisation study: does retrieval learnt at length L hold at 4L, 16L, 64L?

    python experiments/irope_niah.py                       # ~25 min on 2 CPU cores; resumes where it stopped
    python experiments/irope_niah.py --steps 200 --lengths 128,512 --trials 4    # a quick look

Two tiny Llama 4-shaped models (herd's Transformer: MoE on every layer, 4 layers of width 64) are trained at
L = 128 tokens on the same rows, then scored on needle-in-a-haystack prompts at L, 4L, 16L and 64L:

  (a) irope        chunked RoPE layers (chunk 32) alternating with global NoPE layers, and inference-time
                   temperature tuning of the NoPE queries as in Llama 4 (attn_scale 0.1, floor_scale = L, so the
                   scale is exactly 1 at every position seen in training and grows like log(position) after)
  (b) rope-full    RoPE on every layer and full causal attention (a Llama 3-style decoder)
  (c) irope-notemp model (a) evaluated with temperature tuning off: (a) and (c) differ only past L

The task is symbolic, because a model this small trained for minutes on a CPU does not learn to retrieve
7-digit numbers from English text (this study's first version tried that, with herd's text harness
herd/eval/niah.py, and stayed at chance; see docs/irope_niah.md). A vocabulary of 512 tokens holds 16 keys,
16 values, the 256 (key, value) fact tokens, markers and 216 filler tokens:

  haystack  random filler tokens
  needle    <needle> fact(key, value) <needle>            one token carries the fact: retrieval is one look-up
  question  <query> key                                   the model must answer the value token

Training rows (L tokens) hold 8 needles under different keys and their 8 questions, each question somewhere
after its needle (so distances range over the whole row); the loss is on the answers only. An evaluation
prompt is filler of the given length with one needle at the given depth and its question at the end; a cell
scores the share of exact answers over ``--trials`` prompts (different key, value and filler).

Writes runs/irope_niah/{variant}.pt (trained weights), experiments/results/irope_niah.json (every cell, kept in
the repository), docs/irope_niah_{variant}.png heatmaps and the table of docs/irope_niah.md.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import time
from pathlib import Path

import torch

from herd.config import preset
from herd.eval.niah import NiahConfig, NiahResult, heatmap
from herd.model import Transformer
from herd.train.losses import cross_entropy

ROOT = Path(__file__).resolve().parents[1]
VARIANTS = {"irope": "iRoPE (Llama 4)", "rope-full": "RoPE on every layer, full attention",
            "irope-notemp": "iRoPE without temperature tuning"}
TRAINED = {"irope": "irope", "rope-full": "rope-full", "irope-notemp": "irope"}  # whose weights each evaluates

# the vocabulary
BOS, NEEDLE, QUERY, N_KEYS = 0, 1, 2, 16
FACT0 = 8  # fact(key, value) = FACT0 + N_KEYS * key + value
KEY0 = FACT0 + N_KEYS * N_KEYS
VALUE0 = KEY0 + N_KEYS
FILLER = (VALUE0 + N_KEYS, 512)


def config(variant: str, train_len: int):
    cfg = preset("tiny").replace(
        vocab_size=FILLER[1], dim=64, n_layers=4, n_heads=4, n_kv_heads=2, head_dim=16, n_experts=4, top_k=1,
        expert_hidden_dim=128, dense_hidden_dim=256, attention_chunk_size=32, nope_layer_interval=2,
        floor_scale=train_len, attn_scale=0.1, max_seq_len=1 << 20, bos_token_id=BOS, eos_token_id=3,
        pad_token_id=4, rope_scaling=None)
    if variant == "rope-full":
        return cfg.replace(attention_chunk_size=None, rope_layers=(1,) * cfg.n_layers)
    return cfg.replace(attn_temperature_tuning=variant != "irope-notemp")


def training_batch(batch: int, length: int, needles: int, rng: random.Random):
    """[B, L] inputs, targets and the answer mask: 8 needles and their questions laid on 3-token slots in
    random order, each question after its needle."""
    g = torch.Generator().manual_seed(rng.randrange(1 << 30))
    x = torch.randint(*FILLER, (batch, length + 1), generator=g)
    mask = torch.zeros(batch, length + 1)
    x[:, 0] = BOS
    n_slots = (length - 1) // 3
    for b in range(batch):
        keys = rng.sample(range(N_KEYS), needles)
        values = [rng.randrange(N_KEYS) for _ in keys]
        slots = sorted(rng.sample(range(n_slots), 2 * needles))
        todo, waiting = list(range(needles)), []
        for j, s in enumerate(slots):
            p = 1 + 3 * s
            must_ask = len(slots) - j <= len(waiting)
            if todo and not must_ask and (not waiting or rng.random() < 0.5):
                i = todo.pop()
                waiting.append(i)
                x[b, p:p + 3] = torch.tensor([NEEDLE, FACT0 + N_KEYS * keys[i] + values[i], NEEDLE])
            else:
                i = waiting.pop(rng.randrange(len(waiting)))
                x[b, p:p + 3] = torch.tensor([QUERY, KEY0 + keys[i], VALUE0 + values[i]])
                mask[b, p + 2] = 1
    return x[:, :-1], x[:, 1:], mask[:, 1:]


def train(variant: str, a: argparse.Namespace, out: Path) -> Path:
    path = out / f"{variant}.pt"
    if path.is_file():
        return path
    torch.manual_seed(a.seed)
    model = Transformer(config(variant, a.length))
    opt = torch.optim.AdamW(model.parameters(), lr=a.lr, betas=(0.9, 0.95), weight_decay=0.1)
    rng, start, log = random.Random(a.seed), time.time(), []
    for step in range(a.steps):
        warm, cos = min(1.0, (step + 1) / 100), 0.5 * (1 + math.cos(math.pi * step / a.steps))
        for group in opt.param_groups:
            group["lr"] = a.lr * warm * (0.1 + 0.9 * cos)
        x, y, m = training_batch(a.batch, a.length, 8, rng)
        logits = model(x)
        loss, _ = cross_entropy(logits, y, m)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if step % 100 == 0 or step == a.steps - 1:
            acc = (((logits.argmax(-1) == y).float() * m).sum() / m.sum()).item()
            log.append({"step": step, "loss": loss.item(), "answer_accuracy": acc})
            print(f"[{variant} {step}/{a.steps} {time.time() - start:.0f}s] loss {loss.item():.3f} "
                  f"answers {acc:.0%}", flush=True)
    out.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.save({"model": model.state_dict(), "log": log, "seconds": time.time() - start}, tmp)
    tmp.replace(path)  # a half-written file never looks finished
    return path


@torch.inference_mode()
def evaluate(variant: str, weights: Path, a: argparse.Namespace, lengths: list[int], depths: list[float]) -> dict:
    model = Transformer(config(variant, a.length)).eval()
    model.load_state_dict(torch.load(weights)["model"])
    rng, cells, start = random.Random(1000 + a.seed), [], time.time()
    for length in lengths:
        for depth in depths:
            hits = 0
            for first in range(0, a.trials, a.eval_batch):
                n = min(a.eval_batch, a.trials - first)
                g = torch.Generator().manual_seed(rng.randrange(1 << 30))
                x = torch.randint(*FILLER, (n, length), generator=g)
                x[:, 0] = BOS
                answers = []
                for b in range(n):
                    key, value = rng.randrange(N_KEYS), rng.randrange(N_KEYS)
                    p = 1 + round(depth * (length - 6))  # the needle's first token; the question takes the end
                    x[b, p:p + 3] = torch.tensor([NEEDLE, FACT0 + N_KEYS * key + value, NEEDLE])
                    x[b, -2:] = torch.tensor([QUERY, KEY0 + key])
                    answers.append(VALUE0 + value)
                pred = model(x, last_only=True)[:, -1].argmax(-1)
                hits += int((pred == torch.tensor(answers)).sum())
            cells.append({"length": length, "depth": depth, "retrieved": hits, "total": a.trials,
                          "accuracy": hits / a.trials})
        row = [c["accuracy"] for c in cells if c["length"] == length]
        print(f"[{variant} eval {time.time() - start:.0f}s] length {length}: {sum(row) / len(row):.0%}", flush=True)
    return {"cells": cells, "accuracy": sum(c["retrieved"] for c in cells) / sum(c["total"] for c in cells),
            "seconds": time.time() - start}


def write_docs(results: dict, a: argparse.Namespace, lengths: list[int], depths: list[float]) -> None:
    docs = ROOT / "docs"
    lines = ["| variant | " + " | ".join(f"{L // a.length}L = {L}" for L in lengths) + " | all |",
             "|---|" + "---|" * (len(lengths) + 1)]
    for variant, r in results.items():
        by_len = [sum(c["retrieved"] for c in r["cells"] if c["length"] == L) /
                  sum(c["total"] for c in r["cells"] if c["length"] == L) for L in lengths]
        lines.append(f"| ({'abc'[list(VARIANTS).index(variant)]}) {VARIANTS[variant]} | "
                     + " | ".join(f"{x:.0%}" for x in by_len) + f" | {r['accuracy']:.0%} |")
        res = NiahResult(NiahConfig(lengths=lengths, depths=depths, needles=a.trials), r["cells"], r["accuracy"],
                         r["seconds"], model=variant)
        heatmap(res, docs / f"irope_niah_{variant}.png",
                title=f"{VARIANTS[variant]}: trained at {a.length}, {r['accuracy']:.0%} retrieved")
    doc = docs / "irope_niah.md"
    old = doc.read_text() if doc.is_file() else ""
    reading = old[old.index("## Reading"):] if "## Reading" in old else ""
    images = "\n".join(f"![{VARIANTS[v]}](irope_niah_{v}.png)" for v in results)
    doc.write_text(
        f"# iRoPE length generalisation (needle in a haystack)\n\n"
        f"`python experiments/irope_niah.py --length {a.length} --steps {a.steps} --trials {a.trials}` "
        f"({time.strftime('%Y-%m-%d')}): tiny Llama 4-shaped models trained at L = {a.length} tokens, "
        f"needle-in-a-haystack accuracy at each length (mean over {len(depths)} depths x {a.trials} prompts; "
        f"chance is {1 / N_KEYS:.0%}). The task and the variants: the docstring of `experiments/irope_niah.py`.\n\n"
        + "\n".join(lines) + f"\n\n{images}\n" + (f"\n{reading}" if reading else ""))


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--length", type=int, default=128, help="training length L")
    p.add_argument("--lengths", default=None, help="evaluation lengths (default: L, 4L, 16L, 64L)")
    p.add_argument("--depths", default="0,0.1,0.25,0.5,0.75,0.9,1")
    p.add_argument("--steps", type=int, default=3000)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--trials", type=int, default=16, help="prompts per (length, depth) cell")
    p.add_argument("--eval-batch", type=int, default=4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--out", type=Path, default=ROOT / "runs" / "irope_niah")
    p.add_argument("--results", type=Path, default=ROOT / "experiments" / "results" / "irope_niah.json")
    a = p.parse_args()
    lengths = [int(x) for x in a.lengths.split(",")] if a.lengths else [a.length * k for k in (1, 4, 16, 64)]
    depths = [float(x) for x in a.depths.split(",")]
    setting = {k: getattr(a, k) for k in ("length", "steps", "batch", "lr", "trials", "seed")}
    saved = json.loads(a.results.read_text()) if a.results.is_file() else {}
    results = {}
    for variant in a.variants.split(","):
        if variant not in VARIANTS:
            raise SystemExit(f"unknown variant {variant!r}; choose from {', '.join(VARIANTS)}")
        old = saved.get(variant)
        if old and old["setting"] == setting and old["lengths"] == lengths and old["depths"] == depths:
            results[variant] = old
            continue
        weights = train(TRAINED[variant], a, a.out)
        trained = torch.load(weights)
        results[variant] = {"setting": setting, "lengths": lengths, "depths": depths,
                            "train_log": trained["log"], "train_seconds": trained["seconds"],
                            **evaluate(variant, weights, a, lengths, depths)}
        saved[variant] = results[variant]
        a.results.parent.mkdir(parents=True, exist_ok=True)
        a.results.write_text(json.dumps(saved, indent=1) + "\n")
    write_docs(results, a, lengths, depths)


if __name__ == "__main__":
    main()
