"""The root of the errors smol-kernel raises to its users: ``except SmolKernelError``
catches every one of them (``smol_kernel.errors`` names the public ones). It imports
nothing, so every layer, down to ``vm`` and ``image``, can derive from it."""


class SmolKernelError(Exception):
    """What was asked of smol-kernel could not be done; the message says why and what to
    do. Subclasses keep the builtin base callers caught before (ValueError, OSError, ...)."""
