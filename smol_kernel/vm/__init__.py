"""Virtual machines: one small interface (``VmBackend`` -> ``Vm``), one file per backend."""

from .base import BackendUnavailable, Vm, VmBackend, VmError
from .spec import Isolation, VmSpec, VmSpecError

__all__ = [
    "BackendUnavailable",
    "Isolation",
    "Vm",
    "VmBackend",
    "VmError",
    "VmSpec",
    "VmSpecError",
]
