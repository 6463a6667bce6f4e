"""Parameter, Module and Sequential: the PyTorch-shaped skeleton of every cnnx layer, with explicit backward.

A Module's ``forward(x)`` returns the output and keeps what its ``backward`` needs (usually a reference to
``x``, never a copy); ``backward(dy)`` returns ``dx`` and ADDS the parameter gradients into ``param.grad``.
The cache is released by ``backward``, so a second ``backward`` without a new ``forward`` raises
``RuntimeError`` (as PyTorch does when it backpropagates through a graph twice). Do not modify an input
array in place between ``forward`` and ``backward``.
"""
import collections
import itertools
import sys

import numpy as np

from .. import _backend, _planner

__all__ = ["Parameter", "Module", "Sequential", "Residual", "StateDictError"]


class Parameter:
    """A trainable array: ``data`` (numpy, float32 or float64) and ``grad`` (same shape and dtype).

    ``grad`` is allocated zero-filled at construction and ``zero_grad()`` refills it with zeros in place,
    so a training step allocates nothing for gradients. (PyTorch starts from ``grad = None``; here
    ``grad`` may still be set to None by the user or by ``zero_grad(set_to_none=True)``: the next
    backward then allocates it again, and optimizers skip parameters whose grad is None.)
    ``requires_grad=False`` freezes the parameter: layers do not accumulate into its grad and
    optimizers leave it unchanged.
    """

    __slots__ = ("data", "grad", "requires_grad")

    def __init__(self, data, requires_grad=True):
        data = np.asarray(data)
        if not np.issubdtype(data.dtype, np.floating):
            raise TypeError(f"Parameter: data must be a floating numpy array, got dtype {data.dtype}")
        self.data = np.ascontiguousarray(data)
        self.grad = np.zeros_like(self.data)
        self.requires_grad = bool(requires_grad)

    @property
    def shape(self):
        return self.data.shape

    @property
    def dtype(self):
        return self.data.dtype

    @property
    def ndim(self):
        return self.data.ndim

    @property
    def size(self):
        return self.data.size

    def numel(self):
        return self.data.size

    def accumulate_grad(self, g):
        """grad += g (skipped when requires_grad is False; allocates grad if it is None)."""
        if not self.requires_grad:
            return
        grad = self.grad
        if grad is None:
            self.grad = np.array(g, dtype=self.data.dtype, copy=True).reshape(self.data.shape)
        elif grad.shape != self.data.shape:
            raise ValueError(f"Parameter.grad has shape {grad.shape}, but the parameter has shape "
                             f"{self.data.shape}; set grad to None or to an array of the parameter's shape")
        else:
            grad += g

    def __array__(self, dtype=None, copy=None):
        return self.data if dtype is None else self.data.astype(dtype)

    def __repr__(self):
        flag = "" if self.requires_grad else ", requires_grad=False"
        return f"Parameter(shape={self.data.shape}, dtype={self.data.dtype}{flag})"


class StateDictError(ValueError, RuntimeError):
    """load_state_dict found missing/unexpected keys or shape mismatches.

    A ValueError (cnnx's rule for bad input) that is also a RuntimeError (what PyTorch raises).
    """


def _state_array(value):
    """A state_dict value as a numpy array: ndarray, Parameter, PyTorch tensor or anything np.asarray takes.

    A torch.Tensor (recognised by its module, so torch is never imported here) is detached, moved to the
    CPU and made contiguous before .numpy(); a dtype numpy has no twin for (bfloat16, ...) is a TypeError.
    """
    if isinstance(value, np.ndarray):
        return value
    if isinstance(value, Parameter):
        return np.asarray(value.data)
    if (type(value).__module__ or "").split(".")[0] == "torch" and hasattr(value, "detach"):
        tensor = value.detach()
        if getattr(tensor, "layout", None) is not None and "strided" not in str(tensor.layout):
            raise TypeError(f"a {tensor.layout} torch tensor cannot be loaded; convert it with .to_dense()")
        tensor = tensor.cpu().contiguous()
        try:
            return tensor.numpy()
        except (TypeError, RuntimeError) as exc:   # bfloat16, quantized, ...: no numpy dtype
            raise TypeError(f"torch tensor of dtype {tensor.dtype} has no numpy equivalent ({exc}); convert it "
                            f"first, e.g. with .float()") from None
    return np.asarray(value)


