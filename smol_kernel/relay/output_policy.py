"""What a client may be shown of a kernel's messages: the host-side output policy.

Root in the guest writes every byte of every message a smolvm kernel sends. JupyterLab trusts
the outputs of cells run in its session: their HTML goes into the page unsanitized, their
JavaScript runs, with the user's token and XSRF cookie -- enough to start a *host* kernel
through the server's REST API. So every message that carries a MIME bundle or a URL is
rewritten on the host (``message_pump.py`` calls ``OutputPolicy.filter``) before any client -- the
Jupyter server's websocket, nbclient/papermill, ``smol-kernel run``, the Sandbox API, the MCP
server -- sees it:

* MIME bundles keep an allow-list (``mime_bundle.py``): ``text/plain``; ``text/html``
  sanitized (nothing that runs, and nothing loaded from another site: the guest must not
  use the browser to send data out when it has no network); ``text/markdown`` kept when it
  cannot hold markup, else rendered to HTML on the host and sanitized the same way;
  images, SVG as an image, JSON, LaTeX. Anything else (``application/javascript``, bokeh's
  exec/load types, unknown types) is dropped and a ``text/plain`` note says why and how to
  opt in (``trusted_outputs``).
* The same for ``display_data``, ``update_display_data``, ``execute_result``, ``page``
  payloads and user expressions in ``execute_reply``, ``inspect_reply``, the debugger's rich
  variables, and ``kernel_info_reply``'s ``help_links`` (http/https only).
* Widgets (``comm_open``/``comm_msg``): only ipywidgets' own models, each value filtered
  for what its view does with it (``widget_policy.py``). A ``comm_open`` to a target no
  installed frontend extension registered is dropped.
* Any other message passes unchanged; its text is shown as text by every client (what
  reaches the policy was parsed strictly first: ``strict_message.py``).

Pure functions of the message, plus which widget each comm of this kernel is.
"""

from __future__ import annotations

import importlib.util
import re
from collections.abc import Callable
from typing import Any

from .mime_bundle import sanitize_bundle, sanitize_html
from .widget_policy import WIDGET_TARGETS, WidgetPolicy

__all__ = ["FILTERED_TYPES", "OutputPolicy", "comm_targets", "sanitize_bundle", "sanitize_html"]

# Message types whose content this module rewrites; all others pass unchanged.
FILTERED_TYPES = frozenset({
    "display_data", "update_display_data", "execute_result", "execute_reply",
    "inspect_reply", "kernel_info_reply", "comm_open", "comm_msg", "debug_reply",
})  # fmt: skip
_SCHEME = re.compile(r"^\s*([a-zA-Z][a-zA-Z0-9+.\-]*):")


def _help_links(links: Any) -> list:
    out = []
    for link in links if isinstance(links, list) else []:
        if not isinstance(link, dict):
            continue
        url, text = link.get("url"), link.get("text")
        if isinstance(url, str) and isinstance(text, str):
            scheme = _SCHEME.match(url.strip().lower())
            if scheme and scheme.group(1) in ("http", "https"):
                out.append({"text": text, "url": url.strip()})
    return out


def comm_targets() -> frozenset[str]:
    """Comm targets a frontend of this host can have registered: the widget targets when
    ipywidgets' JupyterLab extension is installed where the server runs, else none."""
    for module in ("jupyterlab_widgets", "widgetsnbextension"):
        if importlib.util.find_spec(module) is not None:
            return WIDGET_TARGETS
    return frozenset()


class OutputPolicy:
    """The policy for one kernel. ``filter(msg_type, content)`` returns the content to
    send (the same object when unchanged), or None to drop the message."""

    def __init__(self, targets: frozenset[str] | None = None) -> None:
        self.targets = comm_targets() if targets is None else targets
        self.widgets = WidgetPolicy()

    def filter(self, msg_type: str, content: Any) -> Any:
        if not isinstance(content, dict):
            return None
        handler: Callable[[dict], Any] | None = getattr(self, "_" + msg_type, None)
        if handler is None:
            return content
        out = handler(content)
        # Unchanged (most replies, plain results): the original bytes go out as they came.
        return content if out == content else out

    def _display_data(self, content: dict) -> dict:
        data, metadata = sanitize_bundle(content.get("data"), content.get("metadata"))
        out = {**content, "data": data, "metadata": metadata}
        transient = content.get("transient")
        if transient is not None:
            ok = isinstance(transient, dict) and isinstance(transient.get("display_id"), str)
            out["transient"] = {"display_id": transient["display_id"]} if ok else {}
        return out

    _update_display_data = _display_data
    _execute_result = _display_data

    def _inspect_reply(self, content: dict) -> dict:
        data, metadata = sanitize_bundle(content.get("data"), content.get("metadata"))
        return {**content, "data": data, "metadata": metadata}

    def _execute_reply(self, content: dict) -> dict:
        payload = []
        for item in content.get("payload") or []:
            if not isinstance(item, dict):
                continue
            source = item.get("source")
            if source == "page":
                data, _ = sanitize_bundle(item.get("data"))
                payload.append({"source": "page", "data": data,
                                "start": item.get("start", 0)})  # fmt: skip
            elif source == "set_next_input" and isinstance(item.get("text"), str):
                payload.append({"source": source, "text": item["text"],
                                "replace": bool(item.get("replace"))})  # fmt: skip
            elif source == "ask_exit":
                payload.append({"source": source, "keepkernel": bool(item.get("keepkernel"))})
        out = {**content, "payload": payload}
        expressions = content.get("user_expressions")
        if isinstance(expressions, dict):
            out["user_expressions"] = {
                str(name): (self._expression(value)) for name, value in expressions.items()
            }
        return out

    @staticmethod
    def _expression(value: Any) -> Any:
        if isinstance(value, dict) and "data" in value:
            data, metadata = sanitize_bundle(value.get("data"), value.get("metadata"))
            return {**value, "data": data, "metadata": metadata}
        return value

    def _kernel_info_reply(self, content: dict) -> dict:
        return {**content, "help_links": _help_links(content.get("help_links"))}

    def _debug_reply(self, content: dict) -> dict:
        body = content.get("body")
        if isinstance(body, dict) and "data" in body:
            data, metadata = sanitize_bundle(body.get("data"), body.get("metadata"))
            return {**content, "body": {**body, "data": data, "metadata": metadata}}
        return content

    def _comm_open(self, content: dict) -> dict | None:
        if content.get("target_name") not in self.targets:
            return None
        return self.widgets.comm_open(content)

    def _comm_msg(self, content: dict) -> dict | None:
        if not self.targets:  # no frontend can have a comm: nothing to say to one
            return None
        return self.widgets.comm_msg(content)
