"""The relay: the kernel's five ZMQ channels on the host, carried into the guest, and the
judging of what the guest sends on them (docs/architecture.md, "Relay").

* ``kernel_relay``: ``KernelRelay`` binds the host ports and gives each client connection
  its own stream into the VM.
* ``message_pump`` (guest to client) and ``client_pump`` (client to guest) move the bytes.
* ``zmtp`` and ``strict_message`` parse what the guest sends; ``output_policy``, with
  ``mime_bundle`` and ``widget_policy``, rewrites outputs before any client sees them.

Outside this package it imports only ``error_root``, ``guest.protocol`` and ``metrics``:
never the provisioner, which builds the relay (``launch.py``).
"""

from .kernel_relay import KernelRelay, RelayError

__all__ = ["KernelRelay", "RelayError"]
