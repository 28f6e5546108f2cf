"""Token generation with a simple growing KV cache (the fast engine replaces it; the API stays)."""

from collections.abc import Iterable, Iterator

import torch

from herd.infer.cache import DynamicCache
from herd.model import Transformer


def sample(logits_V: torch.Tensor, temperature: float, generator: torch.Generator | None = None) -> int:
    """Greedy at temperature 0, else a draw from softmax(logits / temperature)."""
    if temperature <= 0:
        return int(torch.argmax(logits_V))
    probs = torch.softmax(logits_V.float() / temperature, dim=-1)
    return int(torch.multinomial(probs, 1, generator=generator))


@torch.no_grad()
def stream(model: Transformer, prompt_ids: list[int], max_new_tokens: int, temperature: float = 0.0,
           seed: int | None = None, stop_ids: Iterable[int] = ()) -> Iterator[int]:
    """Yield generated ids one at a time; stops after a stop id (which is yielded) or ``max_new_tokens``."""
    if not prompt_ids:
        raise ValueError("the prompt is empty: give at least one token (e.g. <|begin_of_text|>)")
    device = next(model.parameters()).device
    generator = None
    if seed is not None:
        generator = torch.Generator(device=device).manual_seed(seed)
    stop = set(stop_ids)
    cache = DynamicCache(model.cfg.n_layers)
    tokens = torch.tensor([prompt_ids], device=device)
    for _ in range(max_new_tokens):
        logits = model(tokens, cache=cache, last_only=True)[0, -1]
        next_id = sample(logits, temperature, generator)
        yield next_id
        if next_id in stop:
            return
        tokens = torch.tensor([[next_id]], device=device)


def generate(model: Transformer, prompt_ids: list[int], max_new_tokens: int, temperature: float = 0.0,
             seed: int | None = None, stop_ids: Iterable[int] = ()) -> list[int]:
    return list(stream(model, prompt_ids, max_new_tokens, temperature, seed, stop_ids))
