"""Names for the egress proxy: the host's own resolver, and the synthetic addresses the
guest is given for the names it may reach.

``Resolver`` asks the configured servers (``dns_servers``) or the host's (resolv.conf) from
a fresh socket on a random port, with a random id and 0x20 case randomisation, and takes
an answer only with its question byte for byte, case included: a forger must guess port,
id and case. ``Names`` gives each allowed name one address from ``SYNTH_NET`` (198.18.0.0/15,
RFC 2544, never a real destination), kept in the kernel's folder so a rewound VM's
connections still mean the same names. Standard library only.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import json
import os
import re
import secrets
import socket
import struct
import time
from pathlib import Path

from . import dns
from .allowlist import valid_name

SYNTH_NET = ipaddress.IPv4Network("198.18.0.0/15")
MAX_NAMES = 4096
NAMES_FILE = "egress-names.json"
MIN_CACHE, MAX_CACHE = 30.0, 3600.0
RESOLVE_SECONDS = 3.0
NEGATIVE_CACHE = 5.0  # seconds a name that did not resolve is not asked again
MAX_RESOLVING = 32  # names being resolved at once; more queries wait or are dropped
_NAMESERVER_LINE = re.compile(r"^\s*nameserver\s+([0-9.]+)\s*$")


def host_resolvers(path: str = "/etc/resolv.conf") -> list[str]:
    try:
        lines = Path(path).read_text().splitlines()
    except OSError:
        return []
    return [m.group(1) for line in lines if (m := _NAMESERVER_LINE.match(line))]


def _query(name: str, qid: int) -> bytes:
    """An A query for ``name`` with every letter's case drawn at random (0x20)."""
    out = bytearray(struct.pack("!HHHHHH", qid, 0x0100, 1, 0, 0, 0))
    for label in name.split("."):
        mixed = "".join(c.upper() if c.isalpha() and secrets.randbits(1) else c for c in label)
        out += bytes((len(mixed),)) + mixed.encode("ascii")
    return bytes(out + b"\x00" + struct.pack("!HH", dns.TYPE_A, dns.CLASS_IN))


class Resolver:
    """Resolves names for the host's connections (and to decide the guest's answers),
    caching each answer for its TTL (clamped). A response counts only from the server asked,
    on the socket (random port) the query left from, with its id and its question byte for
    byte, case included: a forger must guess port, id and case."""

    def __init__(self, servers: list[str], port: int = dns.DNS_PORT) -> None:
        self.servers, self.port = servers, port
        self.cache: dict[str, tuple[float, list[tuple[bytes, int]]]] = {}
        self.resolving: dict[str, asyncio.Future] = {}  # one question per name in flight

    def busy(self) -> bool:
        """As many names in flight as the host asks at once: a new one is not asked."""
        return len(self.resolving) >= MAX_RESOLVING

    async def resolve(self, name: str) -> list[bytes]:
        """The name's A addresses (through its CNAME chain), [] if none, no answer, or too
        many names in flight (the guest asks again). A name in flight is asked once for
        every waiter; a name that got no addresses is not asked again for
        ``NEGATIVE_CACHE`` seconds."""
        now = time.monotonic()
        if (hit := self.cache.get(name)) is not None and hit[0] > now:
            return [a for a, _ in hit[1]]
        if (pending := self.resolving.get(name)) is None:
            if self.busy():
                return []
            pending = asyncio.ensure_future(self._resolve(name))
            self.resolving[name] = pending
            pending.add_done_callback(lambda _: self.resolving.pop(name, None))
        return await asyncio.shield(pending)

    async def _resolve(self, name: str) -> list[bytes]:
        now = time.monotonic()
        for server in self.servers:
            try:
                found = await asyncio.wait_for(self._ask(server, name), RESOLVE_SECONDS)
            except (OSError, TimeoutError, asyncio.TimeoutError):
                continue
            if found is not None:
                ttl = min((t for _, t in found), default=MIN_CACHE)
                self.cache[name] = (now + min(max(ttl, MIN_CACHE), MAX_CACHE), found)
                if len(self.cache) > MAX_NAMES:
                    self.cache.pop(next(iter(self.cache)))
                return [a for a, _ in found]
        self.cache[name] = (now + NEGATIVE_CACHE, [])
        if len(self.cache) > MAX_NAMES:
            self.cache.pop(next(iter(self.cache)))
        return []

    async def _ask(
        self, server: str, name: str, port: int | None = None
    ) -> list[tuple[bytes, int]] | None:
        port = self.port if port is None else port
        loop = asyncio.get_running_loop()
        qid = secrets.randbits(16)
        query = _query(name, qid)
        question = query[12:]
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            sock.setblocking(False)
            sock.connect((server, port))  # the kernel drops datagrams from anyone else
            await loop.sock_sendall(sock, query)
            while True:
                data = await loop.sock_recv(sock, 4096)
                if len(data) < 12 or struct.unpack_from("!H", data)[0] != qid:
                    continue
                if data[12 : 12 + len(question)] != question:
                    continue
                answer = dns.parse_response(data)
                if answer is None:
                    continue
                if answer.rcode != 0:
                    return []
                return [(a, t) for a, t, _ in dns.chain_addresses(answer)]


class Names:
    """Each allowed name the guest resolved and its synthetic address, kept in the kernel's
    folder so a rewound VM's connections still mean the same names."""

    def __init__(self, path: Path | None) -> None:
        self.path = path
        self.by_name: dict[str, bytes] = {}
        self.by_addr: dict[bytes, str] = {}
        with contextlib.suppress(OSError, ValueError, TypeError, AttributeError):
            for name, addr in json.loads(path.read_text()).items():  # type: ignore[union-attr]
                packed = socket.inet_aton(addr)
                fresh = packed not in self.by_addr and len(self.by_name) < MAX_NAMES
                if fresh and valid_name(name) and ipaddress.IPv4Address(addr) in SYNTH_NET:
                    self.by_name[name], self.by_addr[packed] = packed, name

    def address(self, name: str) -> bytes | None:
        if (addr := self.by_name.get(name)) is not None:
            return addr
        if len(self.by_name) >= MAX_NAMES:
            return None
        # After the highest address given (a file read back may have gaps): never reuse one.
        top = max((int.from_bytes(a, "big") for a in self.by_addr), default=0)
        index = max(int(SYNTH_NET.network_address) + 1, top + 1)
        if ipaddress.IPv4Address(index) not in SYNTH_NET:
            return None
        addr = index.to_bytes(4, "big")
        self.by_name[name], self.by_addr[addr] = addr, name
        if self.path is not None:
            table = {n: socket.inet_ntoa(a) for n, a in self.by_name.items()}
            tmp = self.path.with_suffix(".tmp")
            with contextlib.suppress(OSError):
                tmp.write_text(json.dumps(table))
                os.replace(tmp, self.path)
        return addr

    def name(self, addr: bytes) -> str | None:
        return self.by_addr.get(addr)
