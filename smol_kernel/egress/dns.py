"""The little DNS the network guard reads and writes (RFC 1035), for the allow-list.

Reads a query's name and a response's A and CNAME records; writes NXDOMAIN answers. Every
byte comes from the guest or from a resolver, so the reader is bounded everywhere: a name
is at most 255 bytes and 128 labels, compression pointers must point backwards and at most
``MAX_POINTERS`` are followed (no loops), at most ``MAX_RECORDS`` records are read, and any
record that runs past the message ends the reading (what was read so far stands). Nothing
here raises on bad input: a query that cannot be read is ``None``. Standard library only.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

DNS_PORT = 53
TYPE_A, TYPE_CNAME = 1, 5
CLASS_IN = 1
MAX_NAME_BYTES = 255
MAX_POINTERS = 16
MAX_RECORDS = 64
RCODE_NXDOMAIN = 3


class _Bad(Exception):
    pass


def read_name(msg: bytes, pos: int) -> tuple[str, int]:
    """The name at ``pos`` (lowercase, dot-joined, bytes outside [a-z0-9_-] as '?') and the
    position after it in the message itself (not after a pointer's target)."""
    labels: list[str] = []
    total, jumps, end = 0, 0, None
    while True:
        if pos >= len(msg):
            raise _Bad("name runs past the message")
        n = msg[pos]
        if n & 0xC0 == 0xC0:
            if pos + 1 >= len(msg):
                raise _Bad("truncated pointer")
            target = ((n & 0x3F) << 8) | msg[pos + 1]
            if end is None:
                end = pos + 2
            jumps += 1
            if jumps > MAX_POINTERS or target >= pos:
                raise _Bad("compression loop or forward pointer")
            pos = target
            continue
        if n & 0xC0:
            raise _Bad("reserved label type")
        if n == 0:
            return ".".join(labels), (pos + 1 if end is None else end)
        label = msg[pos + 1 : pos + 1 + n]
        if len(label) != n:
            raise _Bad("label runs past the message")
        total += n + 1
        if total > MAX_NAME_BYTES:
            raise _Bad("name too long")
        text = label.decode("latin-1").lower()
        labels.append("".join(c if c.isascii() and (c.isalnum() or c in "-_") else "?"
                              for c in text))  # fmt: skip
        pos += 1 + n


@dataclass(frozen=True)
class Query:
    qid: int
    flags: int
    name: str
    qtype: int
    end: int  # where the (first) question ends

    @property
    def opcode(self) -> int:
        """0 for an ordinary query (UPDATE, NOTIFY... are others)."""
        return (self.flags >> 11) & 0x0F


def parse_query(msg: bytes) -> Query | None:
    """A query with one question (what resolvers send), or None."""
    try:
        if len(msg) < 12:
            return None
        qid, flags, qd, an = struct.unpack_from("!HHHH", msg)
        if flags & 0x8000 or qd != 1 or an:
            return None
        name, pos = read_name(msg, 12)
        if pos + 4 > len(msg):
            return None
        qtype, _ = struct.unpack_from("!HH", msg, pos)
        return Query(qid, flags, name, qtype, pos + 4)
    except _Bad:
        return None


@dataclass(frozen=True)
class Answer:
    qid: int
    name: str  # the question's
    rcode: int
    addresses: tuple[tuple[str, bytes, int], ...]  # (owner name, 4-byte address, ttl)
    cnames: tuple[tuple[str, str], ...]  # (owner, target)


def parse_response(msg: bytes) -> Answer | None:
    """A response's question and its answer section's A and CNAME records (IN class), or
    None when even the question cannot be read."""
    try:
        if len(msg) < 12:
            return None
        qid, flags, qd, an = struct.unpack_from("!HHHH", msg)
        if not flags & 0x8000 or qd != 1:
            return None
        qname, pos = read_name(msg, 12)
        pos += 4
        if pos > len(msg):
            return None
    except _Bad:
        return None
    addrs: list[tuple[str, bytes, int]] = []
    cnames: list[tuple[str, str]] = []
    try:
        for _ in range(min(an, MAX_RECORDS)):
            owner, pos = read_name(msg, pos)
            if pos + 10 > len(msg):
                break
            rtype, rclass, ttl, rdlen = struct.unpack_from("!HHIH", msg, pos)
            pos += 10
            if pos + rdlen > len(msg):
                break
            if rclass == CLASS_IN and rtype == TYPE_A and rdlen == 4:
                addrs.append((owner, bytes(msg[pos : pos + 4]), ttl))
            elif rclass == CLASS_IN and rtype == TYPE_CNAME:
                target, after = read_name(msg, pos)
                if after <= pos + rdlen:
                    cnames.append((owner, target))
            pos += rdlen
    except _Bad:
        pass
    return Answer(qid, qname, flags & 0x0F, tuple(addrs), tuple(cnames))


def chain_addresses(answer: Answer) -> list[tuple[bytes, int, str]]:
    """The A records that belong to the question: owned by its name or by a name its
    CNAME records lead to from it (a resolver may add unrelated records)."""
    names, frontier = {answer.name}, [answer.name]
    while frontier and len(names) < MAX_RECORDS:
        current = frontier.pop()
        for owner, target in answer.cnames:
            if owner == current and target not in names:
                names.add(target)
                frontier.append(target)
    return [(addr, ttl, owner) for owner, addr, ttl in answer.addresses if owner in names]


def _reply(query: bytes, parsed: Query, rcode: int, answers: int) -> bytes:
    flags = 0x8000 | (parsed.flags & 0x7900) | 0x0080 | rcode
    return struct.pack("!HHHHHH", parsed.qid, flags, 1, answers, 0, 0) + bytes(
        query[12 : parsed.end]
    )


def empty(query: bytes, parsed: Query) -> bytes:
    """The answer "this name has no records of that type" (NOERROR, no answers)."""
    return _reply(query, parsed, 0, 0)


def a_answer(query: bytes, parsed: Query, address: bytes, ttl: int) -> bytes:
    """The answer to an A query: one record, ``address``, for the question's name."""
    record = struct.pack("!HHHIH4s", 0xC00C, TYPE_A, CLASS_IN, ttl, 4, address)
    return _reply(query, parsed, 0, 1) + record


def nxdomain(query: bytes, parsed: Query) -> bytes:
    """The answer "no such name" to ``query``: its id and question, RD copied, RA set."""
    flags = 0x8000 | (parsed.flags & 0x7900) | 0x0080 | RCODE_NXDOMAIN
    return struct.pack("!HHHHHH", parsed.qid, flags, 1, 0, 0, 0) + bytes(query[12 : parsed.end])
