"""The allow-list part of the network guard, on frames built here (no VM needed; the
end-to-end behaviour is in tests/security/test_egress_allowlist.py): entry parsing, the DNS
reader against hostile messages, and the decisions ``Egress`` makes with the frames it
writes back (checked down to their checksums, which the guest's stack verifies)."""

from __future__ import annotations

import ipaddress
import json
import socket
import ssl
import struct

import pytest

from smol_kernel.vm import dns
from smol_kernel.vm.allowlist import AllowList, AllowListError, parse_entry
from smol_kernel.vm.egress import (
    MAX_INSPECT,
    MIN_TTL,
    Egress,
    EgressLog,
    _checksum,
    classify,
)
from smol_kernel.vm.netfilter import Policy

from .test_netfilter import start_guard

GUEST_MAC = bytes.fromhex("525400123456")
PASST_MAC = bytes.fromhex("02fc00000001")
GUEST = "10.0.2.15"
RESOLVER = "10.0.2.3"
# Globally routable (a DNS answer opens nothing else unless private_answers says so).
ALLOWED, OTHER = "151.101.0.10", "151.101.64.20"


# ------------------------------------------------------------------ frames
def frame(dst: str, proto: int, l4: bytes, src: str = GUEST) -> bytes:
    ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(l4), 1, 0, 64, proto, 0,
                     socket.inet_aton(src), socket.inet_aton(dst))  # fmt: skip
    return PASST_MAC + GUEST_MAC + b"\x08\x00" + ip + l4


def tcp(dst: str, dport: int, flags: int = 0x02, seq: int = 1000, ack: int = 0,
        payload: bytes = b"", sport: int = 40000) -> bytes:  # fmt: skip
    seg = struct.pack("!HHIIBBHHH", sport, dport, seq, ack, 0x50, flags, 65535, 0, 0)
    return frame(dst, 6, seg + payload)


def udp(dst: str, dport: int, payload: bytes, sport: int = 41000, src: str = GUEST) -> bytes:
    return frame(dst, 17, struct.pack("!HHHH", sport, dport, 8 + len(payload), 0) + payload,
                 src=src)  # fmt: skip


def inbound_udp(src: str, sport: int, dport: int, payload: bytes) -> bytes:
    seg = struct.pack("!HHHH", sport, dport, 8 + len(payload), 0) + payload
    ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 28 + len(payload), 1, 0, 64, 17, 0,
                     socket.inet_aton(src), socket.inet_aton(GUEST))  # fmt: skip
    return GUEST_MAC + PASST_MAC + b"\x08\x00" + ip + seg


def query(name: str, qid: int = 0x1234, qtype: int = 1) -> bytes:
    q = struct.pack("!HHHHHH", qid, 0x0100, 1, 0, 0, 0)
    q += b"".join(bytes([len(p)]) + p.encode() for p in name.split(".")) + b"\0"
    return q + struct.pack("!HH", qtype, 1)


def response(name: str, records: list[bytes], qid: int = 0x1234) -> bytes:
    q = query(name, qid)
    return q[:2] + struct.pack("!HHHHH", 0x8180, 1, len(records), 0, 0) + q[12:] + b"".join(records)


def a_record(addr: str, ttl: int = 60, owner: bytes = b"\xc0\x0c") -> bytes:
    return owner + struct.pack("!HHIH", 1, 1, ttl, 4) + socket.inet_aton(addr)


def encoded(name: str) -> bytes:
    return b"".join(bytes([len(p)]) + p.encode() for p in name.split(".")) + b"\0"


def check_ipv4(out: bytes) -> tuple[int, bytes]:
    """Asserts the IP and L4 checksums of a frame the guard wrote; (proto, l4 bytes)."""
    assert out[12:14] == b"\x08\x00"
    ip = out[14:34]
    assert _checksum(ip) == 0, "IP header checksum"
    proto, src, dst = ip[9], ip[12:16], ip[16:20]
    l4 = out[34 : 14 + struct.unpack_from("!H", ip, 2)[0]]
    if proto in (6, 17):
        pseudo = src + dst + struct.pack("!BBH", 0, proto, len(l4))
        assert _checksum(pseudo + l4) == 0, "TCP/UDP checksum"
    else:
        assert _checksum(l4) == 0, "ICMP checksum"
    return proto, l4


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def make(allow: list[str] | None, tmp_path=None, clock=None, private=()):
    clock = clock or Clock()
    log = EgressLog(tmp_path / "egress.json" if tmp_path else None, allow)
    eg = Egress(AllowList.parse(allow) if allow else None, [RESOLVER], log, clock, list(private))
    nets = {ipaddress.IPv4Network("192.0.2.1/32")}
    return Policy(host_nets=nets, probe=False, clock=clock, egress=eg), eg, clock


def resolve(policy: Policy, eg: Egress, name: str, addr: str, ttl: int = 60, qid: int = 7):
    """The guest asks for ``name``; the resolver answers ``addr`` (to the id the guard sent,
    which the guest gets back as its own). True if the query left."""
    q = udp(RESOLVER, 53, query(name, qid))
    if not policy.allow_frame(q):
        return False
    out = policy.rewritten or q
    sent_id = struct.unpack_from("!H", out, 42)[0]
    if eg.allow is not None:
        assert out[40:42] == b"\0\0", "the UDP checksum is left out: the payload changed"
    answer = inbound_udp(RESOLVER, 53, 41000, response(name, [a_record(addr, ttl)], sent_id))
    assert policy.allow_inbound(answer)
    back = policy.rewritten_in or answer
    assert struct.unpack_from("!H", back, 42)[0] == qid, "the guest sees the id it used"
    return True


