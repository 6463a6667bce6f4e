"""Data-parallel training over MPI (mpi4py): the same model on every process, a shard of each batch each.

    mpirun -n 4 cnnx train --distributed --batch-size 256        # the command line
    mpirun -n 4 python train.py                                  # a script calling fit(..., distributed=True)

In a script, the explicit loop of the library gains two calls:

    rank, world_size = cnnx.distributed.init()        # MPI_COMM_WORLD; aborts the job on an uncaught exception
    cnnx.distributed.broadcast_parameters(model)      # rank 0's weights (and buffers) everywhere
    reducer = cnnx.distributed.GradientReducer(model)
    loader = DataLoader(train, batch_size=256, shuffle=True, generator=0).shard(rank, world_size)
    for x, y in loader:                               # this rank's 256 / world_size samples of each global batch
        optimizer.zero_grad()
        loss = loss_fn.forward(model.forward(x), y)
        model.backward(loss_fn.backward())
        reducer.reduce(num_samples=len(y))            # every grad := mean over the global batch
        optimizer.step()

What is shared and what is not, as in PyTorch's DistributedDataParallel: parameters start equal (broadcast from
rank 0) and stay equal because every rank applies the same averaged gradient; buffers (BatchNorm's running
statistics) are taken from rank 0 by :func:`broadcast_buffers` (``fit`` calls it before each evaluation), while
BatchNorm normalises each rank's shard with that shard's own batch statistics (there is no SyncBatchNorm).

The MPI library comes from the system (Open MPI or MPICH) and its Python binding from ``pip install "cnnx[mpi]"``
(mpi4py); ``import cnnx`` never needs either.
"""
import numbers
import sys
import time
import traceback

import numpy as np

__all__ = ["init", "is_initialized", "get_rank", "get_world_size", "is_main_process", "communicator",
           "broadcast_parameters", "broadcast_buffers", "GradientReducer", "allreduce_sum", "any_rank",
           "abort", "abort_on_error", "MissingMPIError"]

_MPI_HINT = ('cnnx.distributed needs mpi4py and an MPI library: pip install "cnnx[mpi]" (mpi4py), with Open MPI '
             'or MPICH from the system packages (e.g. apt-get install openmpi-bin libopenmpi-dev)')

_state = {"comm": None, "hook": None}


class MissingMPIError(ImportError):
    """mpi4py (or the MPI library it loads) is not installed."""


def _mpi():
    try:
        from mpi4py import MPI
    except ImportError as exc:
        raise MissingMPIError(f"{_MPI_HINT}; importing mpi4py failed: {exc}") from None
    return MPI


def init(comm=None, abort_on_exception=True):
    """Join the MPI job (``MPI_COMM_WORLD`` unless ``comm`` is given) and return ``(rank, world_size)``.

    Run under ``mpirun -n K``; started without mpirun, the process is a job of one (rank 0, world size 1).
    With ``abort_on_exception`` (default) an exception that nothing catches prints its traceback, names the rank
    and calls ``MPI_Abort``: the other ranks, which would otherwise wait forever in their next collective, are
    ended by mpirun within seconds. Calling init again returns the same values.
    """
    MPI = _mpi()
    if comm is None:
        comm = _state["comm"] if _state["comm"] is not None else MPI.COMM_WORLD
    elif not isinstance(comm, MPI.Comm):
        raise TypeError(f"init: comm must be an mpi4py.MPI.Comm or None, got {type(comm).__name__}")
    _state["comm"] = comm
    if abort_on_exception and _state["hook"] is None:
        previous = sys.excepthook

        def hook(kind, value, tb):
            previous(kind, value, tb)
            if comm.Get_size() > 1:
                abort(f"uncaught {kind.__name__}")
        _state["hook"] = hook
        sys.excepthook = hook
    return comm.Get_rank(), comm.Get_size()


def is_initialized():
    return _state["comm"] is not None


def communicator():
    """The communicator chosen by :func:`init` (which this calls first when needed)."""
    if _state["comm"] is None:
        init()
    return _state["comm"]


def get_rank():
    """This process's rank, 0 .. world_size - 1 (0 before :func:`init`)."""
    return _state["comm"].Get_rank() if _state["comm"] is not None else 0


def get_world_size():
    """The number of processes in the job (1 before :func:`init`)."""
    return _state["comm"].Get_size() if _state["comm"] is not None else 1


