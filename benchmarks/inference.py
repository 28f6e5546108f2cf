"""Inference speed of herd's engine against anchors measured in the same run.

    python benchmarks/inference.py [--configs small,medium] [--dtypes fp32,bf16] [--device cpu] [--write]

For each config (benchmarks/configs.py: small = Scout-shaped 512-wide, medium = Maverick-shaped 2048-wide, both
with a 32k vocab and the same random weights in every implementation) and dtype it measures
- decode tok/s at batch 1 (128-token prompt): transformers, herd eager, herd compiled, llama.cpp;
- prefill tok/s on a 2048-token prompt: transformers (one forward), herd, llama.cpp;
- the memory-bandwidth floor of decode: active weight bytes per token / measured copy bandwidth;
- herd's decode throughput at batch 16 over batch 1.
llama.cpp is skipped cleanly when it cannot be built (no network / compiler); transformers with --no-transformers.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import configs  # noqa: E402
import llamacpp  # noqa: E402
from report import append_results, describe  # noqa: E402

from herd import checkpoint  # noqa: E402
from herd.infer.bench import bench  # noqa: E402
from herd.infer.engine import Engine  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def _prompt(n: int, vocab: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, vocab, (1, n), generator=torch.Generator().manual_seed(seed))


def transformers_numbers(model_dir: Path, dtype: torch.dtype, new_tokens: int, prefill_len: int,
                         device: str) -> dict:
    from transformers import Llama4ForCausalLM

    hf = Llama4ForCausalLM.from_pretrained(model_dir, dtype=dtype, attn_implementation="sdpa").to(device).eval()
    vocab = hf.config.vocab_size
    ids = _prompt(128, vocab).to(device)
    kw = dict(do_sample=False, eos_token_id=None, pad_token_id=0)

    def gen(n):
        t = time.perf_counter()
        hf.generate(ids, max_new_tokens=n, min_new_tokens=n, **kw)
        return time.perf_counter() - t

    with torch.inference_mode():
        gen(2)  # warm-up
        t1, tn = gen(1), gen(new_tokens)
        long = _prompt(prefill_len, vocab, 1).to(device)
        hf(long[:, :64], use_cache=False, logits_to_keep=1)
        t = time.perf_counter()
        hf(long, use_cache=False, logits_to_keep=1)
        t_prefill = time.perf_counter() - t
    return {"decode_tok_s": (new_tokens - 1) / (tn - t1), "prefill_tok_s": prefill_len / t_prefill}


def herd_numbers(model_dir: Path, dtype: torch.dtype, new_tokens: int, prefill_len: int, device: str,
                 compile: bool) -> dict:
    model = checkpoint.load(model_dir, dtype=dtype, device=device)
    out = {}
    eager = Engine(model, prefill_chunk=prefill_len)
    out["prefill_tok_s"] = bench(eager, prompt_len=prefill_len, new_tokens=2)["prefill_tok_s"]
    r = bench(eager, prompt_len=128, new_tokens=new_tokens)
    out["decode_tok_s"], out["peak_rss_mb"] = r["decode_tok_s"], r["peak_rss_mb"]
    out["batch16_decode_tok_s"] = bench(eager, prompt_len=128, new_tokens=new_tokens, batch=16)["decode_tok_s"]
    if compile:
        compiled = Engine(model, compile=True)
        t = time.perf_counter()
        bench(compiled, prompt_len=128, new_tokens=new_tokens)  # compiles (and warms) the decode graph
        out["compile_s"] = time.perf_counter() - t
        out["compiled_decode_tok_s"] = bench(compiled, prompt_len=128, new_tokens=new_tokens)["decode_tok_s"]
        bench(compiled, prompt_len=128, new_tokens=new_tokens, batch=16)
        out["compiled_batch16_decode_tok_s"] = bench(compiled, prompt_len=128, new_tokens=new_tokens,
                                                     batch=16)["decode_tok_s"]
    del model
    gc.collect()
    return out


def llamacpp_numbers(name: str, dtype: str, model_dir: Path, new_tokens: int, prefill_len: int) -> dict | None:
    bin_dir = llamacpp.build()
    if bin_dir is None:
        return None
    outtype = "f32" if dtype == "fp32" else "bf16"
    gguf = llamacpp.convert(model_dir, outtype, llamacpp.DEFAULT_WORK_DIR.parent / "gguf" / f"{name}-{outtype}.gguf")
    r = llamacpp.bench(gguf, threads=torch.get_num_threads(), prompt_len=prefill_len, n_gen=new_tokens, reps=3)
    return {"decode_tok_s": r["decode_tok_s"], "prefill_tok_s": r["prefill_tok_s"]}


def floor_tok_s(name: str, dtype: torch.dtype, bandwidth_gbs: float) -> float:
    """Decode cannot beat reading each active weight once per token (embedding lookup excluded)."""
    active = configs.param_counts(configs.CONFIGS[name])["active"]
    return bandwidth_gbs * 1e9 / (active * torch.finfo(dtype).bits / 8)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--configs", default="small,medium")
    p.add_argument("--dtypes", default="fp32,bf16")
    p.add_argument("--device", default="cpu")
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--prefill-len", type=int, default=2048)
    p.add_argument("--no-transformers", action="store_true")
    p.add_argument("--no-llamacpp", action="store_true")
    p.add_argument("--no-compile", action="store_true")
    p.add_argument("--write", action="store_true", help="append the table to benchmarks/RESULTS.md")
    p.add_argument("--json", type=Path, help="also write the raw numbers here")
    args = p.parse_args()
    cpu = args.device == "cpu"
    bandwidth = llamacpp.copy_bandwidth_gbs() if cpu else None
    rows = []
    for name in args.configs.split(","):
        for dt in args.dtypes.split(","):
            dtype = DTYPES[dt]
            model_dir = configs.make_model_dir(name, "f32" if dt == "fp32" else "bf16")
            if cpu:
                llamacpp.wait_idle()
            row = {"config": name, "dtype": dt}
            row["herd"] = herd_numbers(model_dir, dtype, args.new_tokens, args.prefill_len, args.device,
                                       compile=not args.no_compile)
            if not args.no_transformers:
                n = args.new_tokens if name == "small" else min(args.new_tokens, 16)
                row["transformers"] = transformers_numbers(model_dir, dtype, n, args.prefill_len, args.device)
            if cpu and not args.no_llamacpp:
                row["llamacpp"] = llamacpp_numbers(name, dt, model_dir, args.new_tokens, args.prefill_len)
            if bandwidth:
                row["floor_tok_s"] = floor_tok_s(name, dtype, bandwidth)
            rows.append(row)
            print(json.dumps(row), flush=True)
    table = render(rows, args, bandwidth)
    print(table)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))
    if args.write:
        append_results(table)


def _f(v: float | None, fmt: str = "{:.1f}") -> str:
    return "–" if v is None else fmt.format(v)


def render(rows: list[dict], args: argparse.Namespace, bandwidth: float | None) -> str:
    import transformers

    cmd = "python benchmarks/inference.py " + " ".join(sys.argv[1:])
    out = [f"### Inference engine — {datetime.date.today()} — {describe(args.device)}", "",
           f"Command: `{cmd}`. torch {torch.__version__}, transformers {transformers.__version__}. Decode: batch 1, "
           f"128-token prompt, {args.new_tokens} new tokens (transformers on medium: 16); prefill: "
           f"{args.prefill_len}-token prompt." + (f" Copy bandwidth {bandwidth:.1f} GB/s." if bandwidth else ""), "",
           "| config | dtype | decode tok/s: transformers | herd eager | herd compiled | llama.cpp | floor | "
           "herd best / transformers | herd best / llama.cpp | % of floor | prefill tok/s: transformers | herd | "
           "llama.cpp | herd / transformers | batch 16 / batch 1 |",
           "|" + "---|" * 15]
    for r in rows:
        h, t, lc = r["herd"], r.get("transformers") or {}, r.get("llamacpp") or {}
        best = max(h["decode_tok_s"], h.get("compiled_decode_tok_s", 0))
        b16 = max(h["batch16_decode_tok_s"], h.get("compiled_batch16_decode_tok_s", 0))
        b1 = h["decode_tok_s"] if h["batch16_decode_tok_s"] >= h.get("compiled_batch16_decode_tok_s", 0) \
            else h.get("compiled_decode_tok_s", h["decode_tok_s"])
        ratio = lambda a, b: None if not a or not b else a / b  # noqa: E731
        out.append(" | ".join([
            f"| {r['config']}", r["dtype"], _f(t.get("decode_tok_s")), _f(h["decode_tok_s"]),
            _f(h.get("compiled_decode_tok_s")), _f(lc.get("decode_tok_s")), _f(r.get("floor_tok_s")),
            _f(ratio(best, t.get("decode_tok_s")), "{:.1f}x"), _f(ratio(best, lc.get("decode_tok_s")), "{:.2f}x"),
            _f(ratio(best, r.get("floor_tok_s")) and 100 * ratio(best, r.get("floor_tok_s")), "{:.0f}%"),
            _f(t.get("prefill_tok_s"), "{:.0f}"), _f(h["prefill_tok_s"], "{:.0f}"),
            _f(lc.get("prefill_tok_s"), "{:.0f}"),
            _f(ratio(h["prefill_tok_s"], t.get("prefill_tok_s")), "{:.1f}x"),
            _f(ratio(b16, b1), "{:.1f}x") + " |"]))
    return "\n".join(out) + "\n"


if __name__ == "__main__":
    main()
