"""Opt-in guest network: passt for a network that is on, the egress proxy for an allow-list.

``network=True``: one ``passt`` user-space proxy per VM turns the guest's Ethernet frames
into ordinary host sockets, so the guest gets outbound TCP, UDP and ICMP echo with the host
user's rights and no privileges or bridges. How it is configured, and why:

* fixed guest addressing (slirp's 10.0.2.0/24), set up by the guest's /init from
  ``SMOL_NET`` -- no DHCP round trip during boot;
* ``--no-map-gw``: by default passt maps the gateway address to the *host's loopback*; that
  is exactly what must stay unreachable (the Jupyter server listens there);
* ``--dns-forward``: DNS sent to 10.0.2.3 goes to the host's first resolver (UDP port 53
  only), the one host service a guest may use -- unless ``VmSpec.dns`` names servers, which
  the guest then asks directly (passt 2023.03 does not forward to ``--dns`` servers);
* ``-t none -u none``: nothing on the host forwards *into* the guest;
* ``-4``: IPv4 only, one address family to reason about;
* no direct line to the VMM: guest frames pass ``egress.netfilter`` first, which drops anything
  aimed at the host (passt alone forwards raw frames for 127.0.0.1 to the host's loopback)
  and keeps from passt the frames it spins on; it logs every destination tried to
  ``egress.json`` in the VM's runtime folder (``read_egress_log``);
* passt and the guard are helpers of their VM, killed when the VMM exits and with the
  owner (parent-death signal); passt also exits when its link closes.

``allow_hosts``: no passt. The VM's link goes to the egress proxy (``egress/proxy.py``),
which answers the guest's DNS and terminates each connection, connecting on the host only
after its verdict; same log, carried across rewinds (``carry_from``).
"""

from __future__ import annotations

import json
import os
import select
import socket
import stat
import subprocess
import time
from pathlib import Path

from ..egress.log import LOG_FILE, POLICY_FILE
from ..egress.names import NAMES_FILE
from ..egress.netfilter import DNS, GATEWAY, GUEST_ADDR, PREFIX
from ..trusted import find_program, python_argv
from .base import VmError
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
    """What the VM's network guard logged (``egress.log.EgressLog``), or None without one."""
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
    carry_from: Path | None = None,
) -> tuple[list[subprocess.Popen], socket.socket]:
    """Start one VM's network; ``spawn`` is process.spawn. With ``allow_hosts`` (the only
    destinations) that is the egress proxy (``egress/proxy.py``: it terminates every
    connection and asks ``dns``, else the host's resolvers, for the names); without, passt
    and its guard (``egress.netfilter``; ``dns``: the resolvers the guest asks, empty: passt's
    forwarder). ``private_answers``: the non-global ranges a DNS answer may open.
    ``carry_from``: the runtime folder of the VM this one replaces (a rewind), whose egress
    log and names go on here: one log per kernel.

    Returns the processes and the VMM's end of the link, a connected unix stream socket
    the VMM must inherit (close it here once it has). Socket pairs rather than ``passt
    --socket PATH``: passt started as root drops to ``nobody`` before binding, and nobody
    must not be able to enter the VM's runtime dir.
    """
    if allow_hosts:
        return _start_proxy(spawn, rt_path, allow_hosts, dns, private_answers, carry_from)
    passt = find_passt()
    if not passt:
        raise VmError(f"network=True needs passt, which is not installed; {INSTALL_HINT}")
    vmm_end, guard_vm = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    guard_passt, passt_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    ready_r, ready_w = os.pipe()
    procs: list[subprocess.Popen] = []
    try:
        fd = passt_end.fileno()
        procs.append(spawn(passt_argv(passt, fd), rt_path / "passt.log", pass_fds=(fd,)))
        fds = (guard_vm.fileno(), guard_passt.fileno(), ready_w)
        argv = python_argv("smol_kernel.egress.netfilter", *map(str, fds), str(rt_path))
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


def _carry(carry_from: Path | None, rt_path: Path) -> None:
    """Copy the replaced VM's egress log and names (regular files of ours, no link)."""
    for name in (LOG_FILE, NAMES_FILE):
        try:
            flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK  # (a FIFO must not block us)
            fd = os.open(carry_from / name, flags)  # type: ignore[operator]
        except (OSError, TypeError):
            continue
        with os.fdopen(fd, "rb") as f:
            st = os.fstat(f.fileno())
            if stat.S_ISREG(st.st_mode) and st.st_uid == os.getuid():
                (rt_path / name).write_bytes(f.read(MAX_LOG_BYTES))


def _start_proxy(spawn, rt_path: Path, allow_hosts, dns, private_answers, carry_from):
    vmm_end, proxy_vm = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    ready_r, ready_w = os.pipe()
    procs: list[subprocess.Popen] = []
    try:
        policy = {"allow_hosts": list(allow_hosts), "resolvers": list(dns),
                  "private_answers": list(private_answers)}  # fmt: skip
        (rt_path / POLICY_FILE).write_text(json.dumps(policy))
        _carry(carry_from, rt_path)
        fds = (proxy_vm.fileno(), ready_w)
        argv = python_argv("smol_kernel.egress.proxy", *map(str, fds), str(rt_path))
        procs.append(spawn(argv, rt_path / "egress-proxy.log", pass_fds=fds))
        os.close(ready_w)
        ready_w = -1
        ready = select.select([ready_r], [], [], GUARD_READY_TIMEOUT)[0]
        if not ready or os.read(ready_r, 2) != b"ok":
            text = (rt_path / "egress-proxy.log").read_text(errors="replace").strip()
            raise VmError(f"the guest's egress proxy did not start: {text[-500:] or 'no answer'}")
    except BaseException:
        vmm_end.close()
        stop_processes(procs)
        raise
    finally:
        proxy_vm.close()
        for end in (ready_r, ready_w):
            if end >= 0:
                os.close(end)
    return procs, vmm_end