def _overflow_count(value, dtype):
    """How many finite entries of the floating array value become infinite when cast to the floating dtype."""
    if value.dtype.kind != "f" or np.dtype(dtype).kind != "f" or value.dtype.itemsize <= np.dtype(dtype).itemsize:
        return 0
    with np.errstate(over="ignore"):
        return int(np.count_nonzero(np.isinf(value.astype(dtype)) & np.isfinite(value)))


def _same_kind(value_dtype, target_dtype):
    """A value may be loaded into a state array of target_dtype: floating into floating (any width: the
    copy casts), integer into integer; never complex, bool, strings or objects."""
    if np.issubdtype(target_dtype, np.floating):
        return np.issubdtype(value_dtype, np.floating)
    if np.issubdtype(target_dtype, np.integer):
        return np.issubdtype(value_dtype, np.integer)
    return value_dtype == target_dtype


def _kind_name(dtype):
    return ("floating" if np.issubdtype(dtype, np.floating) else
            "integer" if np.issubdtype(dtype, np.integer) else str(dtype))


class _IncompatibleKeys(collections.namedtuple("IncompatibleKeys", ["missing_keys", "unexpected_keys"])):
    pass


def _addindent(text, spaces):
    lines = text.split("\n")
    if len(lines) == 1:
        return text
    return lines[0] + "\n" + "\n".join(" " * spaces + line for line in lines[1:])


_stamps = itertools.count(1)    # next() is atomic under the GIL: every stamp is unique, even across threads
_changes = [0]                  # the stamp of the latest configuration change of any module


def _touch(module):
    """Stamp a change of `module`'s configuration (a public attribute, a parameter, buffer or submodule set or
    deleted): a Sequential's compiled plan compares its modules' stamps before each call, and the cached
    parameter lists compare the global one."""
    stamp = next(_stamps)
    module.__dict__["_version"] = stamp
    _changes[0] = stamp


