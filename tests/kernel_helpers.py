"""Run cells through a real jupyter_client and collect what the kernel sent back."""

from __future__ import annotations

import asyncio
import hashlib
import os
import struct
import zlib
from dataclasses import dataclass, field
from pathlib import Path

from jupyter_client.asynchronous.client import AsyncKernelClient
from jupyter_client.manager import AsyncKernelManager

from smol_kernel.pool import wait_for_pool as wait_pool
from smol_kernel.server_extension import warm_kernelspec

__all__ = ["wait_pool"]


@dataclass
class CellResult:
    status: str = ""
    stdout: str = ""
    stderr: str = ""
    data: list[dict] = field(default_factory=list)  # display_data / execute_result bundles
    ename: str = ""
    evalue: str = ""


async def run_cell(
    kc: AsyncKernelClient, code: str, timeout: float = 60, stdin_reply: str | None = None
) -> CellResult:
    result = CellResult()

    def on_output(msg: dict) -> None:
        kind, content = msg["msg_type"], msg["content"]
        if kind == "stream":
            if content["name"] == "stdout":
                result.stdout += content["text"]
            else:
                result.stderr += content["text"]
        elif kind in ("display_data", "execute_result"):
            result.data.append(content["data"])
        elif kind == "error":
            result.ename, result.evalue = content["ename"], content["evalue"]

    def on_stdin(msg: dict) -> None:
        kc.input(stdin_reply if stdin_reply is not None else "")

    reply = await kc.execute_interactive(
        code,
        timeout=timeout,
        output_hook=on_output,
        allow_stdin=stdin_reply is not None,
        stdin_hook=on_stdin if stdin_reply is not None else None,
    )
    result.status = reply["content"]["status"]
    return result


async def fill_pool(kernel_name: str, timeout: float = 240, **config) -> None:
    """Fill the warm pool for a kernelspec (as the server extension does), with ``config``
    over its provisioner settings, and wait until a VM for it is prepared."""
    from jupyter_client.kernelspec import KernelSpecManager

    spec = KernelSpecManager().get_kernel_spec(kernel_name)
    spec.metadata["kernel_provisioner"]["config"].update(config)
    await warm_kernelspec(spec)
    await wait_pool(lambda pool: pool.ready_count() >= 1, timeout)


async def start_kernel(
    kernel_name: str, manager_cls=AsyncKernelManager, cwd: str | None = None, **kw
) -> tuple[AsyncKernelManager, AsyncKernelClient]:
    """``cwd``: where the kernel starts, as a server passes a notebook's folder. A
    ``*-pooled`` kernelspec's pool is filled first, and its kernel must come from it."""
    if kernel_name.endswith("-pooled"):
        await fill_pool(kernel_name)
    km = manager_cls(kernel_name=kernel_name, **kw)
    await km.start_kernel(**({"cwd": cwd} if cwd else {}))
    kc = km.client()
    kc.start_channels()
    try:
        await kc.wait_for_ready(timeout=120)
        if kernel_name.endswith("-pooled"):
            assert km.provisioner.start_kind == "pooled"
    except BaseException:
        kc.stop_channels()
        await km.shutdown_kernel(now=True)
        raise
    return km, kc


async def stop_kernel(km: AsyncKernelManager, kc: AsyncKernelClient) -> None:
    kc.stop_channels()
    if km.has_kernel:
        await km.shutdown_kernel(now=False)


async def crash_and_reconnect(km, kc, code: str, timeout: float = 180):
    """Run ``code`` (which kills the kernel or its VM), wait until the autorestarter has a
    fresh VM up, and return (the old VM, a client connected to the new kernel)."""
    old_vm = km.provisioner.vm
    restarted = asyncio.Event()
    km.add_restart_callback(restarted.set, "restart")
    kc.execute(code)
    await asyncio.wait_for(restarted.wait(), 60)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not (km.provisioner.vm and km.provisioner.vm.id != old_vm.id):
        assert loop.time() < deadline, "no fresh VM after the kernel died"
        await asyncio.sleep(0.5)
    kc.stop_channels()
    kc = km.client()  # a quick death gets new ports (newports), so reconnect
    kc.start_channels()
    try:
        await kc.wait_for_ready(timeout=timeout)
    except RuntimeError as e:  # say what the restarted kernel was (once seen under load)
        prov, vm = km.provisioner, km.provisioner.vm
        raise AssertionError(
            f"{e}: start {prov.start_kind}, VM {vm.id if vm else None} "
            f"(exit {vm.poll() if vm else None}), client ports {kc.shell_port}, "
            f"kernel ports {km.get_connection_info().get('shell_port')}, "
            f"console: {vm.console_tail(2000) if vm else ''}"
        ) from e
    return old_vm, kc


def rss_mib(pid: int | str = "self") -> float:
    """A process's resident memory in MiB (this one's by default)."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


def ram_digest(folder: Path) -> tuple[str, int]:
    """The RAM file's content and its allocated blocks (a discard punches holes: fewer). The
    file is flushed first: a file system may count blocks differently before its delayed
    allocation is written back (one block more was seen on CI with the same content)."""
    ram = folder / "ram"
    h = hashlib.sha256()
    with open(ram, "rb") as f:
        os.fsync(f.fileno())
        while chunk := f.read(8 << 20):
            h.update(chunk)
    return h.hexdigest(), ram.stat().st_blocks


def written_since_mapped_mib(pid: int, ram: Path) -> int:
    """How much of the RAM file ``ram`` the process ``pid`` maps privately has become its
    own (MiB): the pages it wrote, each copied on write. The rest it reads from the page
    cache, which holds them once for every VM that maps the file."""
    inode = os.stat(ram).st_ino
    total, inside = 0, False
    with open(f"/proc/{pid}/smaps") as f:
        for line in f:
            head = line.split()
            if head and not head[0].endswith(":"):  # a mapping's first line: its inode 5th
                inside = len(head) >= 5 and head[4] == str(inode)
            elif inside and head[0] == "Anonymous:":
                total += int(head[1])
    return total >> 10


def tiny_png() -> bytes:
    def chunk(kind: bytes, data: bytes) -> bytes:
        body = kind + data
        return struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body))

    ihdr = struct.pack(">IIBBBBB", 1, 1, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr)
            + chunk(b"IDAT", zlib.compress(b"\x00\xff\x00\x00")) + chunk(b"IEND", b""))  # fmt: skip
