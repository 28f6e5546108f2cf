"""LoRA: the adapted forward equals the merged model, only adapters train, every grouped-matmul backend agrees, and
adapters round-trip with peft on transformers' Llama 4 (same logits, same merge)."""

import pytest
import torch
import torch.nn.functional as F
from conftest import herd_from_hf, hf_text_model, random_model, small_config
from safetensors.torch import load_file
from torch import nn

from herd import checkpoint
from herd.checkpoint import herd_to_hf, transposed_in_hf
from herd.config import preset
from herd.model.moe import GROUPED_MM, Experts, set_grouped_mm_backend
from herd.post.lora import (
    LoRAConfig,
    apply_lora,
    load_peft_adapter,
    lora_parameters,
    merge_lora,
    merged_state_dict,
    save_peft_adapter,
)

TINY = dict(n_layers=2, interleave_moe_layer_step=2, top_k=2)  # layer 0 dense FFN, layer 1 MoE
TOKENS = torch.randint(0, 512, (2, 24), generator=torch.Generator().manual_seed(0))
CFG = LoRAConfig(rank=8, alpha=16.0)  # rank 8: fp32 rows of 32 bytes, which torch's grouped kernel takes


@torch.no_grad()
def randomize_B(model, seed: int = 1):
    """Fresh adapters have B = 0 and change nothing: give every B values that move the logits."""
    g = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        if name.endswith(("lora_B", "gate_up_B", "down_B")):
            p.copy_(torch.randn(p.shape, generator=g) * 0.05)


def lora_model(cfg: LoRAConfig = CFG):
    model = random_model(0, **TINY)
    apply_lora(model, cfg)
    randomize_B(model)
    return model


def assert_close_logits(got, ref, rel=1e-4):
    scale = ref.abs().max()
    assert (got - ref).abs().max() <= rel * scale, f"max diff {(got - ref).abs().max():.3g} vs scale {scale:.3g}"


