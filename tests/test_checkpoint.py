"""HF checkpoint round trips with transformers, and precise errors on broken checkpoints."""

import json

import pytest
import torch
from conftest import hf_text_model, small_config
from safetensors.torch import load_file, save_file

from herd import checkpoint
from herd.checkpoint import safetensors_io
from herd.config import VisionConfig, to_hf_dict
from herd.errors import CheckpointError
from herd.model import Transformer

TOKENS = torch.randint(0, 512, (2, 40), generator=torch.Generator().manual_seed(0))


def _saved_herd_model(path, **changes):
    cfg = small_config(**changes)
    torch.manual_seed(0)
    model = Transformer(cfg).eval()
    checkpoint.save(model, path)
    return model


def test_herd_save_transformers_load_same_logits(tmp_model_dir):
    from transformers import Llama4ForCausalLM

    model = _saved_herd_model(tmp_model_dir, interleave_moe_layer_step=2, top_k=2)
    hf = Llama4ForCausalLM.from_pretrained(tmp_model_dir, attn_implementation="eager").eval()
    with torch.no_grad():
        ref, got = hf(TOKENS).logits, model(TOKENS)
    assert (got - ref).abs().max() <= 1e-4 * ref.abs().max()


def test_transformers_sharded_save_herd_load_same_logits(tmp_model_dir):
    cfg = small_config()
    hf = hf_text_model(cfg)
    hf.save_pretrained(tmp_model_dir, max_shard_size="200KB")
    assert (tmp_model_dir / checkpoint.INDEX_FILE).exists()
    ours = checkpoint.load(tmp_model_dir).eval()
    with torch.no_grad():
        ref, got = hf(TOKENS).logits, ours(TOKENS)
    assert (got - ref).abs().max() <= 1e-4 * ref.abs().max()


def test_multimodal_checkpoint_loads_text_model(tmp_model_dir):
    """A Llama4ForConditionalGeneration checkpoint (language_model.* + vision tensors) loads the decoder."""
    from transformers import Llama4Config, Llama4ForConditionalGeneration

    cfg = small_config(vision=VisionConfig(dim=32, n_layers=1, n_heads=2, hidden_dim=128, image_size=56,
                                           patch_size=14, projector_input_dim=32, projector_output_dim=32,
                                           vision_output_dim=32))
    d = to_hf_dict(cfg)
    hf_cfg = Llama4Config(text_config=d["text_config"], vision_config=d["vision_config"])
    torch.manual_seed(0)
    hf = Llama4ForConditionalGeneration(hf_cfg).eval()
    with torch.no_grad():
        for p in hf.parameters():
            p.normal_(0, 0.08)
    hf.save_pretrained(tmp_model_dir, max_shard_size="300KB")
    ours = checkpoint.load(tmp_model_dir).eval()
    assert ours.cfg.vision is not None and ours.cfg.vision.dim == 32
    with torch.no_grad():
        # (transformers 5.24 crashes in Llama4ForConditionalGeneration.forward without images: call its decoder)
        ref, got = hf.language_model(input_ids=TOKENS).logits, ours(TOKENS)
    assert (got - ref).abs().max() <= 1e-4 * ref.abs().max()


def test_load_casts_to_requested_dtype(tmp_model_dir):
    _saved_herd_model(tmp_model_dir)
    model = checkpoint.load(tmp_model_dir, dtype="bf16")
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert not any(p.is_meta for p in model.parameters())


@pytest.mark.parametrize("dtype", [None, "bf16"])
def test_loaded_experts_are_contiguous_in_herd_layout(tmp_model_dir, dtype):
    """HF stores routed experts in x out; herd's out x in copy must be dense (a strided view would make every
    decode step walk weight columns), whether or not the load also casts."""
    ref = _saved_herd_model(tmp_model_dir)
    model = checkpoint.load(tmp_model_dir, dtype=dtype)
    for name, p in model.named_parameters():
        assert p.is_contiguous(), name
    experts = model.layers[0].feed_forward.experts
    assert torch.equal(experts.gate_up_proj.float(), ref.layers[0].feed_forward.experts.gate_up_proj.to(
        experts.gate_up_proj.dtype).float())


