"""RMSNorm (learned scale) and the unweighted L2 norm Llama 4 applies to q/k on RoPE layers."""

import torch
from torch import nn


def rms_normalize(x: torch.Tensor, eps: float) -> torch.Tensor:
    # statistics in fp32 whatever the activation dtype, then back: bf16 sums of squares lose too much
    xf = x.float()
    return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).type_as(x)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # the scale multiplies after the cast back, as the reference does (matters in bf16)
        return rms_normalize(x, self.eps) * self.weight

    def reset_parameters(self) -> None:
        nn.init.ones_(self.weight)
