"""Packages in a kernel with no network (docs/packages.md), in a real VM: the host resolves
and fetches binary wheels from a local index the test builds, the guest unpacks them and
imports them; `%pip install` in a cell, Sandbox.install, refusals and caps."""

from __future__ import annotations

import glob
import json
import tempfile

import pytest

from smol_kernel.cli import main
from smol_kernel.sandbox import AsyncSandbox, SandboxError

from .conftest import install_spec
from .package_index import served_standard_index

pytestmark = pytest.mark.vm


@pytest.fixture(scope="module")
def index(tmp_path_factory):
    with served_standard_index(tmp_path_factory.mktemp("index")) as served:
        yield served


@pytest.fixture(scope="module")
async def sb(index):
    url, _ = index
    async with AsyncSandbox(package_index_url=url, max_install_mib=2, memory_mib=768) as sandbox:
        yield sandbox


def _leftovers() -> list[str]:
    return glob.glob(f"{tempfile.gettempdir()}/smol-install-*")


async def test_an_install_brings_a_package_and_its_dependency_into_a_vm_with_no_network(sb):
    before = set(_leftovers())
    assert sb.provisioner.plan.network is False
    report = await sb.install(["smol-top"])
    assert sorted(report.packages) == [("smol-dep", "1.0"), ("smol-top", "2.0")]
    assert "installed smol-dep==1.0, smol-top==2.0" in report.text
    ex = await sb.run_code("import smol_top\nsmol_top.ANSWER")
    assert ex.text == "42", ex.error
    # The VM has no network device at all: the packages came through the agent channel.
    nics = await sb.run_code("import os\nsorted(os.listdir('/sys/class/net'))")
    assert nics.text == "['lo']"
    where = await sb.run_code("import smol_top, os\nos.path.dirname(os.path.dirname("
                              "smol_top.__file__))")  # fmt: skip
    assert report.guest_folder in where.text
    assert set(_leftovers()) == before, "the host kept a copy of what it installed"


async def test_pip_install_in_a_cell_is_served_by_the_host(sb):
    ex = await sb.run_code("%pip install -q smol-dep")
    assert ex.status == "ok", ex.error
    assert "installed smol-dep==1.0" in "".join(ex.logs.stdout)
    assert (await sb.run_code("import smol_dep\nsmol_dep.VALUE")).text == "41"


@pytest.mark.parametrize(
    ("line", "why"),
    [
        ("%pip install --index-url http://evil.test/simple smol-dep", "pip options"),
        ("%pip install ./local-folder", "URLs and paths"),
        ("%pip install smol-dep@https://evil.test/x.whl", "URLs and paths"),
        ("%pip uninstall smol-dep", "installs only"),
    ],
)
async def test_pip_in_a_cell_refuses_what_is_not_a_requirement(sb, line, why):
    ex = await sb.run_code(line)
    said = "".join(ex.logs.stderr)  # IPython prints a magic's UsageError, no traceback
    assert ex.status == "error" and "UsageError: " in said and why in said, said


async def test_an_sdist_is_refused_and_never_built(sb, index):
    _, mark = index
    ex = await sb.run_code("%pip install smol-src")
    assert ex.status == "error" and "no binary wheel" in "".join(ex.logs.stderr), ex.logs
    with pytest.raises(SandboxError, match="no binary wheel"):
        await sb.install(["smol-src"])
    assert not mark.exists(), "the host ran the sdist's setup.py"


async def test_the_size_cap_holds(sb):
    with pytest.raises(SandboxError, match="max_install_mib = 2"):
        await sb.install(["smol-big"])  # a 3 MiB wheel
    ex = await sb.run_code("import smol_big")
    assert ex.status == "error" and ex.error.name == "ModuleNotFoundError"


async def test_an_assistant_installs_through_the_mcp_tool(index):
    """The MCP server's install_packages, as an assistant calls it: the package is then
    importable in run_python; a refused requirement comes back as the tool's error."""
    from smol_kernel.mcp_server import Sessions, build_server

    url, _ = index
    sessions = Sessions({"package_index_url": url, "memory_mib": 768})
    server = build_server(sessions)
    try:
        said = await server.call_tool("install_packages", {"requirements": ["smol-top"]})
        assert "installed smol-dep==1.0, smol-top==2.0" in str(said)
        ran = await server.call_tool("run_python", {"code": "import smol_top\nsmol_top.ANSWER"})
        assert "42" in str(ran)
        with pytest.raises(Exception, match="URLs and paths"):
            await server.call_tool("install_packages", {"requirements": ["./evil"]})
    finally:
        await sessions.close_all()


def _notebook_with(path, dependencies: list[str], code: str) -> str:
    block = "# /// script\n# dependencies = " + json.dumps(dependencies) + "\n# ///\n"
    cell = {"cell_type": "code", "source": block + code, "metadata": {}, "outputs": [],
            "execution_count": None}  # fmt: skip
    nb = {"cells": [cell], "metadata": {}, "nbformat": 4, "nbformat_minor": 5}
    path.write_text(json.dumps(nb))
    return str(path)


def test_a_notebook_runs_with_its_dependencies_block_installed(jupyter_prefix, index, tmp_path,
                                                               capsys):  # fmt: skip
    """PEP 723 in the first code cell, as juv writes it: smol-kernel run starts the kernel
    with those packages installed before the first cell (the VM has no network). One that
    cannot be installed stops the start and says why."""
    url, mark = index
    spec = install_spec(jupyter_prefix, "smolvm-deps", "--package-index-url", url)
    ok = _notebook_with(tmp_path / "deps.ipynb", ["smol-top"],
                        "import smol_top\nprint('answer', smol_top.ANSWER)")  # fmt: skip
    assert main(["run", ok, "--kernel", spec]) == 0
    assert "answer 42" in capsys.readouterr().out
    bad = _notebook_with(tmp_path / "sdist.ipynb", ["smol-src"], "print('ran')")
    assert main(["run", bad, "--kernel", spec]) == 2
    captured = capsys.readouterr()
    said = " ".join(captured.err.split())  # (the start error comes wrapped)
    assert "'sdist.ipynb'" in said and "no binary wheel" in said, said
    assert "ran" not in captured.out and not mark.exists()
