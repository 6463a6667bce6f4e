"""Pictures of a training run: curves, filters, feature maps, confusion matrix, misclassified images.

    from cnnx import viz
    viz.plot_history(history, "curves.png")               # history from cnnx.train.fit
    viz.plot_filters(model.conv1.weight, "filters.png")
    viz.plot_feature_maps(model, x_test[0], "maps.png")
    viz.plot_confusion_matrix(cm, "cm.png", class_names=ds.classes)
    viz.plot_misclassified(x_test, y_true, y_pred, "errors.png")

matplotlib is an optional dependency (``pip install cnnx[viz]``), imported only when a function here runs.
The figures are built with ``matplotlib.figure.Figure`` directly, never through ``pyplot``: no GUI backend
is touched, no global figure list grows, and they render headless (Agg) from any thread. Every function
returns the Figure; with ``path`` it also writes the image there (format from the extension, PNG by
default), atomically, so a crash never leaves half an image.
"""
import math
import numbers
import os

import numpy as np

__all__ = ["plot_history", "plot_filters", "plot_feature_maps", "plot_confusion_matrix", "plot_misclassified",
           "save_figure", "write_training_plots"]

_INSTALL_HINT = "cnnx.viz needs matplotlib, which is not installed: pip install cnnx[viz] (or pip install matplotlib)"


def _figure(figsize):
    """A new headless Figure; ImportError with the install command when matplotlib is missing."""
    try:
        from matplotlib.figure import Figure
    except ImportError as exc:
        raise ImportError(_INSTALL_HINT) from exc
    return Figure(figsize=figsize, layout="constrained")


def save_figure(fig, path, dpi=100):
    """Write ``fig`` to ``path`` (format from the extension, PNG when it has none) atomically; return path."""
    from ._io import atomic_write

    path = os.fspath(path)
    ext = os.path.splitext(path)[1].lower().lstrip(".") or "png"
    atomic_write(path, lambda f: fig.savefig(f, format=ext, dpi=dpi))
    return path


def _finish(fig, path, dpi):
    if path is not None:
        save_figure(fig, path, dpi=dpi)
    return fig


def _tile_grid(count, max_cols):
    cols = max(1, min(max_cols, count))
    return int(math.ceil(count / cols)), cols


def _hide_axes(ax):
    ax.set_xticks([])
    ax.set_yticks([])


# ------------------------------------------------------------------------------------------- history
_HISTORY_KEYS = ("train_loss", "test_loss", "train_accuracy", "test_accuracy")


def _history_records(history):
    if isinstance(history, dict) and "epochs" in history:  # the JSON of `cnnx train --metrics`
        history = history["epochs"]
    if isinstance(history, dict):  # a dict of lists, e.g. {"train_loss": [...], "test_accuracy": [...]}
        lengths = {len(v) for k, v in history.items() if k in _HISTORY_KEYS}
        if len(lengths) != 1:
            raise ValueError(f"plot_history: history as a dict needs lists of one length under some of "
                             f"{list(_HISTORY_KEYS)}, got keys {sorted(history)}")
        n = lengths.pop()
        history = [{k: history[k][i] for k in _HISTORY_KEYS if k in history} | {"epoch": i + 1} for i in range(n)]
    try:
        records = list(history)
    except TypeError:
        raise TypeError(f"plot_history: history must be the list of per-epoch dicts returned by cnnx.train.fit, "
                        f"got {type(history).__name__}") from None
    if not records or not all(isinstance(r, dict) for r in records):
        raise ValueError("plot_history: history must be a non-empty list of per-epoch dicts "
                         "(keys such as 'train_loss', 'test_accuracy')")
    return records


