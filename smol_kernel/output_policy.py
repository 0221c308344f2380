"""What a client may be shown of a kernel's messages: the host-side output policy.

Root in the guest writes every byte of every message a smolvm kernel sends. JupyterLab trusts
the outputs of cells run in its session: their HTML goes into the page unsanitized, their
JavaScript runs, with the user's token and XSRF cookie -- enough to start a *host* kernel
through the server's REST API. So every message that carries a MIME bundle or a URL is
rewritten on the host (``relay.py`` calls ``OutputPolicy.filter``) before any client -- the
Jupyter server's websocket, nbclient/papermill, ``smol-kernel run``, the Sandbox API, the MCP
server -- sees it:

* MIME bundles keep an allow-list: ``text/plain``; ``text/html`` sanitized (no script,
  event handlers, ``javascript:`` URLs, iframes, objects, embeds, forms, meta, base or
  style elements, and nothing loaded from another site: the guest must not use the browser
  to send data out when it has no network); ``text/markdown`` kept when it cannot hold markup,
  else rendered to HTML on the host and sanitized the same way (no parser differential
  between us and the browser);
  ``image/png|jpeg|gif`` as base64; ``image/svg+xml`` shown as an ``<img>`` of a data URL,
  where browsers run no script and load nothing; ``application/json``; ``text/latex``;
  Jupyter widget view/state JSON. Anything else (``application/javascript``, bokeh's
  exec/load types, unknown types) is dropped and a ``text/plain`` note says why and how to
  opt in (``trusted_outputs``). Math the browser typesets loses the TeX commands that make
  links, load extensions or define macros.
* The same for ``display_data``, ``update_display_data``, ``execute_result``, ``page``
  payloads and user expressions in ``execute_reply``, ``inspect_reply``, the debugger's rich
  variables, ``kernel_info_reply``'s ``help_links`` (http/https only), and widget state in
  ``comm_open``/``comm_msg`` (HTML widget values sanitized, HTML descriptions off, output
  lists filtered, layout and style values that could load a URL removed, an image, video
  or audio of format "url" dropped: a kernel without network must not have the user's
  browser fetch for it). A ``comm_open`` to a target no installed frontend extension
  registered is dropped.
* Any other message passes unchanged; its text is shown as text by every client (what
  reaches the policy was parsed strictly first: ``strict_message.py``).

Pure functions of the message, plus the comm ids of HTML widgets this kernel opened.
"""

from __future__ import annotations

import base64
import importlib.util
import re
from collections.abc import Callable
from typing import Any

# Message types whose content this module rewrites; all others pass unchanged.
FILTERED_TYPES = frozenset({
    "display_data", "update_display_data", "execute_result", "execute_reply",
    "inspect_reply", "kernel_info_reply", "comm_open", "comm_msg", "debug_reply",
})  # fmt: skip

