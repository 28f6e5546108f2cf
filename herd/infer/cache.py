"""KV caches the decoder attends through (see herd.model.attention.LayerCache)."""

import torch


class DynamicCache:
    """Keeps every layer's whole history, growing by concatenation: simple and exact, not fast.
    All sequences of the batch share one length."""

    def __init__(self, n_layers: int):
        self.kv: list[tuple[torch.Tensor, torch.Tensor] | None] = [None] * n_layers
        self.seq_len = 0

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor):
        old = self.kv[layer]
        if old is not None:
            k, v = torch.cat((old[0], k), dim=2), torch.cat((old[1], v), dim=2)
        self.kv[layer] = (k, v)
        B, S = k.shape[0], k.shape[2]
        return k, v, torch.arange(S, device=k.device).expand(B, S)

    def advance(self, n: int) -> None:
        self.seq_len += n
