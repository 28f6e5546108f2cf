"""A model as judge: ``ask(prompts) -> replies`` from a herd model or an OpenAI-compatible endpoint, and the
parsing of a 1-10 rating. Used by easy-data removal (herd.post.filter).

    ask = endpoint_judge("http://localhost:8000/v1")       # herd serve, vLLM, OpenAI...; model: the first listed
    ask = herd_judge(herd.load("models/judge"))
    rating(ask([RUBRIC.replace("{conversation}", text)])[0])   # -> 1.0 .. 10.0, or None
"""

from __future__ import annotations

import re
from collections.abc import Callable

from herd.chat_models import EndpointChat, LocalChat
from herd.endpoint import Endpoint
from herd.errors import HerdError

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
    return judge(LocalChat(llm, batch_size=32), max_new_tokens)


def endpoint_judge(url: str, model: str | None = None, api_key: str | None = None, workers: int = 8,
                   max_tokens: int = 16) -> Ask:
    """An OpenAI-compatible endpoint (``http(s)://HOST/v1``, see herd.endpoint) as judge, ``workers`` requests
    at a time."""
    endpoint = Endpoint(url, model, api_key, role="judge")
    endpoint.model  # noqa: B018 - ask /models now, so that a wrong URL fails before any work
    return judge(EndpointChat(endpoint, workers), max_tokens)


def judge(model, max_tokens: int = 16) -> Ask:
    """Any herd.chat_models model as judge; a call that fails raises (a judge must answer every item)."""

    def ask(prompts: list[str]) -> list[str]:
        replies = model.replies([[{"role": "user", "content": p}] for p in prompts], max_tokens=max_tokens)
        failed = next((r.error for r in replies if r.error is not None), None)
        if failed is not None:
            raise HerdError(failed)
        return [r.text for r in replies]

    return ask
