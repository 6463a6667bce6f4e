"""Optimizers with PyTorch's names, defaults and update formulas: SGD, Adam, AdamW, RMSprop.

``params`` is an iterable of :class:`cnnx.nn.Parameter` or a list of parameter groups (dicts with a
``"params"`` entry and per-group hyperparameters overriding the defaults), as in ``torch.optim``.
``step()`` updates ``param.data`` in place from ``param.grad``; parameters with ``grad is None`` or
``requires_grad=False`` are skipped. Each parameter gets one or two scratch buffers on its first step, so
later steps do not allocate arrays of the parameter's size.

On the C backend, SGD and Adam/AdamW steps after the first, and zero_grad, handle a whole parameter group in
one call into cnnx._kernels (the per-parameter Python work is what a small model's step costs); a group with
anything unusual (a strided or odd-dtype array, state not created yet) takes the per-parameter path, which
gives the same numbers bit for bit.
"""
import math
import numbers

import numpy as np

from .. import _backend, reference
from ..nn.module import Parameter
from . import lr_scheduler

__all__ = ["Optimizer", "SGD", "Adam", "AdamW", "RMSprop", "lr_scheduler"]


def _group_kernels():
    """The compiled kernels when they are the active backend (whole-group steps in one call, which refuse what
    they cannot take), else None: the per-parameter path."""
    if _backend.get_backend() != "c":
        return None
    try:
        return _backend.ops()
    except ImportError:
        return None


def _check_real(value, name, fn, minimum=0.0, below=None):
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{fn}: {name} must be a real number, got {type(value).__name__} {value!r}")
    if not value >= minimum or (below is not None and not value < below):        # NaN fails both
        rng = f"in [{minimum}, {below})" if below is not None else f">= {minimum}"
        raise ValueError(f"{fn}: invalid {name} value {value!r}: must be {rng}")
    return value


