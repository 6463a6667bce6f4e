"""Losses with PyTorch's names, arguments and reduction rules; ``forward(input, target)`` returns the loss,
``backward()`` returns d loss / d input (same shape and dtype as input).

With reduction='mean' or 'sum' the loss is a numpy scalar of the input's dtype (``float(loss)`` works);
with reduction='none' it is an array, and ``backward(dloss)`` takes the upstream gradient of that array
(default: ones).
"""
import numbers
import operator

import numpy as np

from .. import _backend, reference
from .module import Module

__all__ = ["CrossEntropyLoss", "NLLLoss", "BCEWithLogitsLoss", "BCELoss", "MSELoss"]

_REDUCTIONS = ("mean", "sum", "none")
_FLOATS = (np.dtype(np.float32), np.dtype(np.float64))


def _kernels():
    """The active backend's kernels; the numpy reference when the C extension cannot be loaded (the losses
    never needed it)."""
    try:
        return _backend.ops()
    except ImportError:
        return reference


def _float_array(x, name, fn):
    if not isinstance(x, np.ndarray):
        x = np.asarray(x)
    if x.dtype != np.float32 and x.dtype != np.float64:
        raise TypeError(f"{fn}: {name} must be a float32 or float64 array, got dtype {x.dtype}")
    return x


def _class_weight(weight, fn):
    if weight is None:
        return None
    w = np.asarray(weight, dtype=np.float64)
    if w.ndim != 1:
        raise ValueError(f"{fn}: weight must be a 1-D array of per-class weights, got shape {w.shape}")
    return w


class _Loss(Module):
    _name = ""

    def __init__(self, reduction="mean"):
        super().__init__()
        if reduction not in _REDUCTIONS:
            raise ValueError(f"{self._name}: reduction must be one of {list(_REDUCTIONS)}, got {reduction!r}")
        self.reduction = reduction
        self._cache_grad = None

    def _reduce(self, losses, denom, dtype):
        """Reduce per-element losses; remember the scale the gradient gets."""
        if self.reduction == "none":
            self._cache_out_shape = losses.shape
            return losses.astype(dtype, copy=False)
        self._cache_out_shape = None
        total = losses.sum(dtype=np.float64)
        if self.reduction == "sum":
            return dtype.type(total)
        with np.errstate(divide="ignore", invalid="ignore"):
            return dtype.type(total / denom)

    def _scale(self, grad, denom, dloss):
        """Turn the per-element gradient into d(reduced loss)/d input, in place."""
        if self.reduction == "mean":
            with np.errstate(divide="ignore", invalid="ignore"):
                grad *= grad.dtype.type(1.0 / denom) if denom != 0 else grad.dtype.type(np.nan)
            if dloss is not None:
                grad *= grad.dtype.type(np.asarray(dloss).reshape(()))
        elif self.reduction == "sum":
            if dloss is not None:
                grad *= grad.dtype.type(np.asarray(dloss).reshape(()))
        return grad

    def _elementwise_grad(self, g, weight, dloss, denom, dtype):
        """Per-element derivative g -> d(reduced loss)/d input: times the element weights, the upstream
        gradient (reduction='none') and 1/denom (reduction='mean')."""
        if weight is not None:
            g = g * weight
        if self.reduction == "none" and dloss is not None:
            g = g * np.asarray(dloss, dtype=dtype)
        return self._scale(np.array(g, dtype=dtype), denom, dloss)

    def backward(self, dloss=None):
        """d loss / d input. dloss: upstream gradient (the loss's shape for reduction='none', else a scalar);
        default 1."""
        if self._cache_grad is None:
            raise self._no_forward()
        grad_fn = self._cache_grad
        self.__dict__["_cache_grad"] = None     # (as Module.__setattr__ does for _cache names, without the call)
        if self.reduction == "none" and dloss is not None:
            dloss = np.asarray(dloss)
            if dloss.shape != self._cache_out_shape:
                raise ValueError(f"{self._name}.backward: dloss must have the loss's shape "
                                 f"{self._cache_out_shape}, got {dloss.shape}")
        elif dloss is not None and np.size(dloss) != 1:
            raise ValueError(f"{self._name}.backward: dloss must be a scalar for reduction="
                             f"{self.reduction!r}, got shape {np.shape(dloss)}")
        return grad_fn(dloss)

    def __call__(self, input, target):
        return self.forward(input, target)


