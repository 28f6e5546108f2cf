"""A model as judge: ``ask(prompts) -> replies`` from a herd model or an OpenAI-compatible endpoint, and the
parsing of a 1-10 rating. Used by easy-data removal (herd.post.filter).

    ask = endpoint_judge("http://localhost:8000/v1")       # herd serve, vLLM, OpenAI...; model: the first listed
    ask = herd_judge(herd.load("models/judge"))
    rating(ask([RUBRIC.replace("{conversation}", text)])[0])   # -> 1.0 .. 10.0, or None
"""

from __future__ import annotations

import re
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

from herd.endpoint import Endpoint
from herd.infer.sampling import SamplingParams

Ask = Callable[[list[str]], list[str]]  # prompts (one user message each) -> replies

RUBRIC = """How hard is the last assistant reply of this conversation for a strong AI assistant to get right?
Rate it from 1 (trivial: a short, well-known or copied answer) to 10 (very hard: expert knowledge, many careful
steps, or an exacting format). Reply with the number only.

{conversation}"""


def rating(reply: str) -> float | None:
    """The first number of a judge's reply, when it is a rating in 1-10."""
    m = re.search(r"\d+(?:\.\d+)?", reply)
    return float(m.group()) if m and 1 <= float(m.group()) <= 10 else None


def herd_judge(llm, max_new_tokens: int = 16) -> Ask:
    """A herd model as judge: the rubric as one user message, a greedy reply."""
    params = SamplingParams(max_new_tokens=max_new_tokens)
    return lambda prompts: [c.text for c in llm.engine.generate(
        [llm.chat_ids([{"role": "user", "content": p}]) for p in prompts], params)]


def endpoint_judge(url: str, model: str | None = None, api_key: str | None = None, workers: int = 8,
                   max_tokens: int = 16) -> Ask:
    """An OpenAI-compatible endpoint (``http(s)://HOST/v1``, see herd.endpoint) as judge, ``workers`` requests
    at a time."""
    endpoint = Endpoint(url, model, api_key, role="judge")
    endpoint.model  # noqa: B018 - ask /models now, so that a wrong URL fails before any work

    def ask(prompts: list[str]) -> list[str]:
        def one(prompt: str) -> str:
            return endpoint.reply([{"role": "user", "content": prompt}], temperature=0.0, max_tokens=max_tokens)

        with ThreadPoolExecutor(workers) as pool:
            return list(pool.map(one, prompts))

    return ask
