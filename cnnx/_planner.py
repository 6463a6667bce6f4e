"""Lowering a Sequential to the graph its compiled plan runs (pure Python: no kernels, no cnnx.nn import).

Each module describes itself: ``module.plan_op(shape, dtype)`` returns a dict (``kind``, named geometry, the
parameters, the output shape; see Module.plan_op) or None, and then the whole Sequential runs layer by layer.
:func:`lower` chains the descriptions over buffer ids (buffer 0 is the caller's input; a reshape keeps its buffer),
lowers a Residual to its two branches and an ``add`` with two inputs and a nested Sequential to its modules, and
fuses: FUSIONS is the one table of patterns, matched longest-first. The extension (cnnx/_plan.pxi) allocates the
buffers and runs each op kind through its forward and backward entry points; a kind it has no entry for (an
eval-mode batch norm that follows no convolution) makes the whole Sequential run layer by layer.

An op's backward writes its input's gradient, or adds to it when another op that reads the same buffer (a
residual's input: the block and the shortcut) comes later in the forward order and so wrote it first.
"""
import numpy as np

# (kinds of consecutive ops, each reading the one before it only, -> the fused kind). A new fusion is an entry
# here plus the kind's forward and backward in cnnx/_plan.pxi.
FUSIONS = (
    (("conv", "relu", "maxpool2x2"), "conv_relu_pool"),   # the conv pools each image while it is in cache
    (("conv", "batchnorm", "relu"), "conv_bn_relu"),      # eval-mode BatchNorm folded into the conv's weights
    (("conv", "batchnorm"), "conv_bn"),
    (("conv", "relu"), "conv_relu"),                      # ReLU in place on the conv's output
    (("linear", "relu"), "linear_relu"),
    (("relu", "maxpool2x2"), "relu_pool"),                # the pool reads relu(x) on the fly
    # Batch statistics (training): the convolution's output must be whole before its statistics exist, so the
    # conv stays its own op and the ReLU joins the batch norm's normalising pass (and its mask the backward's sums)
    (("batchnorm_train", "relu", "maxpool2x2"), "batchnorm_train_relu_pool"),   # the pool as relu_pool runs it
    (("batchnorm_train", "relu"), "batchnorm_train_relu"),
    (("add", "relu"), "add_relu"),                        # a residual block's last ReLU, in the add's pass
)


def _pool_2x2(op):
    """A 2x2, stride-2 max pool without ceil-mode windows: the masked pool (maxpool2x2_relu_*) can run it."""
    p = op.pool
    return (p["KH"], p["KW"], p["SH"], p["SW"], p["PH"], p["PW"], p["DH"], p["DW"]) == (2, 2, 2, 2, 0, 0, 1, 1) \
        and p["H"] >= 2 * p["OH"] and p["W"] >= 2 * p["OW"]


# Pattern names that are not an op kind: a predicate on the op.
TRAITS = {"maxpool2x2": lambda op: op.kind == "maxpool" and _pool_2x2(op)}


class Op:
    """One op of the graph: kind, input buffer ids, output buffer id, and what its kind needs (geometry as
    dicts of named sizes, parameters as (Parameter, expected shape) or None: weight then bias)."""

    def __init__(self, kind, inputs, output, desc=None):
        desc = desc or {}
        self.kind = kind
        self.inputs = list(inputs)
        self.output = output
        self.conv = desc.get("conv")
        self.pool = desc.get("pool")
        self.linear = desc.get("linear")
        self.planes = desc.get("planes")        # global_avgpool: NC planes of L values each
        self.params = list(desc.get("params", ()))
        self.bn = desc.get("bn")        # eval-mode batch norm: eps, mean, var (arrays), params [gamma, beta]
        self.bn_train = desc.get("bn_train")    # batch statistics: eps, N, C, L, momentum, and mean, var, count
        #                                         (the running statistics and num_batches_tracked: None, not kept)
        self.inplace = bool(desc.get("inplace", False))
        self.accumulate = [False] * len(self.inputs)   # set by lower(): add this input's gradient to its buffer's

    def matches(self, name):
        trait = TRAITS.get(name)
        return trait(self) if trait is not None else self.kind == name

    def __repr__(self):
        return f"Op({self.kind}, {self.inputs} -> {self.output})"


class Graph:
    """What the extension compiles: ops over buffer ids (buffer 0: the input, shapes[i]: buffer i's shape when
    made), the output buffer and its final shape, and the modules whose stamps keep the plan valid. No ops: the
    Sequential runs layer by layer."""

    def __init__(self, seq, x):
        self.stamps = [(m, m.__dict__.get("_version", 0)) for m in seq.modules()]
        self.ops = []
        self.shapes = []
        self.dtype = getattr(x, "dtype", None)
        self.in_shape = tuple(getattr(x, "shape", ()))
        self.out_shape = None
        self.output = None
        self.last = None


class _Fallback(Exception):
    """A module the plan cannot run: the whole Sequential runs layer by layer."""


def _owner(cls, name):
    for klass in cls.__mro__:
        if name in klass.__dict__:
            return klass
    return None


