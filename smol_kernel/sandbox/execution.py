"""What a ``run_code`` call returns, and the collector that builds it from IOPub messages.

The collector keeps at most ``max_output_chars`` characters of text (streams, result text,
error text) and ``MAX_IMAGE_BYTES`` of images per execution; the rest is counted, dropped
and marked ``truncated``, so a cell that prints 50 MB costs the host no more memory than
the cap. Callbacks see exactly what is kept, in the order the kernel sent it.
"""

from __future__ import annotations

import base64
import json
import re
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

MAX_IMAGE_BYTES = 16 * 1024 * 1024  # base64 characters of images kept per execution
_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")
_MIME_FIELDS = {
    "text/plain": "text",
    "text/html": "html",
    "text/markdown": "markdown",
    "image/png": "png",
    "image/jpeg": "jpeg",
    "image/svg+xml": "svg",
    "application/json": "json",
    "text/latex": "latex",
}
_IMAGES = ("png", "jpeg")


@dataclass
class Result:
    """One rich output: an ``execute_result`` (``is_main_result``) or a ``display_data``.
    ``png`` and ``jpeg`` are base64 text as the kernel sent them (``image_bytes`` decodes)."""

    text: str | None = None
    html: str | None = None
    markdown: str | None = None
    png: str | None = None
    jpeg: str | None = None
    svg: str | None = None
    json: Any = None
    latex: str | None = None
    is_main_result: bool = False
    extra: dict[str, Any] = field(default_factory=dict)  # other MIME types, as sent

    @classmethod
    def from_bundle(cls, data: dict[str, Any], is_main_result: bool) -> Result:
        result = cls(is_main_result=is_main_result)
        for mime, value in data.items():
            if (name := _MIME_FIELDS.get(mime)) is not None:
                setattr(result, name, value)
            else:
                result.extra[mime] = value
        return result

    def image_b64(self) -> tuple[str, str] | None:
        """``(mime type, base64 text)`` of the PNG or JPEG in this result, if any."""
        for name in _IMAGES:
            if (value := getattr(self, name)) is not None:
                return f"image/{name}", value
        return None

    def image_bytes(self) -> tuple[str, bytes] | None:
        """``(mime type, bytes)`` of the PNG or JPEG in this result, if any."""
        if (image := self.image_b64()) is None:
            return None
        return image[0], base64.b64decode(image[1])

    def formats(self) -> list[str]:
        return [n for n in _MIME_FIELDS.values() if getattr(self, n) is not None]


@dataclass
class Logs:
    stdout: list[str] = field(default_factory=list)
    stderr: list[str] = field(default_factory=list)


@dataclass
class ExecutionError:
    name: str
    value: str
    traceback: str  # ANSI colour codes removed


@dataclass
class Execution:
    """The outcome of one ``run_code``. ``status``: ``ok``, ``error`` (the code raised),
    ``timeout`` (interrupted at the timeout; see ``kernel_restarted``), ``interrupted``
    (by ``interrupt()`` from elsewhere), or ``kernel_died`` (the next call gets a fresh
    kernel in a fresh VM)."""

    results: list[Result] = field(default_factory=list)
    logs: Logs = field(default_factory=Logs)
    error: ExecutionError | None = None
    execution_count: int | None = None
    status: str = "ok"
    duration_s: float = 0.0
    truncated: bool = False
    dropped_chars: int = 0  # output not kept because of max_output_chars / image cap
    kernel_restarted: bool = False  # the kernel ignored the interrupt and was replaced
    blocked: list[str] = field(default_factory=list)  # destinations the network refused

    @property
    def text(self) -> str | None:
        """The main result's text (what a notebook shows as ``Out[n]``), if any."""
        for r in self.results:
            if r.is_main_result:
                return r.text
        return None

    def to_json(self) -> str:
        return json.dumps({**asdict(self), "text": self.text})

    def images(self) -> list[tuple[str, str]]:
        """``(mime type, base64 data)`` of every PNG/JPEG result, in order."""
        return [image for r in self.results if (image := r.image_b64()) is not None]

    def report(self) -> str:
        """The whole outcome as plain text for a language model: stdout, stderr, results,
        the traceback, and a note on a timeout, interrupt, dead kernel or truncation.
        Images appear as ``[image N: TYPE, attached]`` (send ``images()`` alongside)."""
        text: list[str] = []
        if self.logs.stdout:
            text.append("".join(self.logs.stdout).rstrip("\n"))
        if self.logs.stderr:
            text.append("[stderr]\n" + "".join(self.logs.stderr).rstrip("\n"))
        n_images = 0
        for result in self.results:
            if (image := result.image_b64()) is not None:
                n_images += 1
                text.append(f"[image {n_images}: {image[0]}, attached]")
            elif result.text is not None:
                label = f"Out[{self.execution_count}]" if result.is_main_result else "[display]"
                text.append(f"{label}: {result.text}")
        if self.error is not None:
            text.append(self.error.traceback or f"{self.error.name}: {self.error.value}")
        if self.status == "timeout":
            text.append(
                f"[timed out after {self.duration_s:.0f}s and interrupted; output so far above; "
                + ("the code ignored the interrupt, so the kernel was replaced: variables and "
                   "files are gone]" if self.kernel_restarted else "variables are kept]")
            )  # fmt: skip
        elif self.status == "interrupted":
            text.append("[interrupted]")
        elif self.status == "kernel_died":
            text.append("[the kernel died (e.g. out of memory, or os._exit); the next call "
                        "starts a fresh kernel: variables and files are gone]")  # fmt: skip
        if self.blocked:
            text.append(
                "[network: the sandbox refused connections to "
                + ", ".join(self.blocked[:10])
                + (f" and {len(self.blocked) - 10} more" if len(self.blocked) > 10 else "")
                + " (not on its allow-list, or the host); only allowed destinations are "
                "reachable]"
            )
        if self.truncated:
            text.append(f"[output truncated: {self.dropped_chars} characters not shown]")
        return "\n".join(text) if text else "[no output]"


