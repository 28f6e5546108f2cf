"""The Llama 4 vision tower: a MetaCLIP-style ViT over 336x336 tiles, pixel shuffle + MLP adapter, and the projector
into the text width.

``VisionTower(cfg)(pixel_values [N, 3, 336, 336])`` -> ``[N * 144, dim]``: one text-width vector per ``<|patch|>``
placeholder, tile after tile, ready to be scattered into the prompt's embeddings (early fusion). It computes what
transformers' ``Llama4ForConditionalGeneration`` does with ``get_image_features`` (the vision model's output after
``layernorm_post``, CLS dropped, pixel shuffle, adapter) followed by ``multi_modal_projector``.

Module and parameter names are transformers' (``Llama4VisionModel`` under ``vision_model.``,
``Llama4MultiModalProjector`` under ``multi_modal_projector.``), so checkpoint tensors load without renaming.
"""

import torch
import torch.nn.functional as F
from torch import nn

from herd.config import ModelConfig, VisionConfig
from herd.errors import ConfigError
from herd.model.rope import apply_rope


def rope_2d(v: VisionConfig, device: torch.device | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(cos, sin), each [1, P + 1, 1, head_dim/2] fp32, for the P patches (row-major) then the CLS token.

    Per head, the first half of the rotated pairs turn by (column + 1) * f, the second half by (row + 1) * f with
    f = theta^(-2i / (head_dim/2)); the CLS token is not rotated (Llama4VisionRotaryEmbedding's complex freqs_ci)."""
    half = v.dim // v.n_heads // 2
    f = 1.0 / v.rope_theta ** (torch.arange(0, half, 2, device=device).float() / half)  # [half/2]
    g = v.grid_size
    idx = torch.arange(g * g, device=device)
    col, row = (idx % g + 1).float(), (idx // g + 1).float()
    angles = torch.cat([col[:, None] * f, row[:, None] * f], dim=-1)  # [P, half]
    angles = torch.cat([angles, angles.new_zeros(1, half)])  # CLS
    return angles.cos()[None, :, None], angles.sin()[None, :, None]


def pixel_shuffle(x_NPC: torch.Tensor, ratio: float) -> torch.Tensor:
    """[N, g*g, C] -> [N, (g*r)^2, C/r^2]: each r^-1 x r^-1 block of neighbouring patches becomes one token
    (transformers' two view/permute steps, whose channel order the adapter's fc1 weights expect)."""
    N, P, C = x_NPC.shape
    g = round(P**0.5)
    gr, c = round(g * ratio), round(C / ratio)
    x = x_NPC.reshape(N, g, gr, c).permute(0, 2, 1, 3)
    x = x.reshape(N, gr, gr, round(C / ratio**2)).permute(0, 2, 1, 3)
    return x.reshape(N, gr * gr, -1)


class PatchEmbedding(nn.Module):
    """Non-overlapping patch x patch "convolution" as unfold + linear (Llama4UnfoldConvolution): [N, C, H, W] ->
    [N, P, dim], patches row-major, each flattened channel-major (c, dy, dx) as nn.Unfold does."""

    def __init__(self, v: VisionConfig):
        super().__init__()
        self.patch_size = v.patch_size
        self.linear = nn.Linear(v.n_channels * v.patch_size**2, v.dim, bias=False)

    def forward(self, pixels_NCHW: torch.Tensor) -> torch.Tensor:
        patches = F.unfold(pixels_NCHW, kernel_size=self.patch_size, stride=self.patch_size)  # [N, C*p*p, P]
        return self.linear(patches.transpose(1, 2))


class VisionAttention(nn.Module):
    """Bidirectional multi-head attention with biases and 2-D RoPE on q and k (no GQA, no qk-norm)."""

    def __init__(self, v: VisionConfig):
        super().__init__()
        self.n_heads, self.head_dim, self.dropout = v.n_heads, v.dim // v.n_heads, v.attention_dropout
        self.q_proj = nn.Linear(v.dim, v.dim)
        self.k_proj = nn.Linear(v.dim, v.dim)
        self.v_proj = nn.Linear(v.dim, v.dim)
        self.o_proj = nn.Linear(v.dim, v.dim)

    def forward(self, x_NTD: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        N, T, _ = x_NTD.shape
        q = self.q_proj(x_NTD).view(N, T, self.n_heads, self.head_dim)
        k = self.k_proj(x_NTD).view(N, T, self.n_heads, self.head_dim)
        v = self.v_proj(x_NTD).view(N, T, self.n_heads, self.head_dim)
        q, k = apply_rope(q, *rope), apply_rope(k, *rope)  # rotation in fp32, back to the activation dtype
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                             dropout_p=self.dropout if self.training else 0.0)
        return self.o_proj(out.transpose(1, 2).reshape(N, T, -1))


class VisionMLP(nn.Module):
    def __init__(self, v: VisionConfig):
        super().__init__()
        self.fc1 = nn.Linear(v.dim, v.hidden_dim)
        self.fc2 = nn.Linear(v.hidden_dim, v.dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))  # exact (erf) GELU


class VisionEncoderLayer(nn.Module):
    """Pre-LayerNorm ViT block with plain residuals."""

    def __init__(self, v: VisionConfig):
        super().__init__()
        self.input_layernorm = nn.LayerNorm(v.dim, eps=v.norm_eps)
        self.self_attn = VisionAttention(v)
        self.post_attention_layernorm = nn.LayerNorm(v.dim, eps=v.norm_eps)
        self.mlp = VisionMLP(v)

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        h = x + self.self_attn(self.input_layernorm(x), rope)
        return h + self.mlp(self.post_attention_layernorm(h))


class VisionEncoder(nn.Module):
    def __init__(self, v: VisionConfig):
        super().__init__()
        self.layers = nn.ModuleList(VisionEncoderLayer(v) for _ in range(v.n_layers))

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x, rope)
        return x


class AdapterMLP(nn.Module):
    """Llama4VisionMLP2: fc1 -> GELU -> fc2 -> GELU (the output is activated too), no biases."""

    def __init__(self, v: VisionConfig):
        super().__init__()
        self.dropout = v.projector_dropout
        self.fc1 = nn.Linear(v.hidden_dim, v.projector_input_dim, bias=False)
        self.fc2 = nn.Linear(v.projector_output_dim, v.projector_output_dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.dropout(F.gelu(self.fc1(x)), p=self.dropout, training=self.training)
        return F.gelu(self.fc2(h))


class PixelShuffleMLP(nn.Module):
    def __init__(self, v: VisionConfig):
        super().__init__()
        self.ratio = v.pixel_shuffle_ratio
        self.mlp = AdapterMLP(v)

    def forward(self, x_NPD: torch.Tensor) -> torch.Tensor:
        return self.mlp(pixel_shuffle(x_NPD, self.ratio))


class VisionModel(nn.Module):
    """Llama4VisionModel: tiles [N, C, H, W] -> adapter features [N, tokens_per_tile, vision_output_dim]."""

    def __init__(self, v: VisionConfig):
        super().__init__()
        _check_adapter(v)
        self.cfg = v
        n_patches = v.grid_size**2
        self.patch_embedding = PatchEmbedding(v)
        # CLS is appended *after* the patches; the position table has a row for it (the last)
        self.class_embedding = nn.Parameter(torch.randn(v.dim) * v.dim**-0.5)
        self.positional_embedding_vlm = nn.Parameter(torch.randn(n_patches + 1, v.dim) * v.dim**-0.5)
        self.layernorm_pre = nn.LayerNorm(v.dim, eps=v.norm_eps)
        self.layernorm_post = nn.LayerNorm(v.dim, eps=v.norm_eps)
        self.model = VisionEncoder(v)
        self.vision_adapter = PixelShuffleMLP(v)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        v = self.cfg
        if pixel_values.ndim != 4 or tuple(pixel_values.shape[1:]) != (v.n_channels, v.image_size, v.image_size):
            raise ValueError(f"pixel_values must be [n_tiles, {v.n_channels}, {v.image_size}, {v.image_size}], "
                             f"got {list(pixel_values.shape)}")
        x = self.patch_embedding(pixel_values.to(self.patch_embedding.linear.weight.dtype))  # [N, P, D]
        N, _, D = x.shape
        x = torch.cat([x, self.class_embedding.to(x.dtype).expand(N, 1, D)], dim=1)
        x = self.layernorm_pre(x + self.positional_embedding_vlm.to(x.dtype))
        x = self.model(x, rope_2d(v, x.device))
        x = self.layernorm_post(x)[:, :-1]  # the last layer's output, CLS dropped
        return self.vision_adapter(x)


class MultiModalProjector(nn.Module):
    """Llama4MultiModalProjector: vision_output_dim -> the text width, no bias."""

    def __init__(self, vision_output_dim: int, text_dim: int):
        super().__init__()
        self.linear_1 = nn.Linear(vision_output_dim, text_dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_1(x)


class VisionTower(nn.Module):
    """The vision model and the projector, named as in the HF checkpoint (``vision_model.*``,
    ``multi_modal_projector.*``): tiles [N, C, H, W] -> [N * tokens_per_tile, cfg.dim], in the model's dtype."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        if cfg.vision is None:
            raise ConfigError("the config has no vision_config: it describes a text-only model")
        self.cfg = cfg
        self.vision_model = VisionModel(cfg.vision)
        self.multi_modal_projector = MultiModalProjector(cfg.vision.vision_output_dim, cfg.dim)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        features = self.vision_model(pixel_values)
        return self.multi_modal_projector(features.reshape(-1, features.shape[-1]))


def _check_adapter(v: VisionConfig) -> None:
    """Widths that transformers' modules must agree on to run (it builds them regardless and fails in forward)."""
    shuffled = round(v.dim / v.pixel_shuffle_ratio**2)
    if v.hidden_dim != shuffled:
        raise ConfigError(f"vision_config.intermediate_size={v.hidden_dim} must equal hidden_size / "
                          f"pixel_shuffle_ratio**2 = {shuffled}: it is also the pixel-shuffle adapter's input width")
    if v.projector_input_dim != v.projector_output_dim:
        raise ConfigError(f"vision_config.projector_input_dim={v.projector_input_dim} must equal "
                          f"projector_output_dim={v.projector_output_dim} (the adapter's fc2 is square)")
    if v.vision_output_dim != v.projector_output_dim:
        raise ConfigError(f"vision_config.vision_output_dim={v.vision_output_dim} must equal "
                          f"projector_output_dim={v.projector_output_dim}: the projector reads the adapter's output")


__all__ = ["VisionTower", "VisionModel", "MultiModalProjector", "rope_2d", "pixel_shuffle"]
