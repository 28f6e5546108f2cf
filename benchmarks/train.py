"""Training throughput: herd's train step vs transformers' Llama4ForCausalLM, same config, batch and optimizer.

    python benchmarks/train.py                      # small config, batch 4 x 512, fp32 and bf16 autocast
    python benchmarks/train.py --write              # ... and append the table to benchmarks/RESULTS.md
    python benchmarks/train.py --config small --batch 4 --seq 512 --steps 3

A step is forward + next-token loss (+ the MoE load-balancing loss for herd, as herd trains) + backward + AdamW,
under bf16 autocast for "bf16" (weights and optimizer in fp32). Each (implementation, dtype) runs in its own
process, so its peak RSS is its own; herd-ac is herd with activation checkpointing. Model FLOPs per token are 6 x
active matmul parameters + the causal
attention products (6 x layers x seq x width, PaLM's formula); MFU divides the achieved FLOP/s by a bf16 matmul
peak measured in the same run.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from datetime import date
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from configs import CONFIGS, param_counts  # noqa: E402
from report import append_results, describe  # noqa: E402


def herd_step_fn(cfg, dtype: str, activation_checkpointing: bool = False):
    from herd.model import Transformer
    from herd.train.config import TrainSpec
    from herd.train.distributed import World
    from herd.train.losses import cross_entropy, load_balancing_loss
    from herd.train.parallelize import parallelize

    torch.manual_seed(0)
    model = parallelize(Transformer(cfg), TrainSpec(activation_checkpointing=activation_checkpointing), World())
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)

    def step(tokens, targets):
        with _autocast(dtype):
            logits, router = model(tokens, return_router_logits=True)
        loss = cross_entropy(logits, targets)[0] + 1e-3 * load_balancing_loss(router, cfg.n_experts, cfg.top_k)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return float(loss.detach())

    return step


def hf_step_fn(cfg, dtype: str):
    from transformers import Llama4ForCausalLM, Llama4TextConfig

    from herd.config import to_hf_dict

    d = to_hf_dict(cfg, text_only=True)
    d.pop("model_type"), d.pop("architectures")
    hf_cfg = Llama4TextConfig(**d)
    hf_cfg._attn_implementation = "sdpa"
    torch.manual_seed(0)
    model = Llama4ForCausalLM(hf_cfg).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)

    def step(tokens, targets):
        with _autocast(dtype):
            logits = model(input_ids=tokens).logits
        loss = torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), targets.flatten())
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return float(loss.detach())

    return step


def _autocast(dtype: str):
    import contextlib

    return torch.autocast("cpu", dtype=torch.bfloat16) if dtype == "bf16" else contextlib.nullcontext()


def measure_one(impl: str, dtype: str, config: str, batch: int, seq: int, steps: int) -> dict:
    cfg = CONFIGS[config]
    if impl == "transformers":
        step = hf_step_fn(cfg, dtype)
    else:
        step = herd_step_fn(cfg, dtype, activation_checkpointing=impl == "herd-ac")
    gen = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, cfg.vocab_size, (batch, seq + 1), generator=gen)
    step(tokens[:, :-1], tokens[:, 1:])  # warm-up: allocator, oneDNN primitives, optimizer state
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        step(tokens[:, :-1], tokens[:, 1:])
        times.append(time.perf_counter() - t)
    best = min(times)
    return {"impl": impl, "dtype": dtype, "tok_s": batch * seq / best, "step_s": best,
            "median_step_s": sorted(times)[len(times) // 2],
            "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}


def matmul_peak(n: int = 2048, reps: int = 10) -> float:
    """bf16 GEMM FLOP/s of this machine (best of ``reps``)."""
    a, b = torch.randn(n, n, dtype=torch.bfloat16), torch.randn(n, n, dtype=torch.bfloat16)
    a @ b
    best = min(_timed(lambda: a @ b) for _ in range(reps))
    return 2 * n**3 / best


def _timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def flops_per_token(cfg, seq: int) -> float:
    active_matmul = param_counts(cfg)["active"] - cfg.dim  # embedding lookup is not in "active"; drop the final norm
    return 6 * active_matmul + 6 * cfg.n_layers * seq * cfg.n_heads * cfg.head_dim


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--config", default="small", choices=list(CONFIGS))
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=512)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--impls", default="herd,herd-ac,transformers",
                   help="herd-ac: herd with activation checkpointing (every block recomputed in the backward)")
    p.add_argument("--dtypes", default="fp32,bf16")
    p.add_argument("--write", action="store_true")
    p.add_argument("--one", help=argparse.SUPPRESS)  # impl:dtype, run in a child process
    a = p.parse_args()
    if a.one:
        impl, dtype = a.one.split(":")
        print(json.dumps(measure_one(impl, dtype, a.config, a.batch, a.seq, a.steps)))
        return
    cfg = CONFIGS[a.config]
    peak = matmul_peak()
    fpt = flops_per_token(cfg, a.seq)
    rows = {}
    for dtype in a.dtypes.split(","):
        for impl in a.impls.split(","):
            cmd = [sys.executable, __file__, "--one", f"{impl}:{dtype}", "--config", a.config, "--batch",
                   str(a.batch), "--seq", str(a.seq), "--steps", str(a.steps)]
            out = subprocess.run(cmd, capture_output=True, text=True)
            if out.returncode != 0:
                print(out.stderr[-3000:], file=sys.stderr)
                raise SystemExit(f"{impl}:{dtype} failed")
            r = json.loads(out.stdout.strip().splitlines()[-1])
            r["mfu"] = r["tok_s"] * fpt / peak
            rows[(impl, dtype)] = r
            print(f"{impl:13s} {dtype:5s} {r['tok_s']:8.1f} tok/s  step {r['step_s']:.2f} s  "
                  f"peak RSS {r['peak_rss_gb']:.1f} GB  MFU {100 * r['mfu']:.1f}%", flush=True)
    counts = param_counts(cfg)
    lines = [f"### Training step ({a.config}, batch {a.batch} x {a.seq}) — {date.today()} — {describe()}", "",
             f"`python benchmarks/train.py --config {a.config} --batch {a.batch} --seq {a.seq} --steps {a.steps}`: "
             f"forward + loss + backward + AdamW, best of {a.steps} steps after one warm-up, each in its own process. "
             f"{counts['total'] / 1e6:.0f}M parameters, {counts['active'] / 1e6:.0f}M active; "
             f"{fpt / 1e6:.0f} MFLOP per token; bf16 matmul peak measured in this run: {peak / 1e12:.2f} TFLOP/s.", "",
             "| dtype | implementation | tokens/s | vs transformers | MFU | peak RSS (GB) | RSS vs transformers |",
             "|---|---|---|---|---|---|---|"]
    for (impl, dtype), r in rows.items():
        ref = rows.get(("transformers", dtype))
        ratio = f"{r['tok_s'] / ref['tok_s']:.1f}x" if ref else "-"
        mem = f"{r['peak_rss_gb'] / ref['peak_rss_gb']:.2f}x" if ref else "-"
        lines.append(f"| {dtype} | {impl} | {r['tok_s']:.0f} | {ratio} | {100 * r['mfu']:.1f}% | "
                     f"{r['peak_rss_gb']:.1f} | {mem} |")
    section = "\n".join(lines) + "\n"
    print(section)
    if a.write:
        append_results(section)


if __name__ == "__main__":
    main()