# ------------------------------------------------------------------ entries
@pytest.mark.parametrize("text, field, value, ports", [
    ("pypi.org", "name", "pypi.org", None),
    ("PyPI.org.:443", "name", "pypi.org", (443, 443)),
    ("*.example.com:8000-8100", "suffix", ".example.com", (8000, 8100)),
    ("192.0.2.7", "network", ipaddress.IPv4Network("192.0.2.7/32"), None),
    ("192.0.2.0/24:53", "network", ipaddress.IPv4Network("192.0.2.0/24"), (53, 53)),
])  # fmt: skip
def test_entries_parse(text, field, value, ports):
    e = parse_entry(text)
    assert getattr(e, field) == value and e.ports == ports


@pytest.mark.parametrize("text, says", [
    ("", "empty"), ("pypi.org:0", "1 to 65535"), ("pypi.org:90-80", "lowest first"),
    ("pypi.org:http", "not a port"), ("*.com", "two labels"), ("::1", "IPv6"),
    ("300.1.2.3", "not an IPv4"), ("bad_host!", "not a host name"), ("a..b", "not a host"),
    ("-x.com", "not a host"), ("x" * 64 + ".com", "not a host"),
])  # fmt: skip
def test_bad_entries_say_what_is_accepted(text, says):
    with pytest.raises(AllowListError, match=says):
        parse_entry(text)


def test_wildcards_cover_subdomains_only():
    rules = AllowList.parse(["*.example.com"])
    assert rules.name_allowed("a.example.com") and rules.name_allowed("a.b.example.com")
    assert not rules.name_allowed("example.com") and not rules.name_allowed("badexample.com")


# ------------------------------------------------------------------ the DNS reader
def test_a_response_gives_the_questions_addresses_through_its_cname_chain():
    target = b"\x03cdn\x07example\x03net\x00"
    cname = b"\xc0\x0c" + struct.pack("!HHIH", 5, 1, 300, len(target)) + target
    cdn_ptr = struct.pack("!H", 0xC000 | (12 + len(encoded("pypi.org")) + 4 + 12))
    unrelated = a_record("203.0.113.66", owner=encoded("evil.test"))
    msg = response("pypi.org", [cname, a_record("198.51.100.1", 120, cdn_ptr), unrelated])
    answer = dns.parse_response(msg)
    assert answer is not None and answer.name == "pypi.org"
    assert answer.cnames == (("pypi.org", "cdn.example.net"),)
    got = dns.chain_addresses(answer)
    assert got == [(socket.inet_aton("198.51.100.1"), 120, "cdn.example.net")], (
        "the CNAME's address counts, an unrelated record does not"
    )


def test_hostile_names_end_the_reading_not_the_reader():
    header = struct.pack("!HHHHHH", 1, 0x8180, 1, 1, 0, 0)
    loop = header + b"\xc0\x0c" + bytes(4)  # the question points at itself
    assert dns.parse_response(loop) is None
    forward = header + b"\xc0\x20" + bytes(40)
    assert dns.parse_response(forward) is None
    reserved = header + b"\x80abc" + bytes(8)
    assert dns.parse_response(reserved) is None
    long_name = header + (b"\x3f" + b"a" * 63) * 5 + b"\0" + bytes(4)
    assert dns.parse_response(long_name) is None, "over 255 bytes"
    truncated = response("pypi.org", [a_record("198.51.100.1")])[:-3]
    answer = dns.parse_response(truncated)
    assert answer is not None and answer.addresses == (), "a record past the end is dropped"
    for cut in range(len(truncated)):
        dns.parse_response(truncated[:cut])  # never raises
        dns.parse_query(truncated[:cut])


def test_a_chain_of_pointers_is_bounded():
    msg = bytearray(response("a.b", []))
    # Each record's owner points at the previous one: a chain longer than MAX_POINTERS.
    start = len(msg)
    prev = 12
    for _ in range(dns.MAX_POINTERS + 4):
        here = len(msg)
        msg += struct.pack("!H", 0xC000 | prev) + struct.pack("!HHIH", 1, 1, 60, 4) + bytes(4)
        prev = here
    assert start < len(msg)
    ok = dns.parse_response(bytes(msg))
    assert ok is not None  # the early records are read, the late ones are not a loop


def test_huge_counts_read_at_most_max_records():
    records = [a_record(f"198.51.100.{i % 250}") for i in range(200)]
    msg = bytearray(response("pypi.org", records))
    struct.pack_into("!H", msg, 6, 65535)
    answer = dns.parse_response(bytes(msg))
    assert answer is not None and len(answer.addresses) == dns.MAX_RECORDS


def test_queries_and_nxdomain():
    q = query("blocked.test", qid=0xBEEF)
    parsed = dns.parse_query(q)
    assert parsed is not None and parsed.name == "blocked.test" and parsed.qtype == 1
    nx = dns.nxdomain(q, parsed)
    assert nx[:2] == b"\xbe\xef" and nx[3] & 0x0F == 3 and nx[2] & 0x80
    assert dns.parse_query(response("x.test", [])) is None, "a response is not a query"
    assert dns.parse_query(b"\0" * 11) is None


