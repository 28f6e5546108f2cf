"""Serving throughput of `herd serve` under concurrent clients, against sequential serving measured in the same run.

    python benchmarks/serve.py [--configs medium] [--dtype bf16] [--concurrency 1,8,32] [--new-tokens 32] [--write]

For each config (benchmarks/configs.py, random weights) the script starts the real server (uvicorn on loopback,
in this process) and drives it with the official openai client from threads:
- the anchor: the same kind of request sent one after another (``--sequential`` requests), each one alone in the
  batch;
- then ``c`` clients at once for each concurrency c, each streaming one completion of ``--new-tokens`` tokens
  after a 32-token prompt (no stop token: every request generates exactly that many).
It reports requests/s, generated tokens/s, the ratio of tokens/s to the sequential anchor, the mean time to first
token, and the largest decode batch the scheduler ran.
"""

from __future__ import annotations

import argparse
import datetime
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import configs  # noqa: E402
from report import append_results, describe  # noqa: E402

import herd  # noqa: E402

NAME = "bench"


def start_server(llm, max_batch: int):
    import uvicorn

    from herd.serve.app import create_app

    app = create_app(llm, NAME, max_batch=max_batch, max_len=1024)
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.05)
    return server, thread, app, f"http://127.0.0.1:{server.servers[0].sockets[0].getsockname()[1]}/v1"


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


def bench_config(name: str, dtype: str, levels: list[int], new_tokens: int, sequential: int) -> list[dict]:
    llm = herd.load(configs.make_model_dir(name, dtype), dtype=dtype)
    server, thread, app, url = start_server(llm, max_batch=max(levels))
    sched, vocab = app.state.scheduler, llm.config.vocab_size
    try:
        one_request(url, 0, 4, vocab)  # warm-up
        rows = []
        anchor = run_level(url, 1, sequential, new_tokens, 1000, vocab)
        rows.append({"level": "sequential", **anchor, "max_batch": 1})
        print(f"{name} {dtype} sequential: {anchor['tok_s']:.1f} tok/s", flush=True)
        for c in levels:
            sched.stats.max_running = 0
            r = run_level(url, c, c, new_tokens, 2000 + 100 * c, vocab)
            rows.append({"level": c, **r, "max_batch": sched.stats.max_running})
            print(f"{name} {dtype} {c} clients: {r['tok_s']:.1f} tok/s ({r['tok_s'] / anchor['tok_s']:.2f}x)",
                  flush=True)
        for r in rows:
            r["vs_sequential"] = r["tok_s"] / anchor["tok_s"]
        return rows
    finally:
        server.should_exit = True
        thread.join(timeout=60)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--configs", default="medium")
    p.add_argument("--dtype", default="bf16")
    p.add_argument("--concurrency", default="1,8,32")
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--sequential", type=int, default=4, help="requests in the sequential anchor")
    p.add_argument("--write", action="store_true", help="append the table to benchmarks/RESULTS.md")
    a = p.parse_args()
    levels = [int(c) for c in a.concurrency.split(",")]
    lines = ["| config | clients | requests | wall s | requests/s | tokens/s | vs sequential | mean TTFT s | "
             "largest decode batch |", "|---|---|---|---|---|---|---|---|---|"]
    for name in a.configs.split(","):
        for r in bench_config(name, a.dtype, levels, a.new_tokens, a.sequential):
            lines.append(f"| {name} | {r['level']} | {r['requests']} | {r['wall_s']:.1f} | {r['req_s']:.2f} | "
                         f"{r['tok_s']:.1f} | {r['vs_sequential']:.2f}x | {r['ttft_s']:.2f} | {r['max_batch']} |")
    table = "\n".join(lines)
    print(table)
    if a.write:
        append_results(
            f"### Serving (`herd serve`, {a.dtype}, {a.new_tokens} new tokens per request) — "
            f"{datetime.date.today()} — {describe()}\n\n"
            f"Command: `python benchmarks/serve.py --configs {a.configs} --dtype {a.dtype} --concurrency "
            f"{a.concurrency} --new-tokens {a.new_tokens} --write`. torch {torch.__version__}. The server and its "
            f"clients (openai, streaming, one thread each) share the machine. \"sequential\" sends "
            f"{a.sequential} requests one after another (the anchor); each concurrency level sends that many "
            f"requests at once, with --max-batch {max(levels)}.\n\n{table}\n")


if __name__ == "__main__":
    main()