def test_mis_shaped_tensor_names_tensor_and_file(tmp_model_dir):
    _saved_herd_model(tmp_model_dir)
    file = tmp_model_dir / checkpoint.SINGLE_FILE
    tensors = load_file(file)
    name = "model.layers.1.self_attn.k_proj.weight"
    tensors[name] = torch.zeros(3, 7)
    save_file(tensors, file, metadata={"format": "pt"})
    with pytest.raises(CheckpointError) as e:
        checkpoint.load(tmp_model_dir)
    assert name in str(e.value) and "model.safetensors" in str(e.value) and "(3, 7)" in str(e.value)


def test_truncated_shard_names_file(tmp_model_dir):
    model = _saved_herd_model(tmp_model_dir)
    checkpoint.save(model, tmp_model_dir, max_shard_bytes=300_000)  # re-save sharded over the old one
    shards = sorted(tmp_model_dir.glob("model-*.safetensors"))
    assert len(shards) > 2 and not (tmp_model_dir / checkpoint.SINGLE_FILE).exists()
    data = shards[1].read_bytes()
    shards[1].write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError) as e:
        checkpoint.load(tmp_model_dir)
    assert shards[1].name in str(e.value) and "truncated" in str(e.value)


def test_missing_and_unexpected_tensors_are_named(tmp_model_dir):
    _saved_herd_model(tmp_model_dir)
    file = tmp_model_dir / checkpoint.SINGLE_FILE
    tensors = load_file(file)
    del tensors["model.layers.2.feed_forward.router.weight"]
    save_file(tensors, file, metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match="model.layers.2.feed_forward.router.weight"):
        checkpoint.load(tmp_model_dir)
    tensors = load_file(file) | {"model.layers.2.feed_forward.router.weight": torch.zeros(4, 64),
                                 "model.layers.0.mystery.weight": torch.zeros(2)}
    save_file(tensors, file, metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=r"model\.layers\.0\.mystery\.weight.*model\.safetensors"):
        checkpoint.load(tmp_model_dir)


def test_index_pointing_at_missing_shard(tmp_model_dir):
    model = _saved_herd_model(tmp_model_dir)
    checkpoint.save(model, tmp_model_dir, max_shard_bytes=300_000)
    index = json.loads((tmp_model_dir / checkpoint.INDEX_FILE).read_text())
    victim = sorted(set(index["weight_map"].values()))[0]
    (tmp_model_dir / victim).unlink()
    with pytest.raises(CheckpointError, match=victim):
        checkpoint.load(tmp_model_dir)


def test_failed_save_keeps_previous_checkpoint(tmp_model_dir, monkeypatch):
    model = _saved_herd_model(tmp_model_dir)
    (tmp_model_dir / "tokenizer.model").write_text("kept")
    before = (tmp_model_dir / checkpoint.SINGLE_FILE).read_bytes()

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(safetensors_io, "save_file", boom)
    with pytest.raises(OSError):
        checkpoint.save(model, tmp_model_dir)
    assert (tmp_model_dir / checkpoint.SINGLE_FILE).read_bytes() == before
    assert [p.name for p in tmp_model_dir.parent.iterdir()] == [tmp_model_dir.name]  # no temp dirs left
    monkeypatch.undo()
    checkpoint.save(model, tmp_model_dir, dtype="bf16")  # a successful overwrite keeps foreign files
    assert (tmp_model_dir / "tokenizer.model").read_text() == "kept"
    assert checkpoint.load(tmp_model_dir).embed_tokens.weight.dtype == torch.bfloat16


def test_tied_embeddings_round_trip(tmp_model_dir):
    from transformers import Llama4ForCausalLM

    model = _saved_herd_model(tmp_model_dir, tie_embeddings=True)
    assert model.lm_head.weight is model.embed_tokens.weight
    ours = checkpoint.load(tmp_model_dir)
    assert ours.lm_head.weight is ours.embed_tokens.weight
    hf = Llama4ForCausalLM.from_pretrained(tmp_model_dir, attn_implementation="eager").eval()
    with torch.no_grad():
        assert torch.allclose(hf(TOKENS).logits, ours(TOKENS), atol=1e-4)