def is_main_process():
    """True on rank 0: the one that prints, writes checkpoints and metrics."""
    return get_rank() == 0


def abort(reason, exitcode=1):
    """Print ``reason`` with this rank's number to stderr and end the whole MPI job (``MPI_Abort``)."""
    comm = communicator()
    sys.stdout.flush()
    sys.stderr.write(f"cnnx.distributed: rank {comm.Get_rank()} of {comm.Get_size()} failed ({reason}); "
                     f"aborting the MPI job\n")
    sys.stderr.flush()
    comm.Abort(exitcode)


class abort_on_error:
    """``with abort_on_error("fit"):`` -- an exception inside ends the whole job when there are several ranks.

    Once ranks have started exchanging gradients, one rank leaving the loop leaves the others blocked in their
    next collective forever; so the traceback is printed (with the rank) and ``MPI_Abort`` is called. In a job of
    one (or before :func:`init`) the exception propagates as usual.
    """

    def __init__(self, what):
        self.what = what

    def __enter__(self):
        return self

    def __exit__(self, kind, value, tb):
        if kind is None or _state["comm"] is None or get_world_size() == 1:
            return False
        traceback.print_exception(kind, value, tb, file=sys.stderr)
        abort(f"{kind.__name__} in {self.what}: {value}")
        return False


# ------------------------------------------------------------------------------------------- collectives
def _state_arrays(model, what):
    """(name, array) of the parameters (what="parameters") or floating buffers (what="buffers") of `model`."""
    if what == "parameters":
        return [(name, p.data) for name, p in model.named_parameters()]
    return [(name, b) for name, b in model.named_buffers() if np.issubdtype(b.dtype, np.number)]


def _broadcast(model, what, root, fn):
    if not hasattr(model, "named_parameters"):
        raise TypeError(f"{fn}: model must be a cnnx Module, got {type(model).__name__}")
    comm = communicator()
    if not isinstance(root, numbers.Integral) or not 0 <= root < comm.Get_size():
        raise ValueError(f"{fn}: root must be a rank in 0..{comm.Get_size() - 1}, got {root!r}")
    arrays = _state_arrays(model, what)
    # The same model on every rank is a precondition; a mismatch would make Bcast exchange garbage or hang.
    signature = [(name, a.shape, a.dtype.str) for name, a in arrays]
    theirs = comm.bcast(signature, root=root)
    # every rank learns who differs, so all of them raise (none is left waiting in the Bcast below)
    differing = [r for r, same in enumerate(comm.allgather(theirs == signature)) if not same]
    if differing:
        detail = ""
        if theirs != signature:
            only_here = [s for s in signature if s not in theirs]
            only_root = [s for s in theirs if s not in signature]
            detail = (f"; {what} (name, shape, dtype) only here {only_here[:5]}, "
                      f"only on rank {root} {only_root[:5]}")
        raise ValueError(f"{fn}: the model on rank(s) {differing} differs from the one on rank {root} (this is "
                         f"rank {comm.Get_rank()}){detail}")
    for _, a in arrays:
        if not a.flags.c_contiguous:
            raise ValueError(f"{fn}: {what} must be C-contiguous arrays to be broadcast in place")
        comm.Bcast(a, root=root)


def broadcast_parameters(model, root=0, buffers=True):
    """Copy rank ``root``'s parameters (and, with ``buffers``, its buffers) into the model on every rank, in place.

    Call it once after building the model (and after loading a checkpoint on the root only). Every rank must
    call it with a model of the same structure; otherwise a ValueError names what differs.
    """
    _broadcast(model, "parameters", root, "broadcast_parameters")
    if buffers:
        broadcast_buffers(model, root)


def broadcast_buffers(model, root=0):
    """Copy rank ``root``'s buffers (BatchNorm running statistics, ...) into the model on every rank, in place."""
    _broadcast(model, "buffers", root, "broadcast_buffers")


def allreduce_sum(values):
    """The element-wise sum over all ranks of a small float64 vector (metrics: loss sums, counts)."""
    MPI = _mpi()
    out = np.array(values, dtype=np.float64).ravel()
    communicator().Allreduce(MPI.IN_PLACE, out, op=MPI.SUM)
    return out


def any_rank(flag):
    """True on every rank when ``flag`` is true on at least one (e.g. a callback asking to stop)."""
    return bool(allreduce_sum([1.0 if flag else 0.0])[0] > 0)