class Optimizer:
    """Base class: parameter groups, per-parameter state, zero_grad, state_dict/load_state_dict."""

    _name = "Optimizer"

    def __init__(self, params, defaults):
        if isinstance(params, Parameter):
            raise TypeError(f"{self._name}: params must be an iterable of Parameters or of dicts, "
                            f"got a single Parameter (wrap it in a list)")
        if isinstance(params, dict):
            raise TypeError(f"{self._name}: params must be an iterable of Parameters or of dicts, got a dict "
                            f"(wrap it in a list)")
        self.defaults = dict(defaults)
        self.state = {}                 # Parameter -> dict of state (arrays and a step count)
        self._scratch = {}              # Parameter -> (tmp, tmp2) work buffers, never saved
        self.param_groups = []
        groups = list(params)
        if not groups:
            raise ValueError(f"{self._name}: got an empty parameter list")
        if not isinstance(groups[0], dict):
            groups = [{"params": groups}]
        for group in groups:
            self.add_param_group(group)

    def add_param_group(self, param_group):
        """Add a group: a dict with "params" and optional hyperparameters (defaults fill the rest)."""
        if not isinstance(param_group, dict):
            raise TypeError(f"{self._name}: a parameter group must be a dict, got {type(param_group).__name__}")
        group = dict(param_group)
        if "params" not in group:
            raise ValueError(f"{self._name}: a parameter group needs a 'params' entry")
        params = group["params"]
        params = [params] if isinstance(params, Parameter) else list(params)
        for i, p in enumerate(params):
            if not isinstance(p, Parameter):
                raise TypeError(f"{self._name}: params must be cnnx.nn.Parameter objects, element {i} is "
                                f"{type(p).__name__}")
        if len({id(p) for p in params}) != len(params):
            raise ValueError(f"{self._name}: a parameter group contains a parameter more than once")
        existing = {id(p) for g in self.param_groups for p in g["params"]}
        if any(id(p) in existing for p in params):
            raise ValueError(f"{self._name}: some parameters appear in more than one parameter group")
        unknown = set(group) - set(self.defaults) - {"params", "initial_lr", "max_lr", "min_lr",
                                                     "max_momentum", "base_momentum"}
        if unknown:
            raise ValueError(f"{self._name}: unknown hyperparameter(s) {sorted(unknown)} in a parameter group; "
                             f"expected some of {sorted(self.defaults)}")
        for key, value in self.defaults.items():
            group.setdefault(key, value)
        self._validate(group)
        group["params"] = params
        self.param_groups.append(group)

    def _validate(self, group):
        pass

    def zero_grad(self, set_to_none=False):
        """Zero every parameter's grad in place (set_to_none=True sets it to None instead; cnnx's default
        keeps the buffers so the next backward does not allocate)."""
        kernels = None if set_to_none else _group_kernels()
        for group in self.param_groups:
            if kernels is not None:
                kernels.zero_grads(group["params"])
                continue
            for p in group["params"]:
                if set_to_none:
                    p.grad = None
                elif p.grad is not None:
                    p.grad.fill(0)

    def _params_to_update(self, group):
        for p in group["params"]:
            if p.grad is not None and p.requires_grad:
                if p.grad.shape != p.data.shape:
                    raise ValueError(f"{self._name}.step: a parameter of shape {p.data.shape} has a grad of shape "
                                     f"{p.grad.shape}")
                yield p

    def _buffers(self, p):
        bufs = self._scratch.get(p)
        if bufs is None or bufs[0].dtype != p.data.dtype or bufs[0].shape != p.data.shape:
            bufs = self._scratch[p] = (np.empty_like(p.data), np.empty_like(p.data))
        return bufs

    @staticmethod
    def _decayed_grad(p, weight_decay, tmp):
        """grad + weight_decay * param, written into tmp (grad itself when weight_decay is 0)."""
        if not weight_decay:
            return p.grad
        np.multiply(p.data, weight_decay, out=tmp)
        tmp += p.grad
        return tmp

    def _state(self, p):
        st = self.state.get(p)
        if st is None:
            st = self.state[p] = {}
        return st

    def step(self):
        raise NotImplementedError

    # -- persistence -------------------------------------------------------------------------------
    def state_dict(self):
        """{"state": {index: {name: array copy or number}}, "param_groups": [{hyper..., "params": [index...]}]}.

        Parameters are numbered in group order, as in PyTorch, so the state can be loaded into an optimizer
        built the same way on another copy of the model.
        """
        index = {}
        groups = []
        for group in self.param_groups:
            packed = {k: (list(v) if isinstance(v, tuple) else v) for k, v in group.items() if k != "params"}
            ids = []
            for p in group["params"]:
                index.setdefault(id(p), len(index))
                ids.append(index[id(p)])
            packed["params"] = ids
            groups.append(packed)
        state = {}
        for group in self.param_groups:
            for p in group["params"]:
                if p in self.state:
                    state[index[id(p)]] = {k: (v.copy() if isinstance(v, np.ndarray) else v)
                                           for k, v in self.state[p].items()}
        return {"state": state, "param_groups": groups}

    def load_state_dict(self, state_dict):
        """Restore hyperparameters and state saved by state_dict(); arrays are copied and cast to the
        parameters' dtype. Group count, group sizes and state shapes must match."""
        try:
            saved_groups = state_dict["param_groups"]
            saved_state = state_dict["state"]
        except (TypeError, KeyError):
            raise ValueError(f"{self._name}.load_state_dict: expected a dict with 'state' and 'param_groups' "
                             f"(from Optimizer.state_dict()), got {type(state_dict).__name__}") from None
        if len(saved_groups) != len(self.param_groups):
            raise ValueError(f"{self._name}.load_state_dict: loaded state has {len(saved_groups)} parameter "
                             f"groups, this optimizer has {len(self.param_groups)}")
        params = {}
        for group, saved in zip(self.param_groups, saved_groups):
            if len(saved["params"]) != len(group["params"]):
                raise ValueError(f"{self._name}.load_state_dict: a loaded parameter group has "
                                 f"{len(saved['params'])} parameters, this optimizer's has {len(group['params'])}")
            for idx, p in zip(saved["params"], group["params"]):
                params[int(idx)] = p
        new_state = {}
        for idx, st in saved_state.items():
            p = params.get(int(idx))
            if p is None:
                raise ValueError(f"{self._name}.load_state_dict: state for parameter {idx}, which is in no group")
            restored = {}
            for key, value in st.items():
                if isinstance(value, np.ndarray) and value.ndim > 0:
                    if value.shape != p.data.shape:
                        raise ValueError(f"{self._name}.load_state_dict: state {key!r} of parameter {idx} has "
                                         f"shape {value.shape}, the parameter has {p.data.shape}")
                    restored[key] = value.astype(p.data.dtype, copy=True)
                elif isinstance(value, np.ndarray):
                    restored[key] = value.item()
                else:
                    restored[key] = value
            new_state[p] = restored
        for group, saved in zip(self.param_groups, saved_groups):
            for key, value in saved.items():
                if key != "params":
                    group[key] = tuple(value) if isinstance(group.get(key), tuple) or key == "betas" else value
        self.state = new_state

    def __repr__(self):
        lines = [f"{type(self).__name__} ("]
        for i, group in enumerate(self.param_groups):
            lines.append(f"Parameter Group {i}")
            for key in sorted(group):
                if key != "params":
                    lines.append(f"    {key}: {group[key]}")
        lines.append(")")
        return "\n".join(lines)


