"""smol-kernel: run every Jupyter kernel in its own microVM."""

__version__ = "0.1.0"
