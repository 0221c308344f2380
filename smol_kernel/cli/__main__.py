"""``python -m smol_kernel.cli``: the ``smol-kernel`` command (the tests run it so)."""

import sys

from . import main

if __name__ == "__main__":
    sys.exit(main())
