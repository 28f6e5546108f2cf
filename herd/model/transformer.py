"""The Llama 4 model: embedding, pre-norm blocks (iRoPE attention + dense FFN or MoE), final norm, head, and
(when the config has a vision_config) the vision tower whose features replace the ``<|patch|>`` placeholders.

The model is a function of (tokens or embeddings, image features, positions, cache): it knows nothing of training,
sampling or serving. Module names follow the HF checkpoint so the key map (herd.checkpoint) stays one short table.

Early fusion: ``encode_images(pixels)`` gives one text-width vector per ``<|patch|>`` token, and ``embed(tokens,
image_features)`` puts them in place of those tokens' embeddings, in order; the decoder then sees one stream.
"""

from typing import Protocol

import torch
from torch import nn

from herd.config import ModelConfig
from herd.model.attention import Attention, LayerCache
from herd.model.ffn import FeedForward
from herd.model.moe import MoE
from herd.model.norm import RMSNorm
from herd.model.rope import inv_frequencies, rope_angles
from herd.model.vision import VisionTower


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        self.is_moe = cfg.is_moe(layer)
        self.input_layernorm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.self_attn = Attention(cfg, layer)
        self.post_attention_layernorm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.feed_forward = MoE(cfg) if self.is_moe else FeedForward(cfg.dim, cfg.dense_hidden_dim)

    def forward(self, x: torch.Tensor, positions: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor],
                cache: LayerCache | None = None, doc_ids: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, torch.Tensor | None]:
        h = x + self.self_attn(self.input_layernorm(x), positions, rope, cache, doc_ids)
        out = self.feed_forward(self.post_attention_layernorm(h))
        out, router_logits = out if self.is_moe else (out, None)
        return h + out, router_logits


class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.layers = nn.ModuleList(Block(cfg, i) for i in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.lm_head = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        self.vision = VisionTower(cfg) if cfg.vision is not None else None
        if not any(p.is_meta for p in self.parameters()):
            self.init_weights()

    @torch.no_grad()
    def init_weights(self, std: float | None = None) -> None:
        """Random init for fresh models: N(0, std) weights, unit norms (training may re-init per MetaP)."""
        std = self.cfg.init_std if std is None else std
        for name, p in self.named_parameters():
            if name.startswith("vision."):
                continue
            if name.endswith("layernorm.weight") or name == "norm.weight":
                nn.init.ones_(p)
            else:
                nn.init.normal_(p, 0.0, std)
        if self.vision is not None:
            for m in self.vision.modules():
                if isinstance(m, nn.LayerNorm):
                    nn.init.ones_(m.weight), nn.init.zeros_(m.bias)
            for name, p in self.vision.named_parameters():
                if name.endswith(".bias"):
                    nn.init.zeros_(p)
                elif "layernorm" not in name:
                    nn.init.normal_(p, 0.0, self.cfg.vision.init_std)

    def encode_images(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Tiles [N, 3, 336, 336] (herd.images) -> [N * tokens_per_tile, dim] features for the <|patch|> tokens."""
        if self.vision is None:
            raise ValueError("this model has no vision tower (its config has no vision_config): it cannot take images")
        return self.vision(pixel_values)

    def embed(self, tokens: torch.Tensor, image_features: torch.Tensor | None = None) -> torch.Tensor:
        """tokens [B, T] -> [B, T, D]; the k-th <|patch|> token (row-major) gets image_features[k] instead."""
        x = self.embed_tokens(tokens)
        if image_features is None:
            return x
        mask = tokens == self.cfg.image_token_id
        n = int(mask.sum())
        if n != image_features.shape[0]:
            raise ValueError(f"{n} <|patch|> placeholder tokens (id {self.cfg.image_token_id}) but "
                             f"{image_features.shape[0]} image feature rows: the prompt layout and the images disagree")
        return x.masked_scatter(mask[..., None], image_features.to(x.dtype))

    def forward(self, tokens: torch.Tensor | None = None, positions: torch.Tensor | None = None,
                cache: "ModelCache | None" = None, embeds: torch.Tensor | None = None,
                last_only: bool = False, return_router_logits: bool = False,
                pixel_values: torch.Tensor | None = None, doc_ids: torch.Tensor | None = None):
        """tokens [B, T] (or embeds [B, T, D]) -> logits [B, T, V] ([B, 1, V] with ``last_only``).

        pixel_values [N, 3, 336, 336]: the tiles of every image in the batch, in the order of their <|patch|>
        spans. positions [B, T] are absolute; by default they continue the cache (or start at 0).
        doc_ids [B, T] (packed training rows, no cache): a token attends only to earlier tokens of its document;
        give positions that restart at each document with them (herd.train.data does)."""
        if doc_ids is not None and cache is not None:
            raise ValueError("doc_ids (document masking of packed rows) is for cache-free forward passes")
        if embeds is None:
            features = self.encode_images(pixel_values) if pixel_values is not None else None
            embeds = self.embed(tokens, features)
        elif pixel_values is not None:
            raise ValueError("give pixel_values with tokens, not with embeds (embed(tokens, features) fuses them)")
        x = embeds
        B, T, _ = x.shape
        if positions is None:
            positions = cache.positions(T) if cache is not None else torch.arange(T, device=x.device).expand(B, T)
        rope = rope_angles(positions, inv_frequencies(self.cfg.head_dim, self.cfg.rope_theta, self.cfg.rope_scaling,
                                                      device=x.device))
        router_logits = []
        for block in self.layers:
            x, logits_TE = block(x, positions, rope, cache, doc_ids)
            if logits_TE is not None:
                router_logits.append(logits_TE)
        if cache is not None:
            cache.advance(T)
        if last_only:
            x = x[:, -1:]
        logits = self.lm_head(self.norm(x))
        return (logits, router_logits) if return_router_logits else logits


class ModelCache(LayerCache, Protocol):
    """What the decoder needs of a KV cache besides ``update`` (herd.infer.cache.KVCache)."""

    def positions(self, T: int) -> torch.Tensor:
        """[B, T] absolute positions of the next T tokens of each row."""
        ...

    def advance(self, T: int) -> None:
        """T tokens of every row have gone through all layers."""
        ...
