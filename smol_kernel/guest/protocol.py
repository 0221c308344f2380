"""The host <-> guest agent protocol: the only module the guest agent shares with the host.

Stdlib only, and importable on its own (the guest has no ``smol_kernel`` package).

Transport: streams the host opens (host -> guest): under QEMU multiplexed over one
virtio-serial port (``mux.py``), under libkrun vsock ports mapped with ``listen=true``.

* ``CONTROL_PORT`` carries newline-delimited JSON objects. A request has ``op`` and ``id``;
  its reply echoes ``id`` and has ``ok`` (and ``error`` when false). Objects with ``event``
  are unsolicited notifications from the agent (``kernel_prepared``, ``kernel_ready``,
  ``kernel_exited``).
* An ipykernel kernelspec (``python3 -m ipykernel_launcher ...``) starts in two steps:
  ``start_kernel`` with ``prepare: true`` imports and initialises the kernel under a
  throw-away key (``kernel_prepared`` when done), and ``claim_kernel`` hands it the real
  connection key and the per-kernel environment (``kernel_ready`` once it serves). A
  ``start_kernel`` without ``prepare`` does both at once. Other argv start in one step.
* After the claim the launcher's pipes stay open. A magic in the kernel (``%checkpoint``,
  ``%rewind``, ``%checkpoints``) becomes a ``kernel_request`` event; the host answers it
  with ``kernel_reply`` (the guest only asks: the host decides). A kernel restored from a
  checkpoint gets ``resume`` (its key and environment, fresh entropy and clock, reseeded
  random state for a fork) and, once its clients are attached again, ``finish`` (the line
  saying where it is, and the reply to the cell that asked for the rewind).
* ``write_file``, ``read_file``, ``list_files``, ``remove_file`` and ``run_command`` act on
  the guest's files and run shell commands from the agent, beside the kernel (they work
  while a cell runs). File data travels base64-encoded in chunks of at most ``FILE_CHUNK``
  bytes; a failed request caused by an OSError carries its ``errno``.
* Each ``CHANNEL_PORTS`` entry carries raw bytes of one ZMQ connection: the agent connects
  the stream to the kernel's TCP port on guest loopback and copies bytes both ways. ZMTP is
  never parsed, so message signing and CurveZMQ work end to end.
"""

from __future__ import annotations

import json
import re

PROTOCOL_VERSION = 4

CONTROL_PORT = 1024
CHANNEL_PORTS = {"shell": 1025, "iopub": 1026, "stdin": 1027, "control": 1028, "hb": 1029}
# One kernel per VM, so the kernel's ports inside the guest can be fixed.
# Below the ephemeral range (32768+), so no outgoing connection can hold one first.
KERNEL_PORTS = {"shell": 20001, "iopub": 20002, "stdin": 20003, "control": 20004, "hb": 20005}

MAX_LINE = 1 << 20
FILE_CHUNK = 512 * 1024  # raw bytes per read_file / write_file message (base64 stays < MAX_LINE)
COMMAND_OUTPUT_CAP = 192 * 1024  # bytes of stdout and of stderr a run_command reply carries
MAX_LIST_ENTRIES = 5000
MAX_KERNEL_REQUEST = 64 * 1024  # bytes of one request line from the kernel (longer: dropped)

# Requests (host -> guest)
OP_HELLO = "hello"
OP_PING = "ping"
OP_START_KERNEL = "start_kernel"
OP_CLAIM_KERNEL = "claim_kernel"
OP_SIGNAL = "signal"
OP_KERNEL_REPLY = "kernel_reply"
OP_RESUME = "resume"
OP_FINISH = "finish"
OP_POWEROFF = "poweroff"
OP_WRITE_FILE = "write_file"
OP_READ_FILE = "read_file"
OP_LIST_FILES = "list_files"
OP_REMOVE_FILE = "remove_file"
OP_RUN_COMMAND = "run_command"

# Events (guest -> host)
EV_KERNEL_PREPARED = "kernel_prepared"
EV_KERNEL_READY = "kernel_ready"
EV_KERNEL_EXITED = "kernel_exited"
EV_KERNEL_REQUEST = "kernel_request"

# The agent prints this on the console once it listens (a hint for the host, not a proof).
READY_LINE = b"smol-agent: ready"

# Guest paths
GUEST_AGENT_DIR = "/opt/smol-kernel"  # init.sh names it as @GUEST_AGENT_DIR@
# The guest's PATH: the agent's, the kernel's, and the one host-side planning assumes.
GUEST_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
GUEST_CONNECTION_FILE = "/run/smol-kernel/kernel.json"
GUEST_KERNEL_LAUNCHER = GUEST_AGENT_DIR + "/kernel_launcher.py"

# The launcher's pipes from the agent: one JSON line (key, per-kernel env) in, status out.
LAUNCHER_CLAIM_FD, LAUNCHER_STATUS_FD = 3, 4
IPYKERNEL_MODULES = ("ipykernel_launcher", "ipykernel")
_PYTHON = re.compile(r"(?:.*/)?python3(?:\.\d+)?")


def two_step_argv(argv: list[str], debugger: bool = False) -> list[str] | None:
    """The launcher command for a kernelspec argv that can start in two steps, or None.

    Only ``PYTHON -m ipykernel_launcher|ipykernel ARGS`` qualifies: the launcher runs the
    same interpreter with the same module and arguments, so the kernel behaves as the
    kernelspec says; anything else (another kernel, interpreter flags) starts in one step.
    """
    if len(argv) < 3 or not _PYTHON.fullmatch(argv[0]) or argv[1] != "-m":
        return None
    if argv[2] not in IPYKERNEL_MODULES:
        return None
    flags = ["--debugger"] if debugger else []
    return [argv[0], GUEST_KERNEL_LAUNCHER, *flags, "-m", *argv[2:]]


class ProtocolError(Exception):
    """A malformed or oversized protocol message."""


def encode(msg: dict) -> bytes:
    """One message as a JSON line."""
    data = json.dumps(msg, separators=(",", ":")).encode() + b"\n"
    if len(data) > MAX_LINE:
        raise ProtocolError(f"message of {len(data)} bytes exceeds {MAX_LINE}")
    return data


def decode(line: bytes) -> dict:
    """Parse one JSON line; raise ProtocolError unless it is a JSON object."""
    try:
        msg = json.loads(line)
    except (ValueError, RecursionError) as e:  # RecursionError: absurdly nested JSON
        raise ProtocolError(f"not JSON: {line[:80]!r}") from e
    if not isinstance(msg, dict):
        raise ProtocolError(f"not a JSON object: {line[:80]!r}")
    return msg
