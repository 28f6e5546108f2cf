"""Long-context inference budget on this machine: KV-cache memory, prefill time and decode speed of a small iRoPE
model from 1K to 1M tokens of context, each as a ratio against the 1K-token anchor measured in the same run.

    python benchmarks/long_context.py --write          # contexts 1K, 8K, 32K, 128K, 1M (~10 min on 2 cores)

Model: herd-pico (6 layers: 4 chunked RoPE layers with a 128-token chunk, 2 global NoPE layers), bf16, its
max_seq_len raised to the largest context (the weights do not depend on it). Prefill runs in 2048-token pieces
up to ``--max-prefill`` tokens; the global layers' attention is quadratic, so beyond that the cache is advanced
to the context without computing it (decode reads every cached position whatever it holds, so its cost is the
same) and only decode is timed. KV memory is the cache's bytes (local layers hold one chunk, global layers the
context) against a cache holding the whole context in every layer.
"""

from __future__ import annotations

import argparse
import platform
import time

import torch
from report import append_results, describe

import herd
from herd.api import default_model_dir
from herd.checkpoint import load
from herd.cli import parse_token_count
from herd.eval.niah import short_count
from herd.infer.bench import peak_rss_mb
from herd.infer.cache import KVCache
from herd.model.moe import pick_grouped_mm_backend, set_grouped_mm_backend


def advance_without_compute(cache: KVCache, n: int) -> None:
    """Make ``cache`` hold positions [0, n) as if a prompt of n tokens had been prefilled (contents left as
    they are): lengths, and the ring slots' positions of the last chunk."""
    cache.lengths = [n] * len(cache.lengths)
    if any(cache.ring):
        last = torch.arange(max(0, n - cache.chunk), n)
        cache.ring_pos[:, last % cache.chunk] = last


def measure(model, ctx: int, new_tokens: int, max_prefill: int, piece: int = 2048) -> dict:
    cfg = model.cfg
    cache = KVCache(cfg, 1, ctx + new_tokens + 1, torch.bfloat16)
    g = torch.Generator().manual_seed(0)
    prefill_s = None
    with torch.inference_mode():
        if ctx <= max_prefill:
            ids = torch.randint(0, cfg.vocab_size, (1, ctx), generator=g)
            t0 = time.perf_counter()
            for start in range(0, ctx, piece):
                model(ids[:, start:start + piece], cache=cache, last_only=True)
            prefill_s = time.perf_counter() - t0
        else:
            advance_without_compute(cache, ctx)
        token = torch.randint(0, cfg.vocab_size, (1, 1), generator=g)
        model(token, cache=cache, last_only=True)  # first decode step: not timed (allocations)
        t0 = time.perf_counter()
        for _ in range(new_tokens):
            token = model(token, cache=cache, last_only=True)[:, -1].argmax(-1, keepdim=True)
        decode_s = time.perf_counter() - t0
    full = cfg.n_layers * (ctx + new_tokens + 1) * 2 * cfg.n_kv_heads * cfg.head_dim * 2  # every layer, bf16
    return {"context": ctx, "prefill_s": prefill_s, "decode_tok_s": new_tokens / decode_s,
            "kv_bytes": cache.nbytes(), "full_kv_bytes": full, "peak_rss_mb": peak_rss_mb()}


def table(rows: list[dict]) -> str:
    anchor = rows[0]
    out = ["| context | KV cache | vs full cache | prefill (s) | prefill time vs 1K | decode tok/s | decode vs 1K |",
           "|---|---|---|---|---|---|---|"]
    for r in rows:
        pre = (f"{r['prefill_s']:.1f} | {r['prefill_s'] / anchor['prefill_s']:.0f}x" if r["prefill_s"] is not None
               else "not run | -")
        kv = f"{r['kv_bytes'] / 2**20:.1f} MiB | {r['kv_bytes'] / r['full_kv_bytes']:.3f}"
        out.append(f"| {short_count(r['context'])} | {kv} | {pre} | {r['decode_tok_s']:.1f} | "
                   f"{r['decode_tok_s'] / anchor['decode_tok_s']:.2f}x |")
    return "\n".join(out)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--contexts", default="1K,8K,32K,128K,1M")
    p.add_argument("--max-prefill", default="128K", help="longest context that is prefilled (beyond: decode only)")
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--write", action="store_true", help="append the table to benchmarks/RESULTS.md")
    a = p.parse_args()
    contexts = [parse_token_count(c) for c in a.contexts.split(",")]
    model = load(default_model_dir(), dtype=torch.bfloat16)
    model.cfg = model.cfg.replace(max_seq_len=max(contexts) + a.new_tokens + 1)
    model.eval()
    set_grouped_mm_backend(model, pick_grouped_mm_backend("cpu", torch.bfloat16))
    rows = []
    for ctx in contexts:
        rows.append(measure(model, ctx, a.new_tokens, parse_token_count(a.max_prefill)))
        r = rows[-1]
        pre = "not run" if r["prefill_s"] is None else f"{r['prefill_s']:.1f} s"
        print(f"{short_count(ctx)}: prefill {pre}, decode {r['decode_tok_s']:.1f} tok/s, "
              f"KV {r['kv_bytes'] / 2**20:.1f} MiB", flush=True)
    cfg = model.cfg
    section = (f"Command: `python benchmarks/long_context.py --contexts {a.contexts} --max-prefill {a.max_prefill}"
               f"{' --write' if a.write else ''}`\n\n"
               f"### Long-context inference (herd-pico, bf16, batch 1) — {time.strftime('%Y-%m-%d')} — {describe()}\n\n"
               f"herd {herd.__version__}, torch {torch.__version__}, Python {platform.python_version()}. "
               f"{cfg.n_layers} layers: {sum(cfg.is_chunked(i) for i in range(cfg.n_layers))} chunked RoPE "
               f"(chunk {cfg.attention_chunk_size}), {sum(not cfg.is_chunked(i) for i in range(cfg.n_layers))} "
               f"global NoPE; prefill in 2048-token pieces; decode {a.new_tokens} tokens, greedy. Contexts past "
               f"{a.max_prefill} are decoded from a cache advanced without prefill (see the script). "
               f"Peak RSS {max(r['peak_rss_mb'] for r in rows) / 1024:.1f} GiB.\n\n{table(rows)}\n")
    print(section)
    if a.write:
        append_results(section)


if __name__ == "__main__":
    main()