def _describes_itself(m):
    """m's plan_op is its forward's and backward's: a subclass that changes what the layer computes without
    describing it again, or an instance with its own forward or backward, runs layer by layer."""
    if m is None or any(name in m.__dict__ for name in ("forward", "backward", "plan_op")):
        return False
    t = type(m)
    owner = _owner(t, "forward")
    return owner is not None and _owner(t, "backward") is owner and _owner(t, "plan_op") is owner


class _Lowering:
    def __init__(self, graph):
        self.graph = graph
        self.dtype = graph.dtype

    def new_buffer(self, shape):
        self.graph.shapes.append(tuple(shape))
        return len(self.graph.shapes) - 1

    def chain(self, modules, buf, shape, depth):
        for m in modules:
            buf, shape = self.module(m, buf, shape, depth)
        return buf, shape

    def module(self, m, buf, shape, depth):
        if not _describes_itself(m):
            raise _Fallback
        desc = m.plan_op(shape, self.dtype)
        if desc is None:
            raise _Fallback
        kind = desc["kind"]
        if kind == "identity":
            return buf, shape
        if kind == "reshape":
            return buf, tuple(desc["out"])
        if kind == "sequence":      # a Sequential in the chain: its modules join it (as a Residual's branches do)
            return self.chain(desc["modules"], buf, shape, depth + 1)
        if kind == "residual":
            a, shape_a = self.module(desc["block"], buf, shape, depth + 1)
            b, shape_b = (buf, shape) if desc["shortcut"] is None else \
                self.module(desc["shortcut"], buf, shape, depth + 1)
            if shape_a != shape_b:
                raise _Fallback     # (Residual.forward raises it)
            out = self.new_buffer(shape_a)
            self.graph.ops.append(Op("add", [a, b], out))
            return out, shape_a
        out_shape = tuple(desc["out"])
        if 0 in out_shape:
            raise _Fallback
        out = self.new_buffer(out_shape)
        self.graph.ops.append(Op(kind, [buf], out, desc))
        return out, out_shape


def _consumers(ops):
    count = {}
    for op in ops:
        for b in op.inputs:
            count[b] = count.get(b, 0) + 1
    return count


def _chained(group, consumers, output):
    """Each op of group reads only the one before it, whose output nothing else reads."""
    for a, b in zip(group, group[1:]):
        if b.inputs != [a.output] or consumers.get(a.output, 0) != 1 or a.output == output:
            return False
    return True


def _merge(kind, group):
    op = Op(kind, group[0].inputs, group[-1].output)
    for part in group:
        op.conv = op.conv or part.conv
        op.pool = op.pool or part.pool
        op.linear = op.linear or part.linear
        op.planes = op.planes or part.planes
        op.params = op.params or part.params
        op.bn = op.bn or part.bn
        op.bn_train = op.bn_train or part.bn_train
    return op


def fuse(ops, output, table=FUSIONS):
    """ops with every run that matches a pattern of table (longest first, left to right) made one op; output: the
    graph's output buffer (which must stay written)."""
    consumers = _consumers(ops)
    longest_first = sorted(table, key=lambda entry: -len(entry[0]))
    fused, i = [], 0
    while i < len(ops):
        for pattern, kind in longest_first:
            group = ops[i:i + len(pattern)]
            if len(group) == len(pattern) and all(op.matches(name) for op, name in zip(group, pattern)) \
                    and _chained(group, consumers, output):
                fused.append(_merge(kind, group))
                i += len(pattern)
                break
        else:
            fused.append(ops[i])
            i += 1
    return fused


def _mark_accumulation(ops):
    """Backward runs the ops in reverse: the first op there to reach a buffer writes its gradient, the others
    add to it."""
    written = set()
    for op in reversed(ops):
        for k, b in enumerate(op.inputs):
            op.accumulate[k] = b in written
            written.add(b)


def lower(seq, x):
    """The Graph of Sequential seq on arrays shaped and typed like x (no ops: seq runs layer by layer)."""
    graph = Graph(seq, x)
    if type(x) is not np.ndarray or x.dtype not in (np.float32, np.float64) or x.ndim < 1 or x.size == 0:
        return graph
    graph.shapes.append(tuple(x.shape))
    try:
        desc = seq.plan_op(tuple(x.shape), x.dtype)
        modules = desc["modules"] if desc is not None and desc["kind"] == "sequence" else None
        if not modules:
            raise _Fallback
        out, shape = _Lowering(graph).chain(modules, 0, tuple(x.shape), 0)
        ops = graph.ops
        consumers = _consumers(ops)
        for op in ops:      # layer by layer, an in-place ReLU would change what another reader (or the caller) sees
            if op.kind == "relu" and op.inplace and (op.inputs[0] == 0 or consumers[op.inputs[0]] > 1):
                raise _Fallback
        if not ops or out == 0:
            raise _Fallback
    except (_Fallback, ValueError, TypeError, OverflowError, ZeroDivisionError):
        graph.ops = []      # (a setting the layers reject: they raise it themselves, layer by layer)
        return graph
    graph.ops = fuse(ops, out)
    _mark_accumulation(graph.ops)
    graph.output, graph.out_shape, graph.last = out, shape, modules[-1]
    return graph
