"""Serving throughput of `herd serve` under concurrent clients, against sequential serving measured in the same run.

    python benchmarks/serve.py [--configs medium] [--dtype bf16] [--concurrency 1,8,32] [--new-tokens 32] [--compile]
                               [--repeats 3] [--write]

For each config (benchmarks/configs.py, random weights) the script starts `herd serve` in its own process on
loopback and drives it with the official openai client from threads:
- the anchor: the same kind of request sent one after another (``--sequential`` requests), each one alone in the
  batch;
- then ``c`` clients at once for each concurrency c, each streaming one completion of ``--new-tokens`` tokens
  after a 32-token prompt (no stop token: every request generates exactly that many).
It reports requests/s, generated tokens/s, the ratio of tokens/s to the sequential anchor, the mean time to first
token, and the mean decode batch (decode tokens / decode steps, from the server's /metrics).

With ``--compile`` the server decodes through torch.compile (`herd serve --compile`, which compiles the graph
of every batch-size bucket at start-up, before /health answers). A second anchor is then `herd generate
--compile` itself, outside any server: `herd bench --compile` on the same prompt length and token count,
counted end to end (prefill + decode), so that "vs generate" is the server's overhead for one client.
"""

from __future__ import annotations

import argparse
import datetime
import json
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import httpx
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import configs  # noqa: E402
from report import append_results, describe  # noqa: E402

NAME = "bench"


