"""Vision tower parity with transformers' Llama4VisionModel + Llama4MultiModalProjector, and VisionConfig."""

import json

import pytest
import torch

import herd.model.vision as vision
from herd.config import VisionConfig, from_hf_dict, preset, to_hf_dict
from herd.errors import ConfigError
from herd.info import census
from herd.model import VisionTower

TINY = preset("tiny").replace(dim=80, vision=VisionConfig(
    dim=64, n_layers=2, n_heads=4, hidden_dim=256, image_size=64, patch_size=8, pixel_shuffle_ratio=0.5,
    projector_input_dim=96, projector_output_dim=96, vision_output_dim=96))  # 8x8 patches -> 16 tokens per tile


def hf_tower(cfg, seed: int = 0):
    """transformers' vision model and projector for ``cfg`` with random weights of a scale that exercises them."""
    from transformers import Llama4Config
    from transformers.models.llama4.modeling_llama4 import Llama4MultiModalProjector, Llama4VisionModel

    d = to_hf_dict(cfg)
    hf_cfg = Llama4Config(text_config=d["text_config"], vision_config=d["vision_config"])
    hf_cfg.vision_config._attn_implementation = "eager"  # the plain reference
    torch.manual_seed(seed)
    vm, proj = Llama4VisionModel(hf_cfg.vision_config).eval(), Llama4MultiModalProjector(hf_cfg).eval()
    with torch.no_grad():
        for name, p in [*vm.named_parameters(), *proj.named_parameters()]:
            if "layernorm" in name and name.endswith("weight"):
                p.uniform_(0.5, 1.5)
            else:
                p.normal_(0.0, 0.08)
    return vm, proj


def hf_features(vm, proj, pixel_values):
    """What Llama4ForConditionalGeneration.forward scatters into the <|patch|> positions."""
    image_features = vm(pixel_values, return_dict=True).last_hidden_state
    return proj(image_features.view(-1, image_features.size(-1)))


def herd_tower(vm, proj, cfg):
    tower = VisionTower(cfg).eval()
    tower.load_state_dict({**{f"vision_model.{k}": t for k, t in vm.state_dict().items()},
                           **{f"multi_modal_projector.{k}": t for k, t in proj.state_dict().items()}}, strict=True)
    return tower


@pytest.fixture(scope="module")
def pair():
    vm, proj = hf_tower(TINY)
    return vm, proj, herd_tower(vm, proj, TINY)


def tiles(n: int, cfg=TINY, seed: int = 1) -> torch.Tensor:
    v = cfg.vision
    gen = torch.Generator().manual_seed(seed)
    return torch.rand(n, v.n_channels, v.image_size, v.image_size, generator=gen) * 2 - 1  # normalised to [-1, 1]


@pytest.mark.parametrize("n_tiles", [1, 5])
def test_projected_features_match_transformers_fp32(pair, n_tiles):
    vm, proj, ours = pair
    px = tiles(n_tiles)
    with torch.no_grad():
        ref, got = hf_features(vm, proj, px), ours(px)
    assert got.shape == (n_tiles * TINY.vision.tokens_per_tile, TINY.dim) == ref.shape
    assert ref.abs().max() > 0.1  # a scale that the tolerance below is relative to
    assert (got - ref).abs().max() <= 1e-5 * ref.abs().max()


def test_tiles_are_independent_and_in_order(pair):
    _, _, ours = pair
    px, n = tiles(3), TINY.vision.tokens_per_tile
    with torch.no_grad():
        together = ours(px)
        for i in range(3):
            torch.testing.assert_close(together[i * n:(i + 1) * n], ours(px[i:i + 1]), rtol=1e-5, atol=1e-6)


@pytest.mark.filterwarnings("ignore:Casting complex values to real")
def test_bf16_runs_and_is_close(pair):
    vm, proj, ours = pair
    px = tiles(2)
    with torch.no_grad():
        ref = hf_features(vm, proj, px)
        got = VisionTower(TINY).to(torch.bfloat16).eval()
        got.load_state_dict(ours.state_dict())
        out = got(px)  # fp32 pixels are cast to the weights' dtype
        hf_vm, hf_proj = hf_tower(TINY)  # same seed, same weights
        hf_vm.to(torch.bfloat16), hf_proj.to(torch.bfloat16)
        # transformers quirk: Module.to(bf16) casts the complex RoPE table to real, dropping its sin part
        rot = hf_vm.rotary_embedding
        rot.freqs_ci = rot._compute_freqs_ci(hf_vm.config)
        hf_bf16 = hf_features(hf_vm, hf_proj, px.to(torch.bfloat16))
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()
    err, hf_err = (out.float() - ref).abs().max(), (hf_bf16.float() - ref).abs().max()
    assert hf_err <= 3e-2 * ref.abs().max()
    assert err <= 3e-2 * ref.abs().max()
    assert err <= 2 * hf_err  # no worse than transformers' own bf16 path


@pytest.mark.parametrize("mutation", ["rope_axes_swapped", "pixel_shuffle_one_permute"])
def test_the_parity_check_catches_a_wrong_detail(pair, monkeypatch, mutation):
    """The fp32 comparison is not vacuous: plausible near-misses of the reference are far outside its tolerance."""
    vm, proj, ours = pair
    if mutation == "rope_axes_swapped":
        good = vision.rope_2d

        def rope_2d(v, device=None):
            cos, sin = good(v, device)
            half = cos.shape[-1] // 2
            return tuple(torch.cat([t[..., half:], t[..., :half]], -1) for t in (cos, sin))
        monkeypatch.setattr(vision, "rope_2d", rope_2d)
    else:
        def pixel_shuffle(x, ratio):
            N, P, C = x.shape
            g = round(P**0.5)
            x = x.reshape(N, g, round(g * ratio), round(C / ratio)).permute(0, 2, 1, 3)
            return x.reshape(N, -1, round(C / ratio**2))
        monkeypatch.setattr(vision, "pixel_shuffle", pixel_shuffle)
    px = tiles(1)
    with torch.no_grad():
        ref, got = hf_features(vm, proj, px), ours(px)
    assert (got - ref).abs().max() > 1e-2 * ref.abs().max()


