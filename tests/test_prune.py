"""herd.post.prune: MoE -> dense as Llama Guard 4 was made from Scout (routed experts and routers dropped, each MoE
FFN becomes a dense FFN from the shared expert). With the routed experts silenced, the MoE model computes exactly
what the pruned one does; the saved directory is in LG4's dense layout and loads back."""

import json

import pytest
import torch
from conftest import random_model
from safetensors import safe_open

from herd import checkpoint
from herd.errors import HerdError
from herd.model.ffn import FeedForward
from herd.model.moe import Experts
from herd.post.prune import dense_config, prune, prune_directory


def test_pruned_model_is_the_moe_model_without_its_routed_experts():
    moe = random_model(seed=1)
    assert moe.cfg.moe_layers == tuple(range(moe.cfg.n_layers))
    ids = torch.randint(0, moe.cfg.vocab_size, (2, 24))
    dense = prune(moe).eval()
    assert dense.cfg.moe_layers == () and dense.cfg.n_experts == 0
    assert dense.cfg.dense_hidden_dim == moe.cfg.expert_hidden_dim
    assert all(type(block.feed_forward) is FeedForward for block in dense.layers)
    assert not [n for n, _ in dense.named_parameters() if "expert" in n or "router" in n]
    for module in moe.modules():  # silence the routed experts: what is left is the shared expert
        if isinstance(module, Experts):
            torch.nn.init.zeros_(module.down_proj)
    with torch.no_grad():
        torch.testing.assert_close(dense(ids), moe(ids), rtol=1e-5, atol=1e-5)
    shared = moe.layers[0].feed_forward.shared_expert.gate_proj.weight
    assert torch.equal(dense.layers[0].feed_forward.gate_proj.weight, shared)


def test_prune_directory_writes_the_lg4_dense_layout(tmp_path):
    moe = random_model(seed=2)
    src = checkpoint.save(moe, tmp_path / "moe")
    (src / "tokenizer.json").write_text("{}")
    out = prune_directory(src, tmp_path / "dense", dtype="bf16")
    text = json.loads((out / "config.json").read_text())
    assert (text["num_local_experts"], text["interleave_moe_layer_step"], text["moe_layers"]) == (0, 0, [])
    assert text["intermediate_size_mlp"] == moe.cfg.expert_hidden_dim
    with safe_open(out / "model.safetensors", "pt") as f:
        names = list(f.keys())
        assert f.get_tensor(names[0]).dtype == torch.bfloat16
    assert not [n for n in names if "expert" in n or "router" in n]
    assert (out / "tokenizer.json").is_file()
    loaded = checkpoint.load(out, dtype="fp32").eval()
    ids = torch.randint(0, moe.cfg.vocab_size, (1, 16))
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids), prune(moe).eval().to(torch.bfloat16).float()(ids))


def test_prune_refuses_what_it_cannot_do():
    dense_cfg = dense_config(random_model().cfg)
    with pytest.raises(HerdError, match="no MoE layer"):
        dense_config(dense_cfg)
    interleaved = random_model(n_experts=8, top_k=2, interleave_moe_layer_step=2)  # dense 128 wide, experts 96
    with pytest.raises(HerdError, match="one dense width"):
        dense_config(interleaved.cfg)
