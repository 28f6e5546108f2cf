"""The Python API: ``herd.load`` and ``herd.pipeline``.

    llm = herd.load("path/to/Llama-4-Scout-17B-16E-Instruct", dtype="bf16")
    llm.generate("The capital of France is", max_new_tokens=16)
    for piece in llm.stream("Tell me a story"): print(piece, end="")
    llm.chat([{"role": "user", "content": "Hi!"}])          # -> {"role": "assistant", "content": ...}
    llm.chat([{"role": "user", "content": [{"type": "image", "path": "cat.png"},
                                           {"type": "text", "text": "What is this?"}]}])
    llm.generate("Describe the picture:", images=["cat.png"])  # image placeholders, then the text
    pipe = herd.pipeline("text-generation", model=llm)      # called like transformers' pipeline
    llm.chat(messages, shield=Shield.load(ShieldConfig(guard="models/herd-guard-pico")))  # herd.safety.shield
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch

from herd.chat import PATCHES_PER_TILE, ChatFormat, has_pixels, image_token_ids, parse_assistant
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
        v = model.cfg.vision  # the placeholder count and tile size follow the model's vision geometry
        self.chat_format = ChatFormat(tokenizer, patches_per_tile=v.tokens_per_tile if v else PATCHES_PER_TILE)

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

    def encode_with_images(self, prompt: str | list[int],
                           images: Sequence[Any]) -> tuple[list[int], torch.Tensor | None]:
        """A plain prompt with images (paths, bytes, data: URLs, PIL...): <|begin_of_text|>, each image's
        placeholders, then the text; and the images' tiles. Without images: (encode(prompt), None)."""
        if not images:
            return self.encode(prompt), None
        from herd.images import process_images  # torchvision takes ~1 s to import: only when images come

        tiled = process_images(list(images), self._image_config(), dtype=self._pixel_dtype())
        ids = [self.tokenizer.bos_id]
        for image in tiled:
            ids += image_token_ids(self.tokenizer, *image.aspect_ratio, self.chat_format.patches_per_tile)
        return ids + self.tokenizer.encode(prompt), _pixels(tiled)

    def complete(self, prompts: list[str | list[int]], images: Sequence[Any] | None = None,
                 **kw: Any) -> list[Completion]:
        """images: one list of images per prompt (None or [] for a text prompt)."""
        images = [None] * len(prompts) if images is None else images
        if len(images) != len(prompts):
            raise ValueError(f"{len(prompts)} prompts but {len(images)} image lists")
        encoded = [self.encode_with_images(p, im or []) for p, im in zip(prompts, images)]
        return self.engine.generate([ids for ids, _ in encoded], self.params(**kw), [px for _, px in encoded])

    def generate(self, prompt: str | list[int] | list[str], images: Sequence[Any] | None = None,
                 **kw: Any) -> str | list[str]:
        """Continue a prompt (or a list of prompts, batched); returns the generated text only. images: the
        images of a single prompt (or, for a list of prompts, one list per prompt)."""
        batch = isinstance(prompt, list) and prompt and isinstance(prompt[0], str)
        if not batch and images is not None:
            images = [images]
        out = [c.text for c in self.complete(prompt if batch else [prompt], images, **kw)]
        return out if batch else out[0]

    def stream(self, prompt: str | list[int], images: Sequence[Any] | None = None, **kw: Any) -> Iterator[str]:
        ids, pixels = self.encode_with_images(prompt, images or [])
        return self.engine.stream(ids, self.params(**kw), pixels)

    def chat_inputs(self, messages: list[dict]) -> tuple[list[int], torch.Tensor | None]:
        """Prompt ids of a conversation (generation prompt appended) and the tiles of its images, if any."""
        if not has_pixels(messages):
            return self.chat_format.encode_dialog(messages, add_generation_prompt=True), None
        ids, tiled = self.chat_format.encode_dialog_with_images(messages, image_config=self._image_config(),
                                                                dtype=self._pixel_dtype())
        return ids, _pixels(tiled)

    def chat_ids(self, messages: list[dict]) -> list[int]:
        return self.chat_format.encode_dialog(messages, add_generation_prompt=True)

    def chat(self, messages: list[dict], shield: Any = None, **kw: Any) -> dict:
        """The assistant's reply to a conversation, tool calls parsed: {"role", "content", "tool_calls"}. Content
        may be a string or a list of parts, transformers-style: {"type": "text", "text": ...},
        {"type": "image", "path"|"url"|"image": ...}, {"type": "video", "frames": [...]}.

        ``shield`` (a herd.safety.shield.Shield): the input is checked before generating and the reply after; a
        flagged one is answered by the refusal, with "refusal" and "moderation" (the verdict) keys."""
        if shield is not None:
            verdict = shield.check_input(messages)
            if verdict.blocked:
                return shield.blocked_reply(verdict)
        ids, pixels = self.chat_inputs(messages)
        (c,) = self.engine.generate([ids], self.params(**kw), [pixels])
        if shield is not None:
            verdict = shield.check_output(messages, c.text)
            if verdict.blocked:
                return shield.blocked_reply(verdict)
        return parse_assistant(c.text)

    def chat_stream(self, messages: list[dict], shield: Any = None, **kw: Any) -> Iterator[str]:
        """The reply's text as it is generated. With a ``shield``: a herd.safety.shield.ModeratedStream, which
        yields text only once the output guard has passed it and, when the input or the reply is flagged,
        stops with its ``verdict`` set (show ``shield.refusal`` then)."""
        if shield is None:
            ids, pixels = self.chat_inputs(messages)
            return self.engine.stream(ids, self.params(**kw), pixels)
        verdict = shield.check_input(messages)
        if verdict.blocked:
            return shield.stream(messages, None, verdict)
        ids, pixels = self.chat_inputs(messages)
        return shield.stream(messages, self.engine.stream(ids, self.params(**kw), pixels))

    def _image_config(self):
        from herd.images import ImageConfig

        v = self.model.cfg.vision
        return ImageConfig(tile_size=v.image_size) if v is not None else ImageConfig()

    def _pixel_dtype(self) -> torch.dtype:
        # bf16 models get transformers' bf16 pixels bit for bit; other dtypes fp32 pixels
        return torch.bfloat16 if self.engine.dtype == torch.bfloat16 else torch.float32


def default_model_dir() -> Path:
    """The embedded default, herd-pico (``models/herd-pico`` in the source tree; ``HERD_DEFAULT_MODEL`` overrides)."""
    env = os.environ.get("HERD_DEFAULT_MODEL")
    path = Path(env) if env else Path(__file__).resolve().parents[1] / "models" / "herd-pico"
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"the default model is not at {path} (it ships in herd's source tree, not in a wheel): "
                                f"give a model directory, or set HERD_DEFAULT_MODEL")
    return path


def load(path_or_preset: str | Path | None = None, dtype: str | torch.dtype | None = None,
         device: str | torch.device = "cpu", seed: int = 0, prefill_chunk: int = 512, compile: bool = False) -> LLM:
    """An HF model directory, or a preset name (random weights: for tests and smoke runs only); None loads the
    embedded default, herd-pico.

    compile: decode through torch.compile (CUDA graphs on GPU): faster per token after a one-off compilation."""
    path = default_model_dir() if path_or_preset is None else Path(path_or_preset)
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


def _pixels(tiled: list) -> torch.Tensor:
    """The tiles of processed images, in order: [sum of their tiles, 3, H, W] (what the engine takes)."""
    return torch.cat([image.pixel_values for image in tiled])


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
