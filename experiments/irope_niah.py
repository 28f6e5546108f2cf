"""iRoPE length-generalisation study: does retrieval learnt at length L hold at 4L, 16L, 64L?

Two tiny Llama 4-shaped models are trained at L = 256 tokens on the same rows, then scored with herd's
needle-in-a-haystack harness (herd/eval/niah.py) at L, 4L, 16L and 64L:

  (a) irope        chunked RoPE layers (chunk 64) + a global NoPE layer every 3rd layer, with inference-time
                   temperature tuning of the NoPE queries (floor_scale 32, attn_scale 0.1), as in Llama 4
  (b) rope-full    RoPE on every layer and full causal attention (a Llama 3-style decoder)
  (c) irope-notemp model (a) evaluated with temperature tuning off

(During training at L the NoPE layers' scale already grows past floor_scale, as Scout's does during its
256K-token training: (c) differs from (a) only at inference.)

Training rows are the evaluation task at length L: a window of the haystack text (Hamlet and The Tempest, shipped
in herd/eval/haystack) with 1-2 planted "The special magic number for {key} is {value}." sentences under
different keys, then a question and answer for each key (the first exactly as the evaluation asks). The loss
covers every token, the answers' value tokens weighted 10x.

Status (2026-11-25): not yet a working study. With these defaults the iRoPE model did not learn retrieval even at
the training length: over 1800 steps (14 min) the weighted loss fell from 4.4 to 1.1 (the haystack text is
memorised) while the answer's digit accuracy stayed at 20-25%, i.e. no induction/copy circuit formed. A probe
with denser rows (6 facts "Verona 482." and 6 questions per 256-token row, constant lr 3e-3) did not learn
either, with iRoPE (700 steps) or with RoPE + full attention (500 steps): answer digits 30-35%, chance level. So
the obstacle is the training recipe, not iRoPE. Even plain copying is slow here: on rows of 64 random tokens
(of 4000) repeated, RoPE + full attention in fp32 at lr 1e-3 brings the loss from ln(4000) = 8.3 to 6.0 in 950
steps but copies only 1% of tokens exactly (no induction phase change yet). Next to try: a small random alphabet
for a copying warm-up, a dense model, many more steps; then the comparison below.

    python experiments/irope_niah.py                     # resumes where it stopped
    python experiments/irope_niah.py --steps 20 --lengths 256,512 --needles 1   # a quick look

Writes runs/irope_niah/{variant}/ (model, niah.json, niah.png), and docs/irope_niah.md with the heatmaps copied
to docs/irope_niah_{variant}.png.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import shutil
import time
from dataclasses import replace
from pathlib import Path

import torch

from herd import checkpoint
from herd.config import preset
from herd.eval.niah import (ANSWER, KEYS, NEEDLE, QUESTION, NiahConfig, PromptBuilder, engine_completer,
                            haystack_ids, run_niah, save)
from herd.infer.engine import Engine
from herd.model import Transformer
from herd.tokenizer import Tokenizer
from herd.train.losses import cross_entropy

ROOT = Path(__file__).resolve().parents[1]
VARIANTS = {"irope": "iRoPE (Llama 4)", "rope-full": "RoPE on every layer, full attention",
            "irope-notemp": "iRoPE without temperature tuning"}


def config(variant: str, vocab: int, tok: Tokenizer, max_len: int):
    base = preset("tiny").replace(
        vocab_size=vocab, dim=128, n_layers=6, n_heads=4, n_kv_heads=2, head_dim=32, n_experts=4, top_k=1,
        expert_hidden_dim=256, dense_hidden_dim=512, attention_chunk_size=64, nope_layer_interval=3,
        floor_scale=32, attn_scale=0.1, max_seq_len=max_len, bos_token_id=tok.bos_id,
        eos_token_id=(tok.eos_id, tok.eom_id, tok.eot_id), pad_token_id=tok.pad_id)
    if variant == "rope-full":
        return base.replace(attention_chunk_size=None, rope_layers=(1,) * base.n_layers)
    return base.replace(attn_temperature_tuning=variant != "irope-notemp")


def training_row(builder: PromptBuilder, tok: Tokenizer, length: int, rng: random.Random):
    """One row of ``length`` + 1 tokens: haystack with 1-2 needles under different keys, then a question and
    answer for each key (the first exactly as the evaluation asks it); and per-token loss weights (the answers'
    value tokens 10x)."""
    keys = rng.sample(KEYS, rng.randint(1, 2))
    values = [str(rng.randrange(1_000_000, 10_000_000)) for _ in keys]
    needles = [tok.encode(" " + NEEDLE.format(key=k, value=v) + "\n") for k, v in zip(keys, values)]
    # answers: the prompt ends at "... is", the value comes as a separate piece, as the model generates it
    answers = [tok.encode(" " + v + ".") for v in values]
    more = [tok.encode("\n\nQuestion: " + QUESTION.format(key=k) + "\nAnswer: " + ANSWER.format(key=k))
            for k in keys[1:]]
    n = length + 1 - sum(len(x) for x in needles[1:] + answers + more)
    ids = builder.build(n, rng.random(), keys[0], values[0], rng.randrange(len(builder.hay)))
    head, tail = builder.frame(keys[0])
    asked = next(i for i in range(len(ids)) if ids[i:i + len(needles[0])] == needles[0])
    for needle in needles[1:]:  # the other needles anywhere in the haystack, never inside the first one
        spots = [i for i in range(len(head), len(ids) - len(tail) + 1) if not asked < i < asked + len(needles[0])]
        at = rng.choice(spots)
        ids = ids[:at] + needle + ids[at:]
        asked += len(needle) if at <= asked else 0
    value_at = []
    for q, answer in zip([[]] + more, answers):
        ids += q
        value_at += range(len(ids), len(ids) + len(answer) - 1)  # the value's tokens, not the final "."
        ids += answer
    weights = [1.0] * (len(ids) - 1)
    for i in value_at:
        weights[i - 1] = 10.0  # weights[t] belongs to the prediction of ids[t + 1]
    return ids, weights


def train(variant: str, out: Path, args, tok: Tokenizer, builder: PromptBuilder) -> Path:
    model_dir = out / "model"
    if (model_dir / "config.json").is_file():
        return model_dir
    torch.manual_seed(0)
    rng = random.Random(0)
    cfg = config(variant, tok.vocab_size, tok, max(args.lengths) + 64)
    model = Transformer(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.95), weight_decay=0.1, fused=True)
    warmup = max(1, args.steps // 20)
    start, log = time.time(), []
    for step in range(args.steps):
        lr = args.lr * min(1.0, (step + 1) / warmup) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * step / args.steps)))
        for g in opt.param_groups:
            g["lr"] = lr
        rows = [training_row(builder, tok, args.train_len, rng) for _ in range(args.batch)]
        ids = torch.tensor([r[0] for r in rows])
        w = torch.tensor([r[1] for r in rows])
        with torch.autocast("cpu", dtype=torch.bfloat16):
            logits = model(ids[:, :-1])
        loss, _ = cross_entropy(logits, ids[:, 1:], w)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if (step + 1) % 50 == 0 or step + 1 == args.steps:
            answer = w > 1  # how often the next value digit is the argmax: retrieval at the training length
            digits = float((logits.detach().argmax(-1) == ids[:, 1:])[answer].float().mean())
            log.append({"step": step + 1, "loss": loss.item(), "answer_digit_acc": digits,
                        "s": round(time.time() - start, 1)})
            print(f"  {variant} step {step + 1}/{args.steps}: weighted loss {loss.item():.3f}, answer digits "
                  f"{digits:.0%} ({time.time() - start:.0f}s)", flush=True)
    checkpoint.save(model, model_dir)
    for f in (ROOT / "models" / "herd-pico").glob("tokenizer*"):
        shutil.copy2(f, model_dir / f.name)
    (out / "train_log.json").write_text(json.dumps(log))
    return model_dir


def evaluate(variant: str, model_dir: Path, out: Path, args, tok: Tokenizer) -> dict:
    if (out / "niah.json").is_file():
        return json.loads((out / "niah.json").read_text())
    model = checkpoint.load(model_dir, dtype=torch.float32)
    if variant == "irope-notemp":
        model = Transformer(replace(model.cfg, attn_temperature_tuning=False)).eval()
        model.load_state_dict(checkpoint.load(model_dir, dtype=torch.float32).state_dict())
    cfg = NiahConfig(lengths=args.lengths, depths=args.depths, needles=args.needles, seed=1)
    result = run_niah(engine_completer(Engine(model, tok, prefill_chunk=1024), cfg.max_new_tokens, batch=4), tok,
                      cfg, model=variant)
    save(result, out, title=f"{VARIANTS[variant]}: {result.accuracy:.0%} (trained at {args.train_len})")
    return result.to_dict()


def write_doc(results: dict[str, dict], args, minutes: float) -> None:
    docs = ROOT / "docs"
    lines = ["# iRoPE length generalisation (needle in a haystack)", "",
             f"`python experiments/irope_niah.py --steps {args.steps}` ({time.strftime('%Y-%m-%d')}, "
             f"{minutes:.0f} min). Trained at {args.train_len} tokens; evaluated at "
             f"{', '.join(str(n) for n in args.lengths)} tokens x depths "
             f"{', '.join(f'{d:.0%}' for d in args.depths)}, {args.needles} needles per cell.", "",
             "| variant | " + " | ".join(f"{n} ({n // args.train_len}L)" for n in args.lengths) + " | all |",
             "|---|" + "---|" * (len(args.lengths) + 1)]
    for variant, r in results.items():
        by_len = {}
        for c in r["cells"]:
            by_len.setdefault(c["length"], []).append(c["accuracy"])
        lines.append(f"| {VARIANTS[variant]} | " + " | ".join(f"{sum(by_len[n]) / len(by_len[n]):.0%}"
                                                               for n in args.lengths) + f" | {r['accuracy']:.0%} |")
    lines.append("")
    for variant in results:
        src = ROOT / "runs" / "irope_niah" / variant / "niah.png"
        if src.is_file():
            shutil.copy2(src, docs / f"irope_niah_{variant}.png")
            lines += [f"![{VARIANTS[variant]}](irope_niah_{variant}.png)", ""]
    path = docs / "irope_niah.md"
    reading = ""
    if path.is_file() and "## Reading" in path.read_text():
        reading = path.read_text()[path.read_text().index("## Reading"):]
    path.write_text("\n".join(lines) + ("\n" + reading if reading else ""))


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--steps", type=int, default=2000)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--train-len", type=int, default=256)
    p.add_argument("--lengths", default="256,1024,4096,16384")
    p.add_argument("--depths", default="0,0.25,0.5,0.75,1")
    p.add_argument("--needles", type=int, default=4)
    p.add_argument("--out", type=Path, default=ROOT / "runs" / "irope_niah")
    args = p.parse_args()
    args.lengths = [int(x) for x in args.lengths.split(",")]
    args.depths = [float(x) for x in args.depths.split(",")]
    tok = Tokenizer.for_model(ROOT / "models" / "herd-pico")
    builder = PromptBuilder(tok, haystack_ids(tok))
    start = time.time()
    results = {}
    for variant in ("irope", "rope-full", "irope-notemp"):
        out = args.out / variant
        out.mkdir(parents=True, exist_ok=True)
        trained = "irope" if variant == "irope-notemp" else variant
        model_dir = train(trained, args.out / trained, args, tok, builder)
        results[variant] = evaluate(variant, model_dir, out, args, tok)
        print(f"{variant}: accuracy {results[variant]['accuracy']:.1%}", flush=True)
    write_doc(results, args, (time.time() - start) / 60)
    print((ROOT / "docs" / "irope_niah.md").read_text())


if __name__ == "__main__":
    main()
