"""Sandboxes for code an AI assistant (or anyone) wants run: a smolvm kernel as an API.

``Sandbox`` (blocking) and ``AsyncSandbox`` run Python in a fresh microVM with no network
unless ``network=True`` and no host files unless shared, on the same provisioner, settings
and warm pool as the "Python (smolvm)" Jupyter kernel. See docs/ai-assistants.md.
"""

from ..checkpoint import Checkpoint
from .async_sandbox import (
    AsyncCommands,
    AsyncFiles,
    AsyncSandbox,
    CommandResult,
    EntryInfo,
    SandboxError,
    SandboxOptions,
    fill_sandbox_pool,
)
from .execution import Execution, ExecutionError, Logs, Result
from .sync_sandbox import Commands, Files, Sandbox

__all__ = [
    "AsyncCommands",
    "AsyncFiles",
    "AsyncSandbox",
    "Checkpoint",
    "CommandResult",
    "Commands",
    "EntryInfo",
    "Execution",
    "ExecutionError",
    "Files",
    "Logs",
    "Result",
    "Sandbox",
    "SandboxError",
    "SandboxOptions",
    "fill_sandbox_pool",
]
