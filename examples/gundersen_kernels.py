"""Convolution as filtering, after Gregory Gundersen's blog post on convolution and CNN kernels.

Tutorial: Gregory Gundersen's explanation of convolution, from 1-D smoothing to the image kernels that
CNNs learn. No training here; the example shows, with cnnx's functional API:

1. 1-D smoothing of a noisy signal with a mean kernel, run as a 2-D convolution on a 1 x L image, and
   checked against ``numpy.convolve``;
2. true convolution against cross-correlation with an asymmetric 2-D kernel: they differ, and
   ``convolve2d(x, k) == conv2d(x, flip(k))`` (checked, and checked against the textbook double sum);
3. a mean blur, the Laplace kernel and the Sobel kernels on a real image (an MNIST digit, or a
   Fashion-MNIST item with ``--fashion``), with properties checked (the Laplacian of a constant is 0,
   Sobel of a ramp is its slope times 8);
4. the output-size formula ``OH = floor((H + pad_top + pad_bottom - dilation*(KH-1) - 1) / stride) + 1``
   printed for a few configurations, each checked against the shape conv2d returns;
5. the clear ValueError cnnx raises for an impossible configuration (kernel larger than the padded input).

It saves a figure of the signal and the filtered images (``--plots DIR``, default the current directory)
when matplotlib is installed. Published result: the post's figures; this example's are comparable.

What from-scratch code gets wrong here and cnnx does not: calling cross-correlation "convolution"
without the flip (cnnx offers both, under their own names), and output sizes that silently come out
zero or negative for impossible configurations (cnnx raises with the formula filled in).

Run: ``python examples/gundersen_kernels.py [--quick] [--data-dir DIR] [--plots DIR]``. Without the MNIST
files it uses the digit images embedded in cnnx. ``--quick`` does the same (it is already fast).
"""
import os

import numpy as np

import _common  # first: it puts the source checkout on sys.path when cnnx is not installed
import cnnx
from cnnx import functional as F

MEAN_3x3 = np.full((3, 3), 1 / 9)
LAPLACE = np.array([[0, 1, 0], [1, -4, 1], [0, 1, 0]], dtype=np.float64)
SOBEL_X = np.array([[-1, 0, 1], [-2, 0, 2], [-1, 0, 1]], dtype=np.float64)  # responds to left-right change
SOBEL_Y = SOBEL_X.T.copy()


def as_image(a):
    """(H, W) -> (1, 1, H, W) float64, the layout conv2d takes."""
    return np.asarray(a, dtype=np.float64)[None, None]


def as_weight(k):
    return np.asarray(k, dtype=np.float64)[None, None]


def smooth_1d(rng, length=200, width=9):
    t = np.linspace(0, 4 * np.pi, length)
    clean = np.sin(t)
    noisy = clean + rng.normal(0, 0.4, length)
    kernel = np.full(width, 1 / width)
    pad = width // 2
    smoothed = F.conv2d(as_image(noisy[None]), kernel[None, None, None], padding=(0, 0, pad, pad))[0, 0, 0]
    _common.check(np.allclose(smoothed, np.convolve(noisy, kernel, mode="same")),
                  f"1-D mean smoothing (width {width}) via conv2d on a 1x{length} image equals numpy.convolve")
    err_noisy, err_smooth = np.abs(noisy - clean).mean(), np.abs(smoothed - clean)[pad:-pad].mean()
    _common.check(err_smooth < err_noisy / 2, f"smoothing reduces the mean error to the clean sine from "
                                              f"{err_noisy:.3f} to {err_smooth:.3f}")
    return t, clean, noisy, smoothed


def convolution_vs_correlation(rng):
    x = rng.standard_normal((6, 7))
    k = np.array([[1.0, 2.0, 0.0], [0.0, -1.0, 3.0], [4.0, 0.0, -2.0]])  # no symmetry at all
    corr = F.conv2d(as_image(x), as_weight(k))[0, 0]
    conv = F.convolve2d(as_image(x), as_weight(k))[0, 0]
    # textbook definitions, written out: (x * k)[i, j] = sum_mn x[i + m, j + n] k[KH-1-m, KW-1-n] (valid part)
    kh, kw = k.shape
    direct_conv = np.array([[sum(x[i + m, j + n] * k[kh - 1 - m, kw - 1 - n] for m in range(kh) for n in range(kw))
                             for j in range(x.shape[1] - kw + 1)] for i in range(x.shape[0] - kh + 1)])
    direct_corr = np.array([[np.sum(x[i:i + kh, j:j + kw] * k) for j in range(x.shape[1] - kw + 1)]
                            for i in range(x.shape[0] - kh + 1)])
    _common.check(np.allclose(corr, direct_corr), "conv2d is cross-correlation: sum x[i+m, j+n] k[m, n]")
    _common.check(np.allclose(conv, direct_conv), "convolve2d is true convolution: the kernel is flipped")
    _common.check(not np.allclose(conv, corr), f"with an asymmetric kernel they differ (max difference "
                                               f"{np.abs(conv - corr).max():.3f})")
    flipped = F.conv2d(as_image(x), as_weight(k[::-1, ::-1]))[0, 0]
    _common.check(np.allclose(conv, flipped), "convolve2d(x, k) == conv2d(x, k flipped in both axes)")


