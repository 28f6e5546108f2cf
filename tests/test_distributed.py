"""FSDP2 data parallelism on CPU (gloo, 2 processes): the same losses and weights as one process."""

import os
import socket

import pytest
import torch
import torch.distributed as dist

from herd.config import preset
from herd.model import Transformer
from herd.train.distributed import apply_fsdp, rank_rows
from herd.train.losses import cross_entropy

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

    mesh = init_distributed()
    model = apply_fsdp(_model(), mesh)
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
    # Adam divides by sqrt(v): a near-zero gradient summed in another order can move its weight by ~1e-5 of a
    # 1e-2 step, so weights are compared at 1e-4 (three steps of lr 1e-2 move them by up to 3e-2)
    for n, p in single.named_parameters():
        torch.testing.assert_close(got["params"][n], p.detach(), atol=1e-4, rtol=1e-4)


def test_rank_rows_splits_evenly():
    batch = {"tokens": torch.arange(8).view(4, 2), "source": torch.arange(4)}
    assert rank_rows(batch, 1, 2)["tokens"].tolist() == [[4, 5], [6, 7]]
    assert rank_rows(batch, 1, 2)["source"].tolist() == [2, 3]
    with pytest.raises(ValueError, match="does not split"):
        rank_rows(batch, 0, 3)
