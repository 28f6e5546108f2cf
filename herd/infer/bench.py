"""``herd bench``: prefill and decode throughput and peak memory of the engine on random prompts."""

from __future__ import annotations

import resource
import time

import torch

from herd.infer.engine import Engine
from herd.infer.sampling import SamplingParams


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def bench(engine: Engine, prompt_len: int = 128, new_tokens: int = 64, batch: int = 1, warmup: bool = True,
          seed: int = 0) -> dict:
    """Greedy generation of ``new_tokens`` after ``batch`` random prompts of ``prompt_len`` tokens.

    prefill_tok_s counts prompt tokens over the time to the first generated token; decode_tok_s counts the
    batch's generated tokens after the first over the remaining time."""
    if prompt_len < 1 or new_tokens < 2 or batch < 1:
        raise ValueError("bench needs prompt_len >= 1, new_tokens >= 2 and batch >= 1")
    g = torch.Generator().manual_seed(seed)
    vocab = engine.model.cfg.vocab_size
    prompts = [torch.randint(0, vocab, (prompt_len,), generator=g).tolist() for _ in range(batch)]
    params = SamplingParams(max_new_tokens=new_tokens, stop_ids=frozenset())
    if warmup:
        for _ in engine.steps([p[:16] for p in prompts], SamplingParams(max_new_tokens=4, stop_ids=frozenset())):
            pass
    cuda = engine.device.type == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    sync()
    t0 = time.perf_counter()
    t_first = None
    for _ in engine.steps(prompts, params):
        if t_first is None:
            sync()
            t_first = time.perf_counter()
    sync()
    t_end = time.perf_counter()
    out = {"prompt_len": prompt_len, "new_tokens": new_tokens, "batch": batch,
           "dtype": str(engine.dtype).removeprefix("torch."), "device": str(engine.device),
           "prefill_s": t_first - t0, "decode_s": t_end - t_first,
           "prefill_tok_s": batch * prompt_len / (t_first - t0),
           "decode_tok_s": batch * (new_tokens - 1) / (t_end - t_first),
           "peak_rss_mb": peak_rss_mb()}
    if cuda:
        out["peak_gpu_mb"] = torch.cuda.max_memory_allocated() / 2**20
    return out
