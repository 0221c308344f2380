"""The "internet" for the network tests: runs inside a network namespace the test creates.

Serves HTTP (GET /marker -> the marker) and answers DNS A queries for NAME with ADDR, so a
guest with network on can be shown to reach a host that is neither the host itself nor its
loopback, by name. A UDP service on UDP_PORT records who sent what (GET /udp, JSON; GET
/udp/reset), answers b"echo" and, from UDP_PORT - 1, sends b"stranger" to the same peer: a
datagram the guest never asked for. Usage: python netns_services.py ADDR HTTP_PORT NAME MARKER
"""

from __future__ import annotations

import json
import socket
import struct
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


def dns_answer(query: bytes, name: str, addr: str) -> bytes | None:
    if len(query) < 12:
        return None
    qid = query[:2]
    pos, labels = 12, []
    while pos < len(query) and query[pos]:
        n = query[pos]
        labels.append(query[pos + 1 : pos + 1 + n].decode("ascii", "replace"))
        pos += 1 + n
    question = query[12 : pos + 5]
    qtype = struct.unpack_from("!H", query, pos + 1)[0] if pos + 3 <= len(query) else 0
    found = ".".join(labels).lower() == name and qtype == 1
    header = qid + struct.pack("!HHHHH", 0x8180 if found else 0x8183, 1, int(found), 0, 0)
    answer = struct.pack("!HHHIH4s", 0xC00C, 1, 1, 60, 4, socket.inet_aton(addr)) if found else b""
    return header + question + answer


def serve_dns(addr: str, name: str) -> None:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind((addr, 53))
    while True:
        query, peer = sock.recvfrom(512)
        reply = dns_answer(query, name, addr)
        if reply:
            sock.sendto(reply, peer)


UDP_PORT = 9999
udp_seen: list[tuple[int, str]] = []


def serve_udp(addr: str) -> None:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind((addr, UDP_PORT))
    stranger = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    stranger.bind((addr, UDP_PORT - 1))
    while True:
        data, peer = sock.recvfrom(2048)
        if len(udp_seen) < 100_000:
            udp_seen.append((peer[1], data[:64].decode("ascii", "replace")))
        sock.sendto(b"echo", peer)
        stranger.sendto(b"stranger", peer)


def udp_report() -> bytes:
    seen = list(udp_seen)
    return json.dumps(
        {"ports": sorted({p for p, _ in seen}), "payloads": [d for _, d in seen]}
    ).encode()


def main() -> None:
    addr, port, name, marker = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            if self.path == "/udp/reset":
                udp_seen.clear()
            found = self.path in ("/marker", "/udp", "/udp/reset")
            body = udp_report() if self.path.startswith("/udp") else marker.encode()
            body = body if found else b"not found"
            self.send_response(200 if found else 404)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args) -> None:
            pass

    threading.Thread(target=serve_dns, args=(addr, name), daemon=True).start()
    threading.Thread(target=serve_udp, args=(addr,), daemon=True).start()
    server = ThreadingHTTPServer((addr, port), Handler)
    print("ready", flush=True)
    server.serve_forever()


if __name__ == "__main__":
    main()
