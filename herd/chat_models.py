"""A model that answers conversations, wherever it runs: one notion for attackers, targets and judges (red
teaming, CyberSecEval, bias evaluation) and for judges in post-training.

    model = chat_model("models/herd-pico")                   # a herd model directory, run in this process
    model = chat_model("http://localhost:8000/v1")           # herd serve, vLLM, OpenAI... (key: OPENAI_API_KEY)
    model = chat_model(spec, shield=Shield.load(...))        # the model as deployed, behind its shields
    replies = model.replies([[{"role": "user", "content": "hi"}], ...], max_tokens=64, temperature=0.0)
    replies[0].text, replies[0].error, replies[0].moderation

``replies`` answers a batch of conversations in order: a local model in batches through herd's engine, an
endpoint with ``workers`` requests in flight at once. A conversation that fails (an endpoint still down after its
retries, a prompt past the context) gets a Reply with ``error`` set and empty text; the others are answered, so
one bad item never ends a long evaluation. Behind a shield, a flagged input is not sent to the model and a
flagged reply is replaced: both by the refusal, with ``moderation`` = the verdict.
"""

from __future__ import annotations

from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from herd.endpoint import Endpoint, is_url, openai_messages
from herd.errors import HerdError
from herd.infer.sampling import SamplingParams


@dataclass
class Reply:
    text: str
    error: str | None = None  # the call failed: text is ""
    moderation: dict | None = None  # a shield replaced the answer (herd.safety.shield.ShieldVerdict.field())


class LocalChat:
    """A herd LLM (herd.api.LLM): greedy unless ``temperature`` > 0; ``seed`` makes sampling reproducible."""

    def __init__(self, llm, name: str = "herd", batch_size: int = 8):
        self.llm, self.name, self.batch_size = llm, name, batch_size

    def replies(self, conversations: Sequence[list[dict]], max_tokens: int = 256, temperature: float = 0.0,
                seed: int | None = None) -> list[Reply]:
        params = SamplingParams(max_new_tokens=max_tokens, temperature=temperature, seed=seed)
        out: list[Reply] = []
        for start in range(0, len(conversations), self.batch_size):
            batch, inputs = conversations[start:start + self.batch_size], []
            for messages in batch:
                try:
                    inputs.append(self.llm.chat_inputs(list(messages)))
                except (HerdError, ValueError, KeyError, TypeError) as e:
                    inputs.append(e)
            good = [x for x in inputs if not isinstance(x, Exception)]
            try:
                done = iter(self.llm.engine.generate([ids for ids, _ in good], params, [px for _, px in good])
                            if good else [])
            except ValueError:  # one prompt past the context fails the batch: answer one by one
                done = iter([_alone(self.llm, ids, px, params) for ids, px in good])
            for x in inputs:
                if isinstance(x, Exception):
                    out.append(Reply("", f"{type(x).__name__}: {x}"))
                else:
                    c = next(done)
                    out.append(c if isinstance(c, Reply) else Reply(c.text))
        return out


def _alone(llm, ids, pixels, params):
    try:
        return llm.engine.generate([ids], params, [pixels])[0]
    except ValueError as e:
        return Reply("", f"ValueError: {e}")


class EndpointChat:
    """An OpenAI-compatible endpoint (herd.endpoint.Endpoint), ``workers`` requests at a time."""

    def __init__(self, endpoint: Endpoint, workers: int = 8):
        self.endpoint, self.workers, self.name = endpoint, workers, endpoint.url

    def replies(self, conversations: Sequence[list[dict]], max_tokens: int = 256, temperature: float = 0.0,
                seed: int | None = None) -> list[Reply]:
        fields: dict[str, Any] = {"max_tokens": max_tokens, "temperature": temperature}
        if seed is not None:
            fields["seed"] = seed

        def one(messages: list[dict]) -> Reply:
            try:
                return Reply(self.endpoint.reply(openai_messages(list(messages)), **fields))
            except HerdError as e:
                return Reply("", str(e))

        with ThreadPoolExecutor(self.workers) as pool:
            return list(pool.map(one, conversations))


class ShieldedChat:
    """A model behind a herd.safety.shield.Shield, as ``herd serve --guard`` would answer."""

    def __init__(self, model, shield):
        self.model, self.shield, self.name = model, shield, f"{model.name}+shield"

    def replies(self, conversations: Sequence[list[dict]], **params) -> list[Reply]:
        out: list[Reply | None] = [None] * len(conversations)
        for i, messages in enumerate(conversations):
            v = self.shield.check_input(messages)
            if v.blocked:
                out[i] = Reply(self.shield.refusal, moderation=v.field())
        todo = [i for i, r in enumerate(out) if r is None]
        for i, r in zip(todo, self.model.replies([conversations[i] for i in todo], **params)):
            v = self.shield.check_output(conversations[i], r.text) if r.error is None else None
            out[i] = Reply(self.shield.refusal, moderation=v.field()) if v is not None and v.blocked else r
        return out


def chat_model(spec: str | Path, *, model: str | None = None, api_key: str | None = None, workers: int = 8,
               dtype: str | None = None, device: str = "cpu", shield=None, role: str = "model",
               key_env: str | None = None):
    """A LocalChat (a model directory or preset), or an EndpointChat (an http(s):// URL; ``model``: the name to
    ask for, default the first the endpoint lists), behind ``shield`` if one is given."""
    if is_url(str(spec)):
        built = EndpointChat(Endpoint(str(spec), model, api_key, role=role, key_env=key_env), workers)
    else:
        from herd.api import load

        built = LocalChat(load(spec, dtype=dtype, device=device), Path(str(spec)).name)
    return ShieldedChat(built, shield) if shield is not None else built
