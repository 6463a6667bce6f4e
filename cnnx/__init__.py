"""cnnx: explicit CNN layers for Python with fast C kernels and a numpy twin that proves them right."""
__version__ = "0.1.0"

from ._backend import set_backend, get_backend, backend
from ._config import (show_config, set_num_threads, get_num_threads, keep_freed_memory, set_flush_denormal,
                      get_flush_denormal, flush_denormal)
from . import functional
from . import reference

# -- issue 3 (nn, optim, data, training) adds its imports below this line --
from ._random import manual_seed
from . import nn, init, optim, models
from .serialization import save, load, save_state_dict, load_state_dict
from . import datasets, data, train
from . import onnx          # cnnx.onnx.export; the onnx package itself is imported only when exporting
from . import distributed   # mpi4py is imported only by cnnx.distributed.init()