def _update_ops(p, *state):
    """The kernels for one parameter's update: the active backend's (one fused pass in C), or the numpy
    reference when an array is not a C-contiguous ndarray of the parameter's dtype (the C kernel's terms)."""
    for a in (p.data, p.grad) + state:
        if a is not None and (type(a) is not np.ndarray or a.dtype != p.data.dtype or not a.flags.c_contiguous
                              or not a.flags.aligned or not a.flags.writeable and a is not p.grad):
            return reference
    return _backend.ops()


class SGD(Optimizer):
    """Stochastic gradient descent with momentum, dampening, Nesterov and L2 weight decay (torch.optim.SGD):

        g = grad + weight_decay * p
        b = g (first step), else b = momentum * b + (1 - dampening) * g
        g = g + momentum * b if nesterov else b                      (when momentum != 0)
        p = p - lr * g
    """
    _name = "SGD"

    def __init__(self, params, lr=1e-3, momentum=0, dampening=0, weight_decay=0, nesterov=False):
        super().__init__(params, dict(lr=lr, momentum=momentum, dampening=dampening,
                                      weight_decay=weight_decay, nesterov=nesterov))

    def _validate(self, group):
        fn = self._name
        _check_real(group["lr"], "learning rate", fn)
        _check_real(group["momentum"], "momentum", fn)
        _check_real(group["dampening"], "dampening", fn, minimum=-math.inf)
        _check_real(group["weight_decay"], "weight_decay", fn)
        if group["nesterov"] and (group["momentum"] <= 0 or group["dampening"] != 0):
            raise ValueError(f"{fn}: Nesterov momentum requires a momentum and zero dampening, got "
                             f"momentum={group['momentum']}, dampening={group['dampening']}")

    def step(self):
        kernels = _group_kernels()
        for group in self.param_groups:
            lr, momentum, dampening = group["lr"], group["momentum"], group["dampening"]
            wd, nesterov = group["weight_decay"], group["nesterov"]
            if kernels is not None and kernels.sgd_step(group["params"], self.state, lr, momentum, dampening, wd,
                                                        nesterov):
                continue
            for p in self._params_to_update(group):
                buf, first = None, False
                if momentum != 0:
                    st = self._state(p)
                    buf = st.get("momentum_buffer")
                    if buf is None:
                        buf = st["momentum_buffer"] = np.empty_like(p.data)
                        first = True
                _update_ops(p, buf).sgd_update(p.data, p.grad, buf, lr, momentum, dampening, wd, nesterov,
                                               first)


class Adam(Optimizer):
    """Adam (Kingma & Ba 2015) with bias correction, as torch.optim.Adam:

        g = grad + weight_decay * p                     (L2 penalty; see AdamW for decoupled decay)
        m = beta1 * m + (1 - beta1) * g;   v = beta2 * v + (1 - beta2) * g * g
        v_max = max(v_max, v) if amsgrad
        p = p - lr / (1 - beta1**t) * m / (sqrt(v or v_max) / sqrt(1 - beta2**t) + eps)
    """
    _name = "Adam"
    _decoupled = False

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0, amsgrad=False):
        super().__init__(params, dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay,
                                      amsgrad=amsgrad))

    def _validate(self, group):
        fn = self._name
        _check_real(group["lr"], "learning rate", fn)
        _check_real(group["eps"], "epsilon", fn)
        _check_real(group["weight_decay"], "weight_decay", fn)
        betas = tuple(group["betas"])
        if len(betas) != 2:
            raise ValueError(f"{fn}: betas must be a pair (beta1, beta2), got {group['betas']!r}")
        _check_real(betas[0], "beta parameter at index 0", fn, 0.0, 1.0)
        _check_real(betas[1], "beta parameter at index 1", fn, 0.0, 1.0)
        group["betas"] = betas

    def step(self):
        kernels = _group_kernels()
        for group in self.param_groups:
            lr, (beta1, beta2), eps = group["lr"], group["betas"], group["eps"]
            wd, amsgrad = group["weight_decay"], group["amsgrad"]
            if kernels is not None and kernels.adam_step(group["params"], self.state, lr, beta1, beta2, eps, wd,
                                                         self._decoupled, amsgrad):
                continue
            for p in self._params_to_update(group):
                st = self._state(p)
                if "step" not in st:
                    st["step"] = 0
                    st["exp_avg"] = np.zeros_like(p.data)
                    st["exp_avg_sq"] = np.zeros_like(p.data)
                    if amsgrad:
                        st["max_exp_avg_sq"] = np.zeros_like(p.data)
                st["step"] += 1
                vmax = None
                if amsgrad:
                    vmax = st.get("max_exp_avg_sq")
                    if vmax is None:
                        vmax = st["max_exp_avg_sq"] = np.zeros_like(p.data)
                m, v = st["exp_avg"], st["exp_avg_sq"]
                _update_ops(p, m, v, vmax).adam_update(p.data, p.grad, m, v, vmax, lr, beta1, beta2, eps, wd,
                                                       self._decoupled, st["step"])