TEXT_AS_IS = frozenset({"text/plain"})
IMAGES = {"image/png", "image/jpeg", "image/gif"}
JSON_DATA = frozenset({
    "application/json",
    "application/vnd.jupyter.widget-view+json",
    "application/vnd.jupyter.widget-state+json",
})  # fmt: skip
WIDGET_TARGETS = frozenset({"jupyter.widget", "jupyter.widget.control", "jupyter.widget.version"})
OPT_IN = "trusted_outputs=True (smol-kernel install --trusted-outputs)"
_B64 = re.compile(r"[A-Za-z0-9+/=\s]*")
_SCHEME = re.compile(r"^\s*([a-zA-Z][a-zA-Z0-9+.\-]*):")
_DATA_IMAGE = re.compile(r"^data:image/(png|jpeg|gif|webp);base64,[A-Za-z0-9+/=\s]*$")
# TeX control sequences MathJax turns into links, CSS, extension loads or new macros (a
# macro could rename one of the others). JupyterLab typesets math in HTML, Markdown and
# LaTeX outputs.
_UNSAFE_TEX = re.compile(
    r"\\(href|url|class|cssId|style|data|html|unicode|require|def|gdef|edef|xdef|let|"
    r"newcommand|renewcommand|providecommand|newenvironment|renewenvironment|"
    r"DeclareMathOperator|Newextarrow)(?![A-Za-z])"
)
# CSS properties a style attribute may set: none of them can load a URL.
STYLE_PROPERTIES = frozenset({
    "color", "background-color", "text-align", "vertical-align", "font-weight",
    "font-style", "font-size", "font-family", "text-decoration", "white-space", "width",
    "height", "min-width", "max-width", "min-height", "max-height", "padding",
    "padding-left", "padding-right", "padding-top", "padding-bottom", "margin", "margin-left",
    "margin-right", "margin-top", "margin-bottom", "border", "border-left", "border-right",
    "border-top", "border-bottom", "border-color", "border-style", "border-width",
    "border-collapse", "border-spacing", "display", "opacity", "line-height",
})  # fmt: skip
_TAGS = frozenset(
    {"a", "abbr", "b", "bdi", "bdo", "blockquote", "br", "caption", "center", "cite", "code",
     "col", "colgroup", "dd", "del", "details", "dfn", "div", "dl", "dt", "em", "figcaption",
     "figure", "h1", "h2", "h3", "h4", "h5", "h6", "hr", "i", "img", "ins", "kbd", "li",
     "mark", "ol", "p", "pre", "q", "rp", "rt", "ruby", "s", "samp", "small", "span",
     "strike", "strong", "sub", "summary", "sup", "table", "tbody", "td", "tfoot", "th",
     "thead", "time", "tr", "tt", "u", "ul", "var", "wbr"}
)  # fmt: skip
_ATTRIBUTES = {
    "*": {"class", "title", "style", "align", "dir", "lang"},
    "a": {"href"},
    "img": {"src", "alt", "width", "height"},
    "td": {"colspan", "rowspan", "headers"},
    "th": {"colspan", "rowspan", "headers", "scope"},
    "col": {"span"},
    "colgroup": {"span"},
    "ol": {"start", "type"},
    "details": {"open"},
}


def _note(dropped: list[str]) -> str:
    kinds = ", ".join(sorted(set(dropped)))
    return (f"[smol-kernel: not shown: {kinds} output from the kernel's VM could run script "
            f"in your browser. To allow it, set {OPT_IN}.]")  # fmt: skip


def _filter_url(tag: str, attribute: str, value: str) -> str | None:
    """Links may go anywhere a person clicks (http/https/mailto, or the Jupyter server);
    what the browser loads by itself (``img src``) only from data or the Jupyter server."""
    if attribute not in ("href", "src"):
        return value
    url = value.strip()
    lowered = re.sub(r"[\x00-\x20]", "", url).lower()
    scheme = _SCHEME.match(lowered)
    if attribute == "src":
        if scheme is None:  # relative: same origin, unless protocol-relative
            return None if lowered.startswith(("//", "\\\\", "/\\", "\\/")) else url
        return url if _DATA_IMAGE.match(url) else None
    if scheme is None:
        return None if lowered.startswith(("//", "\\\\", "/\\", "\\/")) else url
    return url if scheme.group(1) in ("http", "https", "mailto") else None


_cleaner: Any = None


def sanitize_html(html: str) -> str:
    """``html`` with everything that runs, loads or submits removed (see the module doc)."""
    global _cleaner
    if _cleaner is None:
        import nh3

        _cleaner = nh3.Cleaner(
            tags=set(_TAGS),
            clean_content_tags={"script", "style", "template", "noscript", "iframe", "object",
                                "embed", "svg", "math", "textarea", "select", "xmp"},
            attributes={k: set(v) for k, v in _ATTRIBUTES.items()},
            attribute_filter=_filter_url,
            url_schemes={"http", "https", "mailto", "data"},
            filter_style_properties=set(STYLE_PROPERTIES),
            link_rel="noopener noreferrer",
        )  # fmt: skip
    return neutralize_tex(_cleaner.clean(html))


def neutralize_tex(text: str) -> str:
    """TeX as the browser typesets it, minus link, CSS, extension and macro commands."""
    return _UNSAFE_TEX.sub(r"\\backslash{}\1", text)


_markdown: Any = None


def markdown_to_html(text: str) -> str:
    """Markdown rendered to sanitized HTML on the host (math kept for the browser)."""
    global _markdown
    if _markdown is None:
        import mistune

        _markdown = mistune.create_markdown(
            escape=False, plugins=["strikethrough", "table", "math", "url"]
        )
    return sanitize_html(str(_markdown(text)))


