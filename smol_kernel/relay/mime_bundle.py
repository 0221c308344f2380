"""What a MIME bundle from a kernel's VM may hold when a client shows it (the bundle half of
the output policy, ``output_policy.py``).

``sanitize_bundle`` keeps an allow-list of types: ``text/plain``; ``text/html`` sanitized
(``sanitize_html``: no script, event handlers, ``javascript:`` URLs, iframes, objects,
embeds, forms, meta, base or style elements, and nothing loaded from another site);
``text/markdown`` kept when it cannot hold markup, else rendered to HTML here and sanitized
the same way (no parser differential between us and the browser), within a size bound
(``MAX_MARKDOWN_RENDERED``, ``MAX_MARKDOWN_GROWTH``: larger is shown as text); PNG, JPEG and
GIF as base64; SVG as an ``<img>`` of a data URL, where browsers run no script and load
nothing; JSON; ``text/latex``; widget view/state JSON. Math the browser typesets loses the
TeX commands that make links, styles, load extensions or define macros
(``neutralize_tex``). Anything else is dropped with a ``text/plain`` note saying how to opt
in. Pure functions.
"""

from __future__ import annotations

import base64
import re
from typing import Any

TEXT_AS_IS = frozenset({"text/plain"})
IMAGES = {"image/png", "image/jpeg", "image/gif"}
JSON_DATA = frozenset({
    "application/json",
    "application/vnd.jupyter.widget-view+json",
    "application/vnd.jupyter.widget-state+json",
})  # fmt: skip
OPT_IN = "trusted_outputs=True (smol-kernel install --trusted-outputs)"
_B64 = re.compile(r"[A-Za-z0-9+/=\s]*")
_SCHEME = re.compile(r"^\s*([a-zA-Z][a-zA-Z0-9+.\-]*):")
_DATA_IMAGE = re.compile(r"^data:image/(png|jpeg|gif|webp);base64,[A-Za-z0-9+/=\s]*$")
# TeX control sequences MathJax turns into links, CSS, extension loads or new macros (a
# macro could rename one of the others). JupyterLab typesets math in HTML, Markdown and
# LaTeX outputs.
_UNSAFE_TEX = re.compile(
    r"\\(href|url|class|cssId|style|bbox|mmlToken|data|html|unicode|require|def|gdef|edef|"
    r"xdef|let|"
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


# Markdown is rendered on the relay's loop, for every kernel of the server: bounded. Larger
# (or markdown whose HTML would grow past MAX_MARKDOWN_GROWTH times its size: reference
# links repeat a long URL for every 3-character use) is shown as its text.
MAX_MARKDOWN_RENDERED = 64 << 10
MAX_MARKDOWN_GROWTH = 16


class MarkdownTooLarge(Exception):
    pass


def markdown_to_html(text: str) -> str | None:
    """Markdown rendered to sanitized HTML on the host (math kept for the browser), or
    None when it is too large to render here (``MAX_MARKDOWN_RENDERED``, growth bounded
    while rendering)."""
    if len(text) > MAX_MARKDOWN_RENDERED:
        return None
    import mistune

    class BoundedRenderer(mistune.HTMLRenderer):
        """Counts what it writes (nested parts more than once: a bound, not a size)."""

        budget = MAX_MARKDOWN_GROWTH * len(text) + (64 << 10)

        def render_token(self, token: dict, state: Any) -> str:
            out = super().render_token(token, state)
            self.budget -= len(out)
            if self.budget < 0:
                raise MarkdownTooLarge
            return out

    render = mistune.create_markdown(
        escape=False, renderer=BoundedRenderer(escape=False),
        plugins=["strikethrough", "table", "math", "url"],
    )  # fmt: skip
    try:
        return sanitize_html(str(render(text)))
    except (MarkdownTooLarge, RecursionError):
        return None


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
            html = markdown_to_html(markdown)
            if html is not None:
                out["text/html"] = html
            elif "text/plain" not in out:
                out["text/plain"] = markdown  # too large to render here: its text
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
