"""JupyterLab in a real headless Chromium (Debian's, driven by playwright): click
"Python (smolvm)" in the launcher, run a cell, see its output; open a kernel that cannot
start here and read the reason in JupyterLab's dialog. Screenshots are kept in
``$SMOL_TEST_ARTIFACTS`` (default: test-artifacts/ in the checkout) to look at."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
import requests

from smol_kernel.paths import runtime_dir
from smol_kernel.vm.process import reap_orphans
from smol_kernel.vm.select import select_backend

from .conftest import processes_mentioning, runtime_entries
from .web_helpers import free_port, wait_until_up

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
ROOT = Path(__file__).resolve().parent.parent
ARTIFACTS = Path(os.environ.get("SMOL_TEST_ARTIFACTS", ROOT / "test-artifacts"))
pytestmark = [
    pytest.mark.vm,
    pytest.mark.skipif(
        CHROMIUM is None, reason="Debian's chromium is not installed (scripts/setup.sh installs it)"
    ),
]


def install_lab_kernelspecs(prefix: Path) -> None:
    from smol_kernel.cli import main as cli

    # the server extension (its metrics), and no pool: a refill would only cost time here
    assert cli(["install", "--prefix", str(prefix), "--memory-mib", "640",
                "--pool-size", "0"]) == 0  # fmt: skip
    assert cli(["install", "--prefix", str(prefix), "--name", "smolvm-hw",
                "--display-name", "Python (smolvm, hardware only)",
                "--require-hardware-isolation", "--no-server-extension"]) == 0  # fmt: skip


def install_output_kernelspecs(prefix: Path) -> None:
    """The hostile-output test's kernels: scipy (pandas, matplotlib) with the default output
    policy, and the default image with trusted_outputs (the positive control)."""
    from smol_kernel.cli import main as cli
    from smol_kernel.image.store import GuestImage, ImageNotFound

    try:
        GuestImage.load("scipy")
    except ImageNotFound:
        pytest.fail("the scipy image is not built: smol-kernel image build --preset scipy "
                    "(scripts/setup.sh builds it)")  # fmt: skip
    assert cli(["install", "--prefix", str(prefix), "--name", "smolvm-scipy", "--image", "scipy",
                "--display-name", "Python (smolvm, scipy)", "--pool-size", "0"]) == 0  # fmt: skip
    assert cli(["install", "--prefix", str(prefix), "--name", "smolvm-trusted",
                "--display-name", "Python (smolvm, trusted outputs)", "--trusted-outputs",
                "--memory-mib", "640", "--pool-size", "0",
                "--no-server-extension"]) == 0  # fmt: skip


@pytest.fixture
def lab(request, tmp_path, image):
    prefix = tmp_path / "prefix"
    getattr(request, "param", install_lab_kernelspecs)(prefix)
    token, port = uuid.uuid4().hex, free_port()
    env = {**os.environ, "JUPYTER_PATH": f"{prefix}/share/jupyter",
           "JUPYTER_CONFIG_PATH": f"{prefix}/etc/jupyter"}  # fmt: skip
    argv = [sys.executable, "-m", "jupyterlab", "--no-browser", f"--port={port}",
            "--ServerApp.ip=127.0.0.1", f"--IdentityProvider.token={token}",
            f"--ServerApp.root_dir={tmp_path}",
            "--KernelSpecManager.ensure_native_kernel=False"]  # fmt: skip
    if os.getuid() == 0:
        argv.append("--allow-root")
    with open(tmp_path / "lab.log", "w") as log:
        proc = subprocess.Popen(argv, cwd=tmp_path, env=env, stdout=log, stderr=log)
    url = f"http://127.0.0.1:{port}"
    wait_until_up(lambda: requests.get(f"{url}/api/status", params={"token": token}).ok,
                  proc, tmp_path / "lab.log")  # fmt: skip
    before = runtime_entries()
    try:
        yield url, token, tmp_path
    finally:
        proc.terminate()
        # jupyter_client 8 keeps a kernel that failed to start among its pending ones and
        # the server would ignore SIGTERM; our server extension drops it
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(30)
            pytest.fail("the server did not exit on SIGTERM after a failed kernel start")
        left = runtime_entries() - before  # a killed server leaves dirs, never VMs
        deadline = time.monotonic() + 30
        while any(processes_mentioning(str(runtime_dir() / name)) for name in left):
            assert time.monotonic() < deadline, f"the server's VMs outlived it: {left}"
            time.sleep(0.5)
        reap_orphans()  # what `smol-kernel ps` does with a dead owner's dirs
        assert runtime_entries() - before == set()


def shot(page, name: str) -> Path:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    path = ARTIFACTS / f"{name}.png"
    page.screenshot(path=str(path))
    return path


def drive_lab(page, url: str, token: str) -> str:
    """Run a cell in a new smolvm notebook, then open the hardware-only kernel; returns the
    text of the error dialog JupyterLab shows for it."""
    from playwright.sync_api import expect

    page.goto(f"{url}/lab?token={token}")
    card = page.locator('.jp-LauncherCard[data-category="Notebook"][title="Python (smolvm)"]')
    card.wait_for(timeout=60_000)
    shot(page, "lab-launcher")
    card.click()
    # JupyterLab skips a cell run while the kernel is still starting (as for any kernel)
    expect(page.locator(".jp-StatusBar-Widget", has_text="Python (smolvm) | Idle")).to_be_visible(
        timeout=180_000
    )
    cell = page.locator(".jp-Notebook .jp-Cell .cm-content").first
    cell.wait_for(timeout=60_000)
    cell.click()
    page.keyboard.type("import os; print('answer', 6 * 7, os.uname().release)")
    page.keyboard.press("Shift+Enter")
    output = page.locator(".jp-OutputArea-output", has_text="answer 42")
    expect(output).to_be_visible(timeout=180_000)
    assert os.uname().release not in output.inner_text(), "the cell ran on the host"
    shot(page, "lab-cell-output")

    page.keyboard.press("Escape")
    page.locator(".lm-TabBar-addButton:not(.lm-mod-hidden)").first.click()  # "+": launcher
    hw = page.locator(
        '.jp-LauncherCard[data-category="Notebook"][title="Python (smolvm, hardware only)"]'
    ).last
    hw.wait_for(timeout=30_000)
    hw.click()
    dialog = page.locator(".jp-Dialog")
    expect(dialog).to_be_visible(timeout=60_000)
    expect(dialog).to_contain_text("hardware", timeout=10_000)
    text = dialog.inner_text()
    shot(page, "lab-start-error")
    return text


def test_jupyterlab_runs_a_cell_in_a_smolvm_kernel_and_shows_start_errors(lab):
    from playwright.sync_api import sync_playwright

    url, token, _ = lab
    before = runtime_entries()
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, headless=True,
                                     args=["--no-sandbox", "--disable-gpu"])  # fmt: skip
        page = browser.new_page(viewport={"width": 1280, "height": 800})
        try:
            text = drive_lab(page, url, token)
        except Exception:
            shot(page, "lab-failure")
            raise
        finally:
            browser.close()
    if select_backend("auto", "default", True).backend is None:
        assert "require_hardware_isolation" in text or "hardware isolation" in text, text
    # let the server finish with the failed start before the fixture stops it
    deadline = time.monotonic() + 30
    while len(requests.get(f"{url}/api/kernels", params={"token": token}).json()) != 1:
        assert time.monotonic() < deadline, "the failed kernel is still listed"
        time.sleep(0.5)
    metrics = requests.get(f"{url}/metrics", params={"token": token}).text
    assert re.search(r'smol_kernel_vm_starts_total\{kind="(pooled|clone|cold)"\} 1\.0', metrics)
    assert "smol_kernel_active_vms" in metrics
    assert runtime_entries() - before, "the kernel (and pool) VMs are this server's"


# Each payload would add its name to window.smolPwned if it ran.
HOSTILE_OUTPUTS = r"""
from IPython.display import HTML, SVG, Javascript, Markdown, display
mark = "(window.parent.smolPwned = (window.parent.smolPwned || []).concat(['%s']))"
display(Javascript(mark % "javascript"))
display(HTML("<script>%s</script>" % (mark % "script")))
display(HTML("<img src=x onerror=\"%s\">" % (mark % "img-onerror")))
display(SVG("<svg xmlns='http://www.w3.org/2000/svg' onload=\"%s\"><script>%s</script>"
            "</svg>" % (mark % "svg-onload", mark % "svg-script")))
