"""Training loop, evaluation and metrics for classifiers built from cnnx layers.

    history = fit(model, nn.CrossEntropyLoss(), optimizer, train_loader, test_loader, epochs=10,
                  scheduler=scheduler, checkpoint="best.npz")

The loop is the explicit one of the library: ``optimizer.zero_grad()``, ``logits = model.forward(x)``,
``loss = loss_fn.forward(logits, y)``, ``model.backward(loss_fn.backward())``, ``optimizer.step()``.
:func:`evaluate` only runs ``forward`` in eval mode (dropout off, batch-norm running statistics used and
left alone), so it never changes a weight.
"""
import math
import numbers
import sys
import time

import numpy as np

from .nn import Sequential

__all__ = ["fit", "evaluate", "confusion_matrix", "format_confusion_matrix", "accuracy"]


# ------------------------------------------------------------------------------------------ progress
class _Progress:
    """A progress bar on stderr: tqdm when installed, else a one-line fallback; silent when disabled."""

    def __init__(self, total, desc, enabled):
        self.total, self.desc, self.enabled = total, desc, enabled
        self.count, self.postfix, self._bar = 0, "", None
        self._start = self._last = time.perf_counter()
        if not enabled:
            return
        try:
            from tqdm.auto import tqdm
        except ImportError:
            tqdm = None
        if tqdm is not None:
            self._bar = tqdm(total=total, desc=desc, leave=False, file=sys.stderr, dynamic_ncols=True)

    def update(self, n, **stats):
        if not self.enabled:
            return
        self.count += n
        postfix = " ".join(f"{k} {v:.4f}" for k, v in stats.items())
        if self._bar is not None:
            self._bar.set_postfix_str(postfix, refresh=False)
            self._bar.update(n)
            return
        now = time.perf_counter()
        if now - self._last < 0.2 and self.count < self.total:
            return
        self._last = now
        width = 24
        filled = width * self.count // max(self.total, 1)
        rate = self.count / max(now - self._start, 1e-9)
        sys.stderr.write(f"\r{self.desc} [{'#' * filled}{'.' * (width - filled)}] {self.count}/{self.total} "
                         f"{postfix} {rate:.1f} it/s ")
        sys.stderr.flush()

    def close(self):
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.close()
        else:
            sys.stderr.write("\r\033[K")
            sys.stderr.flush()


def _progress_enabled(progress):
    if not progress:
        return False
    try:
        return sys.stderr.isatty()
    except (AttributeError, ValueError):
        return False


# ------------------------------------------------------------------------------------------- metrics
def _labels(y, name):
    y = np.asarray(y)
    if y.ndim != 1:
        raise ValueError(f"confusion_matrix: {name} must be 1-D class indices, got shape {y.shape}")
    if y.size and not np.issubdtype(y.dtype, np.integer):
        raise TypeError(f"confusion_matrix: {name} must hold integer class indices, got {y.dtype}")
    return y.astype(np.int64, copy=False)


def confusion_matrix(y_true, y_pred, num_classes=None):
    """Counts ``cm[i, j]`` of samples of true class i predicted as class j: (num_classes, num_classes) int64.

    Rows are true classes, columns predictions (scikit-learn's convention); the diagonal holds the correct
    ones. ``num_classes`` defaults to ``max(y_true.max(), y_pred.max()) + 1``.
    """
    y_true, y_pred = _labels(y_true, "y_true"), _labels(y_pred, "y_pred")
    if y_true.shape != y_pred.shape:
        raise ValueError(f"confusion_matrix: y_true and y_pred must have the same length, "
                         f"got {y_true.shape[0]} and {y_pred.shape[0]}")
    if num_classes is None:
        num_classes = int(max(y_true.max(initial=-1), y_pred.max(initial=-1))) + 1
    elif not isinstance(num_classes, numbers.Integral) or isinstance(num_classes, bool) or num_classes < 1:
        raise ValueError(f"confusion_matrix: num_classes must be an int >= 1, got {num_classes!r}")
    for name, y in (("y_true", y_true), ("y_pred", y_pred)):
        if y.size and (y.min() < 0 or y.max() >= num_classes):
            raise ValueError(f"confusion_matrix: {name} has values in [{y.min()}, {y.max()}], "
                             f"expected 0..{num_classes - 1}")
    flat = np.bincount(y_true * num_classes + y_pred, minlength=num_classes * num_classes)
    return flat.reshape(num_classes, num_classes).astype(np.int64)


