"""Export a cnnx model to ONNX: ``cnnx.onnx.export(model, example_input, "m.onnx")``.

The graph is built with the ``onnx`` package's helper API (``pip install "cnnx[onnx]"``; cnnx imports without
it) and checked with ``onnx.checker`` before it is written (atomically). The model is exported in eval mode
(BatchNorm with its running statistics, Dropout as Identity), as ``torch.onnx.export`` does; its own mode is
restored afterwards.

How each layer becomes ONNX is data: ``EMITTERS`` maps a layer type to an emitter function
``emit(graph, layer, x, name) -> output``, where ``x`` is a :class:`Value` (a tensor name in the graph plus
the sample array that flows through the cnnx layers, which gives every shape) and the output is a tensor name
(the builder then runs ``layer.forward`` on the sample) or a Value (containers, which run their children).
Adding a layer is one entry; ``register_emitter(cls, fn)`` adds your own. A two-input block (a residual
``y = x + body(x)``) needs nothing new: its emitter calls ``graph.emit(body, x, name + ".body")`` and
``graph.add(x, y, name)``.

| cnnx layer | ONNX |
| --- | --- |
| Sequential (and LeNet5, ResNet20, VGG) | its layers in order |
| Residual | its block and shortcut, then Add |
| Conv2d | Conv (groups, dilations, strides; every padding, 'same' included, as explicit pads) |
| MaxPool2d | MaxPool (pads, dilations, ceil_mode); return_indices=True refused |
| AvgPool2d | AveragePool (pads, ceil_mode, count_include_pad); divisor_override, and ceil_mode windows AveragePool counts differently, as a depthwise Conv of ones / a constant map of PyTorch's divisors |
| AdaptiveAvgPool2d / AdaptiveMaxPool2d | GlobalAveragePool / GlobalMaxPool for output 1x1; AveragePool / MaxPool when the input divides evenly; else refused |
| Linear | Gemm (2-D input), MatMul + Add otherwise |
| Flatten | Flatten (start_dim=1 to the last dim), Reshape otherwise |
| ReLU, LeakyReLU, Tanh, Sigmoid | Relu, LeakyRelu, Tanh, Sigmoid |
| ScaledTanh | Mul, Tanh, Mul |
| Softmax, LogSoftmax | Softmax, LogSoftmax (the implicit dim resolved as cnnx does) |
| BatchNorm1d / BatchNorm2d | BatchNormalization with the running statistics; track_running_stats=False refused |
| Identity, Dropout | Identity |
"""
import math
import os

import numpy as np

from . import nn
from ._geometry import pair
from ._io import atomic_write
from .nn.layers import _adaptive_windows, _softmax_dim
from .nn.module import _touch

__all__ = ["export", "to_model", "register_emitter", "EMITTERS", "UnsupportedLayerError", "Value", "Graph"]

DEFAULT_OPSET = 17
MIN_OPSET = 17


class UnsupportedLayerError(ValueError, NotImplementedError):
    """A layer (or a layer's configuration) has no ONNX mapping."""


def _onnx(fn="cnnx.onnx.export"):
    try:
        import onnx        # absolute import (Python 3): the onnx package, not this module
        from onnx import helper, numpy_helper  # noqa: F401
    except ImportError:
        raise ImportError(f'{fn}: exporting to ONNX needs the onnx package: pip install "cnnx[onnx]"') from None
    return onnx


class Value:
    """A tensor of the graph being built: its name, and the sample array cnnx computed for it."""
    __slots__ = ("name", "sample")

    def __init__(self, name, sample):
        self.name = name
        self.sample = sample

    @property
    def shape(self):
        return self.sample.shape

    @property
    def dtype(self):
        return self.sample.dtype

    def __repr__(self):
        return f"Value({self.name!r}, shape={self.shape}, dtype={self.dtype})"


