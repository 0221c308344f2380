"""Handing an installed tree to the VM: the host sends it as a file over the agent channel
and the guest unpacks it where the kernel's Python imports from. Nothing of it is read back
or run on the host."""

from __future__ import annotations

import asyncio
import base64
import binascii
import shlex
import uuid
from collections.abc import Awaitable, Callable

from ..guest import protocol as P
from ..shown import escaped
from .installer import Installed, InstallError

# Run by the guest's python3 (the kernel's): the first writable site folder on its path.
UNPACK = r"""
import os, sys, tarfile
archive = sys.argv[1]
dest = next((p for p in sys.path if p.endswith(("site-packages", "dist-packages"))
             and os.path.isdir(p) and os.access(p, os.W_OK)), None)
if dest is None:
    sys.exit("no writable site-packages folder on the kernel's path")
with tarfile.open(archive) as tar:
    if hasattr(tarfile, "data_filter"):
        tar.extractall(dest, filter="data")
    else:
        tar.extractall(dest)
os.remove(archive)
print(dest)
"""
UNPACK_TIME_LIMIT = 120.0
DELIVERY_TIMEOUT = 600.0  # seconds to send and unpack one install, in all

AgentRequest = Callable[..., Awaitable[dict]]  # (op, timeout, **fields) -> reply


async def deliver(request: AgentRequest, installed: Installed) -> str:
    """Send ``installed`` into the VM and unpack it there, within DELIVERY_TIMEOUT; returns
    the guest folder it went to (as the guest said it: escaped). InstallError if the guest
    did not take it."""
    try:
        return await asyncio.wait_for(_deliver(request, installed), DELIVERY_TIMEOUT)
    except (TimeoutError, asyncio.TimeoutError):
        raise InstallError(
            f"the VM did not take the packages within {DELIVERY_TIMEOUT:.0f}s"
        ) from None
    except (ValueError, TypeError, binascii.Error) as e:  # the guest's reply: its words
        said = escaped(str(e))
        raise InstallError(f"the VM answered the unpacking with nonsense: {said}") from None


async def _deliver(request: AgentRequest, installed: Installed) -> str:
    archive = await asyncio.to_thread(installed.archive)
    path = f"/tmp/smol-install-{uuid.uuid4().hex}.tar.gz"
    with open(archive, "rb") as f:
        first = True
        while True:  # one chunk at least: an empty archive is still a file
            data = await asyncio.to_thread(f.read, P.FILE_CHUNK)
            chunk = base64.b64encode(data).decode()
            await request(P.OP_WRITE_FILE, 30.0, path=path, data=chunk, append=not first)
            first = False
            if len(data) < P.FILE_CHUNK:
                break
    reply = await request(
        P.OP_RUN_COMMAND, UNPACK_TIME_LIMIT + 15,
        command=f"python3 -c {shlex.quote(UNPACK)} {path}", cwd="/", env={},
        time_limit=UNPACK_TIME_LIMIT,
    )  # fmt: skip
    out = base64.b64decode(str(reply.get("stdout", "")), validate=True)
    err = base64.b64decode(str(reply.get("stderr", "")), validate=True)
    if int(reply.get("exit_code", -1)) != 0:
        said = err.decode("utf-8", "replace")[-500:]
        raise InstallError(f"the VM could not unpack the packages: {escaped(said)}")
    return escaped(out.decode("utf-8", "replace").strip()[:200])
