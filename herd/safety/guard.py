"""A Llama Guard model run by herd: ``Guard.load(MODEL_DIR).moderate(messages) -> Verdict``.

The prompt is herd.safety.llama_guard's (the official template); the verdict is the greedy answer, parsed, and
P(unsafe) is read from the model's distribution over the verdict word (one forward over the prompt), so a
threshold other than the argmax can be used. ``herd guard`` is its command line.

Not yet: image turns (the prompt's <|image|> placeholder is not expanded into tiles here) and guards behind an
OpenAI-compatible endpoint.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

import torch

from herd.errors import HerdError
from herd.infer.sampling import SamplingParams
from herd.safety.llama_guard import Category, Verdict, guard_prompt, verdict_with_threshold


class Guard:
    def __init__(self, llm, version: int = 4, threshold: float = 0.5, max_new_tokens: int = 16):
        self.llm, self.version, self.threshold, self.max_new_tokens = llm, version, threshold, max_new_tokens

    @classmethod
    def load(cls, path: str | Path, dtype: str | None = None, device: str = "cpu", **kw) -> Guard:
        if str(path).startswith(("http://", "https://")):
            raise HerdError(f"{path}: guards behind an OpenAI-compatible endpoint are not supported yet; give a "
                            f"model directory")
        from herd.api import load

        return cls(load(path, dtype=dtype, device=device), **kw)

    def prompt(self, messages: Sequence[dict], excluded: Iterable[str] = (),
               categories: Sequence[Category] | Mapping[str, str] | None = None) -> str:
        return guard_prompt(messages, self.version, excluded, categories)

    @torch.no_grad()
    def moderate(self, messages: Sequence[dict], excluded: Iterable[str] = (),
                 categories: Sequence[Category] | Mapping[str, str] | None = None) -> Verdict:
        """The verdict on the last turn of ``messages``: unsafe when P(unsafe) >= threshold, with the codes the
        guard wrote (an answer it cannot parse is unsafe, category "unparsed": fail closed)."""
        text = self.prompt(messages, excluded, categories)
        if "<|image|>" in text:
            raise HerdError("image turns are not supported by herd guard yet (text turns only)")
        tok = self.llm.tokenizer
        ids = tok.encode(text, allowed_special="all")
        model = self.llm.model
        logits_V = model(torch.tensor([ids], device=next(model.parameters()).device))[0, -1]
        (answer,) = self.llm.engine.generate([ids], SamplingParams(max_new_tokens=self.max_new_tokens))
        return verdict_with_threshold(answer.text, logits_V, tok, self.threshold, excluded)