# ------------------------------------------------------------------ decisions
def test_names_not_on_the_list_get_nxdomain_at_once(tmp_path):
    policy, eg, _ = make(["allowed.test"], tmp_path)
    assert not policy.allow_frame(udp(RESOLVER, 53, query("blocked.test", 0x4242)))
    (out,) = eg.to_guest
    proto, l4 = check_ipv4(out)
    assert proto == 17 and out[26:30] == socket.inet_aton(RESOLVER)
    sport, dport = struct.unpack_from("!HH", l4)
    assert (sport, dport) == (53, 41000)
    assert l4[8:10] == b"\x42\x42" and l4[11] & 0x0F == 3, "NXDOMAIN for the same id"
    log = json.loads((tmp_path / "egress.json").read_text())
    assert log["blocked"] == 1 and log["entries"][0]["name"] == "blocked.test"


def test_an_allowed_name_opens_its_addresses_and_nothing_else(tmp_path):
    policy, eg, clock = make(["allowed.test"], tmp_path)
    assert not policy.allow_frame(tcp(ALLOWED, 80)), "not before the name is resolved"
    eg.to_guest.clear()
    assert resolve(policy, eg, "allowed.test", ALLOWED)
    assert policy.allow_frame(tcp(ALLOWED, 80, sport=40001))
    assert not eg.to_guest
    assert not policy.allow_frame(tcp(OTHER, 80, seq=5000))
    (rst,) = eg.to_guest
    proto, l4 = check_ipv4(rst)
    _, _, _, ack, _, flags = struct.unpack_from("!HHIIBB", l4)
    assert proto == 6 and flags == 0x14 and ack == 5001, "RST+ACK for the SYN"
    clock.now += MIN_TTL + 61
    assert not policy.allow_frame(tcp(ALLOWED, 80, sport=40002)), "closed after the TTL"


def test_an_answer_the_guard_did_not_let_out_opens_nothing():
    policy, _, _ = make(["allowed.test"])
    assert policy.allow_frame(udp(RESOLVER, 53, query("allowed.test", 99)))
    assert policy.rewritten is not None
    sent_id = struct.unpack_from("!H", policy.rewritten, 42)[0]
    # A spoofer who knows the guest's id (99) but not the id the guard sent:
    guess = 99 if sent_id != 99 else 98
    stray = response("allowed.test", [a_record(ALLOWED)], qid=guess)
    assert not policy.allow_inbound(inbound_udp(RESOLVER, 53, 41000, stray))
    other = response("other.test", [a_record(ALLOWED)], qid=sent_id)
    assert not policy.allow_inbound(inbound_udp(RESOLVER, 53, 41000, other)), "other name"
    assert not policy.allow_frame(tcp(ALLOWED, 80))


def test_answers_open_private_addresses_only_in_listed_ranges(tmp_path):
    policy, eg, _ = make(["allowed.test"], tmp_path)
    resolve(policy, eg, "allowed.test", "192.168.1.1")
    assert not policy.allow_frame(tcp("192.168.1.1", 80)), "DNS rebinding opens nothing"
    resolve(policy, eg, "allowed.test", "100.64.0.1", qid=8)
    assert not policy.allow_frame(tcp("100.64.0.1", 80))
    eg.log.flush(force=True)
    log = json.loads((tmp_path / "egress.json").read_text())
    assert any(e["protocol"] == "dns-answer" and e["address"] == "192.168.1.1"
               for e in log["entries"])  # fmt: skip
    policy, eg, _ = make(["allowed.test"], private=["192.168.0.0/16"])
    resolve(policy, eg, "allowed.test", "192.168.1.1")
    assert policy.allow_frame(tcp("192.168.1.1", 80))


def test_only_ordinary_queries_leave():
    policy, _, _ = make(["allowed.test"])
    update = bytearray(query("allowed.test"))
    update[2] |= 5 << 3  # opcode UPDATE
    assert not policy.allow_frame(udp(RESOLVER, 53, bytes(update)))


def test_ports_wildcards_and_cidr(tmp_path):
    policy, eg, _ = make(["allowed.test:8080", "*.allowed.test", "203.0.113.0/28:22"])
    resolve(policy, eg, "allowed.test", ALLOWED)
    assert policy.allow_frame(tcp(ALLOWED, 8080))
    assert not policy.allow_frame(tcp(ALLOWED, 9090)), "another port of the allowed address"
    assert resolve(policy, eg, "api.allowed.test", OTHER, qid=8)
    assert policy.allow_frame(tcp(OTHER, 9090)), "a wildcard name with no port: any port"
    assert policy.allow_frame(tcp("203.0.113.5", 22))
    assert not policy.allow_frame(tcp("203.0.113.5", 23))
    assert not policy.allow_frame(tcp("203.0.113.17", 22))


def test_names_open_tcp_only():
    policy, eg, _ = make(["allowed.test"])
    resolve(policy, eg, "allowed.test", ALLOWED)
    assert not policy.allow_frame(udp(ALLOWED, 443, b"quic")), "QUIC would hide its SNI"
    ping = frame(ALLOWED, 1, struct.pack("!BBHHH", 8, 0, 0, 1, 1) + bytes(8))
    assert not policy.allow_frame(ping)


def test_udp_and_ping_to_other_addresses_are_refused(tmp_path):
    policy, eg, _ = make(["203.0.113.0/28"])
    assert policy.allow_frame(udp("203.0.113.1", 9999, b"x"))
    assert not policy.allow_frame(udp(OTHER, 9999, b"x"))
    (icmp,) = eg.to_guest
    proto, l4 = check_ipv4(icmp)
    assert proto == 1 and l4[:2] == b"\x03\x0d", "unreachable, administratively prohibited"
    ping = frame(OTHER, 1, struct.pack("!BBHHH", 8, 0, 0, 1, 1) + bytes(8))
    assert not policy.allow_frame(ping)


