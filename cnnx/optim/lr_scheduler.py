"""Learning-rate schedules with PyTorch's names, formulas and defaults (``torch.optim.lr_scheduler``).

A scheduler sets ``group["lr"]`` of each parameter group. Construction applies epoch 0 (the base rate);
each ``step()`` advances one epoch (or one batch for OneCycleLR). Rates use PyTorch's closed forms, with
``base_lr`` the group's ``initial_lr`` (its lr when the scheduler was built)::

    StepLR:            base_lr * gamma ** (epoch // step_size)
    ExponentialLR:     base_lr * gamma ** epoch
    CosineAnnealingLR: eta_min + (base_lr - eta_min) * (1 + cos(pi * epoch / T_max)) / 2
    OneCycleLR:        warm up from max_lr / div_factor to max_lr over pct_start of total_steps, then anneal to
                       max_lr / div_factor / final_div_factor (cosine or linear), cycling momentum inversely
"""
import math
import numbers

__all__ = ["LRScheduler", "StepLR", "ExponentialLR", "CosineAnnealingLR", "OneCycleLR"]


def _positive(value, name, fn, integer=False):
    kind = numbers.Integral if integer else numbers.Real
    if isinstance(value, bool) or not isinstance(value, kind):
        raise TypeError(f"{fn}: {name} must be {'an int' if integer else 'a number'}, got {value!r}")
    if value <= 0:
        raise ValueError(f"{fn}: {name} must be > 0, got {value!r}")
    return value


class LRScheduler:
    """Base class: keeps ``last_epoch``, ``base_lrs`` and writes ``get_lr()`` into the optimizer's groups."""

    _name = "LRScheduler"

    def __init__(self, optimizer, last_epoch=-1):
        if not hasattr(optimizer, "param_groups"):
            raise TypeError(f"{self._name}: optimizer must be a cnnx.optim optimizer, got {type(optimizer).__name__}")
        self.optimizer = optimizer
        if last_epoch == -1:
            for group in optimizer.param_groups:
                group.setdefault("initial_lr", group["lr"])
        else:
            for i, group in enumerate(optimizer.param_groups):
                if "initial_lr" not in group:
                    raise KeyError(f"{self._name}: param 'initial_lr' is not specified in param_groups[{i}] "
                                   f"when resuming an optimizer (last_epoch={last_epoch})")
        self.base_lrs = [group["initial_lr"] for group in optimizer.param_groups]
        self.last_epoch = last_epoch
        self.step()

    def get_lr(self):
        raise NotImplementedError

    def step(self):
        """Advance one epoch (OneCycleLR: one batch) and set each group's lr."""
        self.last_epoch += 1
        lrs = self.get_lr()
        for group, lr in zip(self.optimizer.param_groups, lrs):
            group["lr"] = lr
        self._last_lr = [group["lr"] for group in self.optimizer.param_groups]

    def get_last_lr(self):
        """The learning rates set by the last step(), one per parameter group."""
        return list(self._last_lr)

    def state_dict(self):
        """Everything but the optimizer (numbers and lists: JSON-able)."""
        return {k: v for k, v in self.__dict__.items() if k != "optimizer"}

    def load_state_dict(self, state_dict):
        self.__dict__.update(state_dict)