class Module:
    """Base class of every layer, loss and model.

    Assigning a :class:`Parameter` or a :class:`Module` to an attribute registers it (in order), as in
    PyTorch; :meth:`register_buffer` registers a non-trainable state array (saved by ``state_dict``).
    Subclasses implement ``forward`` and ``backward`` and, to be saved with :func:`cnnx.save`,
    ``get_config()`` returning their constructor arguments as a JSON-able dict.
    """

    def __init__(self):
        d = self.__dict__
        d["training"] = True
        d["_parameters"] = {}
        d["_buffers"] = {}
        d["_modules"] = {}

    # -- registration --------------------------------------------------------------------------
    def __setattr__(self, name, value):
        d = self.__dict__
        if name.startswith("_cache"):  # forward's saved values: never parameters, buffers or modules
            d[name] = value
            return
        if "_parameters" not in d:
            raise AttributeError(f"cannot assign {name!r} before {type(self).__name__}.__init__ called "
                                 f"Module.__init__() (call super().__init__() first)")
        params, buffers, modules = d["_parameters"], d["_buffers"], d["_modules"]
        if isinstance(value, Parameter):
            buffers.pop(name, None)
            modules.pop(name, None)
            params[name] = value
        elif isinstance(value, Module):
            params.pop(name, None)
            buffers.pop(name, None)
            modules[name] = value
        elif name in params:
            if value is not None:
                raise TypeError(f"cannot assign {type(value).__name__} to parameter {name!r} of "
                                f"{type(self).__name__} (expected a Parameter or None)")
            params[name] = None
        elif name in modules:
            if value is not None:
                raise TypeError(f"cannot assign {type(value).__name__} to submodule {name!r} of "
                                f"{type(self).__name__} (expected a Module or None)")
            modules[name] = None
        elif name in buffers:
            if value is not None and not isinstance(value, np.ndarray):
                raise TypeError(f"cannot assign {type(value).__name__} to buffer {name!r} of "
                                f"{type(self).__name__} (expected a numpy array or None)")
            buffers[name] = value
        d[name] = value
        if name[:1] != "_":
            _touch(self)

    def __getstate__(self):
        # copies and pickles leave out what is derived: compiled plans and the cached parameter list
        state = dict(self.__dict__)
        for key in ("_plans", "_plan_state", "_parameter_cache"):
            state.pop(key, None)
        return state

    def __delattr__(self, name):
        for registry in ("_parameters", "_buffers", "_modules"):
            self.__dict__[registry].pop(name, None)
        object.__delattr__(self, name)
        _touch(self)

    def register_buffer(self, name, array):
        """Register a state array that is not trained (e.g. BatchNorm's running_mean); None is allowed."""
        if not isinstance(name, str) or not name or "." in name:
            raise ValueError(f"register_buffer: name must be a non-empty string without '.', got {name!r}")
        if array is not None and not isinstance(array, np.ndarray):
            raise TypeError(f"register_buffer: {name!r} must be a numpy array or None, got {type(array).__name__}")
        self.__dict__["_parameters"].pop(name, None)
        self.__dict__["_modules"].pop(name, None)
        self.__dict__["_buffers"][name] = array
        self.__dict__[name] = array
        _touch(self)

    def register_parameter(self, name, param):
        if param is not None and not isinstance(param, Parameter):
            raise TypeError(f"register_parameter: {name!r} must be a Parameter or None, got {type(param).__name__}")
        self.__dict__["_parameters"][name] = param
        self.__dict__[name] = param
        _touch(self)

    def add_module(self, name, module):
        if not isinstance(name, str) or not name or "." in name:
            raise ValueError(f"add_module: name must be a non-empty string without '.', got {name!r}")
        if module is not None and not isinstance(module, Module):
            raise TypeError(f"add_module: {name!r} must be a Module or None, got {type(module).__name__}")
        self.__dict__["_modules"][name] = module
        self.__dict__[name] = module
        _touch(self)

    # -- computation -----------------------------------------------------------------------------
    def forward(self, *args):
        raise NotImplementedError(f"{type(self).__name__} does not implement forward")

    def backward(self, dy):
        raise NotImplementedError(f"{type(self).__name__} does not implement backward")

    def __call__(self, *args, **kwargs):
        return self.forward(*args, **kwargs)

    def plan_op(self, shape, dtype):
        """How a Sequential's compiled plan (cnnx/_planner.py) runs this module on an input of `shape` and
        `dtype`, or None (the default): the Sequential then runs layer by layer, which raises the usual errors.

        A dict: "kind" ("conv", "linear", "maxpool", "relu", "batchnorm", "batchnorm_train", "global_avgpool";
        "reshape" and "identity", which move no data; "sequence" and "residual" for containers), "out" (the
        output shape), and what the kind needs: "conv" / "pool" (the geometry, named as csrc/cnnx.h's
        cnnx_conv2d_geom / cnnx_pool2d_geom), "linear" (rows, in_features, out_features), "params" ([(weight
        Parameter, its expected shape), (bias, shape) or None]), "inplace" (relu), "bn" (eps, running mean and
        variance, params), "bn_train" (eps, N, C, L, momentum, and the running mean, variance and
        num_batches_tracked arrays it updates, or None), "planes" (NC, L). It is used only when the class that
        defines it also defines forward and backward.
        """
        return None

    def _no_forward(self):
        return RuntimeError(f"{type(self).__name__}.backward called before forward (or twice after one "
                            f"forward): run forward first; backward consumes the cached forward state")

    def _check_dy(self, dy, shape, dtype=None):
        """dy as an ndarray with the forward output's shape (else ValueError) and dtype (else TypeError)."""
        if not isinstance(dy, np.ndarray):
            dy = np.asarray(dy)
        if dy.shape != shape:
            raise ValueError(f"{type(self).__name__}.backward: dy must have the forward output's shape "
                             f"{tuple(shape)}, got {tuple(dy.shape)}")
        if dtype is not None and dy.dtype != dtype:
            raise TypeError(f"{type(self).__name__}.backward: dy must have the forward output's dtype "
                            f"{np.dtype(dtype)}, got {dy.dtype}")
        return dy

    # -- traversal -------------------------------------------------------------------------------
    def named_children(self):
        for name, module in self._modules.items():
            if module is not None:
                yield name, module

    def children(self):
        for _, module in self.named_children():
            yield module

    def named_modules(self, prefix="", memo=None):
        memo = set() if memo is None else memo
        if id(self) in memo:
            return
        memo.add(id(self))
        yield prefix, self
        for name, module in self.named_children():
            yield from module.named_modules(f"{prefix}.{name}" if prefix else name, memo)

    def modules(self):
        for _, module in self.named_modules():
            yield module

    def named_parameters(self, prefix="", recurse=True):
        """(dotted name, Parameter) pairs: 'weight', '0.bias', 'features.conv1.weight', ..."""
        seen = set()
        modules = self.named_modules(prefix) if recurse else [(prefix, self)]
        for mod_prefix, module in modules:
            for name, param in module._parameters.items():
                if param is None or id(param) in seen:
                    continue
                seen.add(id(param))
                yield (f"{mod_prefix}.{name}" if mod_prefix else name), param

    def parameters(self, recurse=True):
        if not recurse:
            return (p for p in self._parameters.values() if p is not None)
        return iter(self._parameter_list())

    def _parameter_list(self):
        """Every Parameter once, in named_parameters() order, without building the names (zero_grad and the
        optimizers' setup call this per step)."""
        cached = self.__dict__.get("_parameter_cache")
        if cached is not None and cached[0] == _changes[0]:
            return cached[1]
        params, seen, visited = [], set(), set()

        def walk(module):
            if id(module) in visited:
                return
            visited.add(id(module))
            for param in module._parameters.values():
                if param is not None and id(param) not in seen:
                    seen.add(id(param))
                    params.append(param)
            for child in module._modules.values():
                if child is not None:
                    walk(child)

        walk(self)
        self.__dict__["_parameter_cache"] = (_changes[0], params)
        return params

    def named_buffers(self, prefix="", recurse=True):
        modules = self.named_modules(prefix) if recurse else [(prefix, self)]
        for mod_prefix, module in modules:
            for name, buf in module._buffers.items():
                if buf is not None:
                    yield (f"{mod_prefix}.{name}" if mod_prefix else name), buf

    def buffers(self, recurse=True):
        for _, buf in self.named_buffers(recurse=recurse):
            yield buf

    def apply(self, fn):
        """Call fn(module) on every submodule (children first) and on self, e.g. for custom initialisation;
        returns self."""
        for module in self.children():
            module.apply(fn)
        fn(self)
        return self

    def zero_grad(self, set_to_none=False):
        """Zero every parameter's grad in place (or set it to None with set_to_none=True)."""
        params = self._parameter_list()
        zero_grads = None if set_to_none else getattr(_backend.ops(), "zero_grads", None)
        if zero_grads is not None:          # the C backend: one call for all of them
            zero_grads(params)
            return
        for param in params:
            if set_to_none:
                param.grad = None
            elif param.grad is not None:
                param.grad.fill(0)

    def train(self, mode=True):
        """Training mode (batch statistics in BatchNorm, active Dropout); returns self."""
        if not isinstance(mode, bool):
            raise TypeError(f"train: mode must be a bool, got {type(mode).__name__}")
        for module in self.modules():
            if module.__dict__.get("training") is not mode:
                module.__dict__["training"] = mode
                _touch(module)
        return self

    def eval(self):
        """Evaluation mode (running statistics, Dropout off); same as train(False)."""
        return self.train(False)

    def requires_grad_(self, requires_grad=True):
        for param in self.parameters():
            param.requires_grad = bool(requires_grad)
        return self

    def to(self, dtype):
        """Convert every floating parameter and buffer to `dtype` (np.float32 or np.float64) in place."""
        dtype = np.dtype(dtype)
        if dtype not in (np.float32, np.float64):
            raise TypeError(f"to: dtype must be float32 or float64, got {dtype}")
        for module in self.modules():
            for param in module._parameters.values():
                if param is not None and param.data.dtype != dtype:
                    param.data = param.data.astype(dtype)
                    param.grad = None if param.grad is None else param.grad.astype(dtype)
            for name, buf in list(module._buffers.items()):
                if buf is not None and np.issubdtype(buf.dtype, np.floating) and buf.dtype != dtype:
                    module.register_buffer(name, buf.astype(dtype))
            if "dtype" in module.__dict__:
                module.__dict__["dtype"] = dtype
        return self

    def num_parameters(self, trainable_only=False):
        return sum(p.size for p in self.parameters() if p.requires_grad or not trainable_only)

    # -- state -----------------------------------------------------------------------------------
    def state_dict(self, prefix=""):
        """An ordered {dotted name: array} of every parameter and buffer (running stats included).

        The arrays are COPIES (unlike PyTorch's references), so a state_dict kept as 'the best
        checkpoint so far' does not change when training continues.
        """
        out = collections.OrderedDict()
        for mod_prefix, module in self.named_modules(prefix):
            for registry in (module._parameters, module._buffers):
                for name, value in registry.items():
                    if value is None:
                        continue
                    array = value.data if isinstance(value, Parameter) else value
                    out[f"{mod_prefix}.{name}" if mod_prefix else name] = array.copy()
        return out

    def _state_targets(self):
        targets = collections.OrderedDict()
        for mod_prefix, module in self.named_modules():
            for registry in (module._parameters, module._buffers):
                for name, value in registry.items():
                    if value is not None:
                        key = f"{mod_prefix}.{name}" if mod_prefix else name
                        targets[key] = value.data if isinstance(value, Parameter) else value
        return targets

    def load_state_dict(self, state_dict, strict=True):
        """Copy arrays from `state_dict` into this module's parameters and buffers, in place.

        Values may be numpy arrays, Parameters or PyTorch tensors (``torch_model.state_dict()``: converted
        through numpy on the CPU, detached, contiguous; torch itself is never imported). Floating values go
        into floating parameters and buffers, integers into integer ones (BatchNorm's num_batches_tracked),
        cast to the module's dtypes. With strict=True (default) a missing or unexpected key raises
        StateDictError (a ValueError and RuntimeError) listing them; a shape or dtype mismatch always
        raises, naming the key, the expected and the found shape or dtype. Nothing is copied unless every
        value is good. Returns (missing_keys, unexpected_keys).
        """
        if not isinstance(state_dict, collections.abc.Mapping):
            raise TypeError(f"load_state_dict: state_dict must be a mapping of name -> array, "
                            f"got {type(state_dict).__name__}")
        targets = self._state_targets()
        missing = [k for k in targets if k not in state_dict]
        unexpected = [k for k in state_dict if k not in targets]
        errors = []
        if strict:
            if unexpected:
                errors.append("Unexpected key(s) in state_dict: " + ", ".join(map(repr, unexpected)) + ".")
            if missing:
                errors.append("Missing key(s) in state_dict: " + ", ".join(map(repr, missing)) + ".")
        values = {}
        for key, target in targets.items():
            if key not in state_dict:
                continue
            try:
                value = _state_array(state_dict[key])
            except (TypeError, ValueError, RuntimeError) as exc:
                errors.append(f"conversion error for {key}: {exc}.")
                continue
            if value.shape != target.shape:
                errors.append(f"size mismatch for {key}: copying an array of shape {value.shape}, "
                              f"the shape in the current model is {target.shape}.")
            elif not _same_kind(value.dtype, target.dtype):
                errors.append(f"dtype error for {key}: expected a {_kind_name(target.dtype)} array (the model "
                              f"holds {target.dtype}), got dtype {value.dtype}.")
            elif (over := _overflow_count(value, target.dtype)):
                errors.append(f"value error for {key}: {over} finite value(s) "
                              f"of the {value.dtype} array, up to {float(np.nanmax(np.abs(value))):.4g} in "
                              f"magnitude, exceed the model's {target.dtype} (largest "
                              f"{float(np.finfo(target.dtype).max):.4g}): they would load as inf.")
            else:
                values[key] = value
        if errors:
            raise StateDictError(f"Error(s) in loading state_dict for {type(self).__name__}:\n\t"
                                 + "\n\t".join(errors))
        for key, value in values.items():
            np.copyto(targets[key], value, casting="unsafe")
        return _IncompatibleKeys(missing, unexpected)

    # -- description -----------------------------------------------------------------------------
    def get_config(self):
        """Constructor arguments as a JSON-able dict (used by cnnx.save); layers override this."""
        raise NotImplementedError(
            f"{type(self).__name__} does not describe its configuration (get_config), so cnnx.save cannot "
            f"record it; implement get_config() and register the class with cnnx.serialization.register_module")

    def extra_repr(self):
        return ""

    def __repr__(self):
        lines = []
        extra = self.extra_repr()
        if extra:
            lines = extra.split("\n")
        for name, module in self._modules.items():
            lines.append(f"({name}): " + _addindent(repr(module), 2))
        main = type(self).__name__ + "("
        if lines:
            if len(lines) == 1 and not self._modules:
                main += lines[0]
            else:
                main += "\n  " + "\n  ".join(lines) + "\n"
        return main + ")"

    def flops(self, input_shape, output_shape):
        """Floating-point operations of one forward for these shapes (multiply-add = 2); 0 if negligible."""
        return 0

    def summary(self, input_shape, dtype=None, file=None, print_summary=True):
        """Run one forward on zeros of `input_shape` (batch included, e.g. (1, 1, 28, 28)) in eval mode
        and report per leaf layer its output shape, parameter count and forward FLOPs.

        Prints a table (to `file`, default stdout, unless print_summary=False) and returns a dict:
        {"layers": [{"name", "type", "output_shape", "params", "flops"}, ...], "input_shape",
        "output_shape", "total_params", "trainable_params", "total_flops"}.
        """
        try:
            input_shape = tuple(int(s) for s in input_shape)
        except TypeError:
            raise TypeError(f"summary: input_shape must be a tuple of ints, got {input_shape!r}") from None
        if dtype is None:
            first = next(self.parameters(), None)
            dtype = first.dtype if first is not None else np.float32
        rows = []
        leaves = [(name, m) for name, m in self.named_modules() if not m._modules and m is not self]
        if not leaves:
            leaves = [("", self)]
        modes = {id(m): m.training for m in self.modules()}

        def recorder(name, module, forward):
            def run(*args, **kwargs):
                out = forward(*args, **kwargs)
                y = out[0] if isinstance(out, tuple) else out
                x = args[0] if args else None
                in_shape = tuple(np.shape(x)) if x is not None else ()
                rows.append({"name": name or type(module).__name__, "type": type(module).__name__,
                             "output_shape": tuple(np.shape(y)),
                             "params": sum(p.size for p in module.parameters()),
                             "flops": int(module.flops(in_shape, tuple(np.shape(y))))})
                return out
            return run

        try:
            self.eval()
            for name, module in leaves:
                module.__dict__["forward"] = recorder(name, module, module.forward)
            out = self.forward(np.zeros(input_shape, dtype=dtype))
        finally:
            for _, module in leaves:
                module.__dict__.pop("forward", None)
            for m in self.modules():
                m.__dict__["training"] = modes.get(id(m), True)
            for m in self.modules():        # drop the caches the probe forward left behind
                for key in [k for k in m.__dict__ if k.startswith("_cache")]:
                    m.__dict__[key] = None
                # and the plans compiled while the layers' forward was the recorder (they run layer by layer, and
                # restoring `training` above stamps no change, so they would stay valid)
                m.__dict__.pop("_plans", None)
        y = out[0] if isinstance(out, tuple) else out
        result = {"input_shape": input_shape, "output_shape": tuple(np.shape(y)), "layers": rows,
                  "total_params": self.num_parameters(),
                  "trainable_params": self.num_parameters(trainable_only=True),
                  "total_flops": sum(r["flops"] for r in rows)}
        if print_summary:
            print(_format_summary(type(self).__name__, result), file=file or sys.stdout)
        return result


