"""The cost of shields in `herd serve`: Llama Guard latency per check, and server throughput with input / output
moderation on vs off, measured in the same run.

    python benchmarks/guard.py                  # fp32,bf16; 8 clients x 64 tokens; 3 rounds of each setting
    python benchmarks/guard.py --write          # ... and append the section to benchmarks/RESULTS.md
    python benchmarks/guard.py --dtype fp32 --clients 8 --max-tokens 64 --rounds 3 --calls 10 --no-endpoint
    python benchmarks/guard.py --quick          # tiny smoke run (about a minute); never written to RESULTS.md

The served model is herd-pico (models/herd-pico). The guard is models/herd-guard-pico when it exists, else
herd-pico itself as a stand-in (``--guard DIR`` picks another). A stand-in's speed is a guard's speed only where it
does the same work, so the stand-in is run as a trained guard that answers "safe" would be: its answer is cut at
the length of "safe" + <|eot|> (a trained guard stops there; herd-pico would write Shakespeare up to herd's cap
of 16 tokens), and it is scored as unsafe with P ~ 0, so nothing is blocked. One difference stays: herd's Guard
reads P(unsafe) from the first step's top-20 logprobs, and when "unsafe" is not among them (herd-pico: never) runs
one more forward over the guard prompt for the exact value; a trained guard that answers "safe" usually has
"unsafe" among them. The guard-latency table says whether that forward ran and what it costs alone.

1. Guard latency per check, in this process: ``Guard.moderate`` (as a shield calls it: the conversation in
   Llama Guard's view) on an input-style conversation (one user turn) and an output-style one (the same turn + the
   served model's greedy answer of --max-tokens tokens), --calls timed calls after 2 warm-up calls each; median
   and p90, and the median against one plain request's latency: one chat request alone on the unshielded server
   (non-streaming, --max-tokens tokens), median of --calls sent one after another. The same request is also sent
   alone --calls times to the input- and the input+output-moderated servers: the differences of the medians are
   one input / output check as the server runs it (on a request worker thread, beside the scheduler's thread).
2. Server throughput. Each setting is a server of its own, `herd serve`'s code path (herd.serve.app.serve: the
   scheduler on the main thread, HTTP on its own thread, an in-process guard on the request's worker thread,
   serialised by its lock), in a child process so that its GIL is not the clients'; all of one dtype's servers
   are up at once and idle while another is measured. A round sends --clients chat requests at once (httpx,
   asyncio, one per client; distinct user turns, --max-tokens tokens, temperature 0, the stop tokens banned with
   logit_bias so that every answer has exactly --max-tokens tokens and every setting does the same generation):
     none              no shield (the anchor, 1.00x), non-streaming
     none, stream      no shield, streaming (the anchor of the streamed rows' second ratio)
     input             --moderate input: one guard check before each request is queued
     input+output      --moderate input,output, non-streaming: + one check of the whole answer
     input+output, stream  the same, streaming with --guard-interval (32): + a check every interval tokens and
                       at the end, each on the whole answer so far; text is released only once checked
   and, unless --no-endpoint, the same two input+output settings with the guard behind a second `herd serve` (a
   plain one, of the guard model, --max-batch --clients) that the shield asks over HTTP (EndpointGuard: requests
   are moderated concurrently and the guard server batches them). Each setting runs --rounds rounds after a
   warm-up round, interleaved (one round of each setting in turn, the order rotated every round); the table shows
   the median round by tokens/s. tokens/s = completion tokens of the round / its wall time; latency = a request's
   time to its last byte, TTFT = to its first content (streamed rows; a shielded stream's first content is its
   first released burst). Guard checks and guard time per request come from the server's /metrics
   (herd_guard_latency_seconds).

The load average is read before and after, and the CPU time that processes other than this benchmark and its
servers used during the timed rounds (/proc/stat, as benchmarks/sft.py's Contention) is reported: on 2 cores, a
run where others used more than ~0.25 cores is not a clean measurement (the section then says so).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import socket
import subprocess
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

import httpx
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from report import append_results, section_command  # noqa: E402
from sft import Contention, load_average, machine  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
PICO = ROOT / "models" / "herd-pico"
GUARD_PICO = ROOT / "models" / "herd-guard-pico"
NAME = "bench"
GUARD_NAME = "guard"
BUSY_LOAD, BUSY_OTHERS = 1.5, 0.25

SERVED = {"none": "unshielded", "input": "input-moderated", "io": "input+output-moderated"}
# (label, server, stream): the throughput settings, in table order
SETTINGS = [("none", "none", False), ("none, stream", "none", True), ("input", "input", False),
            ("input+output", "io", False), ("input+output, stream", "io", True),
            ("endpoint input+output", "endpoint", False), ("endpoint input+output, stream", "endpoint", True)]

PROMPTS = ["Tell me about the king and his three daughters.", "What should a young prince learn first?",
           "Describe a storm at sea.", "Why do lovers quarrel in spring?", "Write a speech for a tired soldier.",
           "What does the fool say to the king?", "How should a host welcome guests to a feast?",
           "Tell a short tale of two rival houses.", "What is honour worth?", "Describe the forest at night.",
           "Give advice to a son leaving for Paris.", "What did the ghost reveal?", "Praise the summer's day.",
           "How does a merchant lose his fortune?", "Speak of the sea and its tides.", "Who rules the island?"]


# -- the guard ---------------------------------------------------------------------------------------------------
def pick_guard(spec: str | None) -> tuple[str, bool]:
    """(guard model directory, stand-in?): --guard, else models/herd-guard-pico, else herd-pico as a stand-in."""
    if spec:
        return spec, Path(spec).resolve() == PICO.resolve()
    if (GUARD_PICO / "config.json").is_file():
        return str(GUARD_PICO), False
    return str(PICO), True


def stand_in_tokens(tokenizer) -> int:
    """The tokens a trained guard generates for a "safe" verdict: the word, then <|eot|>."""
    return len(tokenizer.encode("safe")) + 1


def make_guard(spec: str, dtype: str, stand_in: bool):
    """A herd.safety.guard Guard (a directory, in this process) or EndpointGuard (a URL), as the shield uses it."""
    from herd.safety.guard import EndpointGuard, Guard
    from herd.tokenizer import Tokenizer

    cap = stand_in_tokens(Tokenizer.for_model(PICO)) if stand_in else 16  # 16: herd's own cap
    if spec.startswith("http"):
        return EndpointGuard(spec, max_new_tokens=cap, model=GUARD_NAME, timeout=600.0)
    return Guard.load(spec, dtype=dtype, max_new_tokens=cap)


# -- a server, in a child process -----------------------------------------------------------------------------------
def serve_child(spec: dict) -> None:
    """`herd serve`'s code path (herd.serve.app.serve) with the shield built here (see the module docstring)."""
    import herd
    from herd.safety.shield import Shield, ShieldConfig
    from herd.serve.app import serve

    if spec.get("threads"):
        torch.set_num_threads(spec["threads"])
    llm = herd.load(spec["model"], dtype=spec["dtype"])
    shield = None
    if spec.get("guard"):
        config = ShieldConfig(guard=spec["guard"], moderate=spec["moderate"], interval=spec["interval"],
                              dtype=spec["dtype"])
        shield = Shield(config, make_guard(spec["guard"], spec["dtype"], spec["stand_in"]))
    serve(llm, spec["name"], port=spec["port"], log_level="warning", shield=shield, max_batch=spec["max_batch"])


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Server:
    def __init__(self, spec: dict, logdir: Path):
        self.spec = {**spec, "port": free_port()}
        self.url = f"http://127.0.0.1:{self.spec['port']}"
        self.log = logdir / f"{spec['key']}-{spec['dtype']}.log"
        env = dict(os.environ)
        if spec.get("threads"):  # also the OpenMP pool of the guard's worker thread
            env["OMP_NUM_THREADS"] = str(spec["threads"])
        with self.log.open("w") as f:
            self.proc = subprocess.Popen([sys.executable, __file__, "--serve-child", json.dumps(self.spec)],
                                         stdout=f, stderr=subprocess.STDOUT, cwd=ROOT, env=env)

    def wait(self, timeout: float = 600) -> None:
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise SystemExit(f"server {self.spec['key']} ({self.spec['dtype']}) did not start:\n"
                                 f"{self.log.read_text()[-4000:]}")
            try:
                if httpx.get(self.url + "/health", timeout=2, trust_env=False).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.3)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def cpu_s(self) -> float:
        """The server's CPU time so far (all its threads)."""
        try:
            f = Path(f"/proc/{self.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
            return (int(f[11]) + int(f[12])) / os.sysconf("SC_CLK_TCK")  # utime, stime
        except (OSError, IndexError, ValueError):
            return 0.0

    def guard_counters(self) -> tuple[float, float]:
        """(shield checks, seconds in them) so far, every stage, from /metrics."""
        n = s = 0.0
        for line in httpx.get(self.url + "/metrics", trust_env=False).text.splitlines():
            name, _, value = line.rpartition(" ")
            if name.startswith("herd_guard_latency_seconds_count"):
                n += float(value)
            elif name.startswith("herd_guard_latency_seconds_sum"):
                s += float(value)
        return n, s


class Others(Contention):
    """sft.Contention, not counting the servers' CPU time as others'."""

    def __init__(self, servers: list[Server]):
        self.servers = servers
        self.cpu0 = sum(s.cpu_s() for s in servers)
        super().__init__()

    def stop(self) -> dict:
        wall = time.perf_counter() - self.start[0]
        r = super().stop()
        servers = (sum(s.cpu_s() for s in self.servers) - self.cpu0) / wall
        return {**r, "others_cores": max(0.0, r["others_cores"] - servers), "servers_cores": servers}


# -- clients -----------------------------------------------------------------------------------------------------
def request_body(k: int, max_tokens: int, stream: bool, banned: list[int]) -> dict:
    body = {"model": NAME, "messages": [{"role": "user", "content": PROMPTS[k % len(PROMPTS)]}],
            "max_tokens": max_tokens, "temperature": 0, "logit_bias": {str(t): -100 for t in banned},
            "stream": stream}
    if stream:
        body["stream_options"] = {"include_usage": True}
    return body


async def one_request(client: httpx.AsyncClient, url: str, body: dict) -> dict:
    """latency (s), ttft (s, streamed), completion tokens, blocked, text of one chat request."""
    t0 = time.perf_counter()
    if not body["stream"]:
        r = await client.post(url + "/v1/chat/completions", json=body)
        r.raise_for_status()
        out = r.json()
        choice = out["choices"][0]
        return {"latency": time.perf_counter() - t0, "ttft": None, "tokens": out["usage"]["completion_tokens"],
                "blocked": choice["finish_reason"] == "content_filter", "text": choice["message"]["content"]}
    first, tokens, blocked, text = None, 0, False, ""
    async with client.stream("POST", url + "/v1/chat/completions", json=body) as r:
        r.raise_for_status()
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if "error" in chunk:
                raise RuntimeError(f"stream failed: {chunk['error']}")
            for c in chunk.get("choices") or []:
                piece = c.get("delta", {}).get("content")
                if piece:
                    text += piece
                    if first is None:
                        first = time.perf_counter() - t0
                blocked = blocked or c.get("finish_reason") == "content_filter"
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
    return {"latency": time.perf_counter() - t0, "ttft": first, "tokens": tokens, "blocked": blocked, "text": text}


def run_round(url: str, clients: int, max_tokens: int, stream: bool, banned: list[int]) -> dict:
    """``clients`` requests at once; tokens/s over the round's wall time."""
    async def go():
        limits = httpx.Limits(max_connections=clients + 4, max_keepalive_connections=clients + 4)
        async with httpx.AsyncClient(timeout=1800, limits=limits, trust_env=False) as client:
            t0 = time.perf_counter()
            done = await asyncio.gather(*(one_request(client, url, request_body(k, max_tokens, stream, banned))
                                          for k in range(clients)))
            return time.perf_counter() - t0, done

    wall, done = asyncio.run(go())
    tokens = sum(d["tokens"] for d in done)
    ttfts = [d["ttft"] for d in done if d["ttft"] is not None]
    return {"wall_s": wall, "tokens": tokens, "tok_s": tokens / wall,
            "latency_s": sum(d["latency"] for d in done) / len(done),
            "ttft_s": sum(ttfts) / len(ttfts) if ttfts else None, "blocked": sum(d["blocked"] for d in done)}


def quantile(xs: list[float], q: float) -> float:
    """Nearest-rank quantile."""
    s = sorted(xs)
    return s[max(0, math.ceil(q * len(s)) - 1)]


# -- one dtype -----------------------------------------------------------------------------------------------------
def server_specs(a, dtype: str, guard: str, stand_in: bool) -> list[dict]:
    base = {"model": str(PICO), "dtype": dtype, "name": NAME, "max_batch": a.clients, "interval": a.interval,
            "stand_in": stand_in, "threads": a.threads}
    specs = [{**base, "key": "none"}, {**base, "key": "input", "guard": guard, "moderate": "input"},
             {**base, "key": "io", "guard": guard, "moderate": "input,output"}]
    if a.endpoint:
        specs.append({**base, "key": "guard-server", "model": guard, "name": GUARD_NAME})
    return specs


def guard_latency(a, dtype: str, guard_dir: str, stand_in: bool, answer: str) -> list[dict]:
    """Guard.moderate in this process, input- and output-style, as the shield calls it (Llama Guard's view)."""
    from herd.infer.sampling import SamplingParams
    from herd.safety.guard import TOP_LOGPROBS
    from herd.safety.llama_guard import guard_message, verdict_token_ids
    from herd.safety.shield import guard_view

    guard = make_guard(guard_dir, dtype, stand_in)
    llm = guard.llm
    user = {"role": "user", "content": PROMPTS[0]}
    rows = []
    for kind, conv in (("input (1 user turn)", [user]),
                       (f"output (user + {a.max_tokens}-token answer)", [user, {"role": "assistant",
                                                                                "content": answer}])):
        view = guard_view(conv)
        ids, pixels = llm.chat_inputs([guard_message(view)])
        # does herd's Guard find "unsafe" among the first step's top logprobs, or run one more forward for it?
        (probe,) = llm.engine.generate([ids], SamplingParams(max_new_tokens=1, logprobs=TOP_LOGPROBS), [pixels])
        unsafe_id = verdict_token_ids(llm.tokenizer)[1]
        first = probe.logprobs[0]
        fallback = first.token != unsafe_id and unsafe_id not in dict(first.top)
        forward = []
        if fallback:
            with torch.no_grad():
                for i in range(2 + a.calls):
                    t = time.perf_counter()
                    llm.model(torch.tensor([ids]), pixel_values=pixels)
                    if i >= 2:
                        forward.append(time.perf_counter() - t)
        times, verdicts = [], []
        for i in range(2 + a.calls):
            t = time.perf_counter()
            v = guard.moderate(view)
            if i >= 2:
                times.append(time.perf_counter() - t)
            verdicts.append(v)
        rows.append({"dtype": dtype, "check": kind, "prompt_tokens": len(ids), "median_s": quantile(times, 0.5),
                     "p90_s": quantile(times, 0.9), "fallback": fallback,
                     "fallback_s": quantile(forward, 0.5) if forward else None,
                     "answer_tokens": len(llm.tokenizer.encode(verdicts[-1].raw)),
                     "unsafe": sum(not v.safe for v in verdicts)})
        print(f"{dtype} guard {kind}: {len(ids)} prompt tokens, median {rows[-1]['median_s'] * 1e3:.0f} ms, "
              f"p90 {rows[-1]['p90_s'] * 1e3:.0f} ms, fallback forward "
              f"{'%.0f ms' % (rows[-1]['fallback_s'] * 1e3) if fallback else 'no'}, answer {verdicts[-1].raw!r}",
              flush=True)
    return rows


def bench_dtype(a, dtype: str, guard_dir: str, stand_in: bool, banned: list[int], logdir: Path) -> dict:
    specs = server_specs(a, dtype, guard_dir, stand_in)
    servers = {s["key"]: Server(s, logdir) for s in specs}
    try:
        for s in servers.values():
            s.wait()
        if a.endpoint:  # the shield of this one asks the guard server, which must be up first
            url = servers["guard-server"].url + "/v1"
            servers["endpoint"] = Server({**specs[0], "key": "endpoint", "guard": url, "moderate": "input,output"},
                                         logdir)
            servers["endpoint"].wait()
        settings = [s for s in SETTINGS if s[1] in servers]
        print(f"{dtype}: {len(servers)} servers up", flush=True)
        for _, key, stream in settings:  # warm-up round of each setting
            run_round(servers[key].url, a.clients, a.max_tokens, stream, banned)

        # one request alone: on the unshielded server (the unit of the guard-latency table; its answer is the
        # output-style check's), then on the input- and the input+output-moderated servers (their differences:
        # one check as the server runs it)
        alone, answer = {}, None
        for key in ("none", "input", "io"):
            alone[key] = []
            for _ in range(a.calls):
                async def one():
                    async with httpx.AsyncClient(timeout=600, trust_env=False) as client:
                        return await one_request(client, servers[key].url,
                                                 request_body(0, a.max_tokens, False, banned))
                r = asyncio.run(one())
                alone[key].append(r["latency"])
                answer = answer or r["text"]
        plain, med = alone["none"], {k: quantile(v, 0.5) for k, v in alone.items()}
        plain_row = {"dtype": dtype, "median_s": med["none"], "p90_s": quantile(plain, 0.9)}
        print(f"{dtype} one request alone: median {med['none'] * 1e3:.0f} ms (p90 {plain_row['p90_s'] * 1e3:.0f}), "
              f"input-moderated {med['input'] * 1e3:.0f} ms, input+output {med['io'] * 1e3:.0f} ms", flush=True)
        guard_rows = guard_latency(a, dtype, guard_dir, stand_in, answer)
        for g, (kind, lo, hi) in zip(list(guard_rows), (("input", "none", "input"), ("output", "input", "io"))):
            guard_rows.append({**g, "check": f"{kind}, in the server (request alone: {SERVED[hi]} − {SERVED[lo]})",
                               "median_s": med[hi] - med[lo], "p90_s": None, "in_server": True})

        runs: dict[str, list[dict]] = {label: [] for label, _, _ in settings}
        meter = Others(list(servers.values()))
        for r in range(a.rounds):
            order = settings[r % len(settings):] + settings[:r % len(settings)]
            for label, key, stream in order:
                n0, s0 = servers[key].guard_counters()
                out = run_round(servers[key].url, a.clients, a.max_tokens, stream, banned)
                n1, s1 = servers[key].guard_counters()
                out |= {"checks_per_request": (n1 - n0) / a.clients, "guard_s_per_request": (s1 - s0) / a.clients}
                runs[label].append(out)
                print(f"{dtype} round {r + 1} {label}: {out['tok_s']:.1f} tok/s, mean latency "
                      f"{out['latency_s']:.2f} s, {out['checks_per_request']:.1f} checks/request", flush=True)
        load = meter.stop()
    finally:
        for s in servers.values():
            s.stop()
    rows = []
    for label, key, stream in settings:
        best = sorted(runs[label], key=lambda x: x["tok_s"])[len(runs[label]) // 2]
        rows.append({"dtype": dtype, "setting": label, "stream": stream, **best,
                     "all_tok_s": [x["tok_s"] for x in runs[label]]})
    anchor = rows[0]["tok_s"]
    same = {False: rows[0], True: next((r for r in rows if r["setting"] == "none, stream"), rows[0])}
    for r in rows:
        r["vs_anchor"] = r["tok_s"] / anchor
        r["vs_same_mode"] = r["tok_s"] / same[r["stream"]]["tok_s"]
        r["latency_vs_anchor"] = r["latency_s"] / rows[0]["latency_s"]
    for g in guard_rows:
        g["vs_plain"] = g["median_s"] / plain_row["median_s"]
    return {"plain": plain_row, "guard": guard_rows, "throughput": rows, **load}


# -- the report ----------------------------------------------------------------------------------------------------
def versions() -> str:
    import importlib.metadata as md

    return ", ".join(f"{p} {md.version(p)}" for p in ("herd", "torch", "fastapi", "uvicorn", "httpx"))


def render(a, results: dict, guard_dir: str, stand_in: bool, load0: float, load1: float, others: float,
           busy: bool, problems: list[str]) -> str:
    from herd.tokenizer import Tokenizer

    cmd = section_command("guard.py", a.argv)
    gname = Path(guard_dir).name
    if stand_in:
        cap = stand_in_tokens(Tokenizer.for_model(PICO))
        who = (f"**herd-pico as a stand-in guard** (models/herd-guard-pico did not exist): its answer cut at {cap} "
               f"tokens, the length of \"safe\" + <|eot|> from a trained guard (herd's cap is 16), and it never "
               f"blocks (P(unsafe) ~ 0)")
    else:
        who = f"{gname} (herd's Guard, its answer capped at 16 tokens as herd runs it)"
    endpoint = (f" \"endpoint\" rows: the shield asks a second `herd serve` of the guard (plain, --max-batch "
                f"{a.clients}) over HTTP (EndpointGuard: checks run concurrently and the guard server batches them; "
                f"P(unsafe) from the answer's top-20 logprobs, no extra forward).") if a.endpoint else ""
    lines = [f"### Shield cost in `herd serve` (herd-pico, {a.clients} clients x {a.max_tokens} tokens, guard: "
             f"{'herd-pico stand-in' if stand_in else gname}) — {date.today()} — {machine()}", "",
             f"Command: `{cmd}`", "",
             f"{versions()}. Served model herd-pico; guard: {who}; guard and model in the same dtype. Each setting "
             f"is its own server in its own process (herd.serve.app.serve, `herd serve`'s code path: scheduler on "
             f"the main thread, an in-process guard on the request's worker thread, one check at a time), "
             f"--max-batch {a.clients}, {a.threads or torch.get_num_threads()} torch threads"
             f"{' (--threads)' if a.threads else ''}; all of a dtype's servers are up at once, idle but the one "
             f"measured. A round = {a.clients} chat requests at once (httpx, distinct user turns, temperature 0, "
             f"stop tokens banned by logit_bias so every answer has exactly {a.max_tokens} tokens); {a.rounds} "
             f"rounds per setting after a warm-up round, interleaved, order rotated; the median round by tokens/s is "
             f"shown. Streamed output moderation checks every {a.interval} tokens and at the end, on the whole "
             f"answer so far.{endpoint} Guard checks and guard time per request from the server's /metrics. Load "
             f"average {load0:.2f} before, {load1:.2f} after (the latter includes this run); other processes and "
             f"steal used up to {others:.2f} cores during the timed rounds"
             f"{' — **machine busy: the numbers are indicative; rerun when quiet**' if busy else ''}.", "",
             f"Guard latency per check. In this process: `Guard.moderate` as the shield calls it, on the main "
             f"thread, {a.calls} calls after 2 warm-up calls. In the server: one request alone, non-streaming, "
             f"{a.calls} times on each of the unshielded, input- and input+output-moderated servers; the differences "
             f"of their medians are one check as `herd serve` runs it (on a request worker thread). The anchor is "
             f"one plain chat request alone on the unshielded server ({a.max_tokens} tokens, median of {a.calls}). "
             f"\"extra forward\": herd's Guard did not find \"unsafe\" "
             f"in the first step's top-20 logprobs and ran one more forward over the guard prompt for P(unsafe) "
             f"(its median time alone; a trained guard answering \"safe\" usually has it in the top 20).", "",
             "| dtype | check | guard prompt tokens | median ms | p90 ms | vs plain request | extra forward ms |",
             "|---|---|---|---|---|---|---|"]
    for dtype, res in results.items():
        p = res["plain"]
        lines.append(f"| {dtype} | plain request, no shield ({a.max_tokens} tokens) | – | {p['median_s'] * 1e3:.0f} | "
                     f"{p['p90_s'] * 1e3:.0f} | 1.00x (anchor) | – |")
        for g in res["guard"]:
            extra = f"{g['fallback_s'] * 1e3:.0f}" if g["fallback"] else "no"
            p90 = "–" if g["p90_s"] is None else f"{g['p90_s'] * 1e3:.0f}"
            lines.append(f"| {dtype} | {g['check']} | {g['prompt_tokens']} | {g['median_s'] * 1e3:.0f} | "
                         f"{p90} | {g['vs_plain']:.2f}x | {extra} |")
    lines += ["", f"Server throughput, {a.clients} concurrent chat requests of {a.max_tokens} tokens (\"vs anchor\": "
              f"tokens/s against no shield, non-streaming; \"vs unshielded\": against no shield in the same mode, "
              f"streaming or not):", "",
              "| dtype | shield | tokens/s | vs anchor | vs unshielded | mean latency s | latency vs anchor | "
              "mean TTFT s | guard checks / request | guard s / request | blocked | tokens/s of each round |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for dtype, res in results.items():
        for r in res["throughput"]:
            anchor = r["setting"] == "none"
            ttft = "–" if r["ttft_s"] is None else f"{r['ttft_s']:.2f}"
            lines.append(f"| {dtype} | {r['setting']} | {r['tok_s']:.1f} | "
                         f"{'1.00x (anchor)' if anchor else '**%.2fx**' % r['vs_anchor']} | "
                         f"{r['vs_same_mode']:.2f}x | {r['latency_s']:.2f} | {r['latency_vs_anchor']:.2f}x | {ttft} | "
                         f"{r['checks_per_request']:.1f} | {r['guard_s_per_request']:.2f} | {r['blocked']} | "
                         f"{', '.join('%.1f' % x for x in r['all_tok_s'])} |")
    if problems:
        lines += ["", "Checks failed: " + "; ".join(problems)]
    return "\n".join(lines) + "\n"


def check(a, results: dict) -> list[str]:
    """Every setting must have done the same generation, and nothing may have been blocked."""
    problems = []
    for dtype, res in results.items():
        for r in res["throughput"]:
            if r["tokens"] != a.clients * a.max_tokens:
                problems.append(f"{dtype} {r['setting']}: {r['tokens']} completion tokens, expected "
                                f"{a.clients * a.max_tokens}")
            if r["blocked"]:
                problems.append(f"{dtype} {r['setting']}: {r['blocked']} requests blocked by the guard")
    return problems


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dtype", default="fp32,bf16", help="fp32, bf16 or both: fp32,bf16 (model and guard)")
    p.add_argument("--clients", type=int, default=8, help="concurrent chat requests per round (and --max-batch)")
    p.add_argument("--max-tokens", type=int, default=64, help="completion tokens per request")
    p.add_argument("--rounds", type=int, default=3, help="timed rounds per setting; the median is shown")
    p.add_argument("--calls", type=int, default=10, help="timed guard calls (and plain requests) per kind")
    p.add_argument("--interval", type=int, default=32, help="--guard-interval of the streamed rows")
    p.add_argument("--threads", type=int, help="torch threads of the servers and the in-process guard (default: "
                   "torch's, as herd serve runs)")
    p.add_argument("--guard", help="guard model directory (default: models/herd-guard-pico, else herd-pico)")
    p.add_argument("--no-endpoint", dest="endpoint", action="store_false",
                   help="leave out the rows with the guard behind a second server")
    p.add_argument("--quick", action="store_true", help="tiny settings: a smoke run, never written")
    p.add_argument("--write", action="store_true", help="append the section to benchmarks/RESULTS.md")
    p.add_argument("--out", help="also write the section (markdown) to this file")
    p.add_argument("--json", help="write the raw results to this file")
    p.add_argument("--serve-child", help=argparse.SUPPRESS)  # a server's spec (JSON), in a child process
    a = p.parse_args()
    if a.serve_child:
        serve_child(json.loads(a.serve_child))
        return
    a.argv = sys.argv[1:]
    if a.quick:
        a.dtype, a.clients, a.max_tokens, a.rounds, a.calls, a.interval = "fp32", 2, 8, 1, 2, 4
    if min(a.clients, a.max_tokens, a.rounds, a.calls, a.interval) < 1:
        raise SystemExit("--clients, --max-tokens, --rounds, --calls and --interval must be >= 1")
    from herd.tokenizer import Tokenizer

    if a.threads:
        torch.set_num_threads(a.threads)
    tok = Tokenizer.for_model(PICO)
    banned = sorted(tok.stop_ids)
    guard_dir, stand_in = pick_guard(a.guard)
    print(f"guard: {guard_dir}{' (herd-pico as a stand-in)' if stand_in else ''}", flush=True)
    t0 = time.perf_counter()
    load0 = load_average()
    if load0 > BUSY_LOAD:
        print(f"WARNING: load average {load0:.2f} at start: the machine is busy, the numbers will be noisy",
              file=sys.stderr, flush=True)
    results = {}
    with tempfile.TemporaryDirectory(prefix="guard-bench-") as logdir:
        for dtype in a.dtype.split(","):
            t1 = time.perf_counter()
            results[dtype] = bench_dtype(a, dtype, guard_dir, stand_in, banned, Path(logdir))
            print(f"{dtype}: {time.perf_counter() - t1:.0f} s", flush=True)
    load1 = load_average()
    others = max(max(r["others_cores"], r["steal_cores"]) for r in results.values())
    busy = load0 > BUSY_LOAD or others > BUSY_OTHERS
    if busy:
        print(f"WARNING: machine busy: load average {load0:.2f} at start, other processes / steal up to "
              f"{others:.2f} cores during the timed rounds; rerun when quiet", file=sys.stderr)
    problems = check(a, results)
    for msg in problems:
        print("WARNING:", msg, file=sys.stderr)
    section = render(a, results, guard_dir, stand_in, load0, load1, others, busy, problems)
    print("\n" + section)
    print(f"({time.perf_counter() - t0:.0f} s)", file=sys.stderr)
    if a.out:
        Path(a.out).write_text(section)
    if a.json:
        Path(a.json).write_text(json.dumps(results, indent=1) + "\n")
    if a.write:
        if a.quick:
            print("not appended to RESULTS.md: a --quick run", file=sys.stderr)
        else:
            append_results(section)


if __name__ == "__main__":
    main()