class AdamW(Adam):
    """Adam with decoupled weight decay (Loshchilov & Hutter 2019), as torch.optim.AdamW:
    p = p * (1 - lr * weight_decay), then the Adam update without an L2 term."""
    _name = "AdamW"
    _decoupled = True

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2, amsgrad=False):
        super().__init__(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, amsgrad=amsgrad)


class RMSprop(Optimizer):
    """RMSprop (Hinton's lecture 6e), as torch.optim.RMSprop:

        g = grad + weight_decay * p
        s = alpha * s + (1 - alpha) * g * g
        a = sqrt(s - gbar**2) with gbar = alpha * gbar + (1 - alpha) * g if centered, else sqrt(s);  a += eps
        b = momentum * b + g / a;  p -= lr * b     (momentum > 0)   or   p -= lr * g / a
    """
    _name = "RMSprop"

    def __init__(self, params, lr=1e-2, alpha=0.99, eps=1e-8, weight_decay=0, momentum=0, centered=False):
        super().__init__(params, dict(lr=lr, alpha=alpha, eps=eps, weight_decay=weight_decay,
                                      momentum=momentum, centered=centered))

    def _validate(self, group):
        fn = self._name
        _check_real(group["lr"], "learning rate", fn)
        _check_real(group["eps"], "epsilon", fn)
        _check_real(group["momentum"], "momentum", fn)
        _check_real(group["weight_decay"], "weight_decay", fn)
        _check_real(group["alpha"], "alpha", fn)

    def step(self):
        for group in self.param_groups:
            lr, alpha, eps = group["lr"], group["alpha"], group["eps"]
            wd, momentum, centered = group["weight_decay"], group["momentum"], group["centered"]
            for p in self._params_to_update(group):
                tmp, tmp2 = self._buffers(p)
                st = self._state(p)
                if "step" not in st:
                    st["step"] = 0
                    st["square_avg"] = np.zeros_like(p.data)
                    if momentum > 0:
                        st["momentum_buffer"] = np.zeros_like(p.data)
                    if centered:
                        st["grad_avg"] = np.zeros_like(p.data)
                st["step"] += 1
                g = self._decayed_grad(p, wd, tmp)
                sq = st["square_avg"]
                sq *= alpha
                np.multiply(g, g, out=tmp2)
                tmp2 *= 1 - alpha
                sq += tmp2
                if centered:
                    ga = st.setdefault("grad_avg", np.zeros_like(p.data))
                    ga *= alpha
                    np.multiply(g, 1 - alpha, out=tmp2)
                    ga += tmp2
                    np.multiply(ga, ga, out=tmp2)
                    np.subtract(sq, tmp2, out=tmp2)
                    np.sqrt(tmp2, out=tmp2)
                else:
                    np.sqrt(sq, out=tmp2)
                tmp2 += eps
                np.divide(g, tmp2, out=tmp2)
                if momentum > 0:
                    buf = st.setdefault("momentum_buffer", np.zeros_like(p.data))
                    buf *= momentum
                    buf += tmp2
                    np.multiply(buf, lr, out=tmp2)
                else:
                    tmp2 *= lr
                p.data -= tmp2
