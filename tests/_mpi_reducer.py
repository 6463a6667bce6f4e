"""Run by tests/test_distributed.py under `mpirun -n 2`: GradientReducer and the broadcasts, checked against
the values every rank can compute by itself. Prints "reducer checks passed" on every rank that passes."""
import sys

import numpy as np

import cnnx
from cnnx import distributed, nn


def grads_of(rank):
    """Rank-dependent gradients that are exact in float32 (small integers over powers of two)."""
    return {"w32": np.full((3, 4), rank + 1.0), "b32": np.arange(4.0) * (rank + 1), "w64": np.full((5,), 0.25 * rank)}


def main():
    rank, world = distributed.init()
    assert world == 2, world
    model = nn.Module()
    model.w32 = nn.Parameter(np.zeros((3, 4), dtype=np.float32))
    model.b32 = nn.Parameter(np.zeros(4, dtype=np.float32))
    model.w64 = nn.Parameter(np.zeros(5, dtype=np.float64))
    model.frozen = nn.Parameter(np.zeros(2, dtype=np.float32), requires_grad=False)
    reducer = distributed.GradientReducer(model)
    assert reducer.nbytes == (12 + 4 + 2 + 1) * 4 + (5 + 1) * 8, reducer.nbytes  # one buffer per dtype + count
    assert "float32[18]" in repr(reducer) and "float64[5]" in repr(reducer)

    def load():
        for name, g in grads_of(rank).items():
            getattr(model, name).grad[...] = g

    # 1. mean over ranks (num_samples None): (g0 + g1) / 2
    load()
    reducer.reduce()
    g0, g1 = grads_of(0), grads_of(1)
    for name in g0:
        np.testing.assert_array_equal(getattr(model, name).grad, (g0[name] + g1[name]) / 2)
    # 2. weighted by samples: rank 0 has 3 samples, rank 1 has 1 -> (3 g0 + 1 g1) / 4
    load()
    reducer.reduce(num_samples=3 if rank == 0 else 1)
    for name in g0:
        np.testing.assert_array_equal(getattr(model, name).grad, (3 * g0[name] + g1[name]) / 4)
    # 3. an empty part (0 samples) does not count: the other rank's gradient is the result
    load()
    reducer.reduce(num_samples=0 if rank == 1 else 5)
    for name in g0:
        np.testing.assert_array_equal(getattr(model, name).grad, g0[name])
    # 4. average=False: the sum (a loss with reduction="sum")
    load()
    reducer.reduce(average=False)
    for name in g0:
        np.testing.assert_array_equal(getattr(model, name).grad, g0[name] + g1[name])
    # 5. grads replaced behind the reducer's back: set_to_none, then a new array; None contributes zeros
    model.zero_grad(set_to_none=True)
    model.w32.grad = np.full((3, 4), 2.0 * (rank + 1), dtype=np.float32)
    reducer.reduce()
    np.testing.assert_array_equal(model.w32.grad, np.full((3, 4), 3.0))
    assert model.b32.grad is None and model.w64.grad is None
    # the replaced grad is a view of the buffer again: the next backward writes straight into it
    model.zero_grad()
    model.w32.grad[...] = rank
    reducer.reduce()
    np.testing.assert_array_equal(model.w32.grad, np.full((3, 4), 0.5))

    # broadcasts: rank 0's parameters and buffers everywhere
    cnnx.manual_seed(10 + rank)
    net = nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2))
    net[1].running_mean[...] = rank + 1.0
    distributed.broadcast_parameters(net)
    mine = net.state_dict()
    theirs = distributed.communicator().bcast(mine, root=0)
    for k in mine:
        np.testing.assert_array_equal(mine[k], theirs[k])
    np.testing.assert_array_equal(net[1].running_mean, 1.0)
    # a different model on one rank: a ValueError on every rank (none left waiting), naming what differs
    other = nn.Sequential(nn.Conv2d(1, 2 + rank, 3))
    try:
        distributed.broadcast_parameters(other)
        raise AssertionError("broadcast_parameters accepted different models")
    except ValueError as exc:
        assert "the model on rank(s) [1] differs from the one on rank 0" in str(exc), str(exc)
        assert rank == 0 or "only here [('0.weight', (3, 1, 3, 3)" in str(exc), str(exc)
    assert distributed.allreduce_sum([rank, 1.0]).tolist() == [1.0, 2.0]
    assert distributed.any_rank(rank == 1) is True and distributed.any_rank(False) is False
    print(f"rank {rank}: reducer checks passed", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