def _class_targets(input, target, fn, ignore_index):
    """Move the class axis last: (M, C) logits and (M,) int targets with a valid mask, plus the shapes."""
    if input.ndim < 1:
        raise ValueError(f"{fn}: input must have a class dimension, got a 0-d array")
    if input.ndim == 1:                                        # a single sample (C,)
        if target.ndim != 0:
            raise ValueError(f"{fn}: for input of shape {input.shape} target must be a scalar class index, "
                             f"got shape {target.shape}")
        moved, out_shape = input[None, :], ()
    else:
        expected = input.shape[:1] + input.shape[2:]
        if target.shape != expected:
            raise ValueError(f"{fn}: target shape {target.shape} does not match input shape {input.shape}: "
                             f"expected class indices of shape {expected}")
        moved = np.moveaxis(input, 1, -1) if input.ndim > 2 else input
        out_shape = expected
    c = input.shape[-1] if input.ndim == 1 else input.shape[1]
    logits = moved.reshape(-1, c)
    t = target.reshape(-1).astype(np.int64, copy=False)
    valid = t != ignore_index
    bad = valid & ((t < 0) | (t >= c))
    if bad.any():
        raise ValueError(f"{fn}: target contains class index {int(t[bad][0])} outside [0, {c}) "
                         f"(ignore_index={ignore_index})")
    return logits, t, valid, out_shape, c


def _restore_class_axis(grad2d, input):
    """Inverse of _class_targets' move: (M, C) gradient back to input's layout."""
    if input.ndim == 1:
        return grad2d.reshape(input.shape)
    if input.ndim == 2:
        return grad2d
    moved_shape = (input.shape[0],) + input.shape[2:] + (input.shape[1],)
    return np.ascontiguousarray(np.moveaxis(grad2d.reshape(moved_shape), -1, 1))


def _int_target(target, fn):
    target = np.asarray(target)
    if not np.issubdtype(target.dtype, np.integer):
        raise TypeError(f"{fn}: target must hold integer class indices, got dtype {target.dtype}")
    return target


