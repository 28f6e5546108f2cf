"""The Python API: ``herd.load`` and ``herd.pipeline``.

    llm = herd.load("path/to/Llama-4-Scout-17B-16E-Instruct", dtype="bf16")
    llm.generate("The capital of France is", max_new_tokens=16)
    for piece in llm.stream("Tell me a story"): print(piece, end="")
    llm.chat([{"role": "user", "content": "Hi!"}])          # -> {"role": "assistant", "content": ...}
    pipe = herd.pipeline("text-generation", model=llm)      # called like transformers' pipeline
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from herd.chat import ChatFormat, parse_assistant
from herd.checkpoint import load as load_checkpoint
from herd.config import PRESETS, preset
from herd.infer.engine import Completion, Engine
from herd.infer.sampling import SamplingParams
from herd.model import Transformer
from herd.tokenizer import Tokenizer

_SAMPLING_KEYS = set(SamplingParams.__dataclass_fields__)


class LLM:
    """A model with its tokenizer and a generation engine."""

    def __init__(self, model: Transformer, tokenizer: Tokenizer, prefill_chunk: int = 512, compile: bool = False):
        self.model, self.tokenizer = model, tokenizer
        self.engine = Engine(model, tokenizer, prefill_chunk=prefill_chunk, compile=compile)
        self.chat_format = ChatFormat(tokenizer)

    @property
    def config(self):
        return self.model.cfg

    def params(self, **kw: Any) -> SamplingParams:
        unknown = set(kw) - _SAMPLING_KEYS
        if unknown:
            raise TypeError(f"unknown generation argument(s) {sorted(unknown)}; expected {sorted(_SAMPLING_KEYS)}")
        return SamplingParams(**kw)

    def encode(self, prompt: str | list[int]) -> list[int]:
        """A plain prompt: <|begin_of_text|> + text (token id lists pass through)."""
        return list(prompt) if not isinstance(prompt, str) else [self.tokenizer.bos_id, *self.tokenizer.encode(prompt)]

    def complete(self, prompts: list[str | list[int]], **kw: Any) -> list[Completion]:
        return self.engine.generate([self.encode(p) for p in prompts], self.params(**kw))

    def generate(self, prompt: str | list[int] | list[str], **kw: Any) -> str | list[str]:
        """Continue a prompt (or a list of prompts, batched); returns the generated text only."""
        batch = isinstance(prompt, list) and prompt and isinstance(prompt[0], str)
        out = [c.text for c in self.complete(prompt if batch else [prompt], **kw)]
        return out if batch else out[0]

    def stream(self, prompt: str | list[int], **kw: Any) -> Iterator[str]:
        return self.engine.stream(self.encode(prompt), self.params(**kw))

    def chat_ids(self, messages: list[dict]) -> list[int]:
        return self.chat_format.encode_dialog(messages, add_generation_prompt=True)

    def chat(self, messages: list[dict], **kw: Any) -> dict:
        """The assistant's reply to a conversation, tool calls parsed: {"role", "content", "tool_calls"}."""
        (c,) = self.engine.generate([self.chat_ids(messages)], self.params(**kw))
        return parse_assistant(c.text)

    def chat_stream(self, messages: list[dict], **kw: Any) -> Iterator[str]:
        return self.engine.stream(self.chat_ids(messages), self.params(**kw))


def load(path_or_preset: str | Path, dtype: str | torch.dtype | None = None, device: str | torch.device = "cpu",
         seed: int = 0, prefill_chunk: int = 512, compile: bool = False) -> LLM:
    """An HF model directory, or a preset name (random weights: for tests and smoke runs only).

    compile: decode through torch.compile (CUDA graphs on GPU): faster per token after a one-off compilation."""
    path = Path(path_or_preset)
    if path.exists():
        return LLM(load_checkpoint(path, dtype=dtype, device=device), Tokenizer.for_model(path), prefill_chunk,
                   compile)
    if str(path_or_preset).lower() not in PRESETS:
        raise FileNotFoundError(f"{path_or_preset!r} is neither a model directory nor a preset ({', '.join(PRESETS)})")
    warnings.warn(f"herd.load({path_or_preset!r}): a preset has random weights", stacklevel=2)
    torch.manual_seed(seed)
    from herd.checkpoint import parse_dtype

    with torch.device(device):
        model = Transformer(preset(str(path_or_preset)))
    if dtype is not None:
        model = model.to(parse_dtype(dtype))
    return LLM(model, Tokenizer.load(), prefill_chunk, compile)


class TextGenerationPipeline:
    """``pipe(text_or_messages, max_new_tokens=..., do_sample=..., temperature=..., return_full_text=True)``
    -> ``[{"generated_text": ...}]`` per input, as transformers' text-generation pipeline returns."""

    def __init__(self, llm: LLM, **defaults: Any):
        self.llm, self.defaults = llm, defaults

    def __call__(self, inputs: Any, **kw: Any) -> list:
        kw = self.defaults | kw
        if isinstance(inputs, list) and inputs and not isinstance(inputs[0], dict):
            return [self(x, **kw) for x in inputs]  # a batch of prompts or of conversations
        full = kw.pop("return_full_text", True)
        do_sample = kw.pop("do_sample", None)
        kw.pop("num_return_sequences", None)
        if do_sample is False:
            kw["temperature"] = 0.0
        elif do_sample and kw.get("temperature", 0.0) == 0.0:
            kw["temperature"] = 1.0
        if isinstance(inputs, str):
            text = self.llm.generate(inputs, **kw)
            return [{"generated_text": inputs + text if full else text}]
        reply = self.llm.chat(inputs, **kw)
        message = {"role": "assistant", "content": reply["content"]}
        if reply.get("tool_calls"):
            message["tool_calls"] = reply["tool_calls"]
        return [{"generated_text": [*inputs, message] if full else message["content"]}]


def pipeline(task: str, model: LLM | str | Path, **kw: Any) -> TextGenerationPipeline:
    if task != "text-generation":
        raise ValueError(f"herd.pipeline supports 'text-generation', not {task!r}")
    load_keys = {"dtype", "device", "prefill_chunk", "compile"}
    llm = model if isinstance(model, LLM) else load(model, **{k: kw.pop(k) for k in list(kw) if k in load_keys})
    return TextGenerationPipeline(llm, **kw)
