"""The "internet" for the allow-list tests, inside a network namespace the test makes.

Usage: python egress_services.py FILES_DIR DNS_ADDR NAME=ADDR...

* DNS on DNS_ADDR:53: A records for each NAME (NXDOMAIN for any other name);
* HTTP on every address, ports 80, 8080 and 8081: GET /marker answers ``marker <address>:<port>``
  (so a test sees which host it reached), GET /files/... serves FILES_DIR (a package index),
  GET /tls lists what the TLS port received;
* TCP port 443 on every address: records the first bytes a client sends (a ClientHello),
  answers b"not-tls" and closes;
* TCP ports 6379 and 2525 (Redis, SMTP) record every byte any client sends (GET
  /recorded lists them), port 2222 speaks first (an SSH-like banner) and echoes;
* GET /requests lists the Host header of every HTTP request the server read, GET
  /big?n=BYTES sends that many bytes (HTTP/1.1, keep-alive).
"""

from __future__ import annotations

import json
import socket
import sys
import threading
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer

from netns_services import dns_answer  # the same directory: run as a script

tls_seen: list[str] = []
recorded: list[str] = []  # every byte the line-protocol ports received, per connection
requests_seen: list[str] = []


def serve_dns(addr: str, names: dict[str, str]) -> None:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind((addr, 53))
    while True:
        query, peer = sock.recvfrom(512)
        reply = None
        for name, target in names.items():
            reply = dns_answer(query, name, target)
            if reply and reply[7]:  # one answer record: this name
                break
        if reply:
            sock.sendto(reply, peer)


def serve_tls() -> None:
    srv = socket.socket()
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    srv.bind(("0.0.0.0", 443))
    srv.listen(16)
    while True:
        conn, _ = srv.accept()
        conn.settimeout(3)
        try:
            data = conn.recv(4096)
            tls_seen.append(data.decode("latin-1"))
            conn.sendall(b"not-tls\r\n")
        except OSError:
            pass
        conn.close()


def serve_recorder(port: int) -> None:
    srv = socket.socket()
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    srv.bind(("0.0.0.0", port))
    srv.listen(16)

    def one(conn: socket.socket) -> None:
        got = b""
        conn.settimeout(20)
        try:
            while data := conn.recv(4096):
                got += data
                conn.sendall(b"+OK\r\n")
        except OSError:
            pass
        recorded.append(f"{port}:" + got.decode("latin-1"))
        conn.close()

    while True:
        conn, _ = srv.accept()
        threading.Thread(target=one, args=(conn,), daemon=True).start()


def serve_banner(port: int) -> None:
    srv = socket.socket()
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    srv.bind(("0.0.0.0", port))
    srv.listen(16)

    def one(conn: socket.socket) -> None:
        with conn:
            try:
                conn.sendall(b"SSH-2.0-smol-test\r\n")
                while data := conn.recv(4096):
                    conn.sendall(data)
            except OSError:
                pass

    while True:
        conn, _ = srv.accept()
        threading.Thread(target=one, args=(conn,), daemon=True).start()


def main() -> None:
    files, dns_addr = sys.argv[1], sys.argv[2]
    names = dict(arg.split("=", 1) for arg in sys.argv[3:])

    class Handler(SimpleHTTPRequestHandler):
        protocol_version = "HTTP/1.1"  # keep-alive, as servers are

        def do_GET(self) -> None:
            requests_seen.append(str(self.headers.get("Host")))
            if self.path.startswith("/big?n="):
                size = int(self.path.split("=", 1)[1])
                self.send_response(200)
                self.send_header("Content-Length", str(size))
                self.end_headers()
                chunk = b"x" * (1 << 16)
                while size > 0:
                    self.wfile.write(chunk[: min(size, len(chunk))])
                    size -= len(chunk)
                return
            if self.path.startswith("/files/"):
                self.path = self.path[len("/files") :]
                return super().do_GET()
            if self.path == "/marker":
                host, port = self.connection.getsockname()[:2]
                body = f"marker {host}:{port}".encode()
            elif self.path == "/tls":
                body = json.dumps(tls_seen).encode()
            elif self.path == "/recorded":
                body = json.dumps(recorded).encode()
            elif self.path == "/requests":
                body = json.dumps(requests_seen).encode()
            else:
                self.send_error(404)
                return
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args) -> None:
            pass

    threading.Thread(target=serve_dns, args=(dns_addr, names), daemon=True).start()
    threading.Thread(target=serve_tls, daemon=True).start()
    for port in (6379, 2525):
        threading.Thread(target=serve_recorder, args=(port,), daemon=True).start()
    threading.Thread(target=serve_banner, args=(2222,), daemon=True).start()
    handler = partial(Handler, directory=files)
    servers = [ThreadingHTTPServer(("0.0.0.0", port), handler) for port in (8080, 8081, 80)]
    for server in servers[1:]:
        threading.Thread(target=server.serve_forever, daemon=True).start()
    print("ready", flush=True)
    servers[0].serve_forever()


if __name__ == "__main__":
    main()