def plot_history(history, path=None, title=None, dpi=100):
    """Loss (left) and accuracy (right) per epoch, training and test.

    ``history``: the list returned by :func:`cnnx.train.fit` (dicts with ``epoch``, ``train_loss``,
    ``train_accuracy``, ``test_loss``, ``test_accuracy``; missing or None values are skipped), the
    ``{"epochs": [...]}`` JSON written by ``cnnx train --metrics``, or a dict of per-epoch lists.
    """
    records = _history_records(history)
    fig = _figure((9, 3.6))
    ax_loss, ax_acc = fig.subplots(1, 2)
    plotted = 0
    for ax, kind in ((ax_loss, "loss"), (ax_acc, "accuracy")):
        for split, style in (("train", "o-"), ("test", "s--")):
            key = f"{split}_{kind}"
            points = [(r.get("epoch", i + 1), r[key]) for i, r in enumerate(records) if r.get(key) is not None]
            if points:
                xs, ys = zip(*points)
                ax.plot(xs, ys, style, label=split)
                plotted += 1
        ax.set_xlabel("epoch")
        ax.set_ylabel(kind)
        ax.grid(True, alpha=0.3)
        if ax.has_data():
            ax.legend()
            if len(records) < 15:
                ax.set_xticks([r.get("epoch", i + 1) for i, r in enumerate(records)])
    if plotted == 0:
        raise ValueError(f"plot_history: no values to plot; each epoch dict needs some of {list(_HISTORY_KEYS)}")
    ax_loss.set_title("loss")
    ax_acc.set_title("accuracy")
    if title:
        fig.suptitle(title)
    return _finish(fig, path, dpi)


# ------------------------------------------------------------------------------------------- filters
def _weight_array(conv_weight):
    w = getattr(conv_weight, "weight", conv_weight)  # a Conv2d, a Parameter or an array
    w = np.asarray(getattr(w, "data", w))
    if w.ndim == 2:
        w = w[None, None]
    elif w.ndim == 3:
        w = w[:, None]
    if w.ndim != 4 or not np.issubdtype(w.dtype, np.number):
        raise ValueError(f"plot_filters: conv_weight must be a Conv2d, its weight, or an array "
                         f"(out_channels, in_channels, kH, kW), got shape {np.shape(w)}")
    return w.astype(np.float64)


