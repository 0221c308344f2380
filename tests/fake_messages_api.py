"""A local stand-in for the Anthropic Messages API: replays recorded SSE streams.

``FakeMessagesAPI(["turn1.sse", "turn2.sse"])`` serves ``POST /v1/messages`` on 127.0.0.1;
the Nth request gets the Nth recording (the last one repeats), streamed event by event.
Every request body is kept in ``requests``. ``before_event(name, n)`` runs before each event
of request ``n`` is sent; tests use it to hold the stream at a point and observe the client.
"""

from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

DATA = Path(__file__).parent / "data" / "claude"


def parse_sse(text: str) -> list[tuple[str, str]]:
    events = []
    for chunk in text.strip().split("\n\n"):
        name = data = ""
        for line in chunk.splitlines():
            if line.startswith("event: "):
                name = line[7:]
            elif line.startswith("data: "):
                data = line[6:]
        events.append((name, data))
    return events


class FakeMessagesAPI:
    def __init__(self, recordings: list[str], before_event=None):
        self.streams = [parse_sse((DATA / r).read_text()) for r in recordings]
        self.requests: list[dict] = []
        self.headers: list[dict] = []
        self.before_event = before_event or (lambda name, n: None)
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:
                pass

            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers["content-length"])))
                n = len(fake.requests)
                fake.requests.append(body)
                fake.headers.append({k.lower(): v for k, v in self.headers.items()})
                if self.path != "/v1/messages" or not body.get("stream"):
                    self.send_error(400, "expected a streamed POST /v1/messages")
                    return
                self.send_response(200)
                self.send_header("content-type", "text/event-stream")
                self.send_header("connection", "close")
                self.end_headers()
                for name, data in fake.streams[min(n, len(fake.streams) - 1)]:
                    fake.before_event(name, n)
                    self.wfile.write(f"event: {name}\ndata: {data}\n\n".encode())
                    self.wfile.flush()
                    time.sleep(0.01)
                self.close_connection = True

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def __enter__(self) -> FakeMessagesAPI:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._server.shutdown()
        self._server.server_close()