class CrossEntropyLoss(_Loss):
    """Softmax cross entropy on logits, as ``torch.nn.CrossEntropyLoss``.

    input: (N, C), (C,) or (N, C, d1, ...) logits. target: integer class indices of shape (N,) / () /
    (N, d1, ...) or, as in PyTorch, class probabilities of input's shape (a floating array).
    log_softmax is computed per row as x - max - log(sum(exp(x - max))), finite for huge logits.
    With class indices: loss_i = (1 - e) * w[t_i] * -logp[i, t_i] + e / C * sum_c w[c] * -logp[i, c]
    (e = label_smoothing), rows whose target is ignore_index contribute 0, and 'mean' divides by the
    sum of w[t_i] over the counted rows (the number of counted rows without weight) -- PyTorch's rule.
    With probabilities, 'mean' divides by the number of rows.
    """
    _name = "CrossEntropyLoss"

    def __init__(self, weight=None, ignore_index=-100, reduction="mean", label_smoothing=0.0):
        super().__init__(reduction)
        self.weight = _class_weight(weight, self._name)
        self.ignore_index = operator.index(ignore_index)
        if isinstance(label_smoothing, bool) or not isinstance(label_smoothing, numbers.Real) \
                or not 0.0 <= label_smoothing <= 1.0:
            raise ValueError(f"{self._name}: label_smoothing must be a number in [0, 1], got {label_smoothing!r}")
        self.label_smoothing = float(label_smoothing)

    def forward(self, input, target):
        # The common case -- (N, C) logits, class indices, no weight or smoothing -- in one kernel pass that
        # also writes the gradient; everything else takes the general numpy path below.
        if type(input) is np.ndarray and type(target) is np.ndarray and input.ndim == 2 and target.ndim == 1:
            flags = input.flags
            if (self.weight is None and self.label_smoothing == 0 and input.dtype in _FLOATS
                    and target.dtype.kind in "iu" and target.shape[0] == input.shape[0] and input.size
                    and flags.c_contiguous and flags.aligned and self.reduction in _REDUCTIONS
                    and -2**63 <= self.ignore_index < 2**63):
                return self._forward_indices_2d(input, target)
        fn = self._name
        x = _float_array(input, "input", fn)
        target = np.asarray(target)
        dtype = x.dtype
        c = x.shape[-1] if x.ndim == 1 else (x.shape[1] if x.ndim >= 2 else 0)
        if self.weight is not None and self.weight.shape[0] != c:
            raise ValueError(f"{fn}: weight has {self.weight.shape[0]} entries, input has {c} classes")
        w = None if self.weight is None else self.weight.astype(dtype)
        eps = self.label_smoothing
        if np.issubdtype(target.dtype, np.floating):
            return self._forward_probs(x, target.astype(dtype, copy=False), w, eps, c)
        target = _int_target(target, fn)
        logits, t, valid, out_shape, c = _class_targets(x, target, fn, self.ignore_index)
        logp = logits - logits.max(axis=1, keepdims=True)
        logp -= np.log(np.exp(logp).sum(axis=1, keepdims=True))
        rows = np.arange(t.shape[0])
        tc = np.where(valid, t, 0)
        wt = np.ones(t.shape[0], dtype) if w is None else w[tc]
        wt = np.where(valid, wt, 0).astype(dtype, copy=False)
        losses = -logp[rows, tc] * wt
        if eps > 0:
            smooth = -(logp * w).sum(axis=1) if w is not None else -logp.sum(axis=1)
            losses = (1 - eps) * losses + (eps / c) * np.where(valid, smooth, 0)
        denom = float(wt.sum(dtype=np.float64))
        loss = self._reduce(losses.reshape(out_shape), denom, dtype)

        def grad_fn(dloss):
            # d/dx_j of w_t * -logp_t is w_t * (p_j - [j == t]); of sum_c w_c * -logp_c is (sum w) p_j - w_j
            p = np.exp(logp)
            g = p * ((1 - eps) * wt)[:, None]
            g[rows, tc] -= (1 - eps) * wt
            if eps > 0:
                wsum = float(c) if w is None else float(w.sum(dtype=np.float64))
                sm = p * dtype.type(wsum)
                sm -= 1 if w is None else w
                sm *= dtype.type(eps / c)
                sm[~valid] = 0
                g += sm
            if self.reduction == "none" and dloss is not None:
                g *= np.asarray(dloss, dtype=dtype).reshape(-1, 1)
            g = self._scale(g, denom, dloss)
            return _restore_class_axis(g.astype(dtype, copy=False), x)

        self._cache_grad = grad_fn
        return loss

    def _forward_indices_2d(self, x, target):
        """forward() for (N, C) C-contiguous logits (N, C >= 1), (N,) integer targets, no weight, no smoothing."""
        t = np.ascontiguousarray(target, dtype=np.int64)
        losses, grad, total, count, bad = _kernels().cross_entropy_forward(x, t, self.ignore_index,
                                                                           self.reduction == "mean")
        if bad >= 0:
            raise ValueError(f"{self._name}: target contains class index {int(t[bad])} outside [0, {x.shape[1]}) "
                             f"(ignore_index={self.ignore_index})")
        dtype, reduction = x.dtype, self.reduction
        d = self.__dict__       # (forward state straight into the instance: Module.__setattr__ is a Python call)
        if reduction == "none":
            d["_cache_out_shape"] = losses.shape
            loss = losses
        else:
            d["_cache_out_shape"] = None
            loss = dtype.type(total if reduction == "sum" else total / count if count else np.nan)

        def grad_fn(dloss):
            g = grad
            if dloss is not None:
                if reduction == "none":
                    g *= np.asarray(dloss, dtype=dtype).reshape(-1, 1)
                else:
                    g *= dtype.type(np.asarray(dloss).reshape(()))
            return g

        d["_cache_grad"] = grad_fn
        return loss

    def _forward_probs(self, x, q, w, eps, c):
        fn = self._name
        if q.shape != x.shape:
            raise ValueError(f"{fn}: with class probabilities, target must have input's shape {x.shape}, "
                             f"got {q.shape}")
        if eps > 0:
            q = q * (1 - eps) + eps / c
        axis = 0 if x.ndim == 1 else 1
        logp = x - x.max(axis=axis, keepdims=True)
        logp -= np.log(np.exp(logp).sum(axis=axis, keepdims=True))
        bshape = [1] * x.ndim
        bshape[axis] = c
        wq = q if w is None else q * w.reshape(bshape)
        losses = -(logp * wq).sum(axis=axis)
        denom = float(x.size // c) if x.size else 0.0
        loss = self._reduce(losses, denom, x.dtype)

        def grad_fn(dloss):
            g = np.exp(logp) * wq.sum(axis=axis, keepdims=True) - wq
            if self.reduction == "none" and dloss is not None:
                g *= np.expand_dims(np.asarray(dloss, dtype=x.dtype), axis)
            return self._scale(g.astype(x.dtype, copy=False), denom, dloss)

        self._cache_grad = grad_fn
        return loss

    def extra_repr(self):
        return ""

    def get_config(self):
        return {"weight": None if self.weight is None else self.weight.tolist(),
                "ignore_index": self.ignore_index, "reduction": self.reduction,
                "label_smoothing": self.label_smoothing}


class NLLLoss(_Loss):
    """Negative log likelihood on log-probabilities, as ``torch.nn.NLLLoss``: loss_i = -w[t_i] * input[i, t_i];
    'mean' divides by the sum of w[t_i] over rows whose target is not ignore_index."""
    _name = "NLLLoss"

    def __init__(self, weight=None, ignore_index=-100, reduction="mean"):
        super().__init__(reduction)
        self.weight = _class_weight(weight, self._name)
        self.ignore_index = operator.index(ignore_index)

    def forward(self, input, target):
        fn = self._name
        x = _float_array(input, "input", fn)
        dtype = x.dtype
        target = _int_target(target, fn)
        logp, t, valid, out_shape, c = _class_targets(x, target, fn, self.ignore_index)
        if self.weight is not None and self.weight.shape[0] != c:
            raise ValueError(f"{fn}: weight has {self.weight.shape[0]} entries, input has {c} classes")
        rows = np.arange(t.shape[0])
        tc = np.where(valid, t, 0)
        wt = np.ones(t.shape[0], dtype) if self.weight is None else self.weight.astype(dtype)[tc]
        wt = np.where(valid, wt, 0).astype(dtype, copy=False)
        losses = -logp[rows, tc] * wt
        denom = float(wt.sum(dtype=np.float64))
        loss = self._reduce(losses.reshape(out_shape), denom, dtype)

        def grad_fn(dloss):
            g = np.zeros(logp.shape, dtype)
            g[rows, tc] = -wt
            if self.reduction == "none" and dloss is not None:
                g *= np.asarray(dloss, dtype=dtype).reshape(-1, 1)
            return _restore_class_axis(self._scale(g, denom, dloss), x)

        self._cache_grad = grad_fn
        return loss

    def get_config(self):
        return {"weight": None if self.weight is None else self.weight.tolist(),
                "ignore_index": self.ignore_index, "reduction": self.reduction}


def _elementwise_target(x, target, fn):
    target = _float_array(target, "target", fn).astype(x.dtype, copy=False)
    if target.shape != x.shape:
        raise ValueError(f"{fn}: target shape {target.shape} must equal input shape {x.shape}")
    return target


def _elementwise_weight(weight, shape, dtype, fn, name="weight"):
    if weight is None:
        return None
    w = np.asarray(weight, dtype=dtype)
    try:
        fits = np.broadcast_shapes(w.shape, shape) == tuple(shape)
    except ValueError:
        fits = False
    if not fits:
        raise ValueError(f"{fn}: {name} of shape {w.shape} does not broadcast to the input shape {shape}")
    return w


class BCEWithLogitsLoss(_Loss):
    """Sigmoid + binary cross entropy in one stable expression, as ``torch.nn.BCEWithLogitsLoss``:

        loss = w * [(1 - y) * x + (1 + (pos_weight - 1) * y) * (log(1 + exp(-|x|)) + max(-x, 0))]

    `weight` broadcasts to the input; `pos_weight` broadcasts along the last (class) dimension.
    """
    _name = "BCEWithLogitsLoss"

    def __init__(self, weight=None, reduction="mean", pos_weight=None):
        super().__init__(reduction)
        self.weight = None if weight is None else np.asarray(weight, dtype=np.float64)
        self.pos_weight = None if pos_weight is None else np.asarray(pos_weight, dtype=np.float64)

    def forward(self, input, target):
        fn = self._name
        x = _float_array(input, "input", fn)
        y = _elementwise_target(x, target, fn)
        dtype = x.dtype
        w = _elementwise_weight(self.weight, x.shape, dtype, fn)
        pw = _elementwise_weight(self.pos_weight, x.shape, dtype, fn, "pos_weight")
        softplus_neg = np.log1p(np.exp(-np.abs(x))) + np.maximum(-x, 0)      # log(1 + exp(-x)), stable
        lw = 1 if pw is None else 1 + (pw - 1) * y
        losses = (1 - y) * x + lw * softplus_neg
        if w is not None:
            losses = losses * w
        denom = float(x.size)
        loss = self._reduce(losses, denom, dtype)

        def grad_fn(dloss):
            e = np.exp(-np.abs(x))
            sig = np.where(x >= 0, 1 / (1 + e), e / (1 + e))
            return self._elementwise_grad((1 - y) + lw * (sig - 1), w, dloss, denom, dtype)

        self._cache_grad = grad_fn
        return loss

    def get_config(self):
        return {"weight": None if self.weight is None else self.weight.tolist(), "reduction": self.reduction,
                "pos_weight": None if self.pos_weight is None else self.pos_weight.tolist()}


class BCELoss(_Loss):
    """Binary cross entropy on probabilities, as ``torch.nn.BCELoss``:
    loss = -w * (y * log(x) + (1 - y) * log(1 - x)) with each log clamped at -100 (so x = 0 or 1 gives a
    finite loss); gradient w * (x - y) / max(x * (1 - x), 1e-12), PyTorch's formula. Input outside
    [0, 1] is a ValueError."""
    _name = "BCELoss"

    def __init__(self, weight=None, reduction="mean"):
        super().__init__(reduction)
        self.weight = None if weight is None else np.asarray(weight, dtype=np.float64)

    def forward(self, input, target):
        fn = self._name
        x = _float_array(input, "input", fn)
        y = _elementwise_target(x, target, fn)
        if x.size and not ((x >= 0) & (x <= 1)).all():
            raise ValueError(f"{fn}: all elements of input should be between 0 and 1 (probabilities; use "
                             f"BCEWithLogitsLoss on logits)")
        dtype = x.dtype
        w = _elementwise_weight(self.weight, x.shape, dtype, fn)
        with np.errstate(divide="ignore"):
            log_x = np.maximum(np.log(x), -100)
            log_1mx = np.maximum(np.log1p(-x), -100)
        losses = -(y * log_x + (1 - y) * log_1mx)
        if w is not None:
            losses = losses * w
        denom = float(x.size)
        loss = self._reduce(losses, denom, dtype)

        def grad_fn(dloss):
            g = (x - y) / np.maximum(x * (1 - x), dtype.type(1e-12))
            return self._elementwise_grad(g, w, dloss, denom, dtype)

        self._cache_grad = grad_fn
        return loss

    def get_config(self):
        return {"weight": None if self.weight is None else self.weight.tolist(), "reduction": self.reduction}


class MSELoss(_Loss):
    """Mean squared error, as ``torch.nn.MSELoss``: (x - y)**2 per element; gradient 2 (x - y)."""
    _name = "MSELoss"

    def forward(self, input, target):
        fn = self._name
        x = _float_array(input, "input", fn)
        y = _elementwise_target(x, target, fn)
        diff = x - y
        loss = self._reduce(diff * diff, float(x.size), x.dtype)

        def grad_fn(dloss):
            return self._elementwise_grad(diff * x.dtype.type(2), None, dloss, float(x.size), x.dtype)

        self._cache_grad = grad_fn
        return loss

    def get_config(self):
        return {"reduction": self.reduction}