class Graph:
    """Nodes and initializers of the graph under construction; what emitters call."""

    def __init__(self, dtype, dynamic_batch):
        self._onnx = _onnx()
        self.dtype = np.dtype(dtype)
        self.dynamic_batch = dynamic_batch
        self.nodes = []
        self.initializers = []
        self._names = set()

    def fresh(self, hint):
        """A tensor or node name not used yet, based on `hint`."""
        hint = hint or "t"
        name, i = hint, 1
        while name in self._names:
            name, i = f"{hint}_{i}", i + 1
        self._names.add(name)
        return name

    def initializer(self, array, hint):
        """Add a constant tensor (a weight, a shape, a scalar); returns its name."""
        name = self.fresh(hint)
        self.initializers.append(self._onnx.numpy_helper.from_array(np.asarray(array, order="C"), name))
        return name

    def scalar(self, value, hint):
        """A 0-d constant in the graph's floating dtype (for Mul by a layer's constant)."""
        return self.initializer(np.array(value, dtype=self.dtype), hint)

    def node(self, op_type, inputs, hint, **attributes):
        """Add one node with one output; returns the output's name."""
        out = self.fresh(hint)
        self.nodes.append(self._onnx.helper.make_node(op_type, list(inputs), [out], name=self.fresh(hint + "/" + op_type),
                                                      **attributes))
        return out

    def add(self, a, b, hint="add"):
        """a + b of two Values of the same shape (a residual connection); returns the sum as a Value."""
        if a.shape != b.shape:
            raise ValueError(f"cnnx.onnx: Add {hint!r}: operands must have the same shape, got {a.shape} and {b.shape}")
        return Value(self.node("Add", [a.name, b.name], hint), a.sample + b.sample)

    def emit(self, module, x, name):
        """Emit `module` applied to Value `x` (looked up in EMITTERS); returns the output Value."""
        emitter = _emitter_for(module, name)
        # the dotted module path names nodes and initializers ('conv1.weight', as in the state_dict); a
        # non-container model exported on its own is named after its type
        hint = name if (name or emitter is _sequential) else type(module).__name__.lower()
        out = emitter(self, module, x, hint)
        if isinstance(out, Value):
            return out
        return Value(out, module.forward(x.sample))


def _emitter_for(module, name):
    for cls in type(module).__mro__:
        fn = EMITTERS.get(cls)
        if fn is not None and (cls is type(module) or type(module).forward is cls.forward):
            return fn
        if cls is nn.Module:
            break
    where = f" {name!r}" if name else ""
    raise UnsupportedLayerError(
        f"cnnx.onnx.export: layer{where} ({type(module).__name__}) has no ONNX mapping; layers that have one: "
        f"{', '.join(sorted(c.__name__ for c in EMITTERS))} (add one with cnnx.onnx.register_emitter)")


def register_emitter(cls, fn):
    """Export layers of type `cls` with fn(graph, layer, x, name) -> output name or Value; returns fn."""
    if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
        raise TypeError(f"register_emitter: cls must be a cnnx.nn.Module subclass, got {cls!r}")
    if not callable(fn):
        raise TypeError(f"register_emitter: fn must be callable, got {type(fn).__name__}")
    EMITTERS[cls] = fn
    return fn


def _unsupported(layer, name, why):
    return UnsupportedLayerError(f"cnnx.onnx.export: layer {name!r} ({type(layer).__name__}): {why}")


# -- emitters ---------------------------------------------------------------------------------------------
def _sequential(g, seq, x, name):
    for child_name, child in seq.named_children():
        x = g.emit(child, x, f"{name}.{child_name}" if name else child_name)
    return x


def _residual(g, res, x, name):
    """nn.Residual: block(x) + shortcut(x) (the identity when shortcut is None), an ONNX Add."""
    y = g.emit(res.block, x, f"{name}.block")
    s = x if res.shortcut is None else g.emit(res.shortcut, x, f"{name}.shortcut")
    return g.add(y, s, name)


def _conv2d(g, conv, x, name):
    top, bottom, left, right = conv._padding4(x.shape[2:])
    inputs = [x.name, g.initializer(conv.weight.data, name + ".weight")]
    if conv.bias is not None:
        inputs.append(g.initializer(conv.bias.data, name + ".bias"))
    return g.node("Conv", inputs, name, kernel_shape=list(conv.kernel_size), strides=list(conv.stride),
                  pads=[top, left, bottom, right], dilations=list(conv.dilation), group=conv.groups)