def format_confusion_matrix(cm, class_names=None):
    """The matrix as aligned text: one row per true class, one column per predicted class."""
    cm = np.asarray(cm)
    k = cm.shape[0]
    names = [str(c) for c in (class_names if class_names is not None else range(k))]
    names = [n if len(n) <= 10 else n[:9] + "." for n in names]
    width = max(max(len(str(int(v))) for v in cm.ravel()) if cm.size else 1, max(len(n) for n in names))
    corner = "true \\ pred"
    label = max(len(corner), max(len(n) for n in names))
    lines = [f"{corner:>{label}} " + " ".join(f"{n:>{width}}" for n in names)]
    for name, row in zip(names, cm):
        lines.append(f"{name:>{label}} " + " ".join(f"{int(v):>{width}}" for v in row))
    return "\n".join(lines)


def accuracy(logits, y):
    """Fraction of rows whose argmax equals the target."""
    return float(np.mean(np.argmax(logits, axis=1) == np.asarray(y))) if len(y) else float("nan")


# ------------------------------------------------------------------------------------------- helpers
def _set_mode(model, training):
    if training:
        model.train()
    else:
        model.eval()


def _batch_xy(batch, fn):
    if not isinstance(batch, (tuple, list)) or len(batch) < 2:
        raise TypeError(f"{fn}: the loader must yield (inputs, targets) pairs, got {type(batch).__name__}")
    return batch[0], np.asarray(batch[1])


def _per_sample(loss_value, loss_fn, n):
    """The mean loss of a batch, whatever the loss's reduction ("mean" or "sum")."""
    return loss_value / n if getattr(loss_fn, "reduction", "mean") == "sum" else loss_value


def _current_lr(optimizer):
    groups = getattr(optimizer, "param_groups", None)
    if groups:
        return float(groups[0]["lr"])
    lr = getattr(optimizer, "lr", None)
    return float(lr) if lr is not None else None


def evaluate(model, loader, loss_fn=None, return_predictions=False):
    """Run ``model`` over ``loader`` in eval mode and measure it; never updates a weight.

    Returns a dict: ``accuracy``, ``loss`` (mean per sample, None without ``loss_fn``), ``num_samples``,
    and with ``return_predictions=True`` also ``y_true`` and ``y_pred`` (int64 arrays). The model's
    train/eval mode is restored afterwards.
    """
    total_loss, correct, seen, trues, preds = _evaluate_sums(model, loader, loss_fn, return_predictions)
    if seen == 0:
        raise ValueError("evaluate: the loader yielded no samples")
    result = {"accuracy": correct / seen, "loss": total_loss / seen if loss_fn is not None else None,
              "num_samples": seen}
    if return_predictions:
        result["y_true"] = np.concatenate(trues)
        result["y_pred"] = np.concatenate(preds)
    return result


def _evaluate_sums(model, loader, loss_fn, return_predictions=False):
    """(loss sum, correct, seen, true labels, predictions) of ``model`` over ``loader`` in eval mode."""
    was_training = getattr(model, "training", True)
    _set_mode(model, False)
    total_loss, correct, seen = 0.0, 0, 0
    trues, preds = [], []
    try:
        for batch in loader:
            x, y = _batch_xy(batch, "evaluate")
            n = len(y)
            if n == 0:  # a rank's empty part of a small last batch
                continue
            logits = model.forward(x)
            pred = np.argmax(logits, axis=1)
            if loss_fn is not None:
                total_loss += _per_sample(float(loss_fn.forward(logits, y)), loss_fn, n) * n
            correct += int(np.sum(pred == y))
            seen += n
            if return_predictions:
                trues.append(y.astype(np.int64, copy=False))
                preds.append(pred.astype(np.int64, copy=False))
    finally:
        _set_mode(model, was_training)
    return total_loss, correct, seen, trues, preds