def test_the_host_stays_blocked_whatever_the_list_says(tmp_path):
    policy, eg, _ = make(["0.0.0.0/0", "*.example.com"], tmp_path)
    for dst in ("127.0.0.1", "192.0.2.1", "169.254.169.254", "10.0.2.2"):
        assert not policy.allow_frame(tcp(dst, 80))
    assert policy.allow_frame(tcp(OTHER, 80))
    eg.log.flush(force=True)
    blocked = {e["address"] for e in json.loads((tmp_path / "egress.json").read_text())[
        "entries"] if e["verdict"] == "blocked"}  # fmt: skip
    assert blocked == {"127.0.0.1", "192.0.2.1", "169.254.169.254", "10.0.2.2"}


def test_without_a_list_everything_passes_and_is_logged(tmp_path):
    policy, eg, _ = make(None, tmp_path)
    assert resolve(policy, eg, "anything.test", ALLOWED)
    assert policy.allow_frame(tcp(ALLOWED, 443))
    assert policy.allow_frame(tcp(OTHER, 443))
    eg.log.flush(force=True)
    entries = json.loads((tmp_path / "egress.json").read_text())["entries"]
    seen = {(e["name"], e["address"], e["protocol"]) for e in entries}
    assert ("anything.test", ALLOWED, "tcp") in seen and (None, OTHER, "tcp") in seen


def client_hello(sni: str) -> bytes:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    obj = ctx.wrap_bio(incoming, outgoing, server_hostname=sni)
    with pytest.raises(ssl.SSLWantReadError):
        obj.do_handshake()
    return outgoing.read()


def from_passt(src: str, sport: int, dport: int, flags: int, seq: int, ack: int,
               payload: bytes = b"") -> bytes:  # fmt: skip
    """A TCP segment passt sends the guest."""
    seg = struct.pack("!HHIIBBHHH", sport, dport, seq, ack, 0x50, flags, 65535, 0, 0)
    ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 40 + len(payload), 1, 0, 64, 6, 0,
                     socket.inet_aton(src), socket.inet_aton(GUEST))  # fmt: skip
    return GUEST_MAC + PASST_MAC + b"\x08\x00" + ip + seg + payload


def connect(policy: Policy, port: int, sport: int, seq: int = 100) -> int:
    """The guest's SYN, and passt's SYN-ACK for it; the first data sequence number."""
    assert policy.allow_frame(tcp(ALLOWED, port, sport=sport, seq=seq))
    policy.allow_inbound(from_passt(ALLOWED, port, sport, 0x12, 7000, (seq + 1) & 0xFFFFFFFF))
    return (seq + 1) & 0xFFFFFFFF


@pytest.mark.parametrize("split", [None, 40, 200])
def test_tls_to_a_named_address_must_name_an_allowed_host(split):
    policy, eg, _ = make(["allowed.test", "*.ok.test"])
    resolve(policy, eg, "allowed.test", ALLOWED)
    for n, (sni, ok) in enumerate([("allowed.test", True), ("a.ok.test", True),
                                   ("evil.test", False)]):  # fmt: skip
        hello = client_hello(sni)
        seq = connect(policy, 443, 50000 + n)
        parts = [hello] if split is None else [hello[:split], hello[split:]]
        results = []
        for part in parts:
            results.append(policy.allow_frame(tcp(ALLOWED, 443, 0x18, seq, 777, part,
                                                  sport=50000 + n)))  # fmt: skip
            seq += len(part)
            if not results[-1]:
                break  # the guest's side is reset
        # Refused at the segment that completes the hello (all of it is read), not later.
        assert all(results) is ok, (sni, results)
        assert len(results) == len(parts)
    assert len(eg.to_passt) == 1 and len(eg.to_guest) == 1
    _, l4 = check_ipv4(eg.to_guest[0])
    assert l4[13] & 0x04 and struct.unpack_from("!I", l4, 4)[0] == 777, "RST at the ack"
    _, l4 = check_ipv4(eg.to_passt[0])
    assert l4[13] & 0x04, "passt's side is reset too"


def test_http_must_name_an_allowed_host():
    policy, eg, _ = make(["allowed.test:8080"])
    resolve(policy, eg, "allowed.test", ALLOWED)
    for n, (host, ok) in enumerate([(b"allowed.test:8080", True), (b"evil.test", False),
                                    (None, False)]):  # fmt: skip
        seq = connect(policy, 8080, 51000 + n)
        head = b"GET / HTTP/1.1\r\n" + (b"Host: " + host + b"\r\n" if host else b"")
        assert policy.allow_frame(tcp(ALLOWED, 8080, 0x18, seq, 1, head, sport=51000 + n))
        end = policy.allow_frame(tcp(ALLOWED, 8080, 0x18, seq + len(head), 1, b"\r\n",
                                     sport=51000 + n))  # fmt: skip
        assert end is ok, host


