"""Jupyter messages from the guest, parsed strictly and written anew.

Root in the guest writes every byte a smolvm kernel sends. The clients after the relay --
jupyter_client, the Jupyter server's websocket, the browser -- decode leniently (invalid
UTF-8 becomes U+FFFD, a header they cannot read is guessed at), so a message the host could
not read must never reach them: it would skip the output policy and be acted on anyway.
``parse`` takes the frames of one message and either returns a ``GuestMessage`` or raises
``Rejected``; ``GuestMessage.frames`` writes the message the client gets.

What ``parse`` requires:

* a delimiter after at most ``MAX_ROUTING_FRAMES`` routing frames (the iopub topic, or
  routing ids) of ``MAX_ROUTING_BYTES`` at most, and exactly the signature, header, parent
  header, metadata and content after it; buffers only on comm messages;
* header, parent header, metadata and content each one JSON object in strict UTF-8, as
  RFC 8259 has it (orjson: no BOM, no lone surrogate, no ``NaN``, no control character in
  a string, nothing after the object);
* a header whose ``msg_type`` is one a kernel sends on that channel (``CHANNEL_TYPES``), of
  protocol version 5.x (jupyter_client would translate another version's message), with a
  string ``msg_id``, string ``session`` and ``username``, and an ISO 8601 ``date``; a
  parent header that is empty or has a string ``msg_type`` and ``msg_id`` and the same
  types;
* the content fields a client acts on, with their types (``_CONTENT_RULES``).

What the client gets: the routing frames as they came (no client decodes them: they only
route); the header, parent header and metadata serialized again here from the parsed
objects (in the guest's format when it used one of jupyter_client's two); the content
serialized again from the parsed (and, by the caller, policy-filtered) object, except for
types that carry only text a client shows as text (``TEXT_TYPES``: ``stream``, ``status``,
...), whose content bytes go on once they parsed. The signature is computed again with the
kernel's key -- unless every signed frame that goes out is byte for byte the one that came,
when the guest's own signature (checked to be hex of the digest's length) is kept: it is
then either ours or one every client refuses. That keeps a 50 MB print from paying a second
HMAC.
"""

from __future__ import annotations

import hmac
import json
import re
from dataclasses import dataclass
from typing import Any

import orjson

from . import zmtp

MAX_ROUTING_FRAMES = 8
MAX_ROUTING_BYTES = 1024  # one routing frame (an iopub topic, a routing id: <= 255)
MAX_BUFFERS = 64

# fmt: off
_REPLIES = frozenset({
    "execute_reply", "inspect_reply", "complete_reply", "history_reply", "is_complete_reply",
    "kernel_info_reply", "comm_info_reply", "connect_reply", "shutdown_reply",
    "interrupt_reply", "debug_reply", "usage_reply", "create_subshell_reply",
    "delete_subshell_reply", "list_subshell_reply",
})
_COMMS = frozenset({"comm_open", "comm_msg", "comm_close"})
CHANNEL_TYPES: dict[str, frozenset[str]] = {
    "iopub": frozenset({
        "status", "stream", "display_data", "update_display_data", "execute_input",
        "execute_result", "error", "clear_output", "debug_event", "shutdown_reply",
        "iopub_welcome", *_COMMS,
    }),
    "shell": _REPLIES,
    "control": _REPLIES,
    "stdin": frozenset({"input_request"}),
}
# Types whose content is only text a client shows as text (or a state word): once it
# parsed strictly and its fields have their types, its bytes go on as they came.
TEXT_TYPES = frozenset({
    "status", "stream", "execute_input", "error", "clear_output", "input_request",
    "iopub_welcome", "shutdown_reply", "interrupt_reply", "is_complete_reply",
    "history_reply", "complete_reply", "comm_info_reply", "connect_reply", "usage_reply",
    "comm_close", "create_subshell_reply", "delete_subshell_reply", "list_subshell_reply",
})
_HEX = re.compile(rb"[0-9a-f]+")
_VERSION = re.compile(r"5\.\d{1,3}")
# A date as clients and kernels write one (ISO 8601, RFC 3339 with a space, str(datetime)):
# digits and separators only, so what a client makes of it cannot be markup.
_DATE = re.compile(r"([0-9]{4}-[0-9TtZz:.+\- ]{1,35})?")  # ("": clients that send none)
# Per type: field -> (allowed types, required). ``bool`` is not an ``int`` here.
_CONTENT_RULES: dict[str, dict[str, tuple[tuple[type, ...], bool]]] = {
    "status": {"execution_state": ((str,), True)},
    "stream": {"name": ((str,), True), "text": ((str,), True)},
    "execute_input": {"code": ((str,), True), "execution_count": ((int, type(None)), False)},
    "error": {"ename": ((str,), True), "evalue": ((str,), True),
              "traceback": ((list,), True)},
    "clear_output": {"wait": ((bool,), False)},
    "input_request": {"prompt": ((str,), True), "password": ((bool,), False)},
    "execute_reply": {"status": ((str,), True), "traceback": ((list,), False),
                      "payload": ((list,), False)},
    "complete_reply": {"matches": ((list,), False), "cursor_start": ((int,), False),
                       "cursor_end": ((int,), False)},
    "is_complete_reply": {"status": ((str,), True), "indent": ((str,), False)},
    "comm_open": {"comm_id": ((str,), True), "target_name": ((str,), True)},
    "comm_msg": {"comm_id": ((str,), True)},
    "comm_close": {"comm_id": ((str,), True)},
    "iopub_welcome": {"subscription": ((str,), True)},
}
# fmt: on
_STATES = frozenset({"busy", "idle", "starting"})


