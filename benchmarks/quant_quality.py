"""What each quantization scheme costs in quality, on a small Llama 4 MoE trained here on text.

    python benchmarks/quant_quality.py [--steps 200] [--write]

Random weights give near-flat next-token distributions that any scheme preserves; so the model (byte-level,
MoE on every second layer) is first trained for ``--steps`` steps on Python standard-library source (shipped with
the interpreter: nothing is downloaded), then quantized from its bf16 weights and compared with bf16 on held-out
stdlib files: weight bytes, mean KL(bf16 || scheme) per token, and perplexity. With --write, appends a dated
section to benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import math
import os
import platform
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from report import append_results, describe  # noqa: E402

from herd.config import preset  # noqa: E402
from herd.eval.quant_quality import logit_kl, perplexity  # noqa: E402
from herd.infer.quantize import model_bytes, quantize  # noqa: E402
from herd.model import Transformer  # noqa: E402

# bytes as tokens; MoE on layers 1, 3, 5 (8 experts, top-1) and dense FFN on 0, 2, 4, as Maverick alternates
CONFIG = preset("tiny-interleaved").replace(vocab_size=256, dim=128, n_layers=6, n_heads=4, n_kv_heads=2,
                                            head_dim=32, expert_hidden_dim=256, dense_hidden_dim=512, n_experts=8,
                                            top_k=1, attention_chunk_size=64, pad_token_id=None, bos_token_id=0,
                                            eos_token_id=1, max_seq_len=1024)
SEQ = 128
# (row label, scheme, quantize() keywords)
VARIANTS = [("int8", "int8", {}), ("int4 (group 128)", "int4", {}), ("int4 (group 32)", "int4", {"group_size": 32}),
            ("int4_weight_int8_dynamic_activation", "int4_weight_int8_dynamic_activation", {}),
            ("fp8 (routed experts, first/last layer kept)", "fp8", {}),
            ("fp8 (all routed experts)", "fp8", {"skip": ()})]


def corpus() -> tuple[torch.Tensor, torch.Tensor]:
    """(train, held-out) byte streams: top-level stdlib modules for training, the email package held out."""
    lib = Path(os.__file__).parent
    train = b"".join(p.read_bytes() for p in sorted(lib.glob("*.py")))[: 3 * 2**20]
    held_out = b"".join(p.read_bytes() for p in sorted((lib / "email").glob("*.py")))
    return (torch.frombuffer(bytearray(train), dtype=torch.uint8).long(),
            torch.frombuffer(bytearray(held_out), dtype=torch.uint8).long())


def train(data: torch.Tensor, steps: int, batch: int, seed: int = 0) -> Transformer:
    torch.manual_seed(seed)
    model = Transformer(CONFIG).train()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, betas=(0.9, 0.95), weight_decay=0.1)
    gen = torch.Generator().manual_seed(seed)
    for step in range(steps):
        lr = 3e-3 * min(1.0, (step + 1) / 20) * 0.5 * (1 + math.cos(math.pi * step / steps))
        for g in opt.param_groups:
            g["lr"] = lr
        starts = torch.randint(0, len(data) - SEQ - 1, (batch,), generator=gen)
        tokens = torch.stack([data[s: s + SEQ + 1] for s in starts.tolist()])
        logits = model(tokens[:, :-1])
        loss = F.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if step % 50 == 0 or step == steps - 1:
            print(f"step {step:4d}  loss {loss.item():.3f}", file=sys.stderr)
    return model.eval()


def held_out_batches(data: torch.Tensor, n_seqs: int, batch: int = 8) -> list[torch.Tensor]:
    stride = (len(data) - SEQ - 1) // n_seqs  # evenly spread over the held-out files
    seqs = torch.stack([data[i * stride: i * stride + SEQ + 1] for i in range(n_seqs)])
    return list(seqs.split(batch))


def run(steps: int, batch: int, n_eval: int) -> tuple[list[dict], dict]:
    train_data, held_out = corpus()
    t = time.perf_counter()
    fp32 = train(train_data, steps, batch)
    train_s = time.perf_counter() - t
    ref = copy.deepcopy(fp32).to(torch.bfloat16)
    batches = held_out_batches(held_out, n_eval)
    ref_bytes = model_bytes(ref)
    rows = [{"scheme": "bf16 (reference)", "bytes": ref_bytes, "kl": 0.0, "ppl": perplexity(ref, batches)},
            {"scheme": "fp32 (as trained)", "bytes": model_bytes(fp32), "kl": logit_kl(ref, fp32, batches),
             "ppl": perplexity(fp32, batches)}]
    for label, scheme, kw in VARIANTS:
        q = quantize(copy.deepcopy(ref), scheme, **kw)
        rows.append({"scheme": label, "bytes": model_bytes(q), "kl": logit_kl(ref, q, batches),
                     "ppl": perplexity(q, batches)})
    for r in rows:
        r["ratio"] = r["bytes"] / ref_bytes
    meta = {"train_s": train_s, "steps": steps, "batch": batch, "n_eval": n_eval,
            "train_bytes": len(train_data), "held_out_bytes": len(held_out)}
    return rows, meta


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--eval-seqs", type=int, default=32)
    p.add_argument("--write", action="store_true", help="append the results to benchmarks/RESULTS.md")
    args = p.parse_args()
    rows, meta = run(args.steps, args.batch, args.eval_seqs)
    c = CONFIG
    head = (f"### Quantization quality — {datetime.date.today()} — {describe()}\n\n"
            f"torch {torch.__version__}, Python {platform.python_version()}. Model: byte-level Llama 4, "
            f"{c.n_layers} layers (MoE on {', '.join(map(str, c.moe_layers))}: {c.n_experts} experts top-{c.top_k}, "
            f"expert FFN {c.expert_hidden_dim}; dense FFN {c.dense_hidden_dim}), width {c.dim}, trained "
            f"{meta['steps']} steps × {meta['batch']}×{SEQ} bytes of stdlib *.py ({meta['train_s']:.0f} s). "
            f"Evaluated on {meta['n_eval']}×{SEQ} bytes of the held-out `email` package; KL(bf16 ‖ scheme) "
            "in nats per token.\n\n"
            "| scheme | weight bytes | vs bf16 | KL vs bf16 | perplexity |\n|---|---|---|---|---|\n")
    table = "".join(f"| {r['scheme']} | {r['bytes']:,} | {r['ratio']:.2f}x | {r['kl']:.2e} | {r['ppl']:.3f} |\n"
                    for r in rows)
    print(head + table)
    if args.write:
        append_results(f"Command: `python benchmarks/quant_quality.py --steps {args.steps} --batch {args.batch} "
                       f"--eval-seqs {args.eval_seqs} --write`\n\n" + head + table)


if __name__ == "__main__":
    main()