def test_rope_2d_rotates_by_column_then_row_and_not_cls():
    v = TINY.vision
    cos, sin = vision.rope_2d(v)
    angles = torch.atan2(sin, cos)[0, :, 0]  # [P + 1, head_dim / 2]; lowest frequency 1 keeps angles < pi
    g, half = v.grid_size, v.dim // v.n_heads // 2
    assert angles.shape == (g * g + 1, half)
    p = 2 * g + 5  # row 2, column 5
    assert angles[p, 0].item() == pytest.approx(6.0 - 2 * torch.pi)  # column 5 + 1, wrapped to (-pi, pi]
    assert angles[p, half // 2].item() == pytest.approx(3.0)  # row 2 + 1
    assert torch.equal(angles[-1], torch.zeros(half))


@pytest.mark.parametrize("name", ["scout", "maverick"])
def test_real_tower_on_meta_matches_transformers_tree(name):
    """Scout/Maverick: no memory on the meta device; the same tensor names and shapes as transformers' modules."""
    from transformers import Llama4Config
    from transformers.models.llama4.modeling_llama4 import Llama4MultiModalProjector, Llama4VisionModel

    cfg = preset(name)
    d = to_hf_dict(cfg)
    with torch.device("meta"):
        hf_cfg = Llama4Config(text_config=d["text_config"], vision_config=d["vision_config"])
        vm, proj = Llama4VisionModel(hf_cfg.vision_config), Llama4MultiModalProjector(hf_cfg)
        ours = VisionTower(cfg)
    theirs = {f"vision_model.{k}": t.shape for k, t in vm.state_dict().items()} | \
        {f"multi_modal_projector.{k}": t.shape for k, t in proj.state_dict().items()}
    assert {k: t.shape for k, t in ours.state_dict().items()} == theirs
    assert all(p.is_meta for p in ours.parameters())
    n = sum(p.numel() for p in ours.parameters())
    assert n == sum(p.numel() for p in [*vm.parameters(), *proj.parameters()]) == census(cfg).by_component["vision"]
    assert cfg.vision.tokens_per_tile == 144
    out = ours(torch.empty(2, 3, 336, 336, device="meta"))  # shapes flow through the real config
    assert out.shape == (2 * 144, cfg.dim) and out.is_meta


def test_vision_config_round_trips_through_transformers():
    from transformers import Llama4Config

    v = TINY.vision
    cfg = TINY.replace(vision=VisionConfig(**{**v.__dict__, "attention_dropout": 0.1, "projector_dropout": 0.2,
                                              "init_std": 0.01, "norm_eps": 1e-6, "rope_theta": 500.0}))
    d = to_hf_dict(cfg)
    assert d["vision_config"]["intermediate_size"] == 256 and d["vision_config"]["projector_dropout"] == 0.2
    hf = Llama4Config(text_config=d["text_config"], vision_config=d["vision_config"])
    assert hf.vision_config.hidden_size == 64 and hf.vision_config.pixel_shuffle_ratio == 0.5
    written = json.loads(hf.to_json_string())  # transformers 5 moves rope_theta into rope_parameters
    assert from_hf_dict(written) == cfg
    assert from_hf_dict(json.loads(json.dumps(d))) == cfg
    # the published Scout vision_config (transformers 4.51 era keys)
    scout_vision = {"attention_dropout": 0.0, "hidden_act": "gelu", "hidden_size": 1408, "image_size": 336,
                    "initializer_range": 0.02, "intermediate_size": 5632, "model_type": "llama4_vision_model",
                    "multi_modal_projector_bias": False, "norm_eps": 1e-05, "num_attention_heads": 16,
                    "num_channels": 3, "num_hidden_layers": 34, "patch_size": 14, "pixel_shuffle_ratio": 0.5,
                    "projector_dropout": 0.0, "projector_input_dim": 4096, "projector_output_dim": 4096,
                    "rope_theta": 10000, "vision_feature_layer": -1, "vision_feature_select_strategy": "default",
                    "vision_output_dim": 4096}
    assert from_hf_dict(to_hf_dict(preset("scout")) | {"vision_config": scout_vision}) == preset("scout")


@pytest.mark.parametrize("key,value", [
    ("hidden_act", "quick_gelu"), ("multi_modal_projector_bias", True), ("vision_feature_layer", -2),
    ("vision_feature_select_strategy", "full"), ("num_attention_heads", 32),  # head dim 2: not a multiple of 4
    ("pixel_shuffle_ratio", 0.3),
])
def test_unsupported_vision_values_name_the_key(key, value):
    d = to_hf_dict(TINY)
    d["vision_config"][key] = value
    with pytest.raises(ConfigError, match=key):
        from_hf_dict(d)


@pytest.mark.parametrize("field,key", [("hidden_dim", "intermediate_size"), ("vision_output_dim", "vision_output_dim"),
                                       ("projector_input_dim", "projector_input_dim")])
def test_inconsistent_adapter_widths_are_rejected_when_building(field, key):
    v = VisionConfig(**{**TINY.vision.__dict__, field: 128})
    with pytest.raises(ConfigError, match=key), torch.device("meta"):
        VisionTower(TINY.replace(vision=v))


def test_text_only_config_has_no_tower():
    with pytest.raises(ConfigError, match="vision_config"):
        VisionTower(preset("tiny"))
