"""Grouped-query attention with iRoPE.

RoPE layers: rotary positions, optional L2 norm of q/k, *chunked local* attention (a query sees keys of its own
chunk of ``attention_chunk_size`` positions only). NoPE layers (every ``nope_layer_interval``-th): no positions,
full causal attention, and inference-time temperature tuning of q at long range.

The KV cache is passed in; ``cache.update`` returns the keys/values to attend to and their absolute positions,
so the mask is always built from positions and chunked semantics hold in decode too. Packed training rows
pass ``doc_ids`` (herd.train.data) and attention stays inside each document, in chunked and global layers alike.
"""

from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from herd.config import ModelConfig
from herd.model.norm import rms_normalize
from herd.model.rope import apply_rope


class LayerCache(Protocol):
    def update(self, layer: int, k_BKVTd: torch.Tensor, v_BKVTd: torch.Tensor,
               positions_BT: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Store the new keys/values; return (keys [B, KV, S, hd], values, key positions [B, S]); position < 0 =
        empty slot."""
        ...


def attention_mask(q_pos_BT: torch.Tensor, k_pos_BS: torch.Tensor, chunk: int | None,
                   doc_ids_BT: torch.Tensor | None = None) -> torch.Tensor:
    """[B, 1, T, S] bool: causal, valid slot, (chunked layers) same chunk, and (packed training rows, where
    queries and keys are the same T tokens) same document.

    Causality by position, not by index: with document masking, positions restart at each document, and
    within one document position order is index order."""
    q, k = q_pos_BT[:, None, :, None], k_pos_BS[:, None, None, :]
    mask = (k <= q) & (k >= 0)
    if chunk is not None:
        mask &= torch.div(k, chunk, rounding_mode="floor") == torch.div(q, chunk, rounding_mode="floor")
    if doc_ids_BT is not None:
        mask &= doc_ids_BT[:, None, :, None] == doc_ids_BT[:, None, None, :]
    return mask


def temperature_scale(positions_BT: torch.Tensor, floor_scale: int, attn_scale: float) -> torch.Tensor:
    """[B, T, 1, 1] fp32 factor for q on NoPE layers: 1 below ``floor_scale``, growing like log(pos) after."""
    steps = torch.floor((positions_BT.float() + 1.0) / floor_scale)
    return (torch.log1p(steps) * attn_scale + 1.0)[..., None, None]


class Attention(nn.Module):
    # cuDNN attention rebuilds its plan for every new key length (each decode step): ~10 ms of CPU per call
    sdpa_backends = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]

    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        self.layer = layer
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        self.use_rope = cfg.uses_rope(layer)
        self.chunk = cfg.attention_chunk_size if cfg.is_chunked(layer) else None
        self.qk_norm_eps = cfg.norm_eps if (cfg.use_qk_norm and self.use_rope) else None
        self.temperature = (cfg.floor_scale, cfg.attn_scale) if (cfg.attn_temperature_tuning and not self.use_rope) \
            else None
        self.q_proj = nn.Linear(cfg.dim, cfg.n_heads * cfg.head_dim, bias=False)
        self.k_proj = nn.Linear(cfg.dim, cfg.n_kv_heads * cfg.head_dim, bias=False)
        self.v_proj = nn.Linear(cfg.dim, cfg.n_kv_heads * cfg.head_dim, bias=False)
        self.o_proj = nn.Linear(cfg.n_heads * cfg.head_dim, cfg.dim, bias=False)

    def forward(self, x_BTD: torch.Tensor, positions_BT: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor],
                cache: LayerCache | None = None, doc_ids_BT: torch.Tensor | None = None) -> torch.Tensor:
        B, T, _ = x_BTD.shape
        q = self.q_proj(x_BTD).view(B, T, self.n_heads, self.head_dim)
        k = self.k_proj(x_BTD).view(B, T, self.n_kv_heads, self.head_dim)
        v = self.v_proj(x_BTD).view(B, T, self.n_kv_heads, self.head_dim)
        if self.use_rope:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        if self.qk_norm_eps is not None:  # after the rotation, without a learned scale (Scout)
            q, k = rms_normalize(q, self.qk_norm_eps), rms_normalize(k, self.qk_norm_eps)
        if self.temperature is not None:
            q = (q * temperature_scale(positions_BT, *self.temperature)).to(q.dtype)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # [B, H, T, hd]
        if cache is not None:
            k, v, k_pos = cache.update(self.layer, k, v, positions_BT)
        else:
            k_pos = positions_BT
        out = self.attend(q, k, v, attention_mask(positions_BT, k_pos, self.chunk, doc_ids_BT))
        return self.o_proj(out.transpose(1, 2).reshape(B, T, -1))

    def attend(self, q_BHTd: torch.Tensor, k_BKVSd: torch.Tensor, v_BKVSd: torch.Tensor,
               mask_B1TS: torch.Tensor) -> torch.Tensor:
        """Softmax attention; query head h reads key/value head h // (H / KV). -> [B, H, T, hd]"""
        with sdpa_kernel(self.sdpa_backends):
            return F.scaled_dot_product_attention(q_BHTd, k_BKVSd, v_BKVSd, attn_mask=mask_B1TS,
                                                  enable_gqa=self.n_kv_heads != self.n_heads)
