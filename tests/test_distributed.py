"""A seqkern model trains under DistributedDataParallel: 2 CPU processes over gloo give
the same averaged gradients as one process on the whole batch (torch.distributed is the
engine; seqkern adds no parallelism of its own)."""
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def build_model():
    from seqkern import nn as snn

    torch.manual_seed(0)

    class Model(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.rnn = snn.LSTM(6, 8, batch_first=True)
            self.head = torch.nn.Linear(8, 3)

        def forward(self, x):
            y, _ = self.rnn(x)
            return self.head(y[:, -1])

    return Model().double()


def data():
    g = torch.Generator().manual_seed(1)
    return torch.randn(8, 5, 6, generator=g, dtype=torch.float64), torch.randint(0, 3, (8,), generator=g)


def worker(rank, world, port, out_path):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        model = torch.nn.parallel.DistributedDataParallel(build_model())
        x, y = data()
        shard = slice(rank * 4, rank * 4 + 4)
        loss = torch.nn.functional.cross_entropy(model(x[shard]), y[shard])
        loss.backward()
        if rank == 0:
            torch.save({n: p.grad for n, p in model.module.named_parameters()}, out_path)
    finally:
        dist.destroy_process_group()


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed not built")
def test_ddp_two_processes_match_single_process(tmp_path):
    out = str(tmp_path / "grads.pt")
    mp.start_processes(worker, args=(2, free_port(), out), nprocs=2, join=True, start_method="spawn")
    ddp_grads = torch.load(out)

    model = build_model()
    x, y = data()
    # DDP averages the two shards' mean losses: the same as the mean over the whole batch
    torch.nn.functional.cross_entropy(model(x), y).backward()
    for name, p in model.named_parameters():
        torch.testing.assert_close(ddp_grads[name], p.grad, msg=name)
