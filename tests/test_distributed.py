"""cnnx.distributed: data-parallel training over MPI.

Without MPI: the DataLoader's shards (disjoint, together the single-process batches, in the same order), its
errors, and the missing-mpi4py message. With mpi4py and Open MPI's mpirun: 2-rank runs of tests/_mpi_fit.py and
of `cnnx train --distributed`, compared with 1-process runs (float64: 1e-10 relative on the final weights), and
a rank that raises or is killed ending the job. MPI is only ever started in subprocesses (never in the pytest
process), each bounded by a timeout that fails the test instead of hanging CI.
"""
import glob
import json
import os
import shutil
import signal
import subprocess
import sys

import numpy as np
import pytest

import cnnx
from cnnx import distributed
from cnnx.data import ArrayDataset, DataLoader

HERE = os.path.dirname(os.path.abspath(__file__))
SCRIPT = os.path.join(HERE, "_mpi_fit.py")
# where the cnnx under test was imported from: the subprocesses must import the same one
CNNX_PATH = os.path.dirname(os.path.dirname(os.path.abspath(cnnx.__file__)))
TIMEOUT = 120  # seconds for one mpirun: a hung job fails the test instead of blocking CI


# ------------------------------------------------------------------------------------ without MPI
def _batches(loader):
    return [tuple(np.asarray(a) for a in batch) for batch in loader]