def test_inspection_is_bounded_and_gaps_wait():
    policy, eg, _ = make(["allowed.test"])
    resolve(policy, eg, "allowed.test", ALLOWED)
    seq = connect(policy, 443, 52000)
    assert not policy.allow_frame(tcp(ALLOWED, 443, 0x18, seq + 10, 1, b"\x16\x03\x01",
                                      sport=52000)), "out of order: waits for the gap"  # fmt: skip
    # A TLS record claiming to be huge, fed in pieces, never shows an SNI.
    head = b"\x16\x03\x01\xff\xff\x01\x00\xff\xfb\x03\x03" + bytes(32) + b"\x00"
    ok = policy.allow_frame(tcp(ALLOWED, 443, 0x18, seq, 1, head, sport=52000))
    seq += len(head)
    while ok and seq < 200 + MAX_INSPECT:
        ok = policy.allow_frame(tcp(ALLOWED, 443, 0x18, seq, 1, bytes(1400), sport=52000))
        seq += 1400
    assert not ok, "refused once MAX_INSPECT bytes say nothing"
    other = connect(policy, 22, 52001)
    ssh = b"SSH-2.0-x\r\n"
    assert not policy.allow_frame(tcp(ALLOWED, 22, 0x18, other, 1, ssh, sport=52001)), (
        "neither TLS nor HTTP: refused unless a name entry lists the port"
    )
    policy, eg, _ = make(["allowed.test:22"])
    resolve(policy, eg, "allowed.test", ALLOWED)
    other = connect(policy, 22, 52002)
    assert policy.allow_frame(tcp(ALLOWED, 22, 0x18, other, 1, ssh, sport=52002))


def test_segments_of_no_connection_reach_passt_only_for_open_destinations():
    policy, eg, _ = make(["allowed.test"])
    assert not policy.allow_frame(tcp(OTHER, 80, flags=0x10, seq=5)), "a bare ACK"
    assert not policy.allow_frame(tcp(OTHER, 80, flags=0x12, seq=5)), "SYN+ACK: no opening"
    assert not policy.allow_frame(tcp(OTHER, 80, flags=0x18, seq=5, payload=b"GET / HTTP/1.1"))
    assert not eg.to_guest, "dropped quietly: no reset storm for stray segments"
    resolve(policy, eg, "allowed.test", ALLOWED)
    assert not policy.allow_frame(tcp(ALLOWED, 80, flags=0x10, seq=5)), (
        "a name-opened stream starts with a SYN the guard saw"
    )
    policy, eg, _ = make(["151.101.0.0/16"])
    assert policy.allow_frame(tcp(ALLOWED, 80, flags=0x10, seq=5)), "an address entry: yes"


def head_frames(policy, port, sport, parts, seq=101):
    results = []
    for part in parts:
        results.append(policy.allow_frame(tcp(ALLOWED, port, 0x18, seq, 1, part, sport=sport)))
        seq += len(part)
    return results


@pytest.mark.parametrize("head", [
    b"\r\nGET / HTTP/1.1\r\nHost: evil.test\r\n\r\n",
    b"get / HTTP/1.1\r\nHost: evil.test\r\n\r\n",
    b"PROPFIND / HTTP/1.1\r\nHost: evil.test\r\n\r\n",
    b"GET http://evil.test/ HTTP/1.1\r\nHost: allowed.test\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: allowed.test\r\nHost: evil.test\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: evil.test:1.allowed.test\r\n\r\n",
    b"CONNECT evil.test:443 HTTP/1.1\r\nHost: allowed.test\r\n\r\n",
    b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n",
    b"GET http://user@allowed.test/ HTTP/1.1\r\nHost: allowed.test\r\n\r\n",
])  # fmt: skip
def test_http_that_names_another_host_in_any_way_is_refused(head):
    policy, eg, _ = make(["allowed.test", "*.allowed.test"])
    resolve(policy, eg, "allowed.test", ALLOWED)
    connect(policy, 80, 53000)
    assert head_frames(policy, 80, 53000, [head]) == [False], head


def test_http_requests_that_name_only_allowed_hosts_pass():
    policy, eg, _ = make(["allowed.test", "*.allowed.test"])
    resolve(policy, eg, "allowed.test", ALLOWED)
    for n, head in enumerate([
        b"GET / HTTP/1.1\r\nHost: allowed.test\r\n\r\n",
        b"\r\nget /x HTTP/1.0\r\nhost: API.allowed.test:80\r\n\r\n",
        b"GET http://allowed.test/ HTTP/1.1\r\nHost: allowed.test\r\n\r\n",
    ]):  # fmt: skip
        connect(policy, 80, 53100 + n)
        assert head_frames(policy, 80, 53100 + n, [head]) == [True], head


def test_tls_hellos_that_hide_or_bend_the_name_are_refused():
    policy, eg, _ = make(["allowed.test"])
    resolve(policy, eg, "allowed.test", ALLOWED)
    good = client_hello("allowed.test")
    # Encrypted client hello: the same hello with a 0xfe0d extension appended.
    body = bytearray(good[9:])
    at = 2 + 32
    at += 1 + body[at]
    at += 2 + struct.unpack_from("!H", body, at)[0]
    at += 1 + body[at]
    struct.pack_into("!H", body, at, struct.unpack_from("!H", body, at)[0] + 8)
    body += struct.pack("!HH", 0xFE0D, 4) + b"ech!"
    hello = b"\x01" + len(body).to_bytes(3, "big") + bytes(body)
    record = b"\x16\x03\x01" + struct.pack("!H", len(hello)) + hello
    connect(policy, 443, 54000)
    assert head_frames(policy, 443, 54000, [record]) == [False], "encrypted client hello"
    bent = good.replace(b"allowed.test", b"allowed.tes\x85")
    connect(policy, 443, 54001)
    assert head_frames(policy, 443, 54001, [bent]) == [False], "not a valid host name"
    connect(policy, 443, 54002)
    assert head_frames(policy, 443, 54002, [good]) == [True]


