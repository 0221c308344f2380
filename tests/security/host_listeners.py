"""Servers on the host that record whether a guest reached them."""

from __future__ import annotations

import socket
import threading


class HostServer:
    """A TCP server (default: host loopback) that counts connections."""

    def __init__(self, host: str = "127.0.0.1", port: int = 0) -> None:
        self.sock = socket.create_server((host, port))
        self.port = self.sock.getsockname()[1]
        self.connections = 0
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.connections += 1
            conn.close()

    def close(self) -> None:
        self.sock.close()


class HostUdpServer:
    """A UDP socket (default: host loopback) that counts datagrams."""

    def __init__(self, host: str = "127.0.0.1", port: int = 0) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind((host, port))
        self.port = self.sock.getsockname()[1]
        self.datagrams = 0
        threading.Thread(target=self._recv, daemon=True).start()

    def _recv(self) -> None:
        while True:
            try:
                self.sock.recv(2048)
            except OSError:
                return
            self.datagrams += 1

    def close(self) -> None:
        self.sock.close()