class GradientReducer:
    """Average the parameter gradients over the ranks: one in-place ``Allreduce`` per step per dtype.

    At construction every parameter's ``grad`` becomes a view into one flat, preallocated buffer per dtype
    (float32 and float64 parameters each get theirs), so the layers' backward writes the gradients straight
    into it and :meth:`reduce` needs no packing. The buffer has one extra element, the sample count, so the
    same call that sums the gradients also sums the counts:

        g = sum_r n_r * g_r / sum_r n_r      (g_r: rank r's gradient, the mean over its n_r samples)

    which is the mean over the global batch even when the shards are unequal or one is empty. Without
    ``num_samples`` every rank counts as 1 (the plain average over ranks, as DistributedDataParallel does).

    A grad replaced behind the reducer's back (``zero_grad(set_to_none=True)``, assignment) is copied into the
    buffer at the next reduce and the view put back; a grad that is None contributes zeros and stays None.

    Attributes: ``nbytes`` (bytes all-reduced per step), ``seconds`` (time in the last reduce's Allreduce calls),
    ``count`` (reduces so far).
    """

    def __init__(self, model, comm=None):
        params = list(model.parameters()) if hasattr(model, "parameters") else list(model)
        for i, p in enumerate(params):
            if not hasattr(p, "data") or not hasattr(p, "grad"):
                raise TypeError(f"GradientReducer: model must be a cnnx Module or an iterable of Parameters, "
                                f"item {i} is {type(p).__name__}")
        if comm is None:
            comm = communicator()
        self.comm = comm
        self.world_size = comm.Get_size()
        self._groups = []  # (flat buffer with the count last, [(param, view)])
        for dtype in dict.fromkeys(np.dtype(p.data.dtype) for p in params):
            members = [p for p in params if p.data.dtype == dtype]
            flat = np.zeros(sum(p.data.size for p in members) + 1, dtype=dtype)
            views, offset = [], 0
            for p in members:
                view = flat[offset:offset + p.data.size].reshape(p.data.shape)
                if p.grad is not None:
                    np.copyto(view, p.grad)
                    p.grad = view
                views.append((p, view))
                offset += p.data.size
            self._groups.append((flat, views))
        self.nbytes = sum(flat.nbytes for flat, _ in self._groups)
        self.seconds = 0.0
        self.count = 0

    def __repr__(self):
        sizes = ", ".join(f"{flat.dtype.name}[{flat.size - 1}]" for flat, _ in self._groups)
        return f"GradientReducer({sizes}, world_size={self.world_size})"

    def reduce(self, num_samples=None, average=True):
        """Replace every gradient by its mean (or, with ``average=False``, its sum) over the ranks.

        ``num_samples``: the number of samples this rank's gradient is the mean of (the length of its shard of
        the batch); the result is then the mean over all ranks' samples. None: each rank weighs the same.
        ``average=False`` sums the gradients (for a loss with ``reduction="sum"``: the sum over the global
        batch). Every rank must call this the same number of times, with the same ``average``.
        """
        if num_samples is not None and (not isinstance(num_samples, numbers.Integral) or num_samples < 0):
            raise ValueError(f"GradientReducer.reduce: num_samples must be an int >= 0 or None, got {num_samples!r}")
        if self.world_size == 1:  # nothing to exchange: the gradients are already the global ones
            self.count += 1
            return
        MPI = _mpi()
        weight = 1 if (num_samples is None or not average) else int(num_samples)
        seconds = 0.0
        for flat, views in self._groups:
            for p, view in views:
                grad = p.grad
                if grad is view:
                    continue
                if grad is None:
                    view.fill(0)
                    continue
                if grad.shape != view.shape:
                    raise ValueError(f"GradientReducer.reduce: a parameter of shape {view.shape} has a grad of "
                                     f"shape {grad.shape}")
                np.copyto(view, grad, casting="same_kind")
                p.grad = view
            if weight != 1:
                flat *= weight
            flat[-1] = weight
            start = time.perf_counter()
            self.comm.Allreduce(MPI.IN_PLACE, flat, op=MPI.SUM)
            seconds += time.perf_counter() - start
            total = flat[-1]
            if average and total > 0 and total != 1:
                np.divide(flat, total, out=flat)
        self.seconds = seconds
        self.count += 1