display(Markdown("<img src=x onerror=\"%s\"> **markdown**" % (mark % "markdown")))
display(HTML("<iframe srcdoc=\"<script>%s</script>\"></iframe>" % (mark % "iframe")))
# The same output sent with a session username that is not UTF-8: the header's 0xff byte
# made the relay of old pass it unread (issue 30); then once with a readable header.
k = get_ipython().kernel
for name, user in (("undecodable", "\udcff"), ("readable", "ordinary")):
    saved, k.session.username = k.session.username, user
    try:
        k.session.send(k.iopub_socket, "display_data", {"metadata": {}, "transient": {},
            "data": {"application/javascript": mark % (name + "-javascript"),
                     "text/html": "<img src=x onerror=\"%s\"><table class='probe-%s'>"
                                  "<tr><td>%s</td></tr></table>" % (mark % (name + "-img"),
                                                                     name, name)}},
            parent=k.get_parent())
    finally:
        k.session.username = saved
print("payloads sent")
"""
SCIPY_OUTPUTS = r"""
import pandas as pd, matplotlib
matplotlib.use("module://matplotlib_inline.backend_inline")
import matplotlib.pyplot as plt
df = pd.DataFrame({"visits": [3, 5, 8]}, index=["a", "b", "c"])
display(df)
plt.plot([1, 2, 3], [2, 4, 8]); plt.title("trend"); plt.show()
"""


def _notebook(path: Path, kernel: str, *cells: str) -> None:
    import nbformat

    nb = nbformat.v4.new_notebook()
    nb.metadata["kernelspec"] = {"name": kernel, "display_name": kernel, "language": "python"}
    nb.cells = [nbformat.v4.new_code_cell(c) for c in cells]
    nbformat.write(nb, path)


def _run_notebook(page, url: str, token: str, name: str) -> None:
    """Open a notebook, wait for its kernel, run all cells, wait for the last output."""
    from playwright.sync_api import expect

    page.goto(f"{url}/lab/tree/{name}?reset&token={token}")  # reset: only this notebook
    expect(page.locator(".jp-StatusBar-Widget", has_text="| Idle")).to_be_visible(timeout=240_000)
    page.locator(".jp-Notebook:visible").first.click()
    page.keyboard.press("Escape")
    page.keyboard.press("Control+a")  # select every cell in command mode
    page.keyboard.press("Shift+Enter")  # runs the selection
    expect(page.locator(".jp-OutputArea-output", has_text="payloads sent")).to_be_visible(
        timeout=240_000
    )
    page.wait_for_timeout(3000)  # onerror/onload handlers fire after the DOM insertion


@pytest.mark.parametrize("lab", [install_output_kernelspecs], indirect=True)
def test_kernel_outputs_run_no_script_in_jupyterlab_unless_trusted(lab):
    """Every way a cell's output could run script in the user's page (JavaScript, <script>,
    onerror, SVG onload/script, Markdown HTML, iframe srcdoc, a message whose header is not
    UTF-8) does nothing with the output policy, while a DataFrame table, an HTML table and
    a matplotlib plot still render. The same payloads
    from a trusted_outputs kernel do run: the probe can see script run (positive control).
    """
    from playwright.sync_api import sync_playwright

    url, token, root = lab
    _notebook(root / "hostile.ipynb", "smolvm-scipy", SCIPY_OUTPUTS, HOSTILE_OUTPUTS)
    _notebook(root / "trusted.ipynb", "smolvm-trusted", HOSTILE_OUTPUTS)
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, headless=True,
                                     args=["--no-sandbox", "--disable-gpu"])  # fmt: skip
        page = browser.new_page(viewport={"width": 1280, "height": 1000})
        try:
            _run_notebook(page, url, token, "hostile.ipynb")
            shot(page, "outputs-policy")
            page.locator(
                ".jp-OutputArea-output", has_text="payloads sent"
            ).scroll_into_view_if_needed()
            shot(page, "outputs-policy-payloads")
            assert page.evaluate("window.smolPwned || []") == []
            output = page.locator(".jp-OutputArea-output")
            assert output.locator("table.dataframe").count() == 1, "the DataFrame table"
            assert "visits" in output.locator("table.dataframe").inner_text()
            plots = output.locator("img[src^='data:image/png']")
            assert plots.count() >= 1 and plots.first.evaluate("i => i.naturalWidth") > 100
            svg = output.locator("img[src^='data:image/svg+xml']")
            assert svg.count() == 1, "the SVG is shown as an image"
            assert output.locator("strong", has_text="markdown").count() == 1
            assert output.filter(has_text="not shown: application/javascript").count() == 1
            # the readable copy rendered (sanitized), the undecodable one not at all
            assert output.locator("table.probe-readable").count() == 1
            assert output.locator("table.probe-undecodable").count() == 0

            page.goto("about:blank")
            _run_notebook(page, url, token, "trusted.ipynb")
            shot(page, "outputs-trusted")
            ran = page.evaluate("window.smolPwned || []")
            assert "javascript" in ran and "img-onerror" in ran, ran
            # the probe runs when its message is readable; trusted or not, one the host
            # cannot parse never reaches the page
            assert "readable-javascript" in ran, ran
            assert not [r for r in ran if r.startswith("undecodable")], ran
        except Exception:
            shot(page, "outputs-failure")
            raise
        finally:
            browser.close()
