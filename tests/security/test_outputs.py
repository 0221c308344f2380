"""Notebooks executed headless keep no executable output: ``smol-kernel run --output`` and
papermill write what the output policy let through, and ``run`` prints guest text without
terminal escape sequences."""

from __future__ import annotations

import json

import nbformat
import pytest

from ..conftest import install_spec

pytestmark = pytest.mark.vm

CELLS = [
    r"""
from IPython.display import HTML, SVG, Javascript, Markdown, display
display(Javascript("window.pwned = 1"))
display(HTML("<script>window.pwned = 1</script><img src=x onerror='window.pwned=1'>"))
display(SVG("<svg xmlns='http://www.w3.org/2000/svg' onload='window.pwned=1'/>"))
display(Markdown("<img src=x onerror='window.pwned=1'> **md**"))
""",
    r"print('clipboard \x1b]52;c;aGk=\x07 title \x1b]0;pwned\x07 csi \x9b31m done')",
]


def _executable(nb) -> list[str]:
    found = []
    for cell in nb.cells:
        for out in cell.get("outputs", []):
            text = json.dumps(out.get("data", {})).lower()
            if "application/javascript" in out.get("data", {}):
                found.append("application/javascript")
            found += [w for w in ("<script", "onerror", "onload", "javascript:") if w in text]
    return found


@pytest.fixture(scope="module")
def hostile_notebook(jupyter_prefix, tmp_path_factory):
    spec = install_spec(jupyter_prefix, "smolvm-outputs", "--memory-mib", "640")
    path = tmp_path_factory.mktemp("outputs") / "hostile.ipynb"
    nb = nbformat.v4.new_notebook()
    nb.metadata["kernelspec"] = {"name": spec, "display_name": spec, "language": "python"}
    nb.cells = [nbformat.v4.new_code_cell(c) for c in CELLS]
    nbformat.write(nb, path)
    return spec, path


def test_smol_kernel_run_writes_and_prints_no_executable_output(hostile_notebook, capsys):
    from smol_kernel.cli import main

    spec, path = hostile_notebook
    out = path.with_name("run-out.ipynb")
    assert main(["run", str(path), "--kernel", spec, "--output", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "\x1b" not in printed and "\x07" not in printed and "\x9b" not in printed
    assert "clipboard" in printed and "done" in printed
    nb = nbformat.read(out, as_version=4)
    assert _executable(nb) == []
    html = json.dumps([o.get("data") for c in nb.cells for o in c.get("outputs", [])])
    assert "<strong>md</strong>" in html and "data:image/svg+xml;base64" in html


def test_papermill_writes_no_executable_output(hostile_notebook):
    papermill = pytest.importorskip("papermill", reason="papermill is a test extra")
    spec, path = hostile_notebook
    out = path.with_name("papermill-out.ipynb")
    papermill.execute_notebook(str(path), str(out), kernel_name=spec, progress_bar=False,
                               start_timeout=240)  # fmt: skip
    nb = nbformat.read(out, as_version=4)
    assert _executable(nb) == []
    assert "application/javascript" in json.dumps(nb.cells[0].outputs)  # named in the note