def plot_filters(conv_weight, path=None, max_filters=64, max_in_channels=8, title=None, dpi=100):
    """A grid of learned convolution kernels.

    ``conv_weight``: a ``Conv2d``, its ``weight`` Parameter, or an array (out_channels, in_channels, kH, kW)
    (also (out_channels, kH, kW) or (kH, kW)). With 3 input channels each filter is one RGB tile (scaled to
    [0, 1] per filter); otherwise one row per output channel and one column per input channel (up to
    ``max_in_channels``) on a blue-white-red scale symmetric about 0, shared by the whole grid.
    """
    w = _weight_array(conv_weight)
    oc, ic = w.shape[:2]
    w = w[:max_filters]
    n = w.shape[0]
    if ic == 3:
        rows, cols = _tile_grid(n, 8)
        fig = _figure((1.2 * cols + 0.4, 1.2 * rows + 0.5))
        axes = np.atleast_1d(fig.subplots(rows, cols, squeeze=False)).ravel()
        for k, ax in enumerate(axes):
            _hide_axes(ax)
            if k >= n:
                ax.set_axis_off()
                continue
            tile = w[k].transpose(1, 2, 0)
            lo, hi = tile.min(), tile.max()
            ax.imshow((tile - lo) / (hi - lo) if hi > lo else np.full_like(tile, 0.5), interpolation="nearest")
            ax.set_title(str(k), fontsize=8)
    else:
        cin = min(ic, max_in_channels)
        if cin == 1:  # one tile per filter, laid out in a square-ish grid
            tiles = [(k, 0) for k in range(n)]
            rows, cols = _tile_grid(n, 8)
        else:  # one row per filter; at most 64 tiles, so a wide layer stays quick to draw
            n = min(n, max(1, 64 // cin))
            tiles = [(k, c) for k in range(n) for c in range(cin)]
            rows, cols = n, cin
        limit = float(np.abs(w[:, :cin]).max()) or 1.0
        fig = _figure((1.1 * cols + 1.0, 1.1 * rows + 0.5))
        axes = np.atleast_1d(fig.subplots(rows, cols, squeeze=False)).ravel()
        image = None
        for ax, idx in zip(axes, range(len(axes))):
            _hide_axes(ax)
            if idx >= len(tiles):
                ax.set_axis_off()
                continue
            k, c = tiles[idx]
            image = ax.imshow(w[k, c], cmap="bwr", vmin=-limit, vmax=limit, interpolation="nearest")
            if cin == 1:
                ax.set_title(str(k), fontsize=8)
            elif k == 0:
                ax.set_title(f"in {c}", fontsize=8)
            if cin > 1 and c == 0:
                ax.set_ylabel(f"out {k}", fontsize=8)
        if image is not None:
            fig.colorbar(image, ax=list(axes), shrink=0.8)
    shown = f"{n} of {oc}" if n < oc else f"{oc}"
    fig.suptitle(title or f"{shown} filters, {ic} input channel{'s' if ic != 1 else ''}, "
                          f"{w.shape[2]}x{w.shape[3]}")
    return _finish(fig, path, dpi)


# -------------------------------------------------------------------------------------- feature maps
def _layers(model):
    if hasattr(model, "__iter__") and hasattr(model, "__len__"):
        return list(model)
    children = list(model.children()) if hasattr(model, "children") else []
    if not children:
        raise TypeError(f"plot_feature_maps: model must be a Sequential (or a Module with children run in "
                        f"order), got {type(model).__name__}")
    return children


def _is_spatial_layer(layer):
    name = type(layer).__name__
    return "Conv" in name or "Pool" in name


def plot_feature_maps(model, x, path=None, max_channels=8, layers=None, title=None, dpi=100):
    """One input image followed by its activations after every convolution and pooling layer.

    ``model``: a ``Sequential`` (e.g. ``cnnx.models.LeNet5``) whose children run in order. ``x``: one image
    (C, H, W) or (H, W), or a batch of one (1, C, H, W). The network runs in eval mode (restored afterwards)
    until its output stops being 4-D; each conv/pool output gets one row of up to ``max_channels`` maps.
    ``layers``: optional list of layer types or names to show instead of the conv/pool layers.
    """
    x = np.asarray(x)
    if x.ndim == 2:
        x = x[None, None]
    elif x.ndim == 3:
        x = x[None]
    if x.ndim != 4 or x.shape[0] != 1:
        raise ValueError(f"plot_feature_maps: x must be one image (C, H, W) or (H, W) or a batch of one "
                         f"(1, C, H, W), got shape {x.shape}")
    children = _layers(model)
    # the input takes the dtype of the first layer that has one (layers reject a mismatched dtype)
    dtype = next((m.dtype for m in children if isinstance(getattr(m, "dtype", None), np.dtype)), np.float32)
    h = np.ascontiguousarray(x, dtype=dtype)
    named = list(model.named_children()) if hasattr(model, "named_children") else []
    names = [n for n, _ in named] if len(named) == len(children) else [str(i) for i in range(len(children))]
    rows = [("input", x[0].astype(np.float64))]
    was_training = getattr(model, "training", False)
    model.eval()
    try:
        for name, layer in zip(names, children):
            if h.ndim != 4:
                break
            h = layer.forward(h)
            if isinstance(h, tuple):  # MaxPool2d(return_indices=True)
                h = h[0]
            wanted = (_is_spatial_layer(layer) if layers is None else
                      any(name == s if isinstance(s, str) else isinstance(layer, s) for s in layers))
            if wanted and np.ndim(h) == 4:
                rows.append((f"{name}: {type(layer).__name__} {tuple(h.shape[1:])}", np.asarray(h[0], np.float64)))
    finally:
        model.train(was_training)
    if len(rows) == 1:
        raise ValueError("plot_feature_maps: the model has no convolution or pooling layer to show")
    cols = max(1, min(max_channels, max(r[1].shape[0] for r in rows)))
    fig = _figure((1.25 * cols + 0.3, 1.45 * len(rows) + 0.3))
    axes = fig.subplots(len(rows), cols, squeeze=False)
    for r, (label, maps) in enumerate(rows):
        for c in range(cols):
            ax = axes[r, c]
            _hide_axes(ax)
            if c >= maps.shape[0] or (r == 0 and c > 0):
                ax.set_axis_off()
                continue
            if r == 0 and maps.shape[0] == 3:
                img = maps.transpose(1, 2, 0)
                lo, hi = img.min(), img.max()
                ax.imshow((img - lo) / (hi - lo) if hi > lo else img * 0, interpolation="nearest")
            else:
                ax.imshow(maps[c], cmap="viridis", interpolation="nearest")
            if c == 0:
                ax.set_title(label, fontsize=8, loc="left")
    if title:
        fig.suptitle(title)
    return _finish(fig, path, dpi)


# ---------------------------------------------------------------------------------- confusion matrix
def _class_names(class_names, k, fn):
    if class_names is None:
        return [str(i) for i in range(k)]
    names = [str(c) for c in class_names]
    if len(names) != k:
        raise ValueError(f"{fn}: class_names has {len(names)} names for {k} classes")
    return names


def plot_confusion_matrix(cm, path=None, class_names=None, normalize=False, title=None, dpi=100):
    """The confusion matrix as a heat map with the counts written in each cell.

    ``cm``: (K, K), rows true classes and columns predictions, as :func:`cnnx.train.confusion_matrix`
    returns. ``normalize=True`` shows each row as fractions of its true class (the recall per class).
    """
    cm = np.asarray(cm)
    if cm.ndim != 2 or cm.shape[0] != cm.shape[1] or cm.shape[0] == 0 or not np.issubdtype(cm.dtype, np.number):
        raise ValueError(f"plot_confusion_matrix: cm must be a square numeric (K, K) matrix, got shape {cm.shape}")
    k = cm.shape[0]
    names = _class_names(class_names, k, "plot_confusion_matrix")
    values = cm.astype(np.float64)
    if normalize:
        totals = values.sum(axis=1, keepdims=True)
        values = np.divide(values, totals, out=np.zeros_like(values), where=totals > 0)
    size = min(12.0, 1.5 + 0.55 * k)
    fig = _figure((size + 1.0, size))
    ax = fig.subplots()
    image = ax.imshow(values, cmap="Blues", interpolation="nearest")
    fig.colorbar(image, ax=ax, shrink=0.8)
    ax.set_xticks(range(k))
    ax.set_yticks(range(k))
    ax.set_xticklabels(names, rotation=45 if max(len(n) for n in names) > 2 else 0, ha="right" if
                       max(len(n) for n in names) > 2 else "center")
    ax.set_yticklabels(names)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    if k <= 20:
        top = values.max() if values.size else 0
        for i in range(k):
            for j in range(k):
                text = f"{values[i, j]:.2f}" if normalize else f"{int(cm[i, j])}"
                ax.text(j, i, text, ha="center", va="center", fontsize=8 if k > 10 else 9,
                        color="white" if top and values[i, j] > 0.5 * top else "black")
    total = cm.sum()
    acc = float(np.trace(cm)) / total if total else float("nan")
    ax.set_title(title or f"confusion matrix (accuracy {acc:.4f})")
    return _finish(fig, path, dpi)


# ------------------------------------------------------------------------------------- misclassified
def _display_images(images, fn):
    a = np.asarray(images)
    if a.ndim == 4:
        if a.shape[1] == 1:
            a = a[:, 0]
        elif a.shape[1] == 3:
            a = a.transpose(0, 2, 3, 1)
        elif a.shape[-1] not in (1, 3):
            raise ValueError(f"{fn}: 4-D images must be (N, 1 or 3, H, W) or (N, H, W, 1 or 3), got {a.shape}")
        elif a.shape[-1] == 1:
            a = a[..., 0]
    elif a.ndim != 3:
        raise ValueError(f"{fn}: images must be (N, H, W), (N, C, H, W) or (N, H, W, C), got shape {a.shape}")
    return a


def plot_misclassified(images, y_true, y_pred, path=None, class_names=None, max_images=25, title=None, dpi=100):
    """A grid of the images whose prediction is wrong, each titled "pred P / true T" (first ``max_images``).

    ``images``: the whole evaluated set (N, H, W), (N, 1|3, H, W) or (N, H, W, 1|3), in the same order as
    ``y_true`` and ``y_pred`` (N,); only the mismatches are drawn. Colour images are min-max scaled per image.
    """
    fn = "plot_misclassified"
    imgs = _display_images(images, fn)
    y_true, y_pred = np.asarray(y_true).ravel(), np.asarray(y_pred).ravel()
    if not (len(imgs) == len(y_true) == len(y_pred)):
        raise ValueError(f"{fn}: images, y_true and y_pred need the same length, got {len(imgs)}, "
                         f"{len(y_true)} and {len(y_pred)}")
    if not isinstance(max_images, numbers.Integral) or max_images < 1:
        raise ValueError(f"{fn}: max_images must be an int >= 1, got {max_images!r}")
    wrong = np.flatnonzero(y_true != y_pred)
    shown = wrong[:max_images]

    def label(v):
        v = int(v)
        return str(class_names[v]) if class_names is not None and 0 <= v < len(class_names) else str(v)

    if len(shown) == 0:
        fig = _figure((4, 1.5))
        ax = fig.subplots()
        ax.set_axis_off()
        ax.text(0.5, 0.5, f"no misclassified images among {len(y_true)}", ha="center", va="center")
        return _finish(fig, path, dpi)
    rows, cols = _tile_grid(len(shown), 5 if len(shown) > 16 else 4)
    longest = max(len(label(v)) for v in np.concatenate([y_true[shown], y_pred[shown]]))
    tile = 1.6 if longest <= 4 else 2.1
    fig = _figure((tile * cols, (tile + 0.15) * rows + 0.4))
    axes = fig.subplots(rows, cols, squeeze=False).ravel()
    for ax, k in zip(axes, range(len(axes))):
        _hide_axes(ax)
        if k >= len(shown):
            ax.set_axis_off()
            continue
        i = shown[k]
        img = imgs[i].astype(np.float64)
        if img.ndim == 3:
            lo, hi = img.min(), img.max()
            ax.imshow((img - lo) / (hi - lo) if hi > lo else img * 0, interpolation="nearest")
        else:
            ax.imshow(img, cmap="gray_r", interpolation="nearest")
        ax.set_title(f"pred {label(y_pred[i])}\ntrue {label(y_true[i])}", fontsize=8, color="firebrick")
    fig.suptitle(title or f"{len(shown)} of {len(wrong)} misclassified (of {len(y_true)})")
    return _finish(fig, path, dpi)


# ---------------------------------------------------------------------------------------- all at once
def write_training_plots(directory, history=None, model=None, sample=None, cm=None, class_names=None,
                         images=None, y_true=None, y_pred=None, dpi=100):
    """Write every picture the arguments allow into ``directory`` as PNG; return {name: path}.

    history -> history.png; model -> filters.png (its first Conv2d); model and sample (one input) ->
    feature_maps.png; cm -> confusion_matrix.png; images, y_true and y_pred -> misclassified.png.
    This is what ``cnnx train --plots DIR`` calls.
    """
    directory = os.fspath(directory)
    os.makedirs(directory, exist_ok=True)
    written = {}

    def out(name):
        return os.path.join(directory, name + ".png")

    def done(name, fig):
        written[name] = out(name)
        fig.clear()  # free the figure's memory now: nothing else holds it

    if history is not None:
        done("history", plot_history(history, out("history"), dpi=dpi))
    if model is not None:
        conv = next((m for m in (model.modules() if hasattr(model, "modules") else [])
                     if type(m).__name__ == "Conv2d"), None)
        if conv is not None:
            done("filters", plot_filters(conv, out("filters"), dpi=dpi))
        if sample is not None and conv is not None:
            done("feature_maps", plot_feature_maps(model, sample, out("feature_maps"), dpi=dpi))
    if cm is not None:
        done("confusion_matrix", plot_confusion_matrix(cm, out("confusion_matrix"), class_names=class_names,
                                                       dpi=dpi))
    if images is not None and y_true is not None and y_pred is not None:
        done("misclassified", plot_misclassified(images, y_true, y_pred, out("misclassified"),
                                                 class_names=class_names, dpi=dpi))
    return written