class OutputCollector:
    """Turns the IOPub messages of one execute request into an Execution."""

    def __init__(
        self,
        max_output_chars: int,
        on_stdout: Callable[[str], Any] | None = None,
        on_stderr: Callable[[str], Any] | None = None,
        on_result: Callable[[Result], Any] | None = None,
        on_error: Callable[[ExecutionError], Any] | None = None,
    ):
        self.execution = Execution()
        self._chars_left = max_output_chars
        self._image_left = MAX_IMAGE_BYTES
        self._on = {"stdout": on_stdout, "stderr": on_stderr}
        self._on_result, self._on_error = on_result, on_error

    def _take(self, text: str) -> str:
        kept = text[: max(0, self._chars_left)]
        self._chars_left -= len(kept)
        if len(kept) < len(text):
            self.execution.truncated = True
            self.execution.dropped_chars += len(text) - len(kept)
        return kept

    def feed(self, msg: dict) -> bool:
        """Take one IOPub message of this execution; True once the kernel is idle again."""
        kind, content = msg["msg_type"], msg["content"]
        ex = self.execution
        if kind == "status":
            return content.get("execution_state") == "idle"
        if kind == "stream":
            name = "stderr" if content.get("name") == "stderr" else "stdout"
            if text := self._take(str(content.get("text", ""))):
                getattr(ex.logs, name).append(text)
                if cb := self._on[name]:
                    cb(text)
        elif kind in ("execute_result", "display_data"):
            if (result := self._keep_result(content.get("data") or {}, kind)) is not None:
                ex.results.append(result)
                if self._on_result:
                    self._on_result(result)
        elif kind == "error":
            tb = _ANSI.sub("", "\n".join(content.get("traceback") or []))
            ex.error = ExecutionError(
                self._take(str(content.get("ename", ""))),
                self._take(str(content.get("evalue", ""))),
                self._take(tb),
            )
            if self._on_error:
                self._on_error(ex.error)
        return False

    def _keep_result(self, data: dict, kind: str) -> Result | None:
        kept: dict[str, Any] = {}
        for mime, value in data.items():
            if mime.startswith("image/") and mime != "image/svg+xml" and isinstance(value, str):
                if len(value) <= self._image_left:
                    self._image_left -= len(value)
                    kept[mime] = value
                else:
                    self.execution.truncated = True
                    self.execution.dropped_chars += len(value)
            elif isinstance(value, str):
                if part := self._take(value):
                    kept[mime] = part
            elif len(text := json.dumps(value)) <= self._chars_left:
                self._chars_left -= len(text)
                kept[mime] = value
            else:
                self.execution.truncated = True
                self.execution.dropped_chars += len(text)
        if not kept:
            return None
        return Result.from_bundle(kept, is_main_result=kind == "execute_result")
