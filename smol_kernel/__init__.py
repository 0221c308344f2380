"""smol-kernel: run every Jupyter kernel in its own microVM."""

__version__ = "0.1.0"


def _jupyter_server_extension_points() -> list[dict]:
    return [{"module": "smol_kernel.server_extension"}]
