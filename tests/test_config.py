"""Config dataclasses <-> HF config.json, presets, and errors that name the key."""

import json

import pytest
import torch

from herd.config import ModelConfig, from_hf_dict, load_config, preset, save_config, to_hf_dict
from herd.errors import ConfigError
from herd.info import census
from herd.model import Transformer


@pytest.mark.parametrize("name", ["scout", "maverick", "tiny", "tiny-interleaved"])
def test_preset_round_trips_through_transformers_config(name):
    from transformers import Llama4Config, Llama4TextConfig

    cfg = preset(name)
    d = to_hf_dict(cfg)
    if cfg.vision is None:
        hf = Llama4TextConfig(**{k: v for k, v in d.items() if k not in ("model_type", "architectures")})
        text = hf
    else:
        hf = Llama4Config(text_config=d["text_config"], vision_config=d["vision_config"])
        text = hf.text_config
    # transformers derives the same layout from what herd writes
    assert list(text.moe_layers) == list(cfg.moe_layers)
    assert list(text.no_rope_layers) == list(cfg.rope_layers)
    assert text.num_local_experts == cfg.n_experts and text.use_qk_norm == cfg.use_qk_norm
    back = from_hf_dict(json.loads(hf.to_json_string()))
    assert back == cfg


def test_scout_matches_the_published_numbers():
    s, m = preset("scout"), preset("maverick")
    assert (s.dim, s.n_layers, s.n_heads, s.n_kv_heads, s.head_dim, s.vocab_size) == (5120, 48, 40, 8, 128, 202048)
    assert s.moe_layers == tuple(range(48)) and m.moe_layers == tuple(range(1, 48, 2))
    assert [i for i in range(48) if not s.uses_rope(i)] == list(range(3, 48, 4))
    assert s.rope_scaling.factor == 16 and m.rope_scaling is None and not m.use_qk_norm


@pytest.mark.parametrize("name", ["scout", "maverick"])
def test_census_equals_transformers_module_tree(name):
    """herd's text parameter count (from its own meta model) equals transformers' on the meta device."""
    from transformers import Llama4Config, Llama4ForConditionalGeneration

    cfg = preset(name)
    d = to_hf_dict(cfg)
    with torch.device("meta"):
        hf = Llama4ForConditionalGeneration(Llama4Config(text_config=d["text_config"],
                                                         vision_config=d["vision_config"]))
    hf_text = sum(p.numel() for p in hf.language_model.parameters())
    hf_vision = sum(p.numel() for p in hf.vision_model.parameters()) + \
        sum(p.numel() for p in hf.multi_modal_projector.parameters())
    c = census(cfg)
    assert c.total_params - c.by_component["vision"] == hf_text
    assert c.by_component["vision"] == hf_vision


def test_meta_device_instantiation_costs_no_memory():
    with torch.device("meta"):
        model = Transformer(preset("maverick"))
    assert all(p.is_meta for p in model.parameters())


def test_heads_not_dividing_names_the_key():
    d = to_hf_dict(preset("tiny"))
    d["num_key_value_heads"] = 3
    with pytest.raises(ConfigError, match="num_key_value_heads"):
        from_hf_dict(d)


@pytest.mark.parametrize("key,value,match", [
    ("hidden_size", 0, "hidden_size"),
    ("num_experts_per_tok", 9, "num_experts_per_tok"),
    ("moe_layers", [0, 7], "moe_layers"),
    ("no_rope_layers", [1, 1], "no_rope_layers"),
    ("hidden_act", "gelu", "hidden_act"),
    ("rope_scaling", {"rope_type": "yarn", "factor": 4.0}, "rope_type"),
    ("sliding_window_pattern", 3, "sliding_window_pattern"),
])
def test_bad_values_name_the_key(key, value, match):
    d = to_hf_dict(preset("tiny"))
    d[key] = value
    with pytest.raises(ConfigError, match=match):
        from_hf_dict(d)


def test_unknown_key_can_be_ignored_and_wrong_model_type_rejected(tmp_path):
    d = to_hf_dict(preset("tiny")) | {"some_future_knob": 1}
    assert from_hf_dict(d, strict=False) == preset("tiny")
    with pytest.raises(ConfigError, match="model_type"):
        from_hf_dict(d | {"model_type": "llama"})
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ConfigError, match="config.json"):
        load_config(tmp_path)


def test_save_and_load_config_file(tmp_path):
    cfg = preset("scout")
    save_config(cfg, tmp_path)
    assert load_config(tmp_path) == cfg
    save_config(cfg, tmp_path, text_only=True)
    assert load_config(tmp_path) == cfg.replace(vision=None)


def test_replace_rederives_layout():
    cfg = preset("tiny").replace(n_layers=8, interleave_moe_layer_step=2)
    assert cfg.moe_layers == (1, 3, 5, 7) and cfg.rope_layers == (1, 1, 1, 0, 1, 1, 1, 0)
    assert isinstance(cfg, ModelConfig)
