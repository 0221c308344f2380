"""Many byte streams over one virtio-serial port: the migratable host <-> guest channel.

vhost-user-vsock blocks QEMU's migration, so VMs that are saved and restored (snapshot
clones) carry the agent's control connection and the kernel's five channels over a single
virtio-serial port instead. This module is the wire format (used by both sides) and the
guest's end (threads; stdlib only, like the rest of the guest agent).

Frames: a 9-byte header -- type (1 byte), stream id (4), payload length (4), big-endian --
then the payload. Only the host opens streams (``OPEN`` with the guest port, as a vsock
connect would name it); the guest answers ``OPENED`` or ``CLOSE``. ``DATA`` carries at most
``MAX_DATA`` bytes and only within the sender's credit: each direction of a stream starts
with ``WINDOW`` bytes and the receiver returns credit (``CREDIT``, 4-byte count) as its
consumer takes the data, so a slow consumer stops its sender and nothing queues without
bound. ``CLOSE`` ends a stream both ways (no half-close, as with vhost-device-vsock).

``RESET`` (host -> guest, a 16-byte nonce) starts a session: the guest closes every stream
it had -- after a restore, those belong to the host of the saved VM -- and answers
``RESET_OK`` with the nonce. The host ignores every byte before that answer, which may
include frames the saved VM had queued.
"""

from __future__ import annotations

import os
import socket
import struct
import threading

HEADER = struct.Struct(">BII")
OPEN, OPENED, DATA, CREDIT, CLOSE, RESET, RESET_OK = range(1, 8)
MAX_DATA = 64 * 1024
WINDOW = 256 * 1024
MAX_PAYLOAD = MAX_DATA  # no frame carries more
PORT_NAME = "smol.mux"  # /dev/virtio-ports/<name> in the guest
NONCE_BYTES = 16


class MuxError(Exception):
    """The peer broke the framing or the credit rules."""


def frame(kind: int, stream: int, payload: bytes = b"") -> bytes:
    return HEADER.pack(kind, stream, len(payload)) + payload


def reset_ok(nonce: bytes) -> bytes:
    """The guest's answer to ``RESET``: what the host scans for to find the session start."""
    return frame(RESET_OK, 0, nonce)


# ---------------------------------------------------------------------------- guest side


class _Stream:
    """One guest end: a local socket (the kernel's TCP port, or the agent's control
    handler) and the credit the host gave us."""

    def __init__(self, mux: GuestMux, sid: int, sock: socket.socket) -> None:
        self.mux, self.sid, self.sock = mux, sid, sock
        self.credit = WINDOW  # what we may send to the host
        self.cond = threading.Condition()
        self.closed = False
        self.inbox: list[bytes] = []  # data from the host, within the window we gave
        self.inbox_cond = threading.Condition()

    def start(self) -> None:
        threading.Thread(target=self._to_host, daemon=True).start()
        threading.Thread(target=self._to_local, daemon=True).start()

    def _to_host(self) -> None:
        try:
            while data := self.sock.recv(MAX_DATA):
                view = memoryview(data)
                while view:
                    with self.cond:
                        self.cond.wait_for(lambda: self.credit > 0 or self.closed)
                        if self.closed:
                            return
                        n = min(self.credit, len(view))
                        self.credit -= n
                    self.mux.send(frame(DATA, self.sid, bytes(view[:n])))
                    view = view[n:]
        except OSError:
            pass
        self.mux.close_stream(self.sid, tell_host=True)

    def _to_local(self) -> None:
        while True:
            with self.inbox_cond:
                self.inbox_cond.wait_for(lambda: self.inbox or self.closed)
                if not self.inbox:
                    return
                data = self.inbox.pop(0)
            try:
                self.sock.sendall(data)
            except OSError:
                self.mux.close_stream(self.sid, tell_host=True)
                return
            self.mux.send(frame(CREDIT, self.sid, struct.pack(">I", len(data))))

    def deliver(self, data: bytes) -> None:
        with self.inbox_cond:
            self.inbox.append(data)
            self.inbox_cond.notify()

    def grant(self, n: int) -> None:
        with self.cond:
            self.credit += n
            self.cond.notify()

    def close(self) -> None:
        with self.cond:
            self.closed = True
            self.cond.notify_all()
        with self.inbox_cond:
            self.inbox_cond.notify_all()
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.sock.close()


class GuestMux:
    """The guest's end of the port. ``connect(port)`` makes the local socket for a stream
    the host opens (a socketpair end handed to the agent, or a TCP connection to the kernel);
    it returns None to refuse."""

    def __init__(self, fd: int, connect) -> None:
        self.fd = fd
        self.connect = connect
        self._write = threading.Lock()
        self._lock = threading.Lock()
        self.streams: dict[int, _Stream] = {}

    def send(self, data: bytes) -> None:
        """Write one whole frame (frames from several threads never interleave). A port
        that fails is the host gone: the reader thread sees it too and ends."""
        with self._write:
            view = memoryview(data)
            try:
                while view:
                    view = view[os.write(self.fd, view) :]
            except OSError:
                pass

    def close_stream(self, sid: int, tell_host: bool) -> None:
        with self._lock:
            stream = self.streams.pop(sid, None)
        if stream is not None:
            stream.close()
            if tell_host:
                self.send(frame(CLOSE, sid))

    def _read(self, n: int) -> bytes:
        buf = bytearray()
        while len(buf) < n:
            chunk = os.read(self.fd, n - len(buf))
            if not chunk:
                raise EOFError
            buf += chunk
        return bytes(buf)

    def serve(self) -> None:
        """Read frames from the host for ever (the agent's thread)."""
        while True:
            kind, sid, length = HEADER.unpack(self._read(HEADER.size))
            if length > MAX_PAYLOAD:
                raise MuxError(f"a frame of {length} bytes")
            payload = self._read(length) if length else b""
            self._dispatch(kind, sid, payload)

    def _dispatch(self, kind: int, sid: int, payload: bytes) -> None:
        if kind == RESET:
            with self._lock:
                old, self.streams = list(self.streams.values()), {}
            for stream in old:
                stream.close()
            self.send(reset_ok(payload))
        elif kind == OPEN:
            port = struct.unpack(">I", payload)[0] if len(payload) == 4 else -1
            sock = self.connect(port)
            if sock is None:
                self.send(frame(CLOSE, sid, b"refused"))
                return
            stream = _Stream(self, sid, sock)
            with self._lock:
                self.streams[sid] = stream
            self.send(frame(OPENED, sid))
            stream.start()
        elif kind == DATA:
            stream = self.streams.get(sid)
            if stream is not None:
                stream.deliver(payload)
        elif kind == CREDIT and len(payload) == 4:
            stream = self.streams.get(sid)
            if stream is not None:
                stream.grant(struct.unpack(">I", payload)[0])
        elif kind == CLOSE:
            self.close_stream(sid, tell_host=False)


def open_port(name: str = PORT_NAME) -> int | None:
    """The mux port's descriptor, or None when this VM has no such port (vsock instead).
    The guest runs no udev: the port is found by its name in sysfs (``vportNpM``)."""
    base = "/sys/class/virtio-ports"
    try:
        ports = sorted(os.listdir(base))
    except OSError:
        return None
    for port in ports:
        try:
            with open(f"{base}/{port}/name") as f:
                if f.read().strip() != name:
                    continue
            return os.open(f"/dev/{port}", os.O_RDWR | os.O_CLOEXEC)
        except OSError:
            continue
    return None
