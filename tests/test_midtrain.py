"""Long-context mid-training: a run continues a pretraining checkpoint at a longer sequence length with a new
RoPE theta and a long-documents-only source, and resumes like any run."""

import pytest
import torch
from conftest import text_recipe

from herd.errors import ConfigError
from herd.train import run_state
from herd.train.config import load_run_config, to_toml
from herd.train.trainer import Trainer


def _recipe(tmp_path, name, **sections):
    recipe = text_recipe(tmp_path, model={"n_layers": 2, "vocab_size": 2560},
                         tokenizer={"train_files": [str(tmp_path / "a.txt")], "vocab_size": 300}, **sections)
    path = tmp_path / f"{name}.toml"
    path.write_text(to_toml(recipe))
    return path


@pytest.fixture
def pretrained(tmp_path):
    path = _recipe(tmp_path, "pre", train={"out_dir": str(tmp_path / "pre"), "steps": 2})
    Trainer(load_run_config(path), progress=False).fit()
    return tmp_path / "pre"


def _mid(tmp_path, pretrained, model=None, min_tokens=64, steps=2):
    recipe = {"model": {"init_from": str(pretrained), "rope_theta": 1e6, **(model or {})},
              "data": {"seq_len": 96, "batch_size": 2,
                       "sources": [{"files": [str(tmp_path / "a.txt")], "min_tokens": min_tokens}]},
              "train": {"out_dir": str(tmp_path / "mid"), "steps": steps, "tensorboard": False, "log_every": 1}}
    path = tmp_path / "mid.toml"
    path.write_text(to_toml(recipe))
    return load_run_config(path)


def test_midtraining_continues_a_run_at_a_longer_length(tmp_path, pretrained):
    ckpt = run_state.latest(pretrained / "checkpoints")
    before = Trainer(load_run_config(tmp_path / "pre.toml"), resume=True, progress=False)
    mid = Trainer(_mid(tmp_path, pretrained), progress=False)
    assert mid.model_cfg.rope_theta == 1e6 and before.model_cfg.rope_theta != 1e6
    assert mid.tokenizer.vocab_size == before.tokenizer.vocab_size  # the run's own BPE, not Llama 4's
    for (name, a), b in zip(before.model.state_dict().items(), mid.model.state_dict().values()):
        assert torch.equal(a, b), name  # starts from the pretrained weights
    assert mid.loader.next_batch()["tokens"].shape == (2, 96)
    last = mid.fit()
    assert mid.step == 2 and last["loss"] < 20
    resumed = Trainer(_mid(tmp_path, pretrained, steps=3), resume=True, progress=False)
    assert resumed.step == 2 and resumed.model_cfg.rope_theta == 1e6
    resumed.fit()
    assert resumed.step == 3
    assert run_state.latest(pretrained / "checkpoints") == ckpt  # the pretraining run is untouched


def test_midtraining_cannot_reshape_the_model(tmp_path, pretrained):
    with pytest.raises(ConfigError, match=r"\[model\] dim, rope_theta would change the weights"):
        Trainer(_mid(tmp_path, pretrained, model={"dim": 128}), progress=False)


def test_long_document_filter_that_leaves_nothing_is_an_error(tmp_path, pretrained):
    with pytest.raises(ConfigError, match="no document left of at least min_tokens=100000"):
        Trainer(_mid(tmp_path, pretrained, min_tokens=100_000), progress=False)
