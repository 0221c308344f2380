"""A stand-in guest for the host's network helpers: a network namespace whose only interface
is a TAP device with the guest's address and MAC, its frames carried to the helper as QEMU's
stream netdev carries a VM's (a 4-byte length before each). Real Linux TCP, UDP and DNS
clients run in the namespace (``GuestNs.run``), so the helper faces a real TCP stack
(retransmits, window scaling, SACK) without booting a VM. Needs root; callers skip
otherwise. Used by tests/security/test_egress_proxy.py and benchmarks/egress.py."""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import socket
import struct
import subprocess
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

TUNSETIFF = 0x400454CA
IFF_TAP, IFF_NO_PI = 0x0002, 0x1000
GUEST_MAC = "52:54:00:12:34:56"


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, text=True)


@dataclass
class GuestNs:
    name: str
    vm_end: socket.socket  # the helper's end: what a VMM's netdev socket would be

    def run(self, code: str, timeout: float = 120) -> subprocess.CompletedProcess:
        """Python ``code`` in the guest namespace (its resolver is 10.0.2.3)."""
        return subprocess.run(["ip", "netns", "exec", self.name, sys.executable, "-c", code],
                              capture_output=True, text=True, timeout=timeout)  # fmt: skip


def _bridge(tap: int, sock: socket.socket, stop: threading.Event) -> None:
    def from_tap() -> None:
        with contextlib.suppress(OSError):
            while not stop.is_set():
                frame = os.read(tap, 65536)
                sock.sendall(struct.pack("!I", len(frame)) + frame)

    def to_tap() -> None:
        with contextlib.suppress(OSError, struct.error):
            while not stop.is_set():
                head = sock.recv(4, socket.MSG_WAITALL)
                if len(head) < 4:
                    return
                frame = sock.recv(struct.unpack("!I", head)[0], socket.MSG_WAITALL)
                os.write(tap, frame)

    for target in (from_tap, to_tap):
        threading.Thread(target=target, daemon=True).start()


@contextlib.contextmanager
def tap_guest(prefix: str = "smolg", resolver: str = "10.0.2.3") -> Iterator[GuestNs]:
    if os.geteuid() != 0 or not shutil.which("ip") or not os.path.exists("/dev/net/tun"):
        import pytest

        pytest.skip("the stand-in guest needs root, iproute2 and /dev/net/tun; CI runs as root")
    n = os.getpid() % 200 + 20
    ns, tap_name = f"{prefix}{n}", f"{prefix[:6]}t{n}"
    resolv = Path("/etc/netns") / ns / "resolv.conf"
    tap = os.open("/dev/net/tun", os.O_RDWR)
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    stop = threading.Event()
    try:
        fcntl.ioctl(tap, TUNSETIFF, struct.pack("16sH", tap_name.encode(), IFF_TAP | IFF_NO_PI))
        _ip("netns", "add", ns)
        _ip("link", "set", tap_name, "netns", ns)
        _ip("-n", ns, "link", "set", tap_name, "address", GUEST_MAC)
        _ip("-n", ns, "addr", "add", "10.0.2.15/24", "dev", tap_name)
        _ip("-n", ns, "link", "set", tap_name, "up")
        _ip("-n", ns, "link", "set", "lo", "up")
        _ip("-n", ns, "route", "add", "default", "via", "10.0.2.2")
        resolv.parent.mkdir(parents=True, exist_ok=True)
        resolv.write_text(f"nameserver {resolver}\n")
        _bridge(tap, ours, stop)
        yield GuestNs(ns, theirs)
    finally:
        stop.set()
        for s in (ours, theirs):
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)
            s.close()
        os.close(tap)
        subprocess.run(["ip", "netns", "del", ns], capture_output=True)
        shutil.rmtree(resolv.parent, ignore_errors=True)