_SCHEMES_IN_TEXT = re.compile(r"(javascript|vbscript|data|file)\s*:", re.IGNORECASE)


def inert_markdown(text: str) -> bool:
    """Markdown that no renderer can turn into markup, a loaded image or a script link:
    no ``<`` (HTML, autolinks), no ``&`` (entities), no ``![`` (images) and no dangerous
    scheme even with backslash escapes and controls removed. Such text is passed as
    Markdown; anything else is rendered to sanitized HTML here (``markdown_to_html``)."""
    if "<" in text or "&" in text or "![" in text:
        return False
    squeezed = re.sub(r"[\\\x00-\x20\x7f]", "", text)
    return _SCHEMES_IN_TEXT.search(squeezed) is None


def svg_as_image(svg: str) -> str:
    """An SVG drawing as HTML that shows it without running or loading anything."""
    data = base64.b64encode(svg.encode("utf-8", "surrogatepass")).decode()
    return f'<img src="data:image/svg+xml;base64,{data}" alt="SVG image">'


def _is_base64(value: Any) -> bool:
    return isinstance(value, str) and _B64.fullmatch(value) is not None


def sanitize_bundle(data: Any, metadata: Any = None) -> tuple[dict, dict]:
    """A MIME bundle and its metadata reduced to what the policy allows."""
    if not isinstance(data, dict):
        data = {}
    out: dict[str, Any] = {}
    dropped: list[str] = []
    for mime, value in data.items():
        if not isinstance(mime, str):
            continue
        if mime in TEXT_AS_IS and isinstance(value, str):
            out[mime] = value
        elif mime == "text/html" and isinstance(value, str):
            out[mime] = sanitize_html(value)
        elif mime == "text/latex" and isinstance(value, str):
            out[mime] = neutralize_tex(value)
        elif (mime in IMAGES and _is_base64(value)) or mime in JSON_DATA:
            out[mime] = value
        elif mime == "text/markdown" and isinstance(value, str) and inert_markdown(value):
            out[mime] = neutralize_tex(value)
        elif mime in ("text/markdown", "image/svg+xml") and isinstance(value, str):
            pass  # below: shown as HTML unless the bundle has better
        else:
            dropped.append(mime)
    if "text/html" not in out and "text/markdown" not in out:
        markdown, svg = data.get("text/markdown"), data.get("image/svg+xml")
        if isinstance(markdown, str):
            out["text/html"] = markdown_to_html(markdown)
        elif isinstance(svg, str) and not IMAGES & out.keys():
            out["text/html"] = svg_as_image(svg)
    if dropped:
        note = _note(dropped)
        plain = out.get("text/plain")
        out["text/plain"] = f"{plain}\n{note}" if plain else note
    return out, _safe_metadata(metadata, out)


def _safe_metadata(metadata: Any, data: dict) -> dict:
    """Only sizes and backgrounds of the kept types (no ``isolated``, no frontend hints)."""
    out: dict[str, Any] = {}
    if not isinstance(metadata, dict):
        return out
    for mime, value in metadata.items():
        if mime not in data or not isinstance(value, dict):
            continue
        kept = {k: v for k, v in value.items()
                if (k in ("width", "height") and isinstance(v, (int, float))
                    and not isinstance(v, bool))
                or (k == "needs_background" and v in ("light", "dark"))
                or (k in ("unconfined", "expanded") and isinstance(v, bool))}  # fmt: skip
        if kept:
            out[mime] = kept
    return out


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


# Widget models whose views load ``value`` from a URL when ``format`` is "url".
MEDIA_MODELS = frozenset({"ImageModel", "VideoModel", "AudioModel"})
# CSS functions a layout or style value may use: none of them loads anything.
SAFE_CSS_FUNCTIONS = frozenset({
    "rgb", "rgba", "hsl", "hsla", "hwb", "calc", "min", "max", "clamp", "var", "repeat",
    "minmax", "fit-content",
})  # fmt: skip
_CSS_FUNCTION = re.compile(r"([a-z0-9_-]*)\s*\(")


def _css_value_ok(value: str) -> bool:
    """May a layout or style widget put ``value`` on an element's style? Not when it could
    make the browser load something (``url()``, ``image-set()``, ...; escapes refused, so
    ``u\\72l(`` cannot spell one)."""
    low = value.lower()
    if "\\" in low or "/*" in low:
        return False
    return all(name in SAFE_CSS_FUNCTIONS for name in _CSS_FUNCTION.findall(low))