def test_the_stream_passt_sees_is_the_stream_the_guard_read():
    """The review's desync attacks: each would get a hello for evil.test past the check."""
    evil = client_hello("evil.test")
    policy, eg, _ = make(["allowed.test"])
    resolve(policy, eg, "allowed.test", ALLOWED)
    # A frame whose IP length disagrees with its size (passt drops it, so must the guard).
    connect(policy, 443, 55000)
    padded = tcp(ALLOWED, 443, 0x18, 101, 1, b"AAAA", sport=55000) + b"\0"
    assert not policy.allow_frame(padded)
    assert head_frames(policy, 443, 55000, [evil]) == [False]
    # A resend with other bytes over what was read, or a resend one byte early.
    connect(policy, 443, 55001)
    assert head_frames(policy, 443, 55001, [b"\x16"]) == [True]
    resets = len(eg.to_passt)
    assert not policy.allow_frame(tcp(ALLOWED, 443, 0x18, 100, 1, evil, sport=55001))
    assert len(eg.to_passt) == resets, "dropped, not refused: the stream goes on"
    assert head_frames(policy, 443, 55001, [evil[:1] + b"\x00" + evil[2:]]) == [False]
    assert not policy.allow_frame(tcp(ALLOWED, 443, 0x18, 102, 1, evil[1:], sport=55001)), (
        "after a refusal, no segment of that stream reaches passt"
    )
    # A second SYN with another sequence number on a live stream.
    connect(policy, 443, 55002)
    assert not policy.allow_frame(tcp(ALLOWED, 443, 0x02, 5000, 0, sport=55002))
    # Bytes the guard decided on can never come again as others (data passt dropped).
    policy, eg, _ = make(["allowed.test:443"])
    resolve(policy, eg, "allowed.test", ALLOWED)
    connect(policy, 443, 55003)
    assert head_frames(policy, 443, 55003, [b"AAAA"]) == [True], "other, on a listed port"
    assert head_frames(policy, 443, 55003, [evil]) == [False]
    # A FIN carrying the request is read like any other segment.
    policy, eg, _ = make(["allowed.test"])
    resolve(policy, eg, "allowed.test", ALLOWED)
    connect(policy, 80, 55004)
    fin = tcp(ALLOWED, 80, 0x19, 101, 1, b"GET / HTTP/1.1\r\nHost: evil.test\r\n\r\n",
              sport=55004)  # fmt: skip
    assert not policy.allow_frame(fin)
    # Data on a reset never reaches passt.
    connect(policy, 80, 55005)
    assert not policy.allow_frame(tcp(ALLOWED, 80, 0x04, 101, 1, b"x", sport=55005))


def test_inspected_streams_are_capped():
    policy, eg, _ = make(["allowed.test"])
    resolve(policy, eg, "allowed.test", ALLOWED)
    for i in range(3000):
        policy.allow_frame(tcp(ALLOWED, 443, sport=10000 + i))
    assert len(eg.inspect) <= 256 and len(policy.tcp_flows) <= 256


def test_classify():
    assert classify(b"GE")[0] == "more"
    assert classify(b"SSH-2.0")[0] == "other"
    assert classify(b"\x16\x03\x01\x00\x05\x02\x00\x00\x01")[0] == "bad", "a server hello"


def test_syn_data_and_early_resends_never_reach_passt():
    policy, eg, clock = make(["allowed.test"])
    resolve(policy, eg, "allowed.test", ALLOWED)
    evil = b"GET / HTTP/1.1\r\nHost: evil.test\r\n\r\n"
    assert not policy.allow_frame(tcp(ALLOWED, 80, 0x02, 100, 0, evil, sport=62000)), "SYN+data"
    assert policy.allow_frame(tcp(ALLOWED, 80, 0x02, 100, 0, sport=62000))
    assert not policy.allow_frame(tcp(ALLOWED, 80, 0x02, 100, 0, sport=62000)), (
        "a resend in the same breath (passt 2023.03 loops on two frames of one opening)"
    )
    assert not policy.allow_frame(tcp(ALLOWED, 80, 0x10, 101, 1, sport=62000)), (
        "nothing but the SYN before passt answers it"
    )
    clock.now += 1
    assert policy.allow_frame(tcp(ALLOWED, 80, 0x02, 100, 0, sport=62000)), "a timed resend"
    policy.allow_inbound(from_passt(ALLOWED, 80, 62000, 0x12, 7000, 101))
    assert not policy.allow_frame(tcp(ALLOWED, 80, 0x02, 100, 0, evil, sport=62000))
    assert not policy.allow_frame(tcp(ALLOWED, 80, 0x02, 100, 0, sport=62000)), "answered"
    assert head_frames(policy, 80, 62000, [evil]) == [False]


def test_the_guard_writes_its_answers_to_the_guest(tmp_path):
    policy, _, _ = make(["allowed.test"], tmp_path)
    vm, _passt, t = start_guard(policy)
    q = udp(RESOLVER, 53, query("blocked.test"))
    vm.sendall(struct.pack("!I", len(q)) + q)
    vm.settimeout(5)
    (length,) = struct.unpack("!I", vm.recv(4))
    answer = vm.recv(length)
    assert check_ipv4(answer)[0] == 17 and answer[14 + 28 + 3] & 0x0F == 3
    vm.close()
    t.join(5)
    assert not t.is_alive()
    assert json.loads((tmp_path / "egress.json").read_text())["blocked"] == 1


