"""How much quantization changes a model: KL of its next-token distributions from the reference model's, and
perplexity on held-out text. Both work on any callable ``model(tokens [B, T]) -> logits [B, T, V]``."""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import nn


@torch.inference_mode()
def logit_kl(ref_model: nn.Module, q_model: nn.Module, token_batches: Iterable[torch.Tensor]) -> float:
    """Mean over tokens of KL(ref || quant) in nats: the information lost per predicted token."""
    total, n = 0.0, 0
    for tokens in token_batches:
        # log-probabilities in fp32: bf16 logits would put rounding noise of the same order as int8 effects
        ref = F.log_softmax(ref_model(tokens).float(), dim=-1)
        q = F.log_softmax(q_model(tokens).float(), dim=-1)
        kl_BT = F.kl_div(q, ref, log_target=True, reduction="none").sum(-1)
        total, n = total + kl_BT.sum().item(), n + kl_BT.numel()
    return total / n


@torch.inference_mode()
def perplexity(model: nn.Module, token_batches: Iterable[torch.Tensor]) -> float:
    """exp(mean next-token cross-entropy) over every position that has a next token."""
    nll, n = 0.0, 0
    for tokens in token_batches:
        logits = model(tokens[:, :-1]).float()
        nll += F.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten(), reduction="sum").item()
        n += tokens[:, 1:].numel()
    return math.exp(nll / n)


__all__ = ["logit_kl", "perplexity"]
