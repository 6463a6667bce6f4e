"""The library-wide random number generator: one seed makes initialisation, dropout and shuffling reproducible.

Every function in cnnx that draws random numbers takes ``generator=None``: ``None`` means the default
generator returned by :func:`default_generator`, which :func:`manual_seed` replaces. Pass an explicit
``numpy.random.Generator`` to keep one component's stream independent of the others.
"""
import operator

import numpy as np

__all__ = ["manual_seed", "default_generator", "resolve_generator"]

_state = {"generator": np.random.default_rng()}


def manual_seed(seed):
    """Seed the default generator (a fresh ``numpy.random.default_rng(seed)``) and return it.

    Like ``torch.manual_seed``: call it once before building the model and the data loader.
    """
    try:
        seed = operator.index(seed)
    except TypeError:
        raise TypeError(f"manual_seed: seed must be an int, got {type(seed).__name__} {seed!r}") from None
    if seed < 0:
        raise ValueError(f"manual_seed: seed must be >= 0, got {seed}")
    _state["generator"] = np.random.default_rng(seed)
    return _state["generator"]


def default_generator():
    """The ``numpy.random.Generator`` used when a function gets ``generator=None``."""
    return _state["generator"]


def resolve_generator(generator, fn="cnnx"):
    """``generator`` itself if it is a ``numpy.random.Generator``, the default one if it is None."""
    if generator is None:
        return _state["generator"]
    if isinstance(generator, np.random.Generator):
        return generator
    raise TypeError(f"{fn}: generator must be a numpy.random.Generator or None, "
                    f"got {type(generator).__name__}")
