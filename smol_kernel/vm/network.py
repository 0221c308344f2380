"""Opt-in guest network: one ``passt`` user-space proxy per VM.

passt turns the guest's Ethernet frames into ordinary host sockets, so the guest gets
outbound TCP, UDP and ICMP echo with the host user's rights and no privileges or bridges.
How it is configured, and why:

* fixed guest addressing (slirp's 10.0.2.0/24), set up by the guest's /init from
  ``SMOL_NET`` -- no DHCP round trip during boot;
* ``--no-map-gw``: by default passt maps the gateway address to the *host's loopback*; that
  is exactly what must stay unreachable (the Jupyter server listens there);
* ``--dns-forward``: DNS sent to 10.0.2.3 goes to the host's first resolver (UDP port 53
  only), the one host service a guest may use -- unless ``VmSpec.dns`` names servers, which
  the guest then asks directly (passt 2023.03 does not forward to ``--dns`` servers);
* ``-t none -u none``: nothing on the host forwards *into* the guest;
* ``-4``: IPv4 only, one address family to reason about;
* no direct line to the VMM: guest frames pass ``netfilter`` first, which drops anything
  aimed at the host (passt alone forwards raw frames for 127.0.0.1 to the host's loopback);
* ``allow_hosts`` (``egress.py``): with a list, the guard lets the guest reach only those
  names and addresses; with or without one it logs every destination tried to
  ``egress.json`` in the VM's runtime folder (``read_egress_log``);
* passt and the guard are helpers of their VM, killed when the VMM exits and with the
  owner (parent-death signal); passt also exits when its link closes.
"""

from __future__ import annotations

import json
import os
import select
import socket
import subprocess
import time
from pathlib import Path

from ..trusted import find_program, python_argv
from .base import VmError
from .egress import LOG_FILE, POLICY_FILE
from .netfilter import DNS, GATEWAY, GUEST_ADDR, PREFIX
from .process import stop_processes

GUARD_READY_TIMEOUT = 30.0  # a Python start under load; it reads the routing table
INSTALL_HINT = "install passt: sudo apt-get install passt (Debian/Ubuntu), sudo dnf install passt"


def find_passt() -> str | None:
    return find_program("passt", "SMOL_KERNEL_PASST")


def passt_argv(passt: str, fd: int) -> list[str]:
    return [
        passt, "--foreground", "--quiet", "--stderr", "--fd", str(fd),
        "--ipv4-only", "--address", GUEST_ADDR, "--netmask", str(PREFIX),
        "--gateway", GATEWAY, "--no-map-gw", "--dns-forward", DNS,
        "--tcp-ports", "none", "--udp-ports", "none",
        "--no-dhcpv6", "--no-ndp", "--no-ra",
    ]  # fmt: skip


MAX_LOG_BYTES = 4 << 20


def read_egress_log(rt_path: Path) -> dict | None:
    """What the VM's network guard logged (``egress.EgressLog``), or None without one."""
    try:
        with open(rt_path / LOG_FILE, "rb") as f:
            data = f.read(MAX_LOG_BYTES + 1)
    except OSError:
        return None
    if len(data) > MAX_LOG_BYTES:
        return None
    try:
        log = json.loads(data)
    except ValueError:
        return None
    return log if isinstance(log, dict) else None


def egress_summary(log: dict, most: int = 10) -> dict:
    """Totals and the most tried blocked destinations of an egress log, for the audit."""
    blocked = sorted((e for e in log.get("entries", []) if e.get("verdict") == "blocked"),
                     key=lambda e: -int(e.get("count", 0)))  # fmt: skip
    return {
        "allowed": log.get("allowed", 0),
        "blocked": log.get("blocked", 0),
        "blocked_to": [describe_destination(e) for e in blocked[:most]],
    }


def describe_destination(entry: dict) -> str:
    """``name (address):port/protocol`` of an egress log entry."""
    where = entry.get("address", "?")
    if entry.get("name"):
        where = f"{entry['name']} ({where})"
    port = entry.get("port")
    return f"{where}{'' if port is None else f':{port}'}/{entry.get('protocol', '?')}"


def start_network(
    spawn,
    rt_path: Path,
    allow_hosts: tuple[str, ...] = (),
    dns: tuple[str, ...] = (),
    private_answers: tuple[str, ...] = (),
) -> tuple[list[subprocess.Popen], socket.socket]:
    """Start passt and its guard (``netfilter``) for one VM; ``spawn`` is process.spawn.
    ``allow_hosts``: the only destinations (empty: any the host checks allow); ``dns``: the
    resolvers the guest was given (empty: passt's forwarder); ``private_answers``: the
    non-global ranges a DNS answer may open.

    Returns both processes and the VMM's end of the guarded link, a connected unix stream
    socket the VMM must inherit (close it here once it has). Socket pairs rather than
    ``passt --socket PATH``: passt started as root drops to ``nobody`` before binding, and
    nobody must not be able to enter the VM's runtime dir.
    """
    passt = find_passt()
    if not passt:
        raise VmError(f"network=True needs passt, which is not installed; {INSTALL_HINT}")
    vmm_end, guard_vm = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    guard_passt, passt_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    ready_r, ready_w = os.pipe()
    procs: list[subprocess.Popen] = []
    try:
        policy = {"allow_hosts": list(allow_hosts), "resolvers": list(dns or (DNS,)),
                  "private_answers": list(private_answers)}  # fmt: skip
        (rt_path / POLICY_FILE).write_text(json.dumps(policy))
        fd = passt_end.fileno()
        procs.append(spawn(passt_argv(passt, fd), rt_path / "passt.log", pass_fds=(fd,)))
        fds = (guard_vm.fileno(), guard_passt.fileno(), ready_w)
        argv = python_argv("smol_kernel.vm.netfilter", *map(str, fds), str(rt_path))
        procs.append(spawn(argv, rt_path / "netfilter.log", pass_fds=fds))
        os.close(ready_w)
        ready_w = -1
        # The guard says "ok" once it knows the host's addresses; it fails closed otherwise.
        ready = select.select([ready_r], [], [], GUARD_READY_TIMEOUT)[0]
        if not ready or os.read(ready_r, 2) != b"ok":
            text = (rt_path / "netfilter.log").read_text(errors="replace").strip()
            raise VmError(f"the guest's network guard did not start: {text[-500:] or 'no answer'}")
        time.sleep(0.05)
        if procs[0].poll() is not None:
            text = (rt_path / "passt.log").read_text(errors="replace")
            raise VmError(f"the guest's network proxy exited at once: {text[-500:]}")
    except BaseException:
        vmm_end.close()
        stop_processes(procs)
        raise
    finally:
        for s in (guard_vm, guard_passt, passt_end):
            s.close()
        for end in (ready_r, ready_w):
            if end >= 0:
                os.close(end)
    return procs, vmm_end