# ------------------------------------------------------------------ the second review
def test_an_arp_after_a_query_goes_to_passt_as_itself():
    """A frame that does not pass through the allow-list (ARP) must not be replaced by the
    previous DNS query, under the ARP's own length (passt would then read a frame the
    guest hid after the question)."""
    policy, _, _ = make(["allowed.test"])
    vm, passt, t = start_guard(policy)
    hidden = tcp("127.0.0.1", 8888)
    q = udp(RESOLVER, 53, query("allowed.test") + struct.pack("!I", len(hidden)) + hidden)
    arp = PASST_MAC + GUEST_MAC + b"\x08\x06" + struct.pack(
        "!HHBBH6s4s6s4s", 1, 0x0800, 6, 4, 1, GUEST_MAC, socket.inet_aton(GUEST), bytes(6),
        socket.inet_aton("10.0.2.2"))  # fmt: skip
    vm.sendall(b"".join(struct.pack("!I", len(f)) + f for f in (q, arp)))
    passt.settimeout(5)
    got = b""
    while len(got) < 8 + len(q) + len(arp):
        got += passt.recv(65536)
    (first,) = struct.unpack_from("!I", got)
    assert first == len(q) and got[4 + first : 8 + first] == struct.pack("!I", len(arp))
    assert got[8 + first :] == arp, "the ARP went as itself"
    vm.close()
    t.join(5)


def test_data_on_a_reset_keeps_the_stream_inspected():
    policy, eg, _ = make(["allowed.test"])
    resolve(policy, eg, "allowed.test", ALLOWED)
    connect(policy, 443, 56000)
    assert not policy.allow_frame(tcp(ALLOWED, 443, 0x04, 101, 1, b"x", sport=56000))
    assert head_frames(policy, 443, 56000, [client_hello("evil.test")]) == [False]


def test_a_forgotten_stream_is_reset_on_both_sides_and_passes_nothing_more():
    policy, eg, clock = make(["allowed.test"])
    resolve(policy, eg, "allowed.test", ALLOWED)
    first = connect(policy, 443, 57000)
    assert head_frames(policy, 443, 57000, [b"\x16\x03\x01"], seq=first) == [True]
    # The flow leaves the guard's flow table (a FIN), then 256 other streams need room.
    assert policy.allow_frame(tcp(ALLOWED, 443, 0x11, first + 3, 1, sport=57000))
    eg.to_passt.clear()
    eg.to_guest.clear()
    clock.now += 11  # quiet long enough: a half-closed download would still be moving
    for i in range(256):
        policy.allow_frame(tcp(ALLOWED, 443, sport=20000 + i))
    to_passt = [f for f in eg.to_passt if struct.unpack_from("!H", f, 34)[0] == 57000]
    to_guest = [f for f in eg.to_guest if struct.unpack_from("!H", f, 36)[0] == 57000]
    assert len(to_passt) == 1 and to_passt[0][47] & 0x04, "passt's side is reset"
    assert len(to_guest) == 1 and to_guest[0][47] & 0x04, "and the guest's"
    assert (57000, socket.inet_aton(ALLOWED), 443) not in eg.inspect
    assert not policy.allow_frame(tcp(ALLOWED, 443, 0x18, first + 3, 1, b"x", sport=57000)), (
        "a forgotten name-opened stream passes nothing"
    )


def test_no_data_before_passt_answered_this_very_syn():
    """A connection passt still holds on the tuple (closed, not yet reaped) ignores a new
    SYN: without a SYN-ACK for the new ISN, nothing may be appended to the old stream."""
    policy, eg, _ = make(["allowed.test"])
    resolve(policy, eg, "allowed.test", ALLOWED)
    assert policy.allow_frame(tcp(ALLOWED, 80, seq=100, sport=57100))
    head = b"GET / HTTP/1.1\r\nHost: allowed.test\r\n\r\n"
    assert not policy.allow_frame(tcp(ALLOWED, 80, 0x18, 101, 1, head, sport=57100))
    policy.allow_inbound(from_passt(ALLOWED, 80, 57100, 0x12, 7000, 555))  # another ISN's
    assert not policy.allow_frame(tcp(ALLOWED, 80, 0x18, 101, 1, head, sport=57100))
    policy.allow_inbound(from_passt(ALLOWED, 80, 57100, 0x12, 7000, 101))
    assert policy.allow_frame(tcp(ALLOWED, 80, 0x18, 101, 1, head, sport=57100))


def test_a_tuple_reused_after_its_stream_closed_starts_afresh():
    policy, eg, _ = make(["allowed.test"])
    resolve(policy, eg, "allowed.test", ALLOWED)
    first = connect(policy, 80, 57200)
    head = b"GET / HTTP/1.1\r\nHost: allowed.test\r\n\r\n"
    assert head_frames(policy, 80, 57200, [head], seq=first) == [True]
    assert policy.allow_frame(tcp(ALLOWED, 80, 0x11, first + len(head), 1, sport=57200))
    again = connect(policy, 80, 57200, seq=90000)
    assert head_frames(policy, 80, 57200, [head], seq=again) == [True]


def test_the_guards_position_is_passts_not_the_guests():
    """Segments far ahead of what passt took cannot move the guard's reference: the review's
    jump (and 2 GiB of data passt never took) left seq == start read as new data."""
    policy, eg, _ = make(["allowed.test"])
    resolve(policy, eg, "allowed.test", ALLOWED)
    start = connect(policy, 443, 57300)
    hello = client_hello("allowed.test")
    assert head_frames(policy, 443, 57300, [hello], seq=start) == [True]
    seq = start + len(hello)
    while seq - start < MAX_INSPECT + 2000:
        assert policy.allow_frame(tcp(ALLOWED, 443, 0x18, seq, 1, bytes(1000), sport=57300))
        seq += 1000
    jump = (start + (1 << 31) + 5) & 0xFFFFFFFF
    assert not policy.allow_frame(tcp(ALLOWED, 443, 0x18, jump, 1, b"x", sport=57300))
    evil = client_hello("evil.test")
    assert not policy.allow_frame(tcp(ALLOWED, 443, 0x18, start, 1, evil, sport=57300))
    # Once passt acknowledges past the first bytes, the sequence space moves with it.
    policy.allow_inbound(from_passt(ALLOWED, 443, 57300, 0x10, 7001, seq & 0xFFFFFFFF))
    assert policy.allow_frame(tcp(ALLOWED, 443, 0x18, seq, 1, bytes(100), sport=57300))