class Rejected(ValueError):
    """The guest sent something that is not a Jupyter message this channel carries. The
    ``reason`` names what failed, for the per-kernel counter."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def _object(raw: bytes, what: str) -> dict:
    """One JSON object from strict UTF-8 bytes (Rejected otherwise), with no key
    ``__proto__`` anywhere: JavaScript's JSON.parse makes it an own key, but a copy made by
    assignment (JupyterLab's JSONExt.deepCopy) makes it the copy's prototype."""
    try:
        value = orjson.loads(raw)
    except (orjson.JSONDecodeError, RecursionError):
        raise Rejected(f"{what}: not strict UTF-8 JSON") from None
    if not isinstance(value, dict):
        raise Rejected(f"{what}: not a JSON object")
    if (b"__proto__" in raw or b"\\u" in raw) and _has_proto_key(value):  # (else none)
        raise Rejected(f"{what}: a __proto__ key")
    return value


def _has_proto_key(value: Any) -> bool:
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, dict):
            if "__proto__" in item:
                return True
            stack.extend(v for v in item.values() if isinstance(v, dict | list))
        elif isinstance(item, list):
            stack.extend(v for v in item if isinstance(v, dict | list))
    return False


def dumps(obj: Any) -> bytes:
    """``obj`` as strict UTF-8 JSON as Python's json writes it (jupyter_client without
    orjson); a lone surrogate in a string is written as an ``\\u`` escape (ValueError or
    TypeError for what JSON cannot hold)."""
    text = json.dumps(obj, ensure_ascii=False, allow_nan=False)
    try:
        return text.encode("utf-8")
    except UnicodeEncodeError:
        return json.dumps(obj, ensure_ascii=True, allow_nan=False).encode("ascii")


def dumps_compact(obj: Any) -> bytes:
    """``obj`` as compact strict UTF-8 JSON, fast (content, which may be 64 MiB)."""
    try:
        return orjson.dumps(obj)
    except orjson.JSONEncodeError:  # (an int over 64 bits, a str key-less dict, depth)
        return dumps(obj)


def _check_header(header: dict, allowed: frozenset[str]) -> str:
    msg_type = header.get("msg_type")
    if not isinstance(msg_type, str):
        raise Rejected("header: no msg_type")
    if msg_type not in allowed:
        raise Rejected(f"header: msg_type {msg_type[:40]!r} is not sent on this channel")
    if not isinstance(header.get("msg_id"), str):
        raise Rejected("header: no msg_id")
    for key in ("session", "username", "version"):
        if key in header and not isinstance(header[key], str):
            raise Rejected(f"header: {key} is not a string")
    if not _VERSION.fullmatch(header.get("version") or ""):
        # jupyter_client adapts a message of another major version (4 without one) to
        # its own: a translation the policy never saw.
        raise Rejected("header: not protocol version 5")
    date = header.get("date")
    if date is not None and not (isinstance(date, str) and _DATE.fullmatch(date)):
        raise Rejected("header: date is not ISO 8601")
    return msg_type


def _check_content(msg_type: str, content: dict) -> None:
    for key, (types, required) in _CONTENT_RULES.get(msg_type, {}).items():
        if key not in content:
            if required:
                raise Rejected(f"{msg_type}: no {key}")
            continue
        value = content[key]
        if isinstance(value, bool) and bool not in types:
            raise Rejected(f"{msg_type}: {key} has the wrong type")
        if not isinstance(value, types):
            raise Rejected(f"{msg_type}: {key} has the wrong type")
    if msg_type == "status" and content["execution_state"] not in _STATES:
        raise Rejected("status: unknown execution_state")
    if msg_type == "stream" and content["name"] not in ("stdout", "stderr"):
        raise Rejected("stream: name is not stdout or stderr")
    for key in ("traceback", "matches"):
        items = content.get(key)
        if isinstance(items, list) and not all(isinstance(x, str) for x in items):
            raise Rejected(f"{msg_type}: {key} holds a non-string")


@dataclass
class GuestMessage:
    """A message that parsed; ``content`` may be replaced (the output policy) before
    ``frames`` writes it."""

    routing: list[bytes]
    signed: list[bytes]  # the signature, header, parent, metadata and content as they came
    header: dict
    parent: dict
    metadata: dict
    content: dict
    buffers: list[bytes]

    @property
    def msg_type(self) -> str:
        return self.header["msg_type"]

    def envelope(self) -> tuple[dict, dict, dict]:
        return self.header, self.parent, self.metadata

    def frames(self, key: bytes, signature_scheme: str = "hmac-sha256") -> list[bytes]:
        """The frames a client gets, signed with ``key`` (ValueError/TypeError if the
        content cannot be written as JSON)."""
        signature, *came = self.signed
        as_text = self.msg_type in TEXT_TYPES
        content = came[3] if as_text else dumps_compact(self.content)
        out = [_again(obj, raw) for obj, raw in zip(self.envelope(), came, strict=False)]
        out.append(content)
        if not (as_text and out == came and _is_signature(signature, key, signature_scheme)):
            signature = sign(key, signature_scheme, out)
        return [*self.routing, zmtp.DELIMITER, signature, *out, *self.buffers]


def _again(obj: dict, came: bytes) -> bytes:
    """``obj`` serialized here, in the guest's format where it used one of jupyter_client's
    two (compact with orjson, spaced without), so unchanged frames keep their bytes."""
    out = dumps_compact(obj)
    if out != came and (spaced := dumps(obj)) == came:
        return spaced
    return out


def _is_signature(value: bytes, key: bytes, signature_scheme: str) -> bool:
    """Is ``value`` what a signature looks like: lowercase hex of the digest's size?"""
    if not key:
        return value == b""
    size = hmac.new(key, digestmod=signature_scheme.partition("-")[2] or "sha256").digest_size
    return len(value) == 2 * size and _HEX.fullmatch(value) is not None


