"""What a guest's flood of frames costs the host's serial multiplexer (no VM: a unix socket
stands in for QEMU's chardev, and the guest's frames are written here).

Floods, each on a fresh port with one open stream whose reader reads nothing:
* ``empty``  1 000 000 DATA frames with no payload (a protocol error: the port closes)
* ``tiny``   a window's worth (262 144) of 1-byte DATA frames on the stream, then 1 000 000
             1-byte frames for a stream id that does not exist
Figures: host RSS growth (MiB), the longest the event loop waited (a 5 ms ticker's worst
lateness), the time to take the flood, and whether the port was closed.

Usage: python benchmarks/mux_flood.py
Target (issue 30): RSS grows < 16 MiB and no stall reaches 100 ms.
"""

from __future__ import annotations

import asyncio
import socket
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from smol_kernel.guest import mux as M
from smol_kernel.transport.serial_mux import HostMux


def rss_mib() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


def recv_frame(sock: socket.socket) -> tuple[int, int, bytes]:
    def exactly(n: int) -> bytes:
        data = b""
        while len(data) < n:
            data += sock.recv(n - len(data))
        return data

    kind, sid, length = M.HEADER.unpack(exactly(M.HEADER.size))
    return kind, sid, exactly(length)


async def flood(name: str, make) -> None:
    loop = asyncio.get_running_loop()
    with tempfile.TemporaryDirectory() as tmp:
        host = HostMux(Path(tmp) / "mux.sock")
        await host.listen()
        qemu = socket.socket(socket.AF_UNIX)
        qemu.connect(str(Path(tmp) / "mux.sock"))

        def reset() -> None:
            qemu.sendall(M.reset_ok(recv_frame(qemu)[2]))

        answered = loop.run_in_executor(None, reset)
        await host.start(10)
        await answered

        def accept() -> int:
            _, sid, _ = recv_frame(qemu)
            qemu.sendall(M.frame(M.OPENED, sid))
            return sid

        accepted = loop.run_in_executor(None, accept)
        _reader, _writer = await host.open_stream(7)
        sid = await accepted
        before = rss_mib()  # (the flood's own bytes are freed before the second reading)
        data = make(sid)
        stalls: list[float] = []
        ticking = True

        async def ticker() -> None:
            while ticking:
                t0 = loop.time()
                await asyncio.sleep(0.005)
                stalls.append(loop.time() - t0 - 0.005)

        tick = asyncio.ensure_future(ticker())
        await asyncio.sleep(0.05)
        t0 = time.monotonic()
        try:
            await loop.run_in_executor(None, qemu.sendall, data)
        except OSError:
            pass  # the port was closed on us
        took = time.monotonic() - t0
        del data
        await asyncio.sleep(0.5)
        grew = rss_mib() - before
        ticking = False
        await tick
        print(f"{name:<6} RSS +{grew:6.1f} MiB   longest stall {max(stalls) * 1000:6.1f} ms   "
              f"taken in {took:5.2f} s   port closed: {host.closed.is_set()}")  # fmt: skip
        await host.close()
        qemu.close()


async def main() -> None:
    await flood("empty", lambda sid: M.frame(M.DATA, sid) * 1_000_000)
    await flood("tiny", lambda sid: M.frame(M.DATA, sid, b"x") * M.WINDOW
                + M.frame(M.DATA, 999, b"y") * 1_000_000)  # fmt: skip


if __name__ == "__main__":
    asyncio.run(main())
