"""A model as judge: ``ask(prompts) -> replies`` from a herd model or an OpenAI-compatible endpoint, and the
parsing of a 1-10 rating. Used by easy-data removal (herd.post.filter).

    ask = endpoint_judge("http://localhost:8000/v1")       # herd serve, vLLM, OpenAI...; model: the first listed
    ask = herd_judge(herd.load("models/judge"))
    rating(ask([RUBRIC.replace("{conversation}", text)])[0])   # -> 1.0 .. 10.0, or None
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

from herd.errors import HerdError
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
    """An OpenAI-compatible endpoint (``http(s)://HOST/v1``) as judge, ``workers`` requests at a time; through the
    openai client when it is installed, else urllib."""
    url, key = url.rstrip("/"), api_key or os.environ.get("OPENAI_API_KEY") or "none"
    try:
        import openai

        client = openai.OpenAI(base_url=url, api_key=key, max_retries=2, timeout=120.0)
        errors: tuple = (openai.APIError,)
        models = lambda: [m.id for m in client.models.list()]  # noqa: E731
        chat = lambda body: client.chat.completions.create(**body).choices[0].message.content  # noqa: E731
    except ImportError:
        import urllib.error
        import urllib.request

        def call(path: str, body: dict | None = None) -> dict:
            request = urllib.request.Request(url + path, None if body is None else json.dumps(body).encode(),
                                             {"Authorization": f"Bearer {key}", "Content-Type": "application/json"})
            with urllib.request.urlopen(request, timeout=120) as r:
                return json.load(r)

        errors = (urllib.error.URLError, OSError, ValueError, KeyError)
        models = lambda: [m["id"] for m in call("/models")["data"]]  # noqa: E731
        chat = lambda body: call("/chat/completions", body)["choices"][0]["message"]["content"]  # noqa: E731

    def guard(fn, *args):
        try:
            return fn(*args)
        except errors as e:
            raise HerdError(f"judge endpoint {url}: {type(e).__name__}: {e}") from None

    if model is None:
        found = guard(models)
        if not found:
            raise HerdError(f"judge endpoint {url} lists no model: give --judge-model")
        model = found[0]

    def ask(prompts: list[str]) -> list[str]:
        bodies = [{"model": model, "messages": [{"role": "user", "content": p}], "temperature": 0.0,
                   "max_tokens": max_tokens} for p in prompts]
        with ThreadPoolExecutor(workers) as pool:
            return [reply or "" for reply in pool.map(lambda b: guard(chat, b), bodies)]

    return ask