def sign(key: bytes, signature_scheme: str, parts: list[bytes]) -> bytes:
    if not key:
        return b""
    h = hmac.new(key, digestmod=signature_scheme.partition("-")[2] or "sha256")
    for p in parts:
        h.update(p)
    return h.hexdigest().encode()


def parse(parts: list[bytes], channel: str) -> GuestMessage:
    """The message in ``parts`` (one multipart ZMQ message from the guest on ``channel``),
    or Rejected."""
    try:
        at = parts.index(zmtp.DELIMITER)
    except ValueError:
        raise Rejected("no delimiter") from None
    if at > MAX_ROUTING_FRAMES or any(len(p) > MAX_ROUTING_BYTES for p in parts[:at]):
        raise Rejected("too many or too large routing frames")
    if len(parts) < at + 6:
        raise Rejected("frames missing after the delimiter")
    header = _object(parts[at + 2], "header")
    msg_type = _check_header(header, CHANNEL_TYPES.get(channel, frozenset()))
    parent = _object(parts[at + 3], "parent header")
    if parent and not isinstance(parent.get("msg_id"), str):
        # (the rest is the client's request header echoed: re-serialized, inert)
        raise Rejected("parent header: no msg_id")
    metadata = _object(parts[at + 4], "metadata")
    content = _object(parts[at + 5], "content")
    _check_content(msg_type, content)
    buffers = parts[at + 6 :]
    if buffers and (msg_type not in _COMMS or len(buffers) > MAX_BUFFERS):
        raise Rejected(f"{msg_type}: buffers")
    return GuestMessage(parts[:at], parts[at + 1 : at + 6], header, parent, metadata, content,
                        buffers)  # fmt: skip