def filter_image(image):
    x = as_image(image)
    out = {
        "mean blur 3x3": F.conv2d(x, as_weight(MEAN_3x3), padding="same")[0, 0],
        "Laplace": F.conv2d(x, as_weight(LAPLACE), padding="same")[0, 0],
        "Sobel x": F.conv2d(x, as_weight(SOBEL_X), padding="same")[0, 0],
        "Sobel y": F.conv2d(x, as_weight(SOBEL_Y), padding="same")[0, 0],
    }
    out["Sobel magnitude"] = np.hypot(out["Sobel x"], out["Sobel y"])
    for name, y in out.items():
        print(f"  {name:16s} output {y.shape}, range [{y.min():8.3f}, {y.max():8.3f}]")
    flat = as_image(np.full((8, 8), 0.7))
    _common.check(np.allclose(F.conv2d(flat, as_weight(LAPLACE))[0, 0], 0),
                  "the Laplacian of a constant image is 0 (away from the zero padding)")
    ramp = as_image(np.tile(np.arange(8.0) * 0.5, (8, 1)))  # brightness grows 0.5 per column
    _common.check(np.allclose(F.conv2d(ramp, as_weight(SOBEL_X))[0, 0], 0.5 * 8),
                  "Sobel x of a left-to-right ramp with slope 0.5 is 0.5 * 8 everywhere")
    blurred = F.conv2d(flat, as_weight(MEAN_3x3), padding="same")[0, 0]
    _common.check(np.allclose(blurred[1:-1, 1:-1], 0.7) and np.isclose(blurred[0, 0], 0.7 * 4 / 9),
                  "mean blur keeps a constant's brightness inside; 'same' zero padding darkens a corner to 4/9")
    return out


def output_sizes():
    print("  OH = floor((H + pad_top + pad_bottom - dilation*(KH-1) - 1) / stride) + 1")
    configs = [  # (H, KH, stride, (pad_top, pad_bottom), dilation)
        (28, 3, 1, (0, 0), 1), (28, 5, 1, (2, 2), 1), (32, 4, 2, (0, 0), 1), (15, 4, 2, (0, 0), 1),
        (28, 3, 2, (1, 1), 1), (28, 3, 1, (0, 0), 2), (7, 3, 3, (1, 0), 1),
    ]
    for h, kh, s, (pt, pb), d in configs:
        formula = (h + pt + pb - d * (kh - 1) - 1) // s + 1
        shape = F.conv2d(np.zeros((1, 1, h, h)), np.zeros((1, 1, kh, kh)), stride=s, padding=(pt, pb, pt, pb),
                         dilation=d).shape
        api = F.conv2d_output_shape((1, 1, h, h), (1, 1, kh, kh), stride=s, padding=(pt, pb, pt, pb), dilation=d)
        assert shape[2] == formula and tuple(api) == shape, (shape, formula, api)
        print(f"  H={h:2d} KH={kh} stride={s} pad=({pt},{pb}) dilation={d}: floor(({h} + {pt} + {pb} - {d}*{kh - 1}"
              f" - 1) / {s}) + 1 = {formula:2d}   conv2d gives {shape[2]}")


def impossible():
    try:
        F.conv2d(np.zeros((1, 1, 3, 3)), np.zeros((1, 1, 5, 5)))
    except ValueError as exc:
        print(f"  a 5x5 kernel on a 3x3 image without padding -> ValueError: {exc}")
        return str(exc)
    raise AssertionError("conv2d accepted a kernel larger than its input")


def save_figure(path, signal, image, filtered):
    try:
        from matplotlib.figure import Figure
    except ImportError:
        print("matplotlib is not installed (pip install cnnx[viz]): no figure")
        return None
    t, clean, noisy, smoothed = signal
    fig = Figure(figsize=(12, 5.2), layout="constrained")
    grid = fig.add_gridspec(2, 6)
    ax = fig.add_subplot(grid[0, :])
    ax.plot(t, noisy, ".", ms=3, color="0.6", label="noisy signal")
    ax.plot(t, clean, "--", color="0.2", lw=1, label="clean sine")
    ax.plot(t, smoothed, color="C3", lw=2, label="mean kernel, width 9 (conv2d on a 1xL image)")
    ax.legend(loc="upper right", fontsize=8)
    ax.set_title("1-D smoothing")
    panels = [("image", image)] + list(filtered.items())
    for i, (name, img) in enumerate(panels):
        a = fig.add_subplot(grid[1, i])
        if i < 2 or name == "Sobel magnitude":
            a.imshow(img, cmap="gray", interpolation="nearest")
        else:  # signed responses: white is 0
            limit = np.abs(img).max() or 1.0
            a.imshow(img, cmap="RdBu_r", vmin=-limit, vmax=limit, interpolation="nearest")
        a.set_title(name, fontsize=9)
        a.set_xticks([])
        a.set_yticks([])
    from cnnx.viz import save_figure as write

    write(fig, path)
    print(f"figure: {path}")
    return path


def main(argv=None):
    p = _common.parser(__doc__, quick_help="same as the full run (kept for uniformity)")
    p.add_argument("--fashion", action="store_true", help="filter a Fashion-MNIST item instead of a digit")
    args = p.parse_args(argv)
    _common.setup(args)
    rng = np.random.default_rng(args.seed)
    print("1. 1-D smoothing with a mean kernel")
    signal = smooth_1d(rng)
    print("2. true convolution vs cross-correlation")
    convolution_vs_correlation(rng)
    if args.fashion:
        images, _, _, _, source = _common.load_mnist_like(cnnx.datasets.FashionMNIST, "fashion-mnist", args)
    else:
        images, _, _, _, source = _common.load_mnist_like(cnnx.datasets.MNIST, "mnist", args, allow_embedded=True)
    image = images[0].astype(np.float64) / 255
    print(f"3. mean blur, Laplace and Sobel on image 0 of {source}")
    filtered = filter_image(image)
    print("4. output sizes")
    output_sizes()
    print("5. an impossible configuration")
    impossible()
    path = save_figure(os.path.join(args.plots or ".", "gundersen_kernels.png"), signal, image, filtered)
    _common.result_line("gundersen_kernels", checks="passed", figure=path or "none")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