def test_merge_equals_lora_forward_and_base_plus_scaled_BA():
    model = random_model(0, **TINY)
    base = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        base_logits = model(TOKENS)
    names = apply_lora(model, CFG)
    assert {"layers.0.feed_forward.gate_proj", "layers.1.self_attn.q_proj", "layers.1.feed_forward.experts",
            "layers.1.feed_forward.shared_expert.down_proj"} <= set(names)
    assert len(names) == 15 and not any("router" in n or "embed" in n or n == "lm_head" for n in names)
    with torch.no_grad():
        assert torch.equal(model(TOKENS), base_logits)  # B = 0
    randomize_B(model)
    with torch.no_grad():
        lora_logits = model(TOKENS)
    assert (lora_logits - base_logits).abs().max() > 0.05 * base_logits.abs().max()

    q, ex = model.layers[0].self_attn.q_proj, model.layers[1].feed_forward.experts
    experts = "layers.1.feed_forward.experts"
    by_hand = {k: v.detach().clone() for k, v in {  # W + alpha / rank * B @ A
        "q_proj": base["layers.0.self_attn.q_proj.weight"] + 2.0 * q.lora_B @ q.lora_A,
        "gate_up expert 2": base[f"{experts}.gate_up_proj"][2] + 2.0 * ex.gate_up_B[2] @ ex.gate_up_A[2],
        "down expert 3": base[f"{experts}.down_proj"][3] + 2.0 * ex.down_B[3] @ ex.down_A[3]}.items()}
    merge_lora(model)
    assert type(q) is nn.Linear and type(ex) is Experts and not lora_parameters(model)
    assert list(model.state_dict()) == list(base)
    with torch.no_grad():
        torch.testing.assert_close(model(TOKENS), lora_logits, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(q.weight, by_hand["q_proj"])
    torch.testing.assert_close(ex.gate_up_proj[2], by_hand["gate_up expert 2"])
    torch.testing.assert_close(ex.down_proj[3], by_hand["down expert 3"])


def test_only_lora_params_train_and_backends_agree():
    grads, logits = {}, {}
    for backend in GROUPED_MM:
        model = lora_model()
        set_grouped_mm_backend(model, backend)
        if backend in ("grouped", "gather"):  # forward only: grouped has no CPU backward of its own
            with torch.no_grad():
                logits[backend] = model(TOKENS)
            continue
        out = model(TOKENS)
        logits[backend] = out.detach()
        F.cross_entropy(out[:, :-1].flatten(0, 1), TOKENS[:, 1:].flatten()).backward()
        lora = lora_parameters(model)
        assert len(lora) == 2 * 14 + 4  # 14 linears, one Experts with two pairs
        assert all(p.requires_grad and p.grad is not None and p.grad.abs().sum() > 0 for p in lora)
        ids = {id(p) for p in lora}
        assert all(not p.requires_grad and p.grad is None for p in model.parameters() if id(p) not in ids)
        grads[backend] = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    for backend in GROUPED_MM:
        torch.testing.assert_close(logits[backend], logits["loop"], atol=1e-5, rtol=1e-5, msg=backend)
    for name, g in grads["loop"].items():
        torch.testing.assert_close(grads["grouped_autograd"][name], g, atol=1e-6, rtol=1e-4, msg=name)


def test_merged_state_dict_equals_merge_lora():
    model = lora_model()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    merged = merged_state_dict(state, CFG)
    assert "layers.1.feed_forward.experts.gate_up_A" in state  # pure: the input is left as it was
    merge_lora(model)
    ref = model.state_dict()
    assert list(merged) == list(ref)
    assert all(torch.equal(merged[k], ref[k]) for k in ref)


def test_peft_loads_herd_adapter_with_same_logits_and_merge(tmp_path):
    peft = pytest.importorskip("peft")
    transformers = pytest.importorskip("transformers")
    cfg = LoRAConfig(rank=4, alpha=12.0)
    model = random_model(0, **TINY)
    checkpoint.save(model, tmp_path / "base")
    apply_lora(model, cfg)
    randomize_B(model)
    save_peft_adapter(model, cfg, tmp_path / "adapter", str(tmp_path / "base"))

    hf = transformers.Llama4ForCausalLM.from_pretrained(tmp_path / "base", attn_implementation="eager").eval()
    theirs = peft.PeftModel.from_pretrained(hf, tmp_path / "adapter").eval()
    # peft built exactly the tensors the file holds: no missing or unexpected keys
    ours = load_file(tmp_path / "adapter" / "adapter_model.safetensors")
    assert {k: v.shape for k, v in peft.get_peft_model_state_dict(theirs).items()} == \
        {k: v.shape for k, v in ours.items()}
    with torch.no_grad():
        assert_close_logits(model(TOKENS), theirs(TOKENS).logits)

    merged_hf = theirs.merge_and_unload().state_dict()
    merge_lora(model)
    for name, p in model.named_parameters():
        t = p.transpose(1, 2) if transposed_in_hf(model, name) else p
        torch.testing.assert_close(t, merged_hf[herd_to_hf(name)], atol=1e-6, rtol=1e-5, msg=name)


def test_load_peft_adapter_round_trip_and_from_peft(tmp_path):
    model = lora_model()
    save_peft_adapter(model, CFG, tmp_path / "herd", "base")
    fresh = random_model(0, **TINY)
    got = load_peft_adapter(fresh, tmp_path / "herd")
    assert (got.rank, got.alpha, set(got.targets)) == (CFG.rank, CFG.alpha, set(CFG.targets))
    assert all(torch.equal(a, b) for a, b in zip(fresh.state_dict().values(), model.state_dict().values(), strict=True))
    with torch.no_grad():
        torch.testing.assert_close(fresh(TOKENS), model(TOKENS), atol=0, rtol=0)

    # an adapter peft wrote itself: rank 3, a subset of the linears, both expert weights
    peft = pytest.importorskip("peft")
    cfg = small_config(**TINY)
    hf = hf_text_model(cfg)
    herd = herd_from_hf(hf, cfg)
    theirs = peft.get_peft_model(hf, peft.LoraConfig(
        r=3, lora_alpha=5, target_modules=["q_proj", "v_proj", "down_proj"],
        target_parameters=["feed_forward.experts.gate_up_proj", "feed_forward.experts.down_proj"]))
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for name, p in theirs.named_parameters():
            if "lora_B" in name:
                p.normal_(0.0, 0.05, generator=g)
    theirs.save_pretrained(tmp_path / "peft")
    got = load_peft_adapter(herd, tmp_path / "peft")
    assert (got.rank, got.alpha, set(got.targets)) == (3, 5, {"q_proj", "v_proj", "down_proj", "experts"})
    with torch.no_grad():
        assert_close_logits(herd(TOKENS), theirs(TOKENS).logits)


def test_bad_rank_and_targets_are_errors(tmp_path):
    for rank in (0, -2):
        with pytest.raises(ValueError, match="rank"):
            LoRAConfig(rank=rank)
    model = random_model(0, **TINY)
    for target in ("qproj", "router", "lm_head", "embed_tokens"):
        with pytest.raises(ValueError, match=target):
            apply_lora(model, LoRAConfig(targets=("q_proj", target)))
    assert all(p.requires_grad for p in model.parameters())  # a refused target changes nothing
    with pytest.raises(ValueError, match="experts"):
        apply_lora(random_model(0, n_layers=1, moe_layers=()), LoRAConfig())
    apply_lora(model, CFG)
    with pytest.raises(ValueError, match="once"):
        apply_lora(model, CFG)


def test_multimodal_adapter_leaves_the_vision_tower_alone(tmp_path):
    peft = pytest.importorskip("peft")
    transformers = pytest.importorskip("transformers")
    model = random_model(0, vision=preset("tiny-vision").vision, **TINY)
    checkpoint.save(model, tmp_path / "base")  # Llama4ForConditionalGeneration: text under language_model.
    names = apply_lora(model, CFG)
    assert not any(n.startswith("vision.") for n in names)
    randomize_B(model)
    save_peft_adapter(model, CFG, tmp_path / "adapter", str(tmp_path / "base"))
    hf = transformers.Llama4ForConditionalGeneration.from_pretrained(tmp_path / "base", attn_implementation="eager")
    theirs = peft.PeftModel.from_pretrained(hf.eval(), tmp_path / "adapter").eval()
    ours = load_file(tmp_path / "adapter" / "adapter_model.safetensors")
    assert {k: v.shape for k, v in peft.get_peft_model_state_dict(theirs).items()} == \
        {k: v.shape for k, v in ours.items()}
    with torch.no_grad():  # the text model alone (transformers' full forward wants image outputs)
        assert_close_logits(model(TOKENS), theirs.base_model.model.language_model(input_ids=TOKENS).logits)
    fresh = random_model(0, vision=preset("tiny-vision").vision, **TINY)
    load_peft_adapter(fresh, tmp_path / "adapter")
    with torch.no_grad():
        torch.testing.assert_close(fresh(TOKENS), model(TOKENS), atol=0, rtol=0)
