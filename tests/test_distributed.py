"""Data and expert parallelism on CPU (gloo, 2 processes): the same losses and weights as one process, and
checkpoints that resume on another number of ranks."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from conftest import text_recipe

from herd.config import preset
from herd.errors import ConfigError
from herd.model import Transformer
from herd.train.config import load_run_config, to_toml
from herd.train.distributed import apply_fsdp, rank_rows
from herd.train.losses import cross_entropy
from herd.train.trainer import Trainer

STEPS = 3


def _batches():
    gen = torch.Generator().manual_seed(1)
    for _ in range(STEPS):
        tokens = torch.randint(0, 97, (4, 17), generator=gen)
        yield {"tokens": tokens[:, :-1], "targets": tokens[:, 1:]}


def _model():
    torch.manual_seed(0)
    return Transformer(preset("tiny-interleaved").replace(vocab_size=97))


def _train(model, rank: int = 0, world: int = 1) -> list[float]:
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    losses = []
    for batch in _batches():
        mine = rank_rows(batch, rank, world)
        loss, _ = cross_entropy(model(mine["tokens"]), mine["targets"])
        loss.backward()  # FSDP averages gradients over ranks: rows per rank are equal, so this is the global mean
        opt.step()
        opt.zero_grad()
        total = loss.detach().clone()
        if world > 1:
            dist.all_reduce(total)
        losses.append(float(total) / world)
    return losses


def _worker(rank: int, world: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE=str(world), RANK=str(rank))
    torch.set_num_threads(1)
    from herd.train.distributed import init_distributed

    model = apply_fsdp(_model(), init_distributed().mesh)
    losses = _train(model, rank, world)
    full = {n: p.full_tensor() for n, p in model.named_parameters()}  # gathers the shards
    if rank == 0:
        torch.save({"losses": losses, "params": full}, out)
    dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not built")
def test_fsdp2_two_ranks_equal_one_process(tmp_path):
    out = str(tmp_path / "rank0.pt")
    torch.multiprocessing.spawn(_worker, args=(2, _free_port(), out), nprocs=2)
    got = torch.load(out)
    single = _model()
    expected = _train(single)
    assert got["losses"] == pytest.approx(expected, rel=1e-5, abs=1e-6)
    # Adam divides by sqrt(v): where a gradient is near zero, summing it in another order (two ranks' halves vs
    # one sum) changes its normalised update by up to a few percent of a 1e-2 step (seen: 1.07e-4 on one weight
    # of 8192, on one machine). So nearly every weight must agree to 1e-5, and every weight to 5e-4 (three steps
    # of lr 1e-2 move them by up to 3e-2).
    for n, p in single.named_parameters():
        mine, theirs = got["params"][n], p.detach()
        assert torch.isclose(mine, theirs, atol=1e-5, rtol=1e-4).float().mean() >= 0.999, n
        torch.testing.assert_close(mine, theirs, atol=5e-4, rtol=1e-4)


def test_rank_rows_splits_evenly():
    batch = {"tokens": torch.arange(8).view(4, 2), "source": torch.arange(4)}
    assert rank_rows(batch, 1, 2)["tokens"].tolist() == [[4, 5], [6, 7]]
    assert rank_rows(batch, 1, 2)["source"].tolist() == [2, 3]
    with pytest.raises(ValueError, match="does not split"):
        rank_rows(batch, 0, 3)


def _run_losses(run: Path) -> dict[int, float]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows if "loss" in r}


def _two_rank_recipe(tmp_path, **train) -> Path:
    recipe = text_recipe(tmp_path, model={"n_layers": 2, "vocab_size": 2560},
                         tokenizer={"train_files": [str(tmp_path / "a.txt")], "vocab_size": 300},
                         train={"steps": 4, "ckpt_every": 2, "grad_accum": 2, "threads": 1, **train},
                         optim={"lr": 3e-3, "warmup_steps": 1, "schedule": "constant"})
    recipe["data"]["batch_size"] = 4
    path = tmp_path / "recipe.toml"
    path.write_text(to_toml(recipe))
    return path


def _train_two_ranks(path: Path, out: Path, *overrides: str) -> None:
    subprocess.run([sys.executable, "-m", "herd.cli", "train", str(path), "--nproc", "2", "--no-progress",
                    "--train.ep", "2", "--train.out_dir", str(out), *overrides], check=True,
                   env={**os.environ, "PYTHONWARNINGS": "ignore"}, timeout=300)


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not built")
def test_train_two_ranks_fsdp_ep_equals_one_process_and_resumes_on_one(tmp_path):
    """``herd train --nproc 2 --train.ep 2`` (torchrun, gloo): FSDP2 + expert parallelism with grad accumulation,
    z-loss and the balancing loss gives the single-process losses; its DCP checkpoint then resumes in one
    process and continues the single-process curve."""
    path = _two_rank_recipe(tmp_path, z_loss=1e-4)  # runs of 4 and 6 steps
    two = tmp_path / "two"
    _train_two_ranks(path, two)

    one = tmp_path / "one"
    Trainer(load_run_config(path, ["--train.out_dir", str(one), "--train.steps", "6"]), progress=False).fit()
    expected, got = _run_losses(one), _run_losses(two)
    assert sorted(got) == [1, 2, 3, 4]
    # exact up to summation order, but for the balancing loss: a per-rank statistic averaged over the ranks
    # (measured: 1e-6 relative)
    assert [got[s] for s in got] == pytest.approx([expected[s] for s in got], rel=1e-4)

    # resume the 2-rank run's step-4 DCP checkpoint in one process, to step 6
    resumed = Trainer(load_run_config(path, ["--train.out_dir", str(two), "--train.steps", "6"]), resume=True,
                      progress=False)
    assert resumed.step == 4
    resumed.fit()
    got = _run_losses(two)
    assert [got[5], got[6]] == pytest.approx([expected[5], expected[6]], rel=1e-4)


def test_layout_errors_name_the_setting(tmp_path):
    path = tmp_path / "recipe.toml"
    path.write_text(to_toml(text_recipe(tmp_path, train={"ep": 2})))
    with pytest.raises(ConfigError, match=r"train.ep=2: .* \(1 or 1 here\)"):
        Trainer(load_run_config(path), progress=False)


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not built")
def test_train_two_ranks_with_torchao_fp8(tmp_path):
    """Every transform of parallelize at once: torchao Float8Linear (rowwise), FP8 experts, activation
    checkpointing, expert parallelism and FSDP2 give the single-process losses. Not to summation order: grad_w's
    column scales span each rank's tokens, not the whole batch (measured 1.5e-4)."""
    pytest.importorskip("torchao.float8")
    path = _two_rank_recipe(tmp_path, steps=3, ckpt_every=3, fp8="rowwise", fp8_backend="torchao",
                            activation_checkpointing=True)
    _train_two_ranks(path, tmp_path / "two")
    Trainer(load_run_config(path, ["--train.out_dir", str(tmp_path / "one")]), progress=False).fit()
    expected, got = _run_losses(tmp_path / "one"), _run_losses(tmp_path / "two")
    assert sorted(got) == [1, 2, 3]
    assert [got[s] for s in got] == pytest.approx([expected[s] for s in got], rel=2e-3)


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not built")
@pytest.mark.parametrize("method", ["sft", "dpo", "rl"])
def test_post_training_two_ranks_equals_one_process(base, tmp_path, method):
    """herd sft (full, FSDP2 + expert parallelism), herd dpo (LoRA under FSDP2) and herd rl (full, FSDP2 + EP,
    asynchronous rollouts: every rank runs the same engine) on two ranks give the single-process losses; the
    adapter is gathered and exported."""
    data = tmp_path / "data.jsonl"
    words = "apple bread candle dragon eagle forest garden harbor".split()
    if method == "sft":
        records = [{"messages": [{"role": "user", "content": f"After {w}?"}, {"role": "assistant", "content": v}]}
                   for w, v in zip(words, words[1:] + words[:1])]
    elif method == "dpo":
        records = [{"prompt": f"About {w}?", "chosen": f" I think {w} is fine.", "rejected": f" {w}."} for w in words]
    else:  # a toy task: one token with a "u" in it
        records = [{"prompt": f"Say a word like {w}.", "answer": "u"} for w in words]
    data.write_text("".join(json.dumps(r) + "\n" for r in records))
    if method == "rl":  # no balancing loss: a per-rank statistic, it alone differs between the layouts
        common = ["rl", str(base), "--tasks", f"{data}:matcher=regex", "--steps", "3", "--lr", "1e-2",
                  "--rl.max_new_tokens", "1", "--rl.filter", "false", "--rl.heldout", "4", "--rl.prompts_per_step", "4",
                  "--train.aux_loss_coef", "0", "--optim.schedule", "constant", "--train.tensorboard", "false",
                  "--no-progress"]
    else:
        common = [method, str(base), str(data), "--steps", "3", "--batch-size", "4", "--lr", "1e-3",
                  "--data.seq_len", "64", "--optim.schedule", "constant", "--train.log_every", "1",
                  "--train.tensorboard", "false", "--no-progress", *([] if method == "sft" else ["--lora", "4"])]
    ep = ["--train.ep", "2"] if method != "dpo" else []
    subprocess.run([sys.executable, "-m", "herd.cli", *common, *ep, "--out", str(tmp_path / "two"), "--nproc", "2",
                    "--train.threads", "1"], check=True, env={**os.environ, "PYTHONWARNINGS": "ignore"}, timeout=300)
    subprocess.run([sys.executable, "-m", "herd.cli", *common, "--out", str(tmp_path / "one")], check=True,
                   env={**os.environ, "PYTHONWARNINGS": "ignore"}, timeout=300)
    one, two = _run_losses(tmp_path / "one"), _run_losses(tmp_path / "two")
    assert sorted(two) == [1, 2, 3] and [two[s] for s in two] == pytest.approx([one[s] for s in two], rel=1e-4,
                                                                              abs=1e-5 if method == "rl" else 0)
    assert (tmp_path / "two" / "config.json").is_file()
    if method == "dpo":
        assert (tmp_path / "two" / "adapter" / "adapter_model.safetensors").is_file()
