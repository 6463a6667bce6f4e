"""``python -m cnnx``: the same as the ``cnnx`` console script."""
import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
