"""herd vs transformers: one forward pass (prefill) on the same small MoE config and weights.

    python benchmarks/forward.py [--tokens 512] [--device cpu|cuda] [--repeats 5] [--write]

Reports the median wall time of each implementation and the ratio transformers/herd (>1: herd faster),
measured in the same run, in fp32 and bf16. With --write, appends a dated section to benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import datetime
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from conftest import herd_from_hf, hf_text_model  # noqa: E402  (same weights in both implementations)
from report import append_results, describe  # noqa: E402

from herd.config import preset  # noqa: E402
from herd.model.moe import pick_grouped_mm_backend, set_grouped_mm_backend  # noqa: E402

# a small Scout-shaped MoE: every layer MoE, 16 experts top-1, chunked local + NoPE global layers
CONFIG = preset("tiny").replace(vocab_size=8192, dim=512, n_layers=8, n_heads=8, n_kv_heads=2, head_dim=64,
                                expert_hidden_dim=1024, dense_hidden_dim=2048, n_experts=16, top_k=1,
                                attention_chunk_size=128, floor_scale=8192, pad_token_id=None,
                                bos_token_id=1, eos_token_id=2)


def _time(fn, repeats: int, device: str) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        if device == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        fn()
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def run(tokens: int, device: str, repeats: int) -> list[dict]:
    hf = hf_text_model(CONFIG).to(device)
    hf.config._attn_implementation = "sdpa"  # transformers' fastest CPU/GPU path for Llama 4
    ours = herd_from_hf(hf, CONFIG).to(device)
    ids = torch.randint(0, CONFIG.vocab_size, (1, tokens), device=device)
    rows = []
    for dtype in (torch.float32, torch.bfloat16):
        hf.to(dtype), ours.to(dtype)
        set_grouped_mm_backend(ours, pick_grouped_mm_backend(device, dtype))
        with torch.inference_mode():
            t_hf = _time(lambda: hf(ids, use_cache=False), repeats, device)
            t_herd = _time(lambda: ours(ids), repeats, device)
        rows.append({"dtype": str(dtype).removeprefix("torch."), "transformers_s": t_hf, "herd_s": t_herd,
                     "ratio": t_hf / t_herd})
    return rows


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--tokens", type=int, default=512)
    p.add_argument("--device", default="cpu")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--write", action="store_true", help="append the results to benchmarks/RESULTS.md")
    args = p.parse_args()
    rows = run(args.tokens, args.device, args.repeats)
    import transformers

    head = (f"### Forward (prefill {args.tokens} tokens, batch 1) — {datetime.date.today()} — "
            f"{describe(args.device)}\n\n"
            f"torch {torch.__version__}, transformers {transformers.__version__}. Config: {CONFIG.n_layers} layers, "
            f"width {CONFIG.dim}, {CONFIG.n_experts} experts top-{CONFIG.top_k}, expert FFN "
            f"{CONFIG.expert_hidden_dim}, chunk {CONFIG.attention_chunk_size}, vocab {CONFIG.vocab_size}; "
            f"median of {args.repeats}.\n\n"
            "| dtype | transformers (s) | herd (s) | transformers / herd |\n|---|---|---|---|\n")
    table = "".join(f"| {r['dtype']} | {r['transformers_s']:.4f} | {r['herd_s']:.4f} | {r['ratio']:.2f}x |\n"
                    for r in rows)
    print(head + table)
    if args.write:
        append_results(f"Command: `python benchmarks/forward.py --tokens {args.tokens} --device {args.device} "
                       f"--repeats {args.repeats} --write`\n\n" + head + table)


if __name__ == "__main__":
    main()