def _styles(state: dict) -> bool:
    """A layout or style model: its string values become CSS on the widget's element."""
    name = state.get("_model_name")
    return isinstance(name, str) and (name == "LayoutModel" or name.endswith("StyleModel"))


def _media(state: dict) -> bool:
    return state.get("_model_name") in MEDIA_MODELS


def _renders_html(state: dict) -> bool:
    """A widget whose model or view is an HTML one (the view is chosen by its state)."""
    names = (state.get("_model_name"), state.get("_view_name"))
    return any(isinstance(n, str) and "HTML" in n.upper() for n in names)


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
        self._html_comms: set[str] = set()  # comm ids of HTML widgets
        self._style_comms: set[str] = set()  # of layout and style models (their values: CSS)
        self._media_comms: set[str] = set()  # of image, video and audio models
        self._comms: set[str] = set()  # comm ids the kernel opened and we let through

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
        target = content.get("target_name")
        comm_id = content.get("comm_id")
        if target not in self.targets or not isinstance(comm_id, str):
            return None
        self._comms.add(comm_id)
        data = content.get("data")
        if isinstance(data, dict) and isinstance(data.get("state"), dict):
            self._note_kind(comm_id, data["state"])
            state = self._comm_state(comm_id, data["state"])
            if state is None:
                return None
            return {**content, "data": {**data, "state": state}}
        return content

    def _note_kind(self, comm_id: str, state: dict) -> None:
        for kinds, test in ((self._html_comms, _renders_html), (self._style_comms, _styles),
                            (self._media_comms, _media)):  # fmt: skip
            if test(state):
                kinds.add(comm_id)

    def _comm_state(self, comm_id: str, state: dict) -> dict | None:
        """A widget's state (or update) for the comm's model; None to drop the message."""
        html, styles = comm_id in self._html_comms, comm_id in self._style_comms
        return self._widget_state(state, html, styles, comm_id in self._media_comms)

    def _comm_msg(self, content: dict) -> dict | None:
        comm_id = content.get("comm_id")
        data = content.get("data")
        if not isinstance(comm_id, str) or not isinstance(data, dict):
            return None
        if not self.targets:  # no frontend can have a comm: nothing to say to one
            return None
        out = dict(data)
        if isinstance(data.get("state"), dict):
            self._note_kind(comm_id, data["state"])
            state = self._comm_state(comm_id, data["state"])
            if state is None:
                return None
            out["state"] = state
        if isinstance(data.get("states"), dict):  # the control comm's update_states
            states = {}
            for model_id, state in data["states"].items():
                if isinstance(state, dict):
                    kept = self._widget_state(state, _renders_html(state), _styles(state),
                                              _media(state))  # fmt: skip
                    if kept is None:
                        return None
                    states[str(model_id)] = kept
            out["states"] = states
        return {**content, "data": out}

    @staticmethod
    def _widget_state(state: dict, html: bool, styles: bool = False,
                      media: bool = False) -> dict | None:  # fmt: skip
        """A widget state as a client may get it; None when it would make the browser load
        a URL (an image, video or audio of format "url": the kernel's VM has no network,
        the user's browser has)."""
        fmt = state.get("format")
        if media and isinstance(fmt, str) and fmt.strip().lower() == "url":
            return None
        out = dict(state)
        if styles:
            out = {k: v for k, v in out.items()
                   if not isinstance(v, str) or k.startswith("_") or _css_value_ok(v)}  # fmt: skip
        if "description_allow_html" in out:
            out["description_allow_html"] = False
        if html and isinstance(out.get("value"), str):
            out["value"] = sanitize_html(out["value"])
        if isinstance(out.get("outputs"), list | tuple):
            outputs = []
            for output in out["outputs"]:
                if isinstance(output, dict) and "data" in output:
                    data, metadata = sanitize_bundle(output.get("data"), output.get("metadata"))
                    output = {**output, "data": data, "metadata": metadata}
                if isinstance(output, dict) and output.get("output_type") in (
                    "stream", "error", "display_data", "execute_result"):  # fmt: skip
                    outputs.append(output)
            out["outputs"] = outputs
        return out
