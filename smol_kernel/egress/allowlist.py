"""Egress allow-list entries (``allow_hosts``): parsing and matching.

An entry is a host name (``pypi.org``), a wildcard for subdomains (``*.example.com``: any
name ending in ``.example.com``, not ``example.com`` itself), an IPv4 address or a CIDR
range, each optionally followed by ``:PORT`` or ``:PORT-PORT``. Names are compared without
case and without a trailing dot. Standard library only: the network guard imports it.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass

from ..error_root import SmolKernelError

Ports = tuple[int, int] | None  # an inclusive range, or None for every port
_LABEL = re.compile(r"(?!-)[a-z0-9_-]{1,63}(?<!-)")
MAX_ENTRIES = 256
MAX_NAME = 253


class AllowListError(SmolKernelError, ValueError):
    """An allow-list entry that cannot be understood; the message says what is accepted."""


@dataclass(frozen=True)
class Entry:
    """One parsed entry: exactly one of ``name``/``suffix``/``network`` is set."""

    text: str
    name: str | None = None  # exact host name
    suffix: str | None = None  # "*.example.com" -> ".example.com"
    network: ipaddress.IPv4Network | None = None
    ports: Ports = None

    def port_ok(self, port: int | None) -> bool:
        """``port`` None: a protocol without ports (ICMP), allowed only by a portless entry."""
        if self.ports is None:
            return True
        return port is not None and self.ports[0] <= port <= self.ports[1]

    def name_matches(self, name: str) -> bool:
        if self.name is not None:
            return name == self.name
        return (
            self.suffix is not None and name.endswith(self.suffix) and len(name) > len(self.suffix)
        )


def normalize_name(name: str) -> str:
    return name.strip().rstrip(".").lower()


def valid_name(name: str) -> bool:
    return 0 < len(name) <= MAX_NAME and all(_LABEL.fullmatch(p) for p in name.split("."))


def _ports(text: str, entry: str) -> Ports:
    lo, _, hi = text.partition("-")
    try:
        first, last = int(lo), int(hi or lo)
    except ValueError:
        raise AllowListError(
            f"allow_hosts entry {entry!r}: {text!r} is not a port or a range PORT-PORT"
        ) from None
    if not 1 <= first <= last <= 65535:
        raise AllowListError(
            f"allow_hosts entry {entry!r}: ports run from 1 to 65535, lowest first"
        )
    return (first, last)


def parse_entry(text: str) -> Entry:
    raw = text.strip()
    if not raw:
        raise AllowListError("allow_hosts has an empty entry")
    host, ports = raw, None
    if raw.count(":") == 1:
        host, port_text = raw.split(":")
        ports = _ports(port_text, raw)
    elif ":" in raw:
        raise AllowListError(f"allow_hosts entry {raw!r}: IPv6 is not supported (IPv4 only)")
    if re.fullmatch(r"[0-9./]+", host):
        try:
            net = ipaddress.IPv4Network(host, strict=False)
        except ValueError:
            raise AllowListError(
                f"allow_hosts entry {raw!r}: not an IPv4 address or CIDR range (e.g. "
                "192.0.2.7 or 192.0.2.0/24)"
            ) from None
        return Entry(raw, network=net, ports=ports)
    name = normalize_name(host)
    if name.startswith("*."):
        suffix = name[1:]
        if not valid_name(suffix[1:]) or "." not in suffix[1:]:
            raise AllowListError(
                f"allow_hosts entry {raw!r}: a wildcard covers the subdomains of a domain "
                "with at least two labels, e.g. *.example.com"
            )
        return Entry(raw, suffix=suffix, ports=ports)
    if not valid_name(name):
        raise AllowListError(
            f"allow_hosts entry {raw!r}: not a host name, *.domain, IPv4 address or CIDR "
            "range, each optionally with :PORT or :PORT-PORT"
        )
    return Entry(raw, name=name, ports=ports)


@dataclass(frozen=True)
class AllowList:
    entries: tuple[Entry, ...]

    @classmethod
    def parse(cls, texts) -> AllowList:
        texts = list(texts)
        if len(texts) > MAX_ENTRIES:
            raise AllowListError(f"allow_hosts has {len(texts)} entries; at most {MAX_ENTRIES}")
        return cls(tuple(parse_entry(t) for t in texts))

    def name_allowed(self, name: str) -> bool:
        """Is ``name`` (normalized) covered by a name or wildcard entry?"""
        return any(e.name_matches(name) for e in self.entries)

    def name_ports(self, name: str) -> list[Ports]:
        """The port ranges name entries give ``name`` (empty: not allowed)."""
        return [e.ports for e in self.entries if e.name_matches(name)]

    def address_allowed(self, addr: ipaddress.IPv4Address, port: int | None) -> bool:
        """Is ``addr:port`` covered by an address or CIDR entry?"""
        return any(e.network is not None and addr in e.network and e.port_ok(port)
                   for e in self.entries)  # fmt: skip


WEB_PORTS = (80, 443)  # what a name entry without a port opens (to TLS and HTTP only)


def name_port_ok(ranges, port: int | None) -> bool:
    """Whether ``port`` is open for a name whose entries give ``ranges``: a listed range,
    or a web port for an entry without one."""
    return any(port in WEB_PORTS if r is None else port is not None and r[0] <= port <= r[1]
               for r in ranges)  # fmt: skip


def ports_ok(ranges, port: int | None) -> bool:
    """Whether ``port`` is inside one of ``ranges`` (None in ranges: every port)."""
    for r in ranges:
        if r is None:
            return True
        if port is not None and r[0] <= port <= r[1]:
            return True
    return False


def check_cidr(text: str) -> ipaddress.IPv4Network:
    """An IPv4 CIDR range (``private_answer_ranges``), or AllowListError saying so."""
    try:
        if "/" not in text:
            raise ValueError
        return ipaddress.IPv4Network(text, strict=False)
    except ValueError:
        raise AllowListError(f"{text!r} is not an IPv4 CIDR range (e.g. 10.20.0.0/16)") from None
