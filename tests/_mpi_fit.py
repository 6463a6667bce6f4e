"""Run by tests/test_distributed.py, alone or under mpirun: train LeNet-5 on the embedded MNIST subset with
cnnx.train.fit and write the final weights (rank 0) to OUT.npz, with the history as JSON beside it.

    python _mpi_fit.py OUT --dtype float64 --train-samples 640 --batch-size 64 [--distributed]
        [--fail-rank R --fail-step S --fail-how raise|kill] [--checkpoint PATH]
"""
import argparse
import json
import os
import signal
import sys

import numpy as np

import cnnx
from cnnx import nn, optim
from cnnx.data import Compose, DataLoader, Normalize, ToFloat
from cnnx.models import LeNet5
from cnnx.train import fit


class _Failing:
    """A transform that fails at its `step`-th call (to test that the job ends instead of hanging)."""

    def __init__(self, transform, step, how):
        self.transform, self.step, self.how, self.calls = transform, step, how, 0

    def __call__(self, x):
        self.calls += 1
        if self.calls == self.step:
            if self.how == "kill":
                os.kill(os.getpid(), signal.SIGKILL)
            raise RuntimeError(f"injected failure at batch {self.calls}")
        return self.transform(x)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("out")
    parser.add_argument("--dtype", choices=("float32", "float64"), default="float64")
    parser.add_argument("--train-samples", type=int, default=640)
    parser.add_argument("--test-samples", type=int, default=200)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--test-batch-size", type=int, default=100)
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--optimizer", choices=("sgd", "adam"), default="sgd")
    parser.add_argument("--distributed", action="store_true")
    parser.add_argument("--checkpoint", default=None)
    parser.add_argument("--seed-by-rank", action="store_true", help="different initial weights on every rank")
    parser.add_argument("--fail-rank", type=int, default=None)
    parser.add_argument("--fail-step", type=int, default=3)
    parser.add_argument("--fail-how", choices=("raise", "kill"), default="raise")
    args = parser.parse_args()

    cnnx.set_num_threads(1)
    rank = 0
    if args.distributed:
        rank, _ = cnnx.distributed.init()
    dtype = np.dtype(args.dtype)
    train = cnnx.datasets.MNIST(train=True)
    test = cnnx.datasets.MNIST(train=False)
    transform = Compose([ToFloat(dtype), Normalize(0.1307, 0.3081)])
    n, m = args.train_samples, args.test_samples
    test_loader = DataLoader((test.data[:m], test.targets[:m]), batch_size=args.test_batch_size, transform=transform)
    if args.fail_rank == rank:
        transform = _Failing(transform, args.fail_step, args.fail_how)
    train_loader = DataLoader((train.data[:n], train.targets[:n]), batch_size=args.batch_size, shuffle=True,
                              generator=7, transform=transform)
    cnnx.manual_seed(3 + (rank if args.seed_by_rank else 0))
    model = LeNet5(dtype=dtype)
    if args.optimizer == "sgd":
        optimizer = optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    else:
        optimizer = optim.Adam(model.parameters(), lr=1e-3)
    history = fit(model, nn.CrossEntropyLoss(), optimizer, train_loader, test_loader, epochs=args.epochs,
                  checkpoint=args.checkpoint, progress=False, distributed=args.distributed)
    if rank == 0:
        np.savez(args.out + ".npz", **model.state_dict())
        with open(args.out + ".json", "w") as f:
            json.dump(history, f)
    print(f"rank {rank} done", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