def _pool_window_attrs(pool, name, x, kernel, stride, padding, dilation, pads_count):
    """kernel_shape, strides, pads, dilations and ceil_mode that give cnnx's (PyTorch's) output size.

    ceil_mode differs: PyTorch drops a last window that would start in the bottom/right padding, ONNX does
    not. Such an axis has the floor-mode size. When every ceil_mode axis really gains a window, ONNX's
    ceil_mode=1 is exact; when only some do, those axes get extra end padding under ceil_mode=0, exact
    where padding does not count (max pooling, count_include_pad=False) and refused otherwise."""
    from ._geometry import pool2d_out_size
    want = pool.forward(x.sample).shape[2:]
    floor = [pool2d_out_size(n, k, s, p, d, False) for n, k, s, p, d in zip(x.shape[2:], kernel, stride, padding,
                                                                               dilation)]
    onnx_ceil = [-(-(n + 2 * p - d * (k - 1) - 1) // s) + 1
                 for n, k, s, p, d in zip(x.shape[2:], kernel, stride, padding, dilation)]
    begin = list(padding)
    end = list(padding)
    ceil = 0
    if list(want) != floor:
        if list(want) == onnx_ceil:
            ceil = 1
        elif pads_count:
            raise _unsupported(pool, name, f"ceil_mode=True with count_include_pad=True gains a window on one axis "
                                           f"only (output {tuple(want)}); ONNX's ceil_mode acts on both axes")
        else:
            for i, (n, k, s, p, d) in enumerate(zip(x.shape[2:], kernel, stride, padding, dilation)):
                end[i] += max(0, (want[i] - 1) * s + d * (k - 1) + 1 - (n + 2 * p))
    return dict(kernel_shape=list(kernel), strides=list(stride), pads=begin + end, dilations=list(dilation),
                ceil_mode=ceil)


def _maxpool2d(g, pool, x, name):
    if pool.return_indices:
        raise _unsupported(pool, name, "return_indices=True returns (values, indices); ONNX MaxPool's indices "
                                       "count over the whole tensor, not per plane")
    kernel, stride, padding, dilation = pool._geometry()
    return g.node("MaxPool", [x.name], name, **_pool_window_attrs(pool, name, x, kernel, stride, padding, dilation,
                                                                  pads_count=False))


def _avgpool2d(g, pool, x, name):
    fn = "AvgPool2d"
    kernel = pair(pool.kernel_size, "kernel_size", fn, 1)
    stride = pair(pool.stride, "stride", fn, 1)
    padding = pair(pool.padding, "padding", fn, 0)
    if pool.divisor_override is None:
        try:
            attrs = _pool_window_attrs(pool, name, x, kernel, stride, padding, (1, 1), pool.count_include_pad)
        except UnsupportedLayerError:
            attrs = None
        if attrs is not None:
            del attrs["dilations"]          # AveragePool has them from opset 19 only; cnnx's are always 1
            return g.node("AveragePool", [x.name], name, count_include_pad=int(pool.count_include_pad), **attrs)
    return _window_sum_divided(g, pool, x, name, kernel, stride, padding)


def _window_sum_divided(g, pool, x, name, kernel, stride, padding):
    """Average pooling as (sum over each window) / (that window's divisor): a depthwise Conv with a kernel of
    ones (zero padding adds nothing; extra end padding stands in for ceil_mode) divided by a constant
    (OH, OW) map of PyTorch's divisors, read off the layer itself. Exact for every AvgPool2d, including
    divisor_override and ceil_mode windows AveragePool cannot express."""
    from . import functional as F
    c, (h, w) = x.shape[1], x.shape[2:]
    ones = np.ones((1, 1, h, w), np.float64)
    counts = F.avg_pool2d(ones, kernel, stride, padding, pool.ceil_mode, True, 1)     # real cells per window
    divisors = np.rint(counts / pool.forward(ones))
    out_h, out_w = divisors.shape[2:]
    extra = [max(0, (o - 1) * s + k - (n + 2 * p)) for o, s, k, n, p in zip((out_h, out_w), stride, kernel, (h, w),
                                                                              padding)]
    sums = g.node("Conv", [x.name, g.initializer(np.ones((c, 1) + tuple(kernel), g.dtype), name + ".ones")],
                  name + ".window_sum", kernel_shape=list(kernel), strides=list(stride), group=c,
                  pads=[padding[0], padding[1], padding[0] + extra[0], padding[1] + extra[1]])
    return g.node("Div", [sums, g.initializer(divisors.astype(g.dtype), name + ".divisors")], name)


def _adaptive(g, pool, x, name):
    is_max = isinstance(pool, nn.AdaptiveMaxPool2d)
    if is_max and pool.return_indices:
        raise _unsupported(pool, name, "return_indices=True has no ONNX mapping")
    if x.sample.ndim != 4:
        raise _unsupported(pool, name, f"ONNX pooling takes (N, C, H, W) inputs, got shape {x.shape}")
    h, w = x.shape[2:]
    oh = h if pool._size[0] is None else pool._size[0]
    ow = w if pool._size[1] is None else pool._size[1]
    if (oh, ow) == (1, 1):
        return g.node("GlobalMaxPool" if is_max else "GlobalAveragePool", [x.name], name)
    if (oh, ow) == (h, w):
        return g.node("Identity", [x.name], name)
    if h % oh or w % ow:
        raise _unsupported(pool, name, f"output size {(oh, ow)} does not divide the input size {(h, w)}, so the "
                                       f"windows {_adaptive_windows(h, oh)[:3]}... differ in size; ONNX pooling has "
                                       f"one window size (1x1 and evenly dividing outputs are exported)")
    k = [h // oh, w // ow]
    return g.node("MaxPool" if is_max else "AveragePool", [x.name], name, kernel_shape=k, strides=k)


def _linear(g, lin, x, name):
    w = lin.weight.data
    if x.sample.ndim == 2:
        inputs = [x.name, g.initializer(w, name + ".weight")]
        if lin.bias is not None:
            inputs.append(g.initializer(lin.bias.data, name + ".bias"))
        return g.node("Gemm", inputs, name, transB=1)
    y = g.node("MatMul", [x.name, g.initializer(np.ascontiguousarray(w.T), name + ".weight_t")], name)
    if lin.bias is None:
        return y
    return g.node("Add", [y, g.initializer(lin.bias.data, name + ".bias")], name + ".add")


def _flatten(g, flat, x, name):
    nd = max(x.sample.ndim, 1)
    start = flat.start_dim % nd
    end = flat.end_dim % nd
    if start == 0 and g.dynamic_batch:
        raise _unsupported(flat, name, "start_dim=0 merges the batch dimension; export with dynamic_batch=False")
    if start == 1 and end == nd - 1:         # ONNX Flatten always makes 2-D: (prod(dims < axis), prod(rest))
        return g.node("Flatten", [x.name], name, axis=1)
    shape = [0] * start + [-1] + list(x.shape[end + 1:])        # 0: copy the input's dim (the batch)
    return g.node("Reshape", [x.name, g.initializer(np.array(shape, np.int64), name + ".shape")], name)


def _simple(op_type):
    def emit(g, layer, x, name):
        return g.node(op_type, [x.name], name)
    emit.__name__ = f"_emit_{op_type.lower()}"
    return emit


def _leaky_relu(g, layer, x, name):
    return g.node("LeakyRelu", [x.name], name, alpha=float(layer.negative_slope))


def _scaled_tanh(g, layer, x, name):
    # as cnnx computes it: amplitude * tanh(x * slope), each constant in the tensor's dtype
    scaled = g.node("Mul", [x.name, g.scalar(layer.slope, name + ".slope")], name + ".mul_slope")
    t = g.node("Tanh", [scaled], name + ".tanh")
    return g.node("Mul", [t, g.scalar(layer.amplitude, name + ".amplitude")], name)


def _softmax(op_type):
    def emit(g, layer, x, name):
        axis = _softmax_dim(x.sample.ndim, layer.dim, op_type)
        return g.node(op_type, [x.name], name, axis=axis)
    emit.__name__ = f"_emit_{op_type.lower()}"
    return emit


def _batchnorm(g, bn, x, name):
    if not bn.track_running_stats:
        raise _unsupported(bn, name, "track_running_stats=False normalises with the batch's statistics even in "
                                     "eval mode; ONNX BatchNormalization (inference) needs running statistics")
    c = bn.num_features
    scale = bn.weight.data if bn.weight is not None else np.ones(c, bn.dtype)
    bias = bn.bias.data if bn.bias is not None else np.zeros(c, bn.dtype)
    inputs = [x.name, g.initializer(scale, name + (".weight" if bn.weight is not None else ".scale")),
              g.initializer(bias, name + (".bias" if bn.bias is not None else ".shift")),
              g.initializer(bn.running_mean, name + ".running_mean"),
              g.initializer(bn.running_var, name + ".running_var")]
    return g.node("BatchNormalization", inputs, name, epsilon=float(bn.eps))


EMITTERS = {
    nn.Sequential: _sequential,
    nn.Residual: _residual,
    nn.Conv2d: _conv2d,
    nn.MaxPool2d: _maxpool2d,
    nn.AvgPool2d: _avgpool2d,
    nn.AdaptiveAvgPool2d: _adaptive,
    nn.AdaptiveMaxPool2d: _adaptive,
    nn.Linear: _linear,
    nn.Flatten: _flatten,
    nn.ReLU: _simple("Relu"),
    nn.LeakyReLU: _leaky_relu,
    nn.Tanh: _simple("Tanh"),
    nn.Sigmoid: _simple("Sigmoid"),
    nn.ScaledTanh: _scaled_tanh,
    nn.Softmax: _softmax("Softmax"),
    nn.LogSoftmax: _softmax("LogSoftmax"),
    nn.BatchNorm1d: _batchnorm,
    nn.BatchNorm2d: _batchnorm,
    nn.Identity: _simple("Identity"),
    nn.Dropout: _simple("Identity"),           # eval mode
}


# -- building and writing -----------------------------------------------------------------------------------
def _check_input(model, example_input, fn):
    if not isinstance(model, nn.Module):
        raise TypeError(f"{fn}: model must be a cnnx.nn.Module, got {type(model).__name__}")
    x = np.asarray(example_input)
    if x.dtype not in (np.float32, np.float64):
        raise TypeError(f"{fn}: example_input must be a float32 or float64 array, got dtype {x.dtype}")
    if x.ndim < 1 or x.shape[0] < 1:
        raise ValueError(f"{fn}: example_input must have a batch dimension of at least 1, got shape {x.shape}")
    first = next(model.parameters(), None)
    if first is not None and first.dtype != x.dtype:
        raise TypeError(f"{fn}: example_input dtype {x.dtype} does not match the model's dtype {first.dtype}")
    return np.ascontiguousarray(x)


def to_model(model, example_input, opset=DEFAULT_OPSET, input_name="input", output_name="output",
             dynamic_batch=True, check=True):
    """The onnx.ModelProto of `model` traced on `example_input` (an array of the model's dtype with a batch
    dimension: it fixes every other dimension). dynamic_batch=True names the first dimension 'batch' so
    the file runs on any batch size. Checked with onnx.checker (full check) unless check=False."""
    fn = "cnnx.onnx.export"
    onnx = _onnx(fn)
    helper = onnx.helper
    x = _check_input(model, example_input, fn)
    if isinstance(opset, bool) or not isinstance(opset, int) or not MIN_OPSET <= opset <= onnx.defs.onnx_opset_version():
        raise ValueError(f"{fn}: opset must be an int from {MIN_OPSET} to {onnx.defs.onnx_opset_version()} (the "
                         f"installed onnx package's newest), got {opset!r}")
    if not (isinstance(input_name, str) and isinstance(output_name, str) and input_name and output_name
            and input_name != output_name):
        raise ValueError(f"{fn}: input_name and output_name must be two different non-empty strings, got "
                         f"{input_name!r} and {output_name!r}")
    modes = {id(m): m.training for m in model.modules()}
    graph = Graph(x.dtype, bool(dynamic_batch))
    graph._names.update({input_name, output_name})
    try:
        model.eval()
        out = graph.emit(model, Value(input_name, x), "")
    finally:
        for m in model.modules():
            if m.__dict__.get("training") is not modes[id(m)]:
                m.__dict__["training"] = modes[id(m)]
                _touch(m)
            for key in [k for k in m.__dict__ if k.startswith("_cache")]:
                m.__dict__[key] = None
    if not isinstance(out.sample, np.ndarray) or out.sample.dtype != x.dtype:
        raise _unsupported(model, type(model).__name__, f"its output is not one {x.dtype} array")
    if out.name == input_name:                 # nothing but identities
        graph.nodes.append(helper.make_node("Identity", [input_name], [output_name], name=graph.fresh("output")))
    else:
        for node in graph.nodes:               # rename the last tensor to output_name everywhere
            node.input[:] = [output_name if n == out.name else n for n in node.input]
            node.output[:] = [output_name if n == out.name else n for n in node.output]
    elem = helper.np_dtype_to_tensor_dtype(x.dtype)

    def dims(shape):
        return ["batch" if (i == 0 and dynamic_batch) else int(d) for i, d in enumerate(shape)]

    g = helper.make_graph(graph.nodes, type(model).__name__,
                          [helper.make_tensor_value_info(input_name, elem, dims(x.shape))],
                          [helper.make_tensor_value_info(output_name, elem, dims(out.shape))],
                          initializer=graph.initializers)
    opsets = [helper.make_opsetid("", opset)]
    proto = helper.make_model(g, opset_imports=opsets, producer_name="cnnx",
                              ir_version=helper.find_min_ir_version_for(opsets))
    from . import __version__
    proto.producer_version = __version__
    if check:
        onnx.checker.check_model(proto, full_check=True)
    return proto


def export(model, example_input, path, opset=DEFAULT_OPSET, input_name="input", output_name="output",
           dynamic_batch=True, check=True):
    """Write `model` as an ONNX file at `path` (atomically) and return the path.

    example_input: an array of the model's dtype, e.g. ``np.zeros((1, 1, 28, 28), np.float32)``; its shape
    fixes every dimension but the batch (dynamic unless dynamic_batch=False). opset >= 17. The model is
    exported in eval mode. A layer without an ONNX mapping raises UnsupportedLayerError naming it.
    """
    proto = to_model(model, example_input, opset, input_name, output_name, dynamic_batch, check)
    blob = proto.SerializeToString()
    atomic_write(path, lambda f: f.write(blob))
    return os.fspath(path)
