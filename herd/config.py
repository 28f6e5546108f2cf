"""Model configs as typed dataclasses, the family presets, and HF ``config.json`` <-> dataclass.

Field names are short (nanoGPT style); ``_TEXT_KEYS`` / ``_VISION_KEYS`` are the one table that maps
them to the Hugging Face keys, used for both reading and writing.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from herd.errors import ConfigError


@dataclass(frozen=True)
class RopeScaling:
    """llama3-style frequency scaling (Scout: factor 16, low 1, high 1, original context 8192)."""

    factor: float = 16.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 1.0
    original_max_position_embeddings: int = 8192


@dataclass(frozen=True)
class VisionConfig:
    """The vision tower's shape (MetaCLIP-style ViT + pixel-shuffle adapter), herd.model.vision.

    Defaults are the published Scout/Maverick ``vision_config``. transformers hard-codes the activations (exact
    GELU), the projector without bias and the feature choice (last layer, CLS dropped); the fields that name them
    are carried for the round trip and other values are rejected rather than silently ignored."""

    dim: int = 1408
    n_layers: int = 34
    n_heads: int = 16
    hidden_dim: int = 5632  # ViT MLP width; transformers also sizes the adapter's fc1 input from it
    image_size: int = 336
    patch_size: int = 14
    n_channels: int = 3
    pixel_shuffle_ratio: float = 0.5
    projector_input_dim: int = 4096
    projector_output_dim: int = 4096
    vision_output_dim: int = 4096
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    hidden_act: str = "gelu"
    attention_dropout: float = 0.0
    projector_dropout: float = 0.0
    multi_modal_projector_bias: bool = False
    vision_feature_layer: int = -1
    vision_feature_select_strategy: str = "default"
    init_std: float = 0.02

    def __post_init__(self) -> None:
        _check_positive(self, "vision_config", ("dim", "n_layers", "n_heads", "hidden_dim", "image_size", "patch_size"))
        if self.dim % self.n_heads:
            raise ConfigError(f"vision_config.num_attention_heads={self.n_heads} does not divide "
                              f"hidden_size={self.dim}")
        if (self.dim // self.n_heads) % 4:
            raise ConfigError(f"vision_config: head dim hidden_size/num_attention_heads={self.dim // self.n_heads} "
                              f"must be a multiple of 4 for the 2-D RoPE (half the pairs rotate by x, half by y)")
        if self.image_size % self.patch_size:
            raise ConfigError(f"vision_config.patch_size={self.patch_size} does not divide "
                              f"image_size={self.image_size}")
        r = self.pixel_shuffle_ratio
        if not 0 < r <= 1 or (self.grid_size * r) % 1 or (self.dim / r**2) % 1:
            raise ConfigError(f"vision_config.pixel_shuffle_ratio={r} must shrink the {self.grid_size}-patch grid "
                              f"side and widen hidden_size={self.dim} to whole numbers")
        for key, want in (("hidden_act", "gelu"), ("multi_modal_projector_bias", False), ("vision_feature_layer", -1),
                          ("vision_feature_select_strategy", "default")):  # herd field name == HF key
            if getattr(self, key) != want:
                raise ConfigError(f"vision_config.{key}={getattr(self, key)!r} is not supported (Llama 4 and "
                                  f"transformers use {want!r} whatever the config says)")

    @property
    def grid_size(self) -> int:
        """Patches per side of a tile (336 / 14 = 24)."""
        return self.image_size // self.patch_size

    @property
    def tokens_per_tile(self) -> int:
        """``<|patch|>`` tokens (projected features) per tile after the pixel shuffle (24 * 24 * 0.5**2 = 144)."""
        return round(self.grid_size * self.pixel_shuffle_ratio) ** 2


@dataclass(frozen=True)
class ModelConfig:
    """The Llama 4 text decoder (plus an optional vision tower)."""

    vocab_size: int = 202048
    dim: int = 5120
    n_layers: int = 48
    n_heads: int = 40
    n_kv_heads: int = 8
    head_dim: int = 128
    # SwiGLU hidden sizes: routed/shared experts and the dense FFN of non-MoE layers
    expert_hidden_dim: int = 8192
    dense_hidden_dim: int = 16384
    n_experts: int = 16
    top_k: int = 1
    # Layers that are MoE; None derives them from interleave_moe_layer_step as HF does.
    moe_layers: tuple[int, ...] | None = None
    interleave_moe_layer_step: int = 1
    # 1 = layer uses RoPE + chunked local attention, 0 = NoPE global layer; None derives it from the interval.
    rope_layers: tuple[int, ...] | None = None
    nope_layer_interval: int = 4
    use_qk_norm: bool = True
    attention_chunk_size: int | None = 8192
    attn_temperature_tuning: bool = True
    floor_scale: int = 8192
    attn_scale: float = 0.1
    rope_theta: float = 500000.0
    rope_scaling: RopeScaling | None = None
    norm_eps: float = 1e-5
    max_seq_len: int = 131072
    tie_embeddings: bool = False
    router_aux_loss_coef: float = 0.001
    bos_token_id: int = 200000
    eos_token_id: int | tuple[int, ...] = (200001, 200007, 200008)
    pad_token_id: int | None = 200018
    init_std: float = 0.02
    vision: VisionConfig | None = None
    # multimodal token ids (HF Llama4Config); meaningful only with a vision tower
    image_token_id: int = 200092
    boi_token_id: int = 200080
    eoi_token_id: int = 200081

    def __post_init__(self) -> None:
        _check_positive(self, "text_config", ("vocab_size", "dim", "n_layers", "n_heads", "n_kv_heads", "head_dim",
                                              "expert_hidden_dim", "dense_hidden_dim", "nope_layer_interval",
                                              "floor_scale"))
        # may be 0 in a dense model (Llama Guard 4: moe_layers [], 0 experts, step 0); MoE layers need >= 1 (below)
        _check_positive(self, "text_config", ("n_experts", "top_k", "interleave_moe_layer_step"), minimum=0)
        if self.n_heads % self.n_kv_heads:
            raise ConfigError(f"text_config.num_key_value_heads={self.n_kv_heads} does not divide "
                              f"num_attention_heads={self.n_heads}")
        if self.head_dim % 2:
            raise ConfigError(f"text_config.head_dim={self.head_dim} must be even for RoPE")
        if self.attention_chunk_size is not None and self.attention_chunk_size <= 0:
            raise ConfigError(f"text_config.attention_chunk_size={self.attention_chunk_size} must be positive or null")
        if self.moe_layers is None:  # as HF derives them; step 0 (which HF cannot derive from) means none
            step = self.interleave_moe_layer_step
            object.__setattr__(self, "moe_layers", tuple(range(step - 1, self.n_layers, step)) if step else ())
        else:
            object.__setattr__(self, "moe_layers", tuple(int(i) for i in self.moe_layers))
        if self.moe_layers:
            for name in ("n_experts", "top_k"):
                if getattr(self, name) < 1:
                    raise ConfigError(f"text_config.{_HF_NAME['text_config', name]}={getattr(self, name)} must be "
                                      f">= 1 for the MoE layers {list(self.moe_layers)} (a dense model, with no "
                                      f"MoE layer, has moe_layers: [])")
            if self.top_k > self.n_experts:
                raise ConfigError(f"text_config.num_experts_per_tok={self.top_k} exceeds "
                                  f"num_local_experts={self.n_experts}")
        bad = [i for i in self.moe_layers if not 0 <= i < self.n_layers]
        if bad:
            raise ConfigError(f"text_config.moe_layers has indices {bad} outside [0, {self.n_layers})")
        if self.rope_layers is None:
            n = self.nope_layer_interval
            object.__setattr__(self, "rope_layers", tuple(int((i + 1) % n != 0) for i in range(self.n_layers)))
        else:
            object.__setattr__(self, "rope_layers", tuple(int(v) for v in self.rope_layers))
        if len(self.rope_layers) < self.n_layers or any(v not in (0, 1) for v in self.rope_layers):
            raise ConfigError(f"text_config.no_rope_layers must hold a 0/1 flag for each of the {self.n_layers} layers")
        if isinstance(self.eos_token_id, list):
            object.__setattr__(self, "eos_token_id", tuple(self.eos_token_id))

    # -- derived layout -------------------------------------------------------------------------------------
    def is_moe(self, layer: int) -> bool:
        return layer in self.moe_layers

    def uses_rope(self, layer: int) -> bool:
        return bool(self.rope_layers[layer])

    def is_chunked(self, layer: int) -> bool:
        """RoPE layers attend within their chunk; NoPE layers (and everything, without a chunk size) globally."""
        return self.uses_rope(layer) and self.attention_chunk_size is not None

    def replace(self, **changes: Any) -> ModelConfig:
        # derived fields are recomputed unless given explicitly
        if "n_layers" in changes or "interleave_moe_layer_step" in changes:
            changes.setdefault("moe_layers", None)
        if "n_layers" in changes or "nope_layer_interval" in changes:
            changes.setdefault("rope_layers", None)
        return dataclasses.replace(self, **changes)


def _check_positive(cfg: Any, section: str, names: tuple[str, ...], minimum: int = 1) -> None:
    for name in names:
        value = getattr(cfg, name)
        if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
            key = _HF_NAME.get((section, name), name)
            kind = "a positive" if minimum == 1 else "a non-negative"
            raise ConfigError(f"{section}.{key} must be {kind} integer, got {value!r}")


# ---------------------------------------------------------------------------------------------------------------
# Presets. Scout/Maverick follow the published HF configs; Behemoth's shape is not public (see PRESETS doc).
# ---------------------------------------------------------------------------------------------------------------
_SCOUT = ModelConfig(rope_scaling=RopeScaling(), max_seq_len=10485760, vision=VisionConfig())
PRESETS: dict[str, ModelConfig] = {
    "scout": _SCOUT,
    "maverick": _SCOUT.replace(n_experts=128, interleave_moe_layer_step=2, use_qk_norm=False, rope_scaling=None,
                               max_seq_len=1048576),
    # ESTIMATE: Meta has not published Behemoth's dimensions. Chosen to give the announced ~2T total / ~288B
    # active with 16 routed experts + 1 shared on every layer: width 16384, 112 layers, GQA 128/8 heads,
    # expert FFN 19968 -> 1.94T total / 290B active (`herd info behemoth`).
    "behemoth": ModelConfig(dim=16384, n_layers=112, n_heads=128, n_kv_heads=8, head_dim=128,
                            expert_hidden_dim=19968, dense_hidden_dim=39936, n_experts=16,
                            rope_scaling=RopeScaling(), vision=VisionConfig()),
    # tiny shapes for tests and smoke runs (random weights)
    "tiny": ModelConfig(vocab_size=202048, dim=64, n_layers=4, n_heads=4, n_kv_heads=2, head_dim=16,
                        expert_hidden_dim=96, dense_hidden_dim=128, n_experts=4, attention_chunk_size=16,
                        floor_scale=8, max_seq_len=4096),
    "tiny-interleaved": ModelConfig(vocab_size=202048, dim=64, n_layers=4, n_heads=4, n_kv_heads=2, head_dim=16,
                                    expert_hidden_dim=96, dense_hidden_dim=128, n_experts=8, top_k=2,
                                    interleave_moe_layer_step=2, use_qk_norm=False, attention_chunk_size=16,
                                    floor_scale=8, max_seq_len=4096),
}
# tiny + a tiny vision tower at the real tile geometry (336 px, 14 px patches -> 144 <|patch|> per tile)
PRESETS["tiny-vision"] = PRESETS["tiny"].replace(vision=VisionConfig(
    dim=64, n_layers=2, n_heads=4, hidden_dim=256, projector_input_dim=128, projector_output_dim=128,
    vision_output_dim=128))


def preset(name: str) -> ModelConfig:
    try:
        return PRESETS[name.lower()]
    except KeyError:
        raise ConfigError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}") from None


# ---------------------------------------------------------------------------------------------------------------
# HF config.json. One table per section: (herd field, HF key).
# ---------------------------------------------------------------------------------------------------------------
_TEXT_KEYS = [
    ("vocab_size", "vocab_size"), ("dim", "hidden_size"), ("n_layers", "num_hidden_layers"),
    ("n_heads", "num_attention_heads"), ("n_kv_heads", "num_key_value_heads"), ("head_dim", "head_dim"),
    ("expert_hidden_dim", "intermediate_size"), ("dense_hidden_dim", "intermediate_size_mlp"),
    ("n_experts", "num_local_experts"), ("top_k", "num_experts_per_tok"), ("moe_layers", "moe_layers"),
    ("interleave_moe_layer_step", "interleave_moe_layer_step"), ("rope_layers", "no_rope_layers"),
    ("nope_layer_interval", "no_rope_layer_interval"), ("use_qk_norm", "use_qk_norm"),
    ("attention_chunk_size", "attention_chunk_size"), ("attn_temperature_tuning", "attn_temperature_tuning"),
    ("floor_scale", "floor_scale"), ("attn_scale", "attn_scale"), ("norm_eps", "rms_norm_eps"),
    ("max_seq_len", "max_position_embeddings"), ("router_aux_loss_coef", "router_aux_loss_coef"),
    ("bos_token_id", "bos_token_id"), ("eos_token_id", "eos_token_id"), ("pad_token_id", "pad_token_id"),
    ("init_std", "initializer_range"),
]
_VISION_KEYS = [
    ("dim", "hidden_size"), ("n_layers", "num_hidden_layers"), ("n_heads", "num_attention_heads"),
    ("hidden_dim", "intermediate_size"), ("image_size", "image_size"), ("patch_size", "patch_size"),
    ("n_channels", "num_channels"), ("pixel_shuffle_ratio", "pixel_shuffle_ratio"),
    ("projector_input_dim", "projector_input_dim"), ("projector_output_dim", "projector_output_dim"),
    ("vision_output_dim", "vision_output_dim"), ("norm_eps", "norm_eps"), ("rope_theta", "rope_theta"),
    ("hidden_act", "hidden_act"), ("attention_dropout", "attention_dropout"),
    ("projector_dropout", "projector_dropout"), ("multi_modal_projector_bias", "multi_modal_projector_bias"),
    ("vision_feature_layer", "vision_feature_layer"),
    ("vision_feature_select_strategy", "vision_feature_select_strategy"), ("init_std", "initializer_range"),
]
_HF_NAME = {("text_config", f): k for f, k in _TEXT_KEYS} | {("vision_config", f): k for f, k in _VISION_KEYS}
# Keys that HF writes but that do not change the model's function (training knobs, bookkeeping, dtype).
_IGNORED = {
    "model_type", "architectures", "torch_dtype", "dtype", "transformers_version", "_name_or_path", "use_cache",
    "output_router_logits", "router_jitter_noise", "attention_dropout", "projector_dropout", "layer_types",
    "cache_implementation", "for_llm_compressor", "output_hidden_states", "output_attentions", "return_dict",
    "chunk_size_feed_forward", "is_encoder_decoder", "id2label", "label2id", "problem_type", "tokenizer_class",
    "initializer_range", "vision_feature_select_strategy", "vision_feature_layer", "intermediate_layers_indices",
    "multi_modal_projector_bias", "num_labels", "attention_bias", "hidden_act", "rope_scaling", "rope_theta",
    "rope_parameters", "tie_word_embeddings", "boi_token_index", "eoi_token_index", "image_token_index",
    "text_config", "vision_config", "quantization_config", "pruned_heads", "torchscript", "tf_legacy_loss",
    "use_bfloat16", "add_cross_attention", "finetuning_task", "task_specific_params", "sep_token_id",
    "decoder_start_token_id", "tie_encoder_decoder", "is_decoder", "cross_attention_hidden_size",
    "pad_token_id",  # top level of multimodal configs (the text_config one is read)
}


def _read_section(d: dict, table: list[tuple[str, str]], section: str, strict: bool) -> dict:
    known = {k for _, k in table}
    if strict:
        unknown = sorted(set(d) - known - _IGNORED)
        if unknown:
            raise ConfigError(f"unknown key {section}.{unknown[0]} in config.json (herd cannot honour it); "
                              f"pass strict=False to ignore unknown keys")
    # null means "use the default" for most keys, but a null pad_token_id means "no padding token"
    out = {f: d[k] for f, k in table if k in d and (d[k] is not None or f == "pad_token_id")}
    for name in ("moe_layers", "rope_layers"):
        if name in out:
            out[name] = tuple(out[name])
    return out


def _read_rope(d: dict) -> dict:
    """Both HF conventions: ``rope_theta`` + ``rope_scaling`` (checkpoints, transformers 4.x) and
    ``rope_parameters`` (transformers 5)."""
    params = d.get("rope_parameters") or {}
    scaling = d.get("rope_scaling") or (params if params.get("rope_type", "default") != "default" else None)
    out: dict[str, Any] = {}
    theta = d.get("rope_theta", params.get("rope_theta"))
    if theta is not None:
        out["rope_theta"] = float(theta)
    if scaling:
        kind = scaling.get("rope_type", scaling.get("type"))
        if kind != "llama3":
            raise ConfigError(f"text_config.rope_scaling.rope_type={kind!r} is not supported (only 'llama3')")
        try:
            out["rope_scaling"] = RopeScaling(float(scaling["factor"]), float(scaling["low_freq_factor"]),
                                              float(scaling["high_freq_factor"]),
                                              int(scaling["original_max_position_embeddings"]))
        except KeyError as e:
            raise ConfigError(f"text_config.rope_scaling is missing {e.args[0]!r}") from None
    return out


def from_hf_dict(d: dict, strict: bool = True) -> ModelConfig:
    """Build a ModelConfig from a parsed HF config (``llama4`` with text/vision sub-configs, or ``llama4_text``)."""
    model_type = d.get("model_type")
    if model_type == "llama4":
        if "text_config" not in d:
            raise ConfigError("config.json of model_type 'llama4' has no text_config")
        text, vision = d["text_config"], d.get("vision_config")
        _read_section(d, [], "config", strict)  # only to reject unknown top-level keys
    elif model_type == "llama4_text":
        text, vision = d, None
    else:
        raise ConfigError(f"model_type={model_type!r} is not a Llama 4 config (expected 'llama4' or 'llama4_text')")
    act = text.get("hidden_act", "silu")
    if act != "silu":
        raise ConfigError(f"text_config.hidden_act={act!r} is not supported (Llama 4 uses 'silu')")
    if text.get("attention_bias"):
        raise ConfigError("text_config.attention_bias=true is not supported (Llama 4 has no attention bias)")
    kw = _read_section(text, _TEXT_KEYS, "text_config", strict) | _read_rope(text)
    kw["tie_embeddings"] = bool(d.get("tie_word_embeddings", text.get("tie_word_embeddings", False)))
    for f, k in (("image_token_id", "image_token_index"), ("boi_token_id", "boi_token_index"),
                 ("eoi_token_id", "eoi_token_index")):
        if k in d:
            kw[f] = d[k]
    if vision is not None:
        vkw = _read_section(vision, _VISION_KEYS, "vision_config", strict)
        theta = (vision.get("rope_parameters") or {}).get("rope_theta")  # where transformers 5 writes it
        if "rope_theta" not in vkw and theta is not None:
            vkw["rope_theta"] = float(theta)
        kw["vision"] = VisionConfig(**vkw)
    try:
        return ModelConfig(**kw)
    except TypeError as e:  # a value of the wrong type reaching a check
        raise ConfigError(f"config.json: {e}") from None


def to_hf_dict(cfg: ModelConfig, text_only: bool | None = None) -> dict:
    """The HF config for ``cfg``: ``llama4`` (with vision) or ``llama4_text`` (text only)."""
    text = {k: _jsonable(getattr(cfg, f)) for f, k in _TEXT_KEYS}
    text.update(model_type="llama4_text", hidden_act="silu", attention_bias=False, rope_theta=cfg.rope_theta,
                tie_word_embeddings=cfg.tie_embeddings,
                rope_scaling=None if cfg.rope_scaling is None else
                {"rope_type": "llama3", **dataclasses.asdict(cfg.rope_scaling)})
    text_only = cfg.vision is None if text_only is None else text_only
    if text_only:
        return text | {"architectures": ["Llama4ForCausalLM"]}
    vision = {k: _jsonable(getattr(cfg.vision, f)) for f, k in _VISION_KEYS}
    vision.update(model_type="llama4_vision_model", vision_feature_select_strategy="default",
                  multi_modal_projector_bias=False)
    return {"model_type": "llama4", "architectures": ["Llama4ForConditionalGeneration"],
            "text_config": text, "vision_config": vision, "tie_word_embeddings": cfg.tie_embeddings,
            "boi_token_index": cfg.boi_token_id, "eoi_token_index": cfg.eoi_token_id,
            "image_token_index": cfg.image_token_id,
            "pad_token_id": cfg.pad_token_id}  # else transformers assumes Llama 4's 200018, outside small vocabs


def _jsonable(v: Any) -> Any:
    return list(v) if isinstance(v, tuple) else v


def load_config(path: str | Path, strict: bool = True) -> ModelConfig:
    """Read ``config.json`` from a model directory (or the file itself)."""
    path = Path(path)
    file = path / "config.json" if path.is_dir() else path
    if not file.exists():
        raise ConfigError(f"no config.json at {path}")
    try:
        d = json.loads(file.read_text())
    except json.JSONDecodeError as e:
        raise ConfigError(f"{file} is not valid JSON: {e}") from None
    try:
        return from_hf_dict(d, strict=strict)
    except ConfigError as e:
        raise ConfigError(f"{file}: {e}") from None


def save_config(cfg: ModelConfig, directory: str | Path, text_only: bool | None = None) -> Path:
    file = Path(directory) / "config.json"
    file.write_text(json.dumps(to_hf_dict(cfg, text_only), indent=2) + "\n")
    return file


def resolve(name_or_dir: str | Path) -> ModelConfig:
    """A preset name or a model directory."""
    p = Path(name_or_dir)
    if p.exists():
        return load_config(p)
    if str(name_or_dir).lower() in PRESETS:
        return preset(str(name_or_dir))
    raise ConfigError(f"{name_or_dir!r} is neither a model directory nor a preset ({', '.join(PRESETS)})")


__all__ = ["ModelConfig", "VisionConfig", "RopeScaling", "PRESETS", "preset", "from_hf_dict", "to_hf_dict",
           "load_config", "save_config", "resolve"]
