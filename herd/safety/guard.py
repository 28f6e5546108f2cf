"""A Llama Guard as herd runs one: a model directory (``Guard``) or an OpenAI-compatible endpoint that serves one
(``EndpointGuard``); ``load_guard(MODEL_DIR_OR_URL)`` picks. Both answer ``moderate(messages, excluded,
categories) -> Verdict`` for the last turn of a conversation; ``herd guard`` is the command line, and
herd.safety.shield puts them around a served model.

A model directory is a Llama Guard 4 (a dense Llama 4: herd loads its layout) or any herd-trained guard
(models/herd-guard-pico). Its prompt is herd.safety.llama_guard's guard_message, the official template rendered
by herd's chat format, images included (each image's tiles where the template has its <|image|>). The verdict is
the greedy answer, parsed; P(unsafe) is the probability of the verdict word at the first generated step.

An endpoint is asked through /chat/completions (greedy, logprobs on), in one of two ways:
  template="herd"    the guard prompt, rendered by herd, is sent as one user message. Right for a server that
                     applies the plain Llama 4 chat template (``herd serve`` of a guard model, vLLM with a
                     Llama 4 template): it then sees exactly the official prompt.
  template="server"  the conversation itself is sent, with ``chat_template_kwargs`` {"categories",
                     "excluded_category_keys"}: for a server that applies the guard's own chat template (vLLM
                     serving meta-llama/Llama-Guard-4-12B with its tokenizer_config's template).
P(unsafe) comes from the first answer token's top_logprobs (the entry that begins the word "unsafe"; when it is
not among the top 20, their least probability, an upper bound); when the server sends no logprobs, the answer's
text decides alone.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from threading import Lock

import torch

from herd.endpoint import Endpoint, is_url, openai_messages
from herd.errors import HerdError
from herd.infer.sampling import SamplingParams
from herd.safety.llama_guard import Category, Verdict, decide, guard_message, verdict_token_ids

Categories = Sequence[Category] | Mapping[str, str] | None
TOP_LOGPROBS = 20


class Guard:
    """A guard model run in this process by herd's engine (one request at a time: calls are serialised)."""

    def __init__(self, llm, threshold: float = 0.5, max_new_tokens: int = 16):
        self.llm, self.threshold, self.max_new_tokens = llm, threshold, max_new_tokens
        self.lock = Lock()
        self.name = "herd"

    @classmethod
    def load(cls, path: str | Path, dtype: str | None = None, device: str = "cpu", **kw) -> Guard:
        from herd.api import load

        guard = cls(load(path, dtype=dtype, device=device), **kw)
        guard.name = Path(path).name
        return guard

    @torch.no_grad()
    def moderate(self, messages: Sequence[dict], excluded: Iterable[str] = (), categories: Categories = None
                 ) -> Verdict:
        """The verdict on the last turn of ``messages``: unsafe when P(unsafe) >= threshold, with the codes the
        guard wrote (an answer it cannot parse is unsafe, category "unparsed": fail closed)."""
        excluded = list(excluded)
        ids, pixels = self.llm.chat_inputs([guard_message(messages, excluded, categories)])
        params = SamplingParams(max_new_tokens=self.max_new_tokens, logprobs=TOP_LOGPROBS)
        _, unsafe_id = verdict_token_ids(self.llm.tokenizer)
        with self.lock:
            (answer,) = self.llm.engine.generate([ids], params, [pixels])
            first = answer.logprobs[0] if answer.logprobs else None
            found = None if first is None else (first.logprob if first.token == unsafe_id
                                                else dict(first.top).get(unsafe_id))
            if found is None:  # "unsafe" is not among the top alternatives: its exact probability, by one forward
                model = self.llm.model
                device = next(model.parameters()).device
                logits_V = model(torch.tensor([ids], device=device), pixel_values=pixels)[0, -1]
                score = torch.softmax(logits_V.float(), -1)[unsafe_id].item()
            else:
                score = math.exp(found)
        return decide(answer.text, score, self.threshold, excluded)


class EndpointGuard:
    """A guard behind an OpenAI-compatible endpoint (see the module docstring for ``template``). Thread-safe:
    several requests may be moderated at once."""

    def __init__(self, url: str, threshold: float = 0.5, max_new_tokens: int = 16, template: str = "herd",
                 model: str | None = None, api_key: str | None = None, timeout: float = 30.0, retries: int = 1):
        if template not in ("herd", "server"):
            raise HerdError(f"guard template must be 'herd' or 'server', got {template!r}")
        self.endpoint = Endpoint(url, model, api_key, timeout=timeout, retries=retries,
                                 key_env="HERD_GUARD_API_KEY", role="guard")
        self.threshold, self.max_new_tokens, self.template = threshold, max_new_tokens, template
        self.name = url

    def moderate(self, messages: Sequence[dict], excluded: Iterable[str] = (), categories: Categories = None
                 ) -> Verdict:
        excluded = list(excluded)
        fields: dict = {"max_tokens": self.max_new_tokens, "temperature": 0.0, "logprobs": True,
                        "top_logprobs": TOP_LOGPROBS}
        if self.template == "herd":
            sent = [guard_message(messages, excluded, categories)]
        else:
            guard_message(messages, excluded, categories)  # the same checks of roles, codes and exclusions
            sent = list(messages)
            kwargs: dict = {"excluded_category_keys": excluded}
            if categories is not None:
                kwargs["categories"] = (dict(categories) if isinstance(categories, Mapping)
                                        else {c.code: c.name for c in categories})
            fields["chat_template_kwargs"] = kwargs
        choice = self.endpoint.chat(openai_messages(sent), **fields)["choices"][0]
        return decide(choice["message"].get("content") or "", _endpoint_score(choice.get("logprobs")),
                      self.threshold, excluded)


def _endpoint_score(logprobs: dict | None) -> float | None:
    """P(unsafe) from OpenAI chat logprobs: at the first token that is not blank (LG3's template leaves the
    "\n\n" to the model), the top entry whose text begins the word "unsafe" ("u", "un", ..., "unsafe"). When it
    is not among the top alternatives, P(unsafe) is at most the least of theirs: that bound is returned (a
    threshold above it decides exactly as the true value would). None without logprobs."""
    for entry in (logprobs or {}).get("content") or []:
        if not entry.get("token", "").strip():
            continue
        alternatives = [entry, *(entry.get("top_logprobs") or [])]
        for alt in alternatives:
            word = alt.get("token", "").strip().lower()
            if word and "unsafe".startswith(word):
                return math.exp(alt["logprob"])
        return math.exp(min(alt["logprob"] for alt in alternatives)) if len(alternatives) > 1 else None
    return None


def load_guard(spec: str | Path, dtype: str | None = None, device: str = "cpu", threshold: float = 0.5,
               template: str = "herd", **kw) -> Guard | EndpointGuard:
    """A guard from a model directory or an http(s):// URL."""
    if is_url(str(spec)):
        return EndpointGuard(str(spec), threshold=threshold, template=template, **kw)
    return Guard.load(spec, dtype=dtype, device=device, threshold=threshold, **kw)