def test_a_frame_passt_never_makes_ends_the_network(tmp_path):
    policy, _, _ = make(["allowed.test"], tmp_path)
    vm, passt, t = start_guard(policy)
    good = from_passt(ALLOWED, 80, 40000, 0x10, 1, 1)
    bad = good[:16] + struct.pack("!H", 9999) + good[18:]  # an IPv4 length that lies
    passt.sendall(b"".join(struct.pack("!I", len(f)) + f for f in (good, bad, good)))
    vm.settimeout(5)
    got = b""
    while chunk := vm.recv(65536):
        got += chunk
    assert got == struct.pack("!I", len(good)) + good, "the first passed, then the network ended"
    t.join(5)
    assert not t.is_alive()


def test_http_split_after_a_cr_and_connect_without_host():
    policy, eg, _ = make(["allowed.test", "proxy.test:3128", "pypi.org:443"])
    resolve(policy, eg, "allowed.test", ALLOWED)
    head = b"GET / HTTP/1.1\r\nHost: allowed.test\r\nAccept: */*\r\n\r\n"
    for cut in range(1, len(head)):
        sport = 57400 + cut
        first = connect(policy, 80, sport)
        assert head_frames(policy, 80, sport, [head[:cut], head[cut:]], seq=first) == [
            True, True
        ], cut  # fmt: skip
    policy, eg, _ = make(["proxy.test:3128", "pypi.org:443"])
    resolve(policy, eg, "proxy.test", ALLOWED)
    for n, (connect_head, ok) in enumerate([
        (b"CONNECT pypi.org:443 HTTP/1.1\r\n\r\n", True),
        (b"CONNECT pypi.org:443 HTTP/1.1\r\nHost: pypi.org:443\r\n\r\n", True),
        (b"CONNECT pypi.org:22 HTTP/1.1\r\n\r\n", False),
        (b"CONNECT evil.test:443 HTTP/1.1\r\nHost: pypi.org:443\r\n\r\n", False),
    ]):  # fmt: skip
        first = connect(policy, 3128, 57600 + n)
        assert head_frames(policy, 3128, 57600 + n, [connect_head], seq=first) == [ok]


def test_everything_after_the_first_16_kib_flows_once_decided():
    policy, eg, _ = make(["allowed.test"])
    resolve(policy, eg, "allowed.test", ALLOWED)
    connect(policy, 443, 58000)
    hello = client_hello("allowed.test")
    assert head_frames(policy, 443, 58000, [hello]) == [True]
    seq, sent = 101 + len(hello), 0
    while sent < 64 * 1024:
        assert policy.allow_frame(tcp(ALLOWED, 443, 0x18, seq, 1, bytes(1400), sport=58000)), sent
        seq, sent = seq + 1400, sent + 1400
    # A resend of early bytes still has to match what was read.
    assert not policy.allow_frame(tcp(ALLOWED, 443, 0x18, 101, 1, b"\x17" * 5, sport=58000))
    assert policy.allow_frame(tcp(ALLOWED, 443, 0x18, 101, 1, hello[:5], sport=58000))


def test_offsets_unwrap_past_the_sequence_space():
    policy, eg, _ = make(["allowed.test"])
    resolve(policy, eg, "allowed.test", ALLOWED)
    isn = 0xFFFFFF00  # the stream's sequence numbers wrap after 255 bytes
    seq = connect(policy, 80, 59000, seq=isn)
    head = b"GET / HTTP/1.1\r\nHost: allowed.test\r\n\r\n"
    for _ in range(20):
        assert policy.allow_frame(tcp(ALLOWED, 80, 0x18, seq, 1, head, sport=59000))
        seq = (seq + len(head)) & 0xFFFFFFFF


@pytest.mark.parametrize("head", [
    b"GET /x HTTP/1.1\nHost: evil.test\n\n",
    b"GET / HTTP/1.1\r\nX: a\nHost: evil.test\r\nHost : allowed.test\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost : allowed.test\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: allowed.test\r\n evil\r\n\r\n",
    b"CONNECT allowed.test:22 HTTP/1.1\r\nHost: allowed.test\r\n\r\n",
])  # fmt: skip
def test_http_heads_servers_read_leniently_are_refused(head):
    policy, eg, _ = make(["allowed.test:443"])
    resolve(policy, eg, "allowed.test", ALLOWED)
    connect(policy, 443, 60000)
    assert head_frames(policy, 443, 60000, [head]) == [False], head


def test_names_are_compared_without_case_or_trailing_dot():
    policy, eg, _ = make(["allowed.test"])
    resolve(policy, eg, "allowed.test", ALLOWED)
    connect(policy, 443, 61000)
    assert head_frames(policy, 443, 61000, [client_hello("Allowed.Test.")]) == [True]
    connect(policy, 80, 61001)
    assert head_frames(policy, 80, 61001, [b"GET / HTTP/1.1\r\nHost: allowed.test.\r\n\r\n"]) == [
        True
    ]
    connect(policy, 443, 61002)
    connect_head = b"CONNECT allowed.test:443 HTTP/1.1\r\nHost: allowed.test:443\r\n\r\n"
    assert head_frames(policy, 443, 61002, [connect_head]) == [True]