@contextmanager
def server(model_dir: Path, dtype: str, max_batch: int, compile: bool = False):
    """`herd serve` in its own process (its GIL is not shared with the client threads); yields the base URL."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "herd.cli", "serve", str(model_dir), "--dtype", dtype,
                             "--port", str(port), "--max-batch", str(max_batch), "--max-model-len", "1024",
                             "--model-name", NAME, "--log-level", "warning", *(["--compile"] if compile else [])])
    url = f"http://127.0.0.1:{port}"
    try:
        while True:
            if proc.poll() is not None:
                raise SystemExit(f"herd serve exited with {proc.returncode}")
            try:
                if httpx.get(url + "/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.5)
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=60)


def counters(url: str) -> tuple[float, float]:
    """(decode steps, generated tokens) so far, from /metrics."""
    found = {}
    for line in httpx.get(url + "/metrics").text.splitlines():
        name, _, value = line.partition(" ")
        if name in ("herd_decode_steps", "herd_generation_tokens_total"):
            found[name] = float(value)
    return found["herd_decode_steps"], found["herd_generation_tokens_total"]


def one_request(url: str, k: int, new_tokens: int, vocab: int) -> tuple[float, float, int]:
    """(seconds to the first token, seconds in all, tokens) of one streamed completion of a 32-token prompt (token
    ids: the benchmark models have a 32k vocab, below the Llama 4 tokenizer's special tokens, so no stop token
    can end a request early)."""
    import openai

    client = openai.OpenAI(base_url=url, api_key="x", max_retries=0, timeout=3600)
    prompt = torch.randint(0, vocab, (32,), generator=torch.Generator().manual_seed(k)).tolist()
    t0, first, n = time.perf_counter(), None, 0
    stream = client.completions.create(model=NAME, prompt=prompt, max_tokens=new_tokens, temperature=0, stream=True,
                                       stream_options={"include_usage": True})
    for chunk in stream:
        if chunk.choices and first is None:
            first = time.perf_counter() - t0
        if chunk.usage is not None:
            n = chunk.usage.completion_tokens
    return first or 0.0, time.perf_counter() - t0, n


def run_level(url: str, clients: int, total: int, new_tokens: int, offset: int, vocab: int) -> dict:
    """``total`` requests, at most ``clients`` in flight."""
    t0 = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        results = list(pool.map(lambda k: one_request(url, k, new_tokens, vocab), range(offset, offset + total)))
    wall = time.perf_counter() - t0
    tokens = sum(r[2] for r in results)
    return {"requests": total, "wall_s": wall, "req_s": total / wall, "tok_s": tokens / wall,
            "ttft_s": sum(r[0] for r in results) / total, "tokens": tokens}


def generate_tok_s(model_dir: Path, dtype: str, new_tokens: int, compile: bool, repeats: int) -> float:
    """`herd generate`'s tokens/s for one 32-token prompt, end to end (prefill + decode), from `herd bench`: the
    median of ``repeats`` runs, each in its own process as the server is."""
    runs = []
    for _ in range(repeats):
        out = subprocess.run([sys.executable, "-m", "herd.cli", "bench", str(model_dir), "--prompt-len", "32",
                              "--new-tokens", str(new_tokens), "--dtype", dtype, "--json",
                              *(["--compile"] if compile else [])], check=True, capture_output=True, text=True)
        r = json.loads(out.stdout)
        runs.append(new_tokens / (r["prefill_s"] + r["decode_s"]))
    return sorted(runs)[len(runs) // 2]


def bench_config(name: str, dtype: str, levels: list[int], new_tokens: int, sequential: int,
                 compile: bool = False, repeats: int = 3) -> list[dict]:
    model_dir = configs.make_model_dir(name, dtype)
    vocab = configs.CONFIGS[name].vocab_size
    anchor = generate_tok_s(model_dir, dtype, new_tokens, compile, repeats)
    print(f"{name} {dtype} herd generate{' --compile' if compile else ''}: {anchor:.1f} tok/s", flush=True)
    with server(model_dir, dtype, max(levels), compile) as url:
        one_request(url + "/v1", 0, 4, vocab)  # warm-up
        rows = []
        for level in ["sequential", *levels]:
            runs = []
            for rep in range(repeats):  # arrivals interleave with steps differently each time: take the median
                steps, tokens = counters(url)
                if level == "sequential":
                    r = run_level(url + "/v1", 1, sequential, new_tokens, 1000 + 10 * rep, vocab)
                else:
                    r = run_level(url + "/v1", level, level, new_tokens, 2000 + 100 * level + rep, vocab)
                steps2, tokens2 = counters(url)
                # every request's first token comes from its prefill, the others from decode steps
                r["mean_batch"] = (tokens2 - tokens - r["requests"]) / max(steps2 - steps, 1)
                runs.append(r)
            r = sorted(runs, key=lambda r: r["tok_s"])[len(runs) // 2]
            rows.append({"level": level, **r})
            each = ", ".join(f"{x['tok_s']:.1f}" for x in runs)
            print(f"{name} {dtype} {level}: {r['tok_s']:.1f} tok/s (runs: {each}), mean decode batch "
                  f"{r['mean_batch']:.1f}", flush=True)
        for r in rows:
            r["vs_sequential"] = r["tok_s"] / rows[0]["tok_s"]
            r["vs_generate"] = r["tok_s"] / anchor if r["level"] in ("sequential", 1) else None
        return [{"level": "herd generate", "requests": 1, "wall_s": new_tokens / anchor, "req_s": anchor / new_tokens,
                 "tok_s": anchor, "ttft_s": None, "mean_batch": 1.0, "vs_sequential": anchor / rows[0]["tok_s"],
                 "vs_generate": 1.0}, *rows]


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--configs", default="medium")
    p.add_argument("--dtype", default="bf16")
    p.add_argument("--concurrency", default="1,8,32")
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--sequential", type=int, default=4, help="requests in the sequential anchor")
    p.add_argument("--compile", action="store_true", help="herd serve --compile (and herd generate --compile)")
    p.add_argument("--repeats", type=int, default=3, help="runs of each level; the table shows the median")
    p.add_argument("--write", action="store_true", help="append the table to benchmarks/RESULTS.md")
    a = p.parse_args()
    levels = [int(c) for c in a.concurrency.split(",")]
    lines = ["| config | clients | requests | wall s | requests/s | tokens/s | vs sequential | vs generate | "
             "mean TTFT s | mean decode batch |", "|---|---|---|---|---|---|---|---|---|---|"]
    for name in a.configs.split(","):
        for r in bench_config(name, a.dtype, levels, a.new_tokens, a.sequential, a.compile, a.repeats):
            vs_generate = "" if r["vs_generate"] is None else f"{r['vs_generate']:.2f}x"
            ttft = "–" if r["ttft_s"] is None else f"{r['ttft_s']:.2f}"
            lines.append(f"| {name} | {r['level']} | {r['requests']} | {r['wall_s']:.1f} | {r['req_s']:.2f} | "
                         f"{r['tok_s']:.1f} | {r['vs_sequential']:.2f}x | {vs_generate} | {ttft} | "
                         f"{r['mean_batch']:.1f} |")
    table = "\n".join(lines)
    print(table)
    if a.write:
        append_results(
            f"### Serving (`herd serve{' --compile' if a.compile else ''}`, {a.dtype}, {a.new_tokens} new tokens per "
            f"request) — "
            f"{datetime.date.today()} — {describe()}\n\n"
            f"Command: `python benchmarks/serve.py --configs {a.configs} --dtype {a.dtype} --concurrency "
            f"{a.concurrency} --new-tokens {a.new_tokens}{' --compile' if a.compile else ''} --repeats {a.repeats} "
            f"--write`. torch "
            f"{torch.__version__}. The server (its own "
            f"process) and its clients (openai, streaming, one thread each) share the machine. \"sequential\" sends "
            f"{a.sequential} requests one after another (the anchor); each concurrency level sends that many "
            f"requests at once, with --max-batch {max(levels)}; each level runs {a.repeats} times and the table "
            f"shows the median run. \"herd generate\" is `herd bench` on one 32-token "
            f"prompt outside the server, end to end (the second anchor, \"vs generate\").\n\n{table}\n")


if __name__ == "__main__":
    main()