class StepLR(LRScheduler):
    """lr = base_lr * gamma ** (epoch // step_size)."""
    _name = "StepLR"

    def __init__(self, optimizer, step_size, gamma=0.1, last_epoch=-1):
        self.step_size = _positive(step_size, "step_size", self._name, integer=True)
        self.gamma = gamma
        super().__init__(optimizer, last_epoch)

    def get_lr(self):
        return [base * self.gamma ** (self.last_epoch // self.step_size) for base in self.base_lrs]


class ExponentialLR(LRScheduler):
    """lr = base_lr * gamma ** epoch."""
    _name = "ExponentialLR"

    def __init__(self, optimizer, gamma, last_epoch=-1):
        self.gamma = gamma
        super().__init__(optimizer, last_epoch)

    def get_lr(self):
        return [base * self.gamma ** self.last_epoch for base in self.base_lrs]


class CosineAnnealingLR(LRScheduler):
    """lr = eta_min + (base_lr - eta_min) * (1 + cos(pi * epoch / T_max)) / 2 (SGDR without restarts;
    past T_max the cosine continues, as PyTorch's closed form does)."""
    _name = "CosineAnnealingLR"

    def __init__(self, optimizer, T_max, eta_min=0.0, last_epoch=-1):
        self.T_max = _positive(T_max, "T_max", self._name)
        self.eta_min = eta_min
        super().__init__(optimizer, last_epoch)

    def get_lr(self):
        return [self.eta_min + (base - self.eta_min) * (1 + math.cos(math.pi * self.last_epoch / self.T_max)) / 2
                for base in self.base_lrs]


class OneCycleLR(LRScheduler):
    """The 1cycle policy (Smith & Topin 2018), as torch.optim.lr_scheduler.OneCycleLR; step() once per batch.

    total_steps, or epochs * steps_per_epoch, steps in all. Phase 1 (pct_start of the steps) goes from
    initial_lr = max_lr / div_factor up to max_lr, phase 2 down to min_lr = initial_lr / final_div_factor
    (three_phase=True: up, back down to initial_lr, then to min_lr). With cycle_momentum the optimizer's
    momentum (SGD, RMSprop) or beta1 (Adam) moves the opposite way between max_momentum and base_momentum.
    Stepping beyond total_steps raises ValueError.
    """
    _name = "OneCycleLR"

    def __init__(self, optimizer, max_lr, total_steps=None, epochs=None, steps_per_epoch=None, pct_start=0.3,
                 anneal_strategy="cos", cycle_momentum=True, base_momentum=0.85, max_momentum=0.95,
                 div_factor=25.0, final_div_factor=1e4, three_phase=False, last_epoch=-1):
        fn = self._name
        if not hasattr(optimizer, "param_groups"):
            raise TypeError(f"{fn}: optimizer must be a cnnx.optim optimizer, got {type(optimizer).__name__}")
        if total_steps is not None:
            self.total_steps = _positive(total_steps, "total_steps", fn, integer=True)
        elif epochs is not None and steps_per_epoch is not None:
            _positive(epochs, "epochs", fn, integer=True)
            _positive(steps_per_epoch, "steps_per_epoch", fn, integer=True)
            self.total_steps = epochs * steps_per_epoch
        else:
            raise ValueError(f"{fn}: you must define either total_steps OR (epochs AND steps_per_epoch)")
        if isinstance(pct_start, bool) or not isinstance(pct_start, numbers.Real) or not 0 <= pct_start <= 1:
            raise ValueError(f"{fn}: expected a float between 0 and 1 for pct_start, got {pct_start!r}")
        if anneal_strategy not in ("cos", "linear"):
            raise ValueError(f"{fn}: anneal_strategy must be one of 'cos' or 'linear', got {anneal_strategy!r}")
        self.anneal_strategy = anneal_strategy
        t = self.total_steps
        if three_phase:
            self._schedule_phases = [
                {"end_step": float(pct_start * t) - 1, "start_lr": "initial_lr", "end_lr": "max_lr",
                 "start_momentum": "max_momentum", "end_momentum": "base_momentum"},
                {"end_step": float(2 * pct_start * t) - 2, "start_lr": "max_lr", "end_lr": "initial_lr",
                 "start_momentum": "base_momentum", "end_momentum": "max_momentum"},
                {"end_step": t - 1, "start_lr": "initial_lr", "end_lr": "min_lr",
                 "start_momentum": "max_momentum", "end_momentum": "max_momentum"},
            ]
        else:
            self._schedule_phases = [
                {"end_step": float(pct_start * t) - 1, "start_lr": "initial_lr", "end_lr": "max_lr",
                 "start_momentum": "max_momentum", "end_momentum": "base_momentum"},
                {"end_step": t - 1, "start_lr": "max_lr", "end_lr": "min_lr",
                 "start_momentum": "base_momentum", "end_momentum": "max_momentum"},
            ]
        groups = optimizer.param_groups
        max_lrs = self._per_group(max_lr, "max_lr", len(groups))
        if last_epoch == -1:
            for lr, group in zip(max_lrs, groups):
                group["initial_lr"] = lr / div_factor
                group["max_lr"] = lr
                group["min_lr"] = group["initial_lr"] / final_div_factor
        self.cycle_momentum = bool(cycle_momentum)
        if self.cycle_momentum:
            defaults = optimizer.defaults
            if "momentum" not in defaults and "betas" not in defaults:
                raise ValueError(f"{fn}: optimizer must support momentum or beta1 with cycle_momentum enabled")
            self.use_beta1 = "betas" in defaults
            max_moms = self._per_group(max_momentum, "max_momentum", len(groups))
            base_moms = self._per_group(base_momentum, "base_momentum", len(groups))
            if last_epoch == -1:
                for m_mom, b_mom, group in zip(max_moms, base_moms, groups):
                    if self.use_beta1:
                        group["betas"] = (m_mom, *tuple(group["betas"])[1:])
                    else:
                        group["momentum"] = m_mom
                    group["max_momentum"] = m_mom
                    group["base_momentum"] = b_mom
        super().__init__(optimizer, last_epoch)

    def _per_group(self, value, name, n):
        if isinstance(value, (list, tuple)):
            if len(value) != n:
                raise ValueError(f"{self._name}: expected {n} values for {name}, got {len(value)}")
            return list(value)
        return [value] * n

    def _anneal(self, start, end, pct):
        if self.anneal_strategy == "cos":
            return end + (start - end) / 2.0 * (math.cos(math.pi * pct) + 1)
        return (end - start) * pct + start

    def get_lr(self):
        step_num = self.last_epoch
        if step_num > self.total_steps:
            raise ValueError(f"{self._name}: tried to step {step_num} times; the specified number of total steps "
                             f"is {self.total_steps}")
        lrs = []
        for group in self.optimizer.param_groups:
            start_step = 0.0
            computed_lr = computed_momentum = None
            for i, phase in enumerate(self._schedule_phases):
                end_step = phase["end_step"]
                if step_num <= end_step or i == len(self._schedule_phases) - 1:
                    pct = (step_num - start_step) / (end_step - start_step)
                    computed_lr = self._anneal(group[phase["start_lr"]], group[phase["end_lr"]], pct)
                    if self.cycle_momentum:
                        computed_momentum = self._anneal(group[phase["start_momentum"]],
                                                         group[phase["end_momentum"]], pct)
                    break
                start_step = phase["end_step"]
            lrs.append(computed_lr)
            if self.cycle_momentum:
                if self.use_beta1:
                    group["betas"] = (computed_momentum, *tuple(group["betas"])[1:])
                else:
                    group["momentum"] = computed_momentum
        return lrs
