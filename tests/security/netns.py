"""A test "internet": a network namespace behind a veth pair, with services run inside it.

Needs root and iproute2 (CI runs as root); callers skip otherwise. Everything made here is
removed on exit, the services' process included."""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
from collections.abc import Iterator

import pytest


def ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, text=True)


@contextlib.contextmanager
def outside_network(prefix: str, subnet: int, hosts: int, argv_for) -> Iterator[list[str]]:
    """A namespace with ``hosts`` addresses 10.``subnet``.N.2.. (N from this pid), the host
    side at .1. ``argv_for(addresses)``: the services to run inside; they print ``ready``.
    Yields the addresses."""
    if os.geteuid() != 0 or not shutil.which("ip"):
        pytest.skip("the test network needs root and iproute2 (ip netns + veth); CI runs as root")
    n = os.getpid() % 200 + 20
    ns, host_if, ns_if = f"{prefix}{n}", f"{prefix[:5]}h{n}", f"{prefix[:5]}n{n}"
    addrs = [f"10.{subnet}.{n}.{2 + i}" for i in range(hosts)]
    proc = None
    try:
        ip("netns", "add", ns)
        ip("link", "add", host_if, "type", "veth", "peer", "name", ns_if)
        ip("link", "set", ns_if, "netns", ns)
        ip("addr", "add", f"10.{subnet}.{n}.1/24", "dev", host_if)
        ip("link", "set", host_if, "up")
        for addr in addrs:
            ip("-n", ns, "addr", "add", f"{addr}/24", "dev", ns_if)
        ip("-n", ns, "link", "set", ns_if, "up")
        ip("-n", ns, "link", "set", "lo", "up")
        proc = subprocess.Popen(["ip", "netns", "exec", ns, *argv_for(addrs)],
                                stdout=subprocess.PIPE, text=True)  # fmt: skip
        assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
        yield addrs
    finally:
        if proc is not None:
            proc.kill()
            proc.wait()
        subprocess.run(["ip", "netns", "del", ns], capture_output=True)
        subprocess.run(["ip", "link", "del", host_if], capture_output=True)