def _format_summary(title, result):
    header = ("Layer (type)", "Output shape", "Params", "FLOPs")
    body = [(f"{r['name']} ({r['type']})", str(r["output_shape"]), f"{r['params']:,}", f"{r['flops']:,}")
            for r in result["layers"]]
    widths = [max(len(row[i]) for row in [header] + body) for i in range(4)]
    rule = "-" * (sum(widths) + 6)

    def fmt(row):
        return (f"{row[0]:<{widths[0]}}  {row[1]:<{widths[1]}}  {row[2]:>{widths[2]}}  "
                f"{row[3]:>{widths[3]}}")

    lines = [f"{title} summary, input {result['input_shape']}", rule, fmt(header), rule]
    lines += [fmt(row) for row in body]
    lines += [rule, f"Total params: {result['total_params']:,}",
              f"Trainable params: {result['trainable_params']:,}",
              f"Non-trainable params: {result['total_params'] - result['trainable_params']:,}",
              f"Forward FLOPs: {result['total_flops']:,}  (multiply-add = 2)",
              f"Output shape: {result['output_shape']}"]
    return "\n".join(lines)


class Sequential(Module):
    """Modules run in order: ``Sequential(Conv2d(1, 6, 5), ReLU(), ...)`` or ``Sequential(OrderedDict)``.

    Indexable (an int gives the module, a slice a new Sequential sharing the modules), ``len()`` and
    iteration; backward runs the modules in reverse.
    """

    def __init__(self, *args):
        super().__init__()
        if len(args) == 1 and isinstance(args[0], collections.OrderedDict):
            for name, module in args[0].items():
                self.add_module(name, module)
        else:
            for index, module in enumerate(args):
                if not isinstance(module, Module):
                    raise TypeError(f"Sequential: argument {index} must be a Module, got {type(module).__name__}")
                self.add_module(str(index), module)

    def add_module(self, name, module):
        if not isinstance(module, Module):
            raise TypeError(f"Sequential: {name!r} must be a Module, got {type(module).__name__}")
        super().add_module(name, module)

    def append(self, module):
        self.add_module(str(len(self._modules)), module)
        return self

    def __len__(self):
        return len(self._modules)

    def __iter__(self):
        return iter(self._modules.values())

    def __getitem__(self, index):
        modules = list(self._modules.items())
        if isinstance(index, slice):
            return Sequential(collections.OrderedDict(modules[index]))
        try:
            return modules[index][1]
        except IndexError:
            raise IndexError(f"Sequential index {index} out of range for {len(modules)} modules") from None
        except TypeError:
            raise TypeError(f"Sequential indices must be int or slice, got {type(index).__name__}") from None

    # A chain of modules that describe themselves (Module.plan_op: Conv2d, ReLU, MaxPool2d, Flatten, Linear,
    # Identity, eval-mode Dropout, BatchNorm2d, AdaptiveAvgPool2d(1), Residual, Sequential) runs as one compiled
    # plan per input shape (cnnx/_planner.py lowers it, cnnx/_plan.pxi runs it): the same kernels on the same
    # values, without the per-layer Python work that dominates small batches. The layers inside then keep no
    # forward state of their own: backward goes through the Sequential. Anything else runs layer by layer.
    def _plan(self, x):
        if type(x) is not np.ndarray:
            return None
        build = getattr(_backend.ops(), "compile_plan", None)
        if build is None:
            return None
        d = self.__dict__
        plans = d.get("_plans")
        if plans is None:
            plans = d["_plans"] = {}
        key = (x.shape, x.dtype)
        entry = plans.get(key)      # (plan, the global change stamp when its modules' stamps were last compared)
        # No module anywhere was reconfigured since then (the usual case in a training loop): the plan is valid
        # without comparing each module's stamp (plan.valid(), a Python loop over the modules).
        if entry is not None and entry[1] == _changes[0]:
            return entry[0]
        changes = _changes[0]       # (read before the comparison: a change made during it forces the next one)
        plan = None if entry is None else entry[0]
        if plan is None or not plan.valid():
            if len(plans) >= 8:
                plans.clear()
            plan = build(_planner.lower(self, x))
        plans[key] = (plan, changes)
        return plan

    def plan_op(self, shape, dtype):
        # A Sequential inside another plan's chain (or a Residual's block or shortcut that is a Sequential) is
        # lowered into the plan that holds it.
        return {"kind": "sequence", "modules": list(self._modules.values())}

    def forward(self, x):
        plan = self._plan(x)
        if plan is not None:
            y = plan.forward(x)
            if y is not None:
                self.__dict__["_plan_state"] = plan
                return y
        self.__dict__["_plan_state"] = None
        for module in self._modules.values():
            x = module(x)
        return x

    def backward(self, dy, input_grad=True):
        """Run every module's backward in reverse; returns dx.

        input_grad=False skips the gradient with respect to the network's input (returns None): the first
        layer (Conv2d, Linear, or a Sequential starting with one) then computes only its parameter gradients,
        which saves a whole convolution-backward per training step. Parameter gradients are identical.
        """
        state = self.__dict__.get("_plan_state")
        if state is not None:
            if state is False:
                raise self._no_forward()
            if state.pending and not state.takes(dy):     # (an array it takes as it is needs no checks)
                dy = state.last._check_dy(dy, state.out_shape, state.dtype)
            dx = state.backward(dy, input_grad)
            self.__dict__["_plan_state"] = False
            return dx
        modules = list(self._modules.values())
        for i in range(len(modules) - 1, -1, -1):
            module = modules[i]
            if not input_grad and i == 0 and hasattr(module, "_backward_params_only"):
                module._backward_params_only(dy)
                return None
            dy = module.backward(dy)
        return None if not input_grad else dy

    def _backward_params_only(self, dy):
        self.backward(dy, input_grad=False)

    def get_config(self):
        return {"layers": [{"name": name, "module": _describe(module)} for name, module in self._modules.items()]}