# ------------------------------------------------------------------------------------ data parallelism
class _Distributed:
    """What fit(distributed=True) adds to the loop: sharded loaders, the gradient reducer, reduced metrics.

    In a job of one (no mpirun) the loaders are used as they are and nothing is exchanged, so the run is the
    plain single-process one.
    """

    def __init__(self, model, train_loader, test_loader):
        from . import distributed
        from .data import DataLoader
        self.dist = distributed
        self.rank, self.world_size = distributed.init()
        for name, loader in (("train_loader", train_loader), ("test_loader", test_loader)):
            if loader is not None and not isinstance(loader, DataLoader):
                # every rank must run the same number of steps, or one waits forever in a collective:
                # only a DataLoader knows how to split its batches evenly over the ranks
                raise TypeError(f"fit: with distributed=True, {name} must be a cnnx.data.DataLoader (fit "
                                f"gives each rank its part of every batch), got {type(loader).__name__}")
        self.train_loader = self._shard(train_loader, "train_loader")
        self.test_loader = None
        if test_loader is not None:
            if test_loader.num_replicas == 1 and self.world_size > 1:
                # the metrics depend on neither order nor batching: every sample once, in order, in a batch
                # rounded up to a multiple of the ranks (no generator needed to agree on an order)
                batch = -(-test_loader.batch_size // self.world_size) * self.world_size
                test_loader = DataLoader(test_loader.dataset if not test_loader._single
                                         else test_loader.dataset.arrays[0], batch_size=batch,
                                         transform=test_loader.transform,
                                         target_transform=test_loader.target_transform)
            self.test_loader = self._shard(test_loader, "test_loader")
        distributed.broadcast_parameters(model)
        self.reducer = distributed.GradientReducer(model)
        if self.world_size > 1:
            self._fork_default_generator()

    def _shard(self, loader, name):
        if loader.num_replicas == 1:
            return loader.shard(self.rank, self.world_size) if self.world_size > 1 else loader
        if (loader.num_replicas, loader.rank) != (self.world_size, self.rank):
            raise ValueError(f"fit: {name} is rank {loader.rank}'s shard of {loader.num_replicas}, but this is "
                             f"rank {self.rank} of {self.world_size}")
        return loader

    def _fork_default_generator(self):
        """Give each rank its own stream of the default generator (dropout, random augmentation): with one stream
        every rank would draw the same masks and shifts for different samples. One draw from the common stream
        seeds them, so the run stays reproducible from cnnx.manual_seed."""
        from . import _random
        seed = int(_random.default_generator().integers(2 ** 63))
        _random._state["generator"] = np.random.default_rng([seed, self.rank])

    def reduce_gradients(self, loss_fn, n):
        if getattr(loss_fn, "reduction", "mean") == "sum":
            self.reducer.reduce(average=False)
        else:
            self.reducer.reduce(num_samples=n)

    def sums(self, *values):
        return self.dist.allreduce_sum(values) if self.world_size > 1 else np.array(values, dtype=np.float64)

    def evaluate(self, model, loss_fn):
        if self.world_size > 1:
            self.dist.broadcast_buffers(model)  # rank 0's running statistics, as DistributedDataParallel
        total_loss, correct, seen, _, _ = _evaluate_sums(model, self.test_loader, loss_fn)
        total_loss, correct, seen = self.sums(total_loss, correct, seen)
        if seen == 0:
            raise ValueError("fit: the test loader yielded no samples")
        return {"accuracy": correct / seen, "loss": total_loss / seen}


def _scheduler_per_batch(scheduler, interval):
    if interval is None:
        return type(scheduler).__name__ in ("OneCycleLR", "CyclicLR")
    if interval not in ("epoch", "batch"):
        raise ValueError(f"fit: scheduler_interval must be 'epoch', 'batch' or None, got {interval!r}")
    return interval == "batch"


def fit(model, loss_fn, optimizer, train_loader, test_loader=None, epochs=1, scheduler=None,
        checkpoint=None, progress=True, callbacks=(), scheduler_interval=None, distributed=False):
    """Train ``model`` for ``epochs`` passes over ``train_loader``; return the per-epoch history.

    Args:
        model: a cnnx Module (``forward``, ``backward``, ``train``, ``eval``); updated in place.
        loss_fn: e.g. ``cnnx.nn.CrossEntropyLoss()``: ``forward(logits, y)`` -> loss, ``backward()`` -> dlogits.
        optimizer: a ``cnnx.optim`` optimizer over ``model.parameters()``.
        train_loader / test_loader: iterables of (inputs, int targets) batches, e.g. ``cnnx.data.DataLoader``.
        epochs: number of epochs (int >= 1).
        scheduler: a ``cnnx.optim.lr_scheduler`` scheduler, stepped once per epoch, or once per batch for
            ``OneCycleLR`` (override with ``scheduler_interval="epoch"|"batch"``).
        checkpoint: path; the model is saved there with ``cnnx.save`` whenever the test accuracy improves
            (after every epoch when there is no test loader).
        progress: show a progress bar on stderr (tqdm if installed), only when stderr is a terminal.
        callbacks: callables ``cb(record)`` run after each epoch with that epoch's record; a callback
            returning True stops training after that epoch.
        distributed: data-parallel training over MPI (``cnnx.distributed``; run under ``mpirun -n K``). The
            loaders must be ``cnnx.data.DataLoader``s, given as for one process: each rank gets its part of
            every global batch (``batch_size`` is the global batch, a multiple of K), the gradients are
            averaged over the global batch after each backward (one Allreduce), the metrics are summed over
            the ranks, the test set is split between them. The model starts from rank 0's weights; only
            rank 0 shows progress and writes the checkpoint; callbacks run on every rank with the same record.
            With the same seed and global batch the weights equal the single-process ones up to rounding (not
            with dropout or random augmentation, whose draws differ per rank, nor with BatchNorm, which
            normalises each rank's part with its own statistics). An exception on any rank during training
            prints its traceback and ends the whole job (MPI_Abort), since the others cannot go on without it.

    Returns a list with one dict per epoch: ``epoch``, ``train_loss``, ``train_accuracy``, ``test_loss``,
    ``test_accuracy`` (None without a test loader), ``seconds`` (wall time of the epoch, evaluation
    included), ``lr`` (the learning rate at the start of the epoch) and ``checkpoint_saved``.
    """
    if not isinstance(epochs, numbers.Integral) or isinstance(epochs, bool) or epochs < 1:
        raise ValueError(f"fit: epochs must be an int >= 1, got {epochs!r}")
    callbacks = [callbacks] if callable(callbacks) else list(callbacks or ())
    for cb in callbacks:
        if not callable(cb):
            raise TypeError(f"fit: callbacks must be callables, got {type(cb).__name__}")
    per_batch = scheduler is not None and _scheduler_per_batch(scheduler, scheduler_interval)
    if distributed:
        from .distributed import abort_on_error
        with abort_on_error("fit"):  # a rank that stops here would leave the others waiting in a collective
            parallel = _Distributed(model, train_loader, test_loader)
            return _fit_epochs(model, loss_fn, optimizer, parallel.train_loader, parallel.test_loader, epochs,
                               scheduler, per_batch, checkpoint, progress and parallel.rank == 0, callbacks,
                               parallel)
    return _fit_epochs(model, loss_fn, optimizer, train_loader, test_loader, epochs, scheduler, per_batch,
                       checkpoint, progress, callbacks, None)


def _fit_epochs(model, loss_fn, optimizer, train_loader, test_loader, epochs, scheduler, per_batch, checkpoint,
                progress, callbacks, parallel):
    show = _progress_enabled(progress)
    writer = parallel is None or parallel.rank == 0
    history, best = [], -math.inf
    for epoch in range(1, int(epochs) + 1):
        start = time.perf_counter()
        lr = _current_lr(optimizer)
        _set_mode(model, True)
        total_loss, correct, seen = 0.0, 0, 0
        try:
            total = len(train_loader)
        except TypeError:
            total = 0
        bar = _Progress(total, f"epoch {epoch}/{epochs}", show)
        skip_input_grad = isinstance(model, Sequential)
        try:
            for step, batch in enumerate(train_loader, 1):
                x, y = _batch_xy(batch, "fit")
                n = len(y)
                optimizer.zero_grad()
                if n or parallel is None:  # a rank's part of a last batch smaller than K may be empty
                    logits = model.forward(x)
                    loss = float(loss_fn.forward(logits, y))
                    if not math.isfinite(loss):
                        raise FloatingPointError(
                            f"fit: the training loss became {loss} at epoch {epoch}, batch {step}; "
                            f"lower the learning rate (lr={lr})")
                    if skip_input_grad:  # nothing needs d(loss)/d(images): spare the first layer's dx
                        model.backward(loss_fn.backward(), input_grad=False)
                    else:
                        model.backward(loss_fn.backward())
                    total_loss += _per_sample(loss, loss_fn, n) * n
                    correct += int(np.sum(np.argmax(logits, axis=1) == y))
                    seen += n
                if parallel is not None:
                    parallel.reduce_gradients(loss_fn, n)
                optimizer.step()
                if per_batch:
                    scheduler.step()
                bar.update(1, loss=total_loss / max(seen, 1), acc=correct / max(seen, 1))
        finally:
            bar.close()
        if parallel is not None:
            total_loss, correct, seen = parallel.sums(total_loss, correct, seen)
        if seen == 0:
            raise ValueError("fit: the training loader yielded no samples")
        record = {"epoch": epoch, "train_loss": total_loss / seen, "train_accuracy": correct / seen,
                  "test_loss": None, "test_accuracy": None}
        if test_loader is not None:
            result = evaluate(model, test_loader, loss_fn) if parallel is None else parallel.evaluate(model, loss_fn)
            record["test_loss"], record["test_accuracy"] = result["loss"], result["accuracy"]
        if scheduler is not None and not per_batch:
            scheduler.step()
        saved = False
        if checkpoint is not None:
            score = record["test_accuracy"] if record["test_accuracy"] is not None else math.inf
            if score > best or test_loader is None:
                if writer:  # one writer: rank 0 (every rank holds the same weights)
                    from . import save  # cnnx.save: npz without pickle, written atomically
                    save(model, checkpoint)
                best, saved = score, True
        record["seconds"] = time.perf_counter() - start
        record["lr"] = lr
        record["checkpoint_saved"] = saved
        history.append(record)
        stop = any(cb(record) is True for cb in list(callbacks))
        if parallel is not None and parallel.world_size > 1:
            stop = parallel.dist.any_rank(stop)  # every rank stops after the same epoch, or one would wait
        if stop:
            break
    return history