@pytest.mark.parametrize("world", [1, 2, 3, 4])
@pytest.mark.parametrize("n, batch, shuffle, drop_last", [
    (103, 12, True, False),    # last batch 7: uneven parts (2/2/2/1 for 4 ranks)
    (103, 12, False, True),
    (98, 24, True, False),     # last batch 2 < 3, 4 ranks: some parts are empty
    (48, 12, True, False),
])
def test_shards_are_the_single_process_batches(world, n, batch, shuffle, drop_last):
    if batch % world:
        pytest.skip("batch not a multiple of the world size (tested for its error below)")
    x = np.arange(n * 2, dtype=np.float64).reshape(n, 2)
    y = np.arange(n)
    # each rank builds its loader with the same seed (its own generator, as in separate processes)
    whole = DataLoader((x, y), batch_size=batch, shuffle=shuffle, drop_last=drop_last, generator=5)
    shards = [DataLoader((x, y), batch_size=batch, shuffle=shuffle, drop_last=drop_last, generator=5,
                         num_replicas=world, rank=r) for r in range(world)]
    for epoch in range(2):  # a new permutation each epoch, the same on every rank
        expected = _batches(whole)
        parts = [_batches(s) for s in shards]
        assert all(len(p) == len(expected) == len(s) for p, s in zip(parts, shards))
        for step, (xb, yb) in enumerate(expected):
            got_y = np.concatenate([p[step][1] for p in parts])
            got_x = np.concatenate([p[step][0] for p in parts])
            np.testing.assert_array_equal(got_y, yb)  # same samples, same order: rank 0's part first
            np.testing.assert_array_equal(got_x, xb)
            sizes = [len(p[step][1]) for p in parts]
            assert max(sizes) - min(sizes) <= 1
            if len(yb) == batch:
                assert sizes == [batch // world] * world


def test_shards_of_an_item_wise_dataset_include_empty_parts():
    class Items:  # no _batch_indexable: fetched item by item
        def __len__(self):
            return 5

        def __getitem__(self, i):
            return np.full((2, 2), i, dtype=np.float32), i

    parts = [_batches(DataLoader(Items(), batch_size=4, num_replicas=4, rank=r)) for r in range(4)]
    assert [len(p[1][1]) for p in parts] == [1, 0, 0, 0]          # last batch: one sample for four ranks
    assert parts[3][1][0].shape == (0, 2, 2) and parts[3][1][0].dtype == np.float32
    assert [int(p[0][1][0]) for p in parts] == [0, 1, 2, 3]


def test_shard_errors():
    data = (np.zeros((10, 2)), np.zeros(10, dtype=np.int64))
    with pytest.raises(ValueError, match=r"batch_size \(the global batch\) must be a multiple of num_replicas.*"
                                         r"got batch_size 5 for 2 ranks"):
        DataLoader(data, batch_size=5, num_replicas=2, rank=0)
    with pytest.raises(ValueError, match=r"rank must be in 0..num_replicas - 1 = 1, got 2"):
        DataLoader(data, batch_size=4, num_replicas=2, rank=2)
    with pytest.raises(ValueError, match="needs generator=SEED"):
        DataLoader(data, batch_size=4, shuffle=True, num_replicas=2, rank=1)
    shard = DataLoader(data, batch_size=4, num_replicas=2, rank=1)
    with pytest.raises(ValueError, match="already rank 1's shard of 2"):
        shard.shard(0, 2)
    assert len(shard) == 3 and "rank=1, num_replicas=2" in repr(shard)
    made = DataLoader(ArrayDataset(*data), batch_size=4, shuffle=True, generator=1).shard(1, 2)
    assert (made.rank, made.num_replicas, made.batch_size, len(made)) == (1, 2, 4, 3)
    assert [len(b[1]) for b in made] == [2, 2, 1]


def test_missing_mpi4py_names_the_extra(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "mpi4py", None)
    monkeypatch.setitem(sys.modules, "mpi4py.MPI", None)
    monkeypatch.setitem(distributed._state, "comm", None)
    with pytest.raises(ImportError, match=r'pip install "cnnx\[mpi\]"'):
        distributed.init()
    assert not distributed.is_initialized() and distributed.get_world_size() == 1
    from cnnx.cli import main
    code = main(["train", "--distributed", "--epochs", "1", "--train-samples", "64", "--no-progress"])
    assert code == 1
    err = capsys.readouterr().err
    assert err.startswith("cnnx train: error: --distributed: cnnx.distributed needs mpi4py") and "cnnx[mpi]" in err


def test_import_cnnx_does_not_import_mpi4py():
    proc = _run([sys.executable, "-c", "import sys, cnnx, cnnx.distributed; print('mpi4py' in sys.modules)"])
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "False"


# ------------------------------------------------------------------------------------------ with MPI
def _env():
    env = dict(os.environ, PYTHONPATH=CNNX_PATH + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.setdefault("OMPI_MCA_btl_vader_single_copy_mechanism", "none")  # no CMA in containers
    env["OMPI_MCA_rmaps_base_oversubscribe"] = "1"
    return env


def _run(cmd, cwd=None):
    """Run cmd in its own process group; on timeout end mpirun and its ranks, then fail."""
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env(),
                            cwd=cwd, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=TIMEOUT)
    except subprocess.TimeoutExpired:
        proc.terminate()  # mpirun passes SIGTERM on to its ranks
        try:
            out, err = proc.communicate(timeout=10)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            out, err = proc.communicate()
        pytest.fail(f"{' '.join(cmd)} did not end within {TIMEOUT} s (a hang):\n{out[-2000:]}\n{err[-3000:]}")
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def _mpirun_problem():
    try:
        import mpi4py  # noqa: F401  (only the package: MPI itself is started in the subprocesses)
    except ImportError:
        return "mpi4py is not installed (pip install cnnx[mpi])"
    mpirun = shutil.which("mpirun")
    if mpirun is None:
        return "mpirun is not on PATH (apt-get install openmpi-bin libopenmpi-dev)"
    try:
        version = subprocess.run([mpirun, "--version"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"mpirun --version failed: {exc}"
    if "Open MPI" not in version and "OpenRTE" not in version:
        return f"these tests launch Open MPI's mpirun (--allow-run-as-root --oversubscribe), found: {version[:80]!r}"
    return None


_PROBLEM = _mpirun_problem()
needs_mpi = pytest.mark.skipif(_PROBLEM is not None, reason=str(_PROBLEM))


@needs_mpi
def test_fit_distributed_refuses_other_iterables():
    # fit calls init() first, which starts MPI (a job of one here): run it in a subprocess
    code = ("import numpy as np, cnnx\nfrom cnnx import nn, optim\nfrom cnnx.train import fit\n"
            "m = nn.Linear(2, 2)\n"
            "try:\n    fit(m, nn.CrossEntropyLoss(), optim.SGD(m.parameters(), lr=0.1), "
            "[(np.zeros((2, 2)), np.zeros(2, dtype=np.int64))], distributed=True)\n"
            "except TypeError as exc:\n    print('TypeError:', exc)\n")
    proc = _run([sys.executable, "-c", code])
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "train_loader must be a cnnx.data.DataLoader" in proc.stdout and "got list" in proc.stdout


def mpirun(n, *args):
    return _run(["mpirun", "--allow-run-as-root", "--oversubscribe", "-n", str(n), "-x", "PYTHONPATH",
                 sys.executable, *args])


def _fit(tmp_path, name, ranks, *options):
    out = str(tmp_path / name)
    if ranks == 0:  # the plain single-process run, no MPI at all
        proc = _run([sys.executable, SCRIPT, out, *options])
    else:
        proc = mpirun(ranks, SCRIPT, out, "--distributed", *options)
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}"
    with open(out + ".json") as f:
        history = json.load(f)
    return dict(np.load(out + ".npz")), history


def _max_rel(a, b):
    assert a.keys() == b.keys()
    return max(float(np.abs(a[k] - b[k]).max() / np.abs(a[k]).max()) for k in a)


@needs_mpi
@pytest.mark.parametrize("options", [
    # 1001 samples, batch 64: 15 full batches and one of 41 split 21 / 20, so the count weighting matters;
    # different initial weights per rank: equality also proves the broadcast from rank 0
    ["--train-samples", "1001", "--batch-size", "64", "--optimizer", "sgd", "--seed-by-rank"],
    # batch 4 over 101 samples: the last batch (1 sample) leaves rank 1 an empty part; 2 epochs
    ["--train-samples", "101", "--batch-size", "4", "--optimizer", "adam", "--epochs", "2",
     "--test-batch-size", "33"],
], ids=["sgd-uneven-last-batch", "adam-empty-part"])
def test_two_ranks_equal_one_process_float64(tmp_path, options):
    single, h1 = _fit(tmp_path, "one", 0, "--dtype", "float64", *options)
    double, h2 = _fit(tmp_path, "two", 2, "--dtype", "float64", *options)
    assert _max_rel(single, double) < 1e-10
    for r1, r2 in zip(h1, h2):
        for key in ("train_loss", "test_loss"):
            assert r2[key] == pytest.approx(r1[key], rel=1e-10)
        for key in ("train_accuracy", "test_accuracy"):
            assert r2[key] == r1[key]


@needs_mpi
def test_one_rank_under_mpi_is_the_single_process_run(tmp_path):
    options = ["--dtype", "float64", "--train-samples", "300", "--batch-size", "32"]
    single, _ = _fit(tmp_path, "one", 0, *options)
    one, _ = _fit(tmp_path, "mpi1", 1, *options)
    assert _max_rel(single, one) == 0.0  # nothing is exchanged, nothing rounds differently


@needs_mpi
def test_two_ranks_float32_same_accuracy(tmp_path):
    options = ["--dtype", "float32", "--train-samples", "1000", "--test-samples", "1000", "--optimizer", "adam"]
    single, h1 = _fit(tmp_path, "one", 0, *options)
    double, h2 = _fit(tmp_path, "two", 2, *options)
    assert abs(h1[-1]["test_accuracy"] - h2[-1]["test_accuracy"]) <= 0.001
    assert abs(h1[-1]["train_accuracy"] - h2[-1]["train_accuracy"]) <= 0.001
    assert _max_rel(single, double) < 1e-3


@needs_mpi
@pytest.mark.parametrize("how", ["raise", "kill"])
def test_a_failing_rank_ends_the_job(tmp_path, how):
    ckpt = tmp_path / "best.npz"
    # 1 epoch per checkpoint: rank 1 fails in epoch 2, after rank 0 has written the epoch-1 checkpoint
    proc = mpirun(2, SCRIPT, str(tmp_path / "out"), "--distributed", "--train-samples", "256", "--batch-size",
                  "32", "--epochs", "3", "--checkpoint", str(ckpt), "--fail-rank", "1", "--fail-step", "12",
                  "--fail-how", how)
    output = proc.stdout + proc.stderr
    assert proc.returncode != 0, output
    assert "rank 0 done" not in output and not os.path.exists(tmp_path / "out.npz")
    if how == "raise":
        assert "RuntimeError: injected failure at batch 12" in output
        assert "cnnx.distributed: rank 1 of 2 failed (RuntimeError in fit: injected failure at batch 12)" in output
    else:
        assert "signal 9" in output or "KILLED" in output.upper(), output[-3000:]
    # the checkpoint is the complete epoch-1 file, and no temporary file is left beside it
    assert cnnx.load(str(ckpt)) is not None
    assert glob.glob(str(tmp_path / ".*.tmp")) == []


@needs_mpi
def test_cli_distributed_matches_the_single_process_cli(tmp_path):
    quick = ["train", "--epochs", "1", "--train-samples", "640", "--test-samples", "200", "--no-progress",
             "--threads", "1", "--seed", "2"]
    single = _run([sys.executable, "-m", "cnnx", *quick, "--metrics", str(tmp_path / "one.json")], cwd=tmp_path)
    assert single.returncode == 0, single.stderr
    proc = mpirun(2, "-m", "cnnx", *quick, "--distributed", "--save", str(tmp_path / "two.npz"),
                  "--metrics", str(tmp_path / "two.json"))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    # rank 0 alone prints: one header, one epoch line, one summary
    assert proc.stdout.count("cnnx train: LeNet5") == 1 and proc.stdout.count("epoch 1/1") == 1
    assert "batch 64 (32 in each of 2 MPI processes)" in proc.stdout
    one = json.loads((tmp_path / "one.json").read_text())["epochs"][0]
    two = json.loads((tmp_path / "two.json").read_text())["epochs"][0]
    assert two["train_accuracy"] == pytest.approx(one["train_accuracy"], abs=0.001)
    assert two["train_loss"] == pytest.approx(one["train_loss"], rel=1e-4)
    assert two["test_accuracy"] == pytest.approx(one["test_accuracy"], abs=0.001)
    model = cnnx.load(str(tmp_path / "two.npz"))
    assert model.num_parameters() == 61706


@needs_mpi
def test_cli_distributed_rejects_an_uneven_global_batch(tmp_path):
    proc = mpirun(2, "-m", "cnnx", "train", "--distributed", "--batch-size", "63", "--epochs", "1")
    assert proc.returncode != 0
    lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("cnnx train: error")]
    assert lines == ["cnnx train: error: --batch-size is the global batch and must be a multiple of the number "
                     "of MPI processes to be split evenly, got 63 for 2 processes (try 64)"]


BENCH = os.path.join(os.path.dirname(HERE), "benchmarks", "bench_distributed.py")


@needs_mpi
@pytest.mark.skipif(not os.path.isfile(BENCH), reason="benchmarks/ is not next to tests/ (out-of-tree test run)")
def test_bench_distributed_quick():
    proc = _run([sys.executable, BENCH, "--quick", "--steps", "5", "--repeat", "1"])
    out = proc.stdout
    assert proc.returncode == 0, out[-2000:] + proc.stderr[-3000:]
    assert "VALIDATION FAILED" not in out
    assert "K=2: weights bit-identical on all ranks after 10 steps (every run): PASS" in out
    assert "| 2 | 32 |" in out and "| 246,828 |" in out      # LeNet-5: 61,706 float32 gradients + the count
    assert "alpha = " in out and "| ResNet-20 | 100 Gb/s |" in out
    assert "=== summary" in out


@needs_mpi
def test_reducer_and_broadcasts_on_two_ranks():
    proc = mpirun(2, os.path.join(HERE, "_mpi_reducer.py"))
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    assert "rank 0: reducer checks passed" in proc.stdout and "rank 1: reducer checks passed" in proc.stdout