def _describe(module):
    """{"type": class name, "config": get_config()} for one module (see cnnx.serialization)."""
    return {"type": type(module).__name__, "config": module.get_config()}


class Residual(Module):
    """y = block(x) + shortcut(x): a residual connection (shortcut=None: the identity, y = block(x) + x).

    block and shortcut are modules (a Sequential for several layers) whose outputs have one shape and dtype.
    backward(dy) runs dy through both paths and returns the sum of their input gradients. Inside a Sequential the
    compiled plan runs it as ops over buffer ids: the branches, then an add with two inputs.
    """

    def __init__(self, block, shortcut=None):
        super().__init__()
        for name, m in (("block", block), ("shortcut", shortcut)):
            if not isinstance(m, Module) and not (name == "shortcut" and m is None):
                raise TypeError(f"Residual: {name} must be a Module{' or None' if name == 'shortcut' else ''}, "
                                f"got {type(m).__name__}")
        self.block = block
        self.shortcut = shortcut
        self._cache_shape = None

    def forward(self, x):
        y = self.block(x)
        s = x if self.shortcut is None else self.shortcut(x)
        if not isinstance(y, np.ndarray) or not isinstance(s, np.ndarray) or y.shape != s.shape \
                or y.dtype != s.dtype:
            raise ValueError(f"Residual: block and shortcut must give arrays of one shape and dtype, got "
                             f"{getattr(y, 'shape', type(y).__name__)} {getattr(y, 'dtype', '')} and "
                             f"{getattr(s, 'shape', type(s).__name__)} {getattr(s, 'dtype', '')}")
        self._cache_shape, self._cache_dtype = y.shape, y.dtype
        return y + s

    def backward(self, dy):
        if self._cache_shape is None:
            raise self._no_forward()
        dy = self._check_dy(dy, self._cache_shape, self._cache_dtype)
        self._cache_shape = None
        dx = self.block.backward(dy)
        ds = dy if self.shortcut is None else self.shortcut.backward(dy)
        return dx + ds

    def plan_op(self, shape, dtype):
        return {"kind": "residual", "block": self.block, "shortcut": self.shortcut}

    def get_config(self):
        return {"block": _describe(self.block),
                "shortcut": None if self.shortcut is None else _describe(self.shortcut)}
