"""Host-side installs (smol_kernel/packages/), no VM: strict requirements, resolution of
binary wheels only against a local index, hashes, caps."""

from __future__ import annotations

import glob
import json
import tarfile
import tempfile

import pytest

from smol_kernel.packages.installer import HostInstaller, InstallError, PackagePolicy
from smol_kernel.packages.notebook_deps import notebook_requirements
from smol_kernel.packages.requirements import RequirementError, parse_requirements

from .package_index import (
    make_wheel,
    serve_index,
    served_standard_index,
    standard_index,
    write_index,
)


@pytest.fixture(scope="module")
def index(tmp_path_factory):
    with served_standard_index(tmp_path_factory.mktemp("index")) as served:
        yield served


# ------------------------------------------------------------------ requirements


@pytest.mark.parametrize(
    "text",
    ["numpy", "pandas[parquet]>=2", "attrs; python_version >= '3.8'", "Smol_Top==2.0"],
)
def test_names_with_extras_versions_and_markers_are_taken(text):
    (req,) = parse_requirements([text], 5)
    assert str(req)  # written anew from the parsed form


@pytest.mark.parametrize(
    ("text", "why"),
    [
        ("--index-url=http://evil.test/simple", "pip options"),
        ("-r requirements.txt", "pip options"),
        ("-e .", "pip options"),
        ("pkg @ https://evil.test/pkg.whl", "URLs and paths"),
        ("git+https://evil.test/repo", "not a requirement|URLs and paths"),
        ("./local/pkg", "not a requirement|URLs and paths"),
        ("/tmp/pkg.whl", "not a requirement|URLs and paths"),
        ("file:///tmp/x", "not a requirement|URLs and paths"),
        ("pkg\n--index-url x", "not a requirement"),
        ("", "not a requirement"),
        ("x" * 300, "not a requirement"),
        # packaging writes marker values back in double quotes, unescaped: uv would read
        # an option out of this one (review of the change)
        ("foo; os_name == 'posix\" --hash=sha256:abcd'", "not a requirement"),
        ("foo # --index-url http://evil.test", "not a requirement"),
    ],
)
def test_options_urls_and_paths_are_refused_with_what_is_accepted(text, why):
    with pytest.raises(RequirementError, match=why) as caught:
        parse_requirements([text], 5)
    assert "e.g. 'pandas>=2'" in str(caught.value)


def test_counts_and_lists_are_enforced():
    with pytest.raises(RequirementError, match="at most 2"):
        parse_requirements(["a", "b", "c"], 2)
    with pytest.raises(RequirementError, match="named twice"):
        parse_requirements(["a", "A>=1"], 5)
    with pytest.raises(RequirementError, match="not a package this server installs"):
        parse_requirements(["evil"], 5, block=["Evil"])
    with pytest.raises(RequirementError, match="not a package this server installs"):
        parse_requirements(["other"], 5, allow=["numpy"])
    assert len(parse_requirements(["numpy"], 5, allow=["NumPy"])) == 1  # the control
    for not_a_list in ("numpy", {"numpy": 1}, None, []):  # what a guest's JSON may hold
        with pytest.raises(RequirementError, match="name at least one requirement"):
            parse_requirements(not_a_list, 5)  # type: ignore[arg-type]
    with pytest.raises(RequirementError, match="not a requirement"):
        parse_requirements([["numpy"]], 5)  # type: ignore[list-item]


def test_the_default_index_is_the_hosts_pips(monkeypatch):
    from smol_kernel.packages.installer import default_index_url

    monkeypatch.setenv("PIP_INDEX_URL", "https://mirror.example/simple")
    assert default_index_url() == "https://mirror.example/simple"


# ------------------------------------------------------------------ installs


def _leftovers() -> list[str]:
    return glob.glob(f"{tempfile.gettempdir()}/smol-install-*")


def _installer(url: str, **policy) -> HostInstaller:
    return HostInstaller(PackagePolicy(index_url=url, **policy))


async def test_an_install_brings_its_dependencies_as_a_tree_to_hand_over(index):
    url, _ = index
    done = await _installer(url).install(["smol-top"])
    try:
        assert sorted(done.packages) == [("smol-dep", "1.0"), ("smol-top", "2.0")]
        assert (done.tree / "smol_top" / "__init__.py").is_file()
        assert (done.tree / "smol_dep" / "__init__.py").is_file()
        with tarfile.open(done.archive()) as tar:
            names = tar.getnames()
            owners = {(m.uid, m.uname) for m in tar.getmembers()}
        assert owners == {(0, "root")}, "the host's user went into the archive"
        assert "smol_top/__init__.py" in names and ".lock" not in names
        assert all(not n.startswith(("/", "..")) for n in names)
        assert "smol-top==2.0" in done.describe() and "MiB" in done.describe()
    finally:
        done.discard()
    assert not done.work.exists()


async def test_an_sdist_is_never_built(index):
    url, mark = index
    with pytest.raises(InstallError, match="no binary wheel") as caught:
        await _installer(url).install(["smol-src"])
    assert "sdists are never built" in str(caught.value)
    assert not mark.exists(), "the host ran the package's setup.py"


async def test_an_unknown_package_says_so(index):
    url, _ = index
    with pytest.raises(InstallError, match="no such package"):
        await _installer(url).install(["smol-nowhere"])


async def test_a_wheel_that_does_not_match_its_listed_hash_is_refused(tmp_path):
    root = tmp_path / "index"
    standard_index(root, tmp_path / "mark")
    wheel = next((root / "files").glob("smol_dep-*.whl"))
    with serve_index(root) as url:
        good = await _installer(url).install(["smol-dep"])  # the control
        good.discard()
        wheel.write_bytes(wheel.read_bytes() + b"\0")  # changed after the index listed it
        with pytest.raises(InstallError, match=r"(?i)hash"):
            await _installer(url).install(["smol-dep"])


async def test_the_size_cap_counts_every_install_of_the_kernel(index):
    url, _ = index
    installer = _installer(url, max_install_mib=4)
    big = await installer.install(["smol-big"])  # 3 MiB
    big.discard()
    with pytest.raises(InstallError, match="max_install_mib = 4"):
        await installer.install(["smol-big"])  # 3 more would be 6
    small = await installer.install(["smol-dep"])  # a few bytes still fit
    small.discard()


async def test_the_lists_judge_dependencies_too(index):
    url, _ = index
    with pytest.raises(RequirementError, match="'smol-dep' is not a package"):
        await _installer(url, block=("smol-dep",)).install(["smol-top"])
    with pytest.raises(RequirementError, match="'smol-dep' is not a package"):
        await _installer(url, allow=("smol-top",)).install(["smol-top"])


async def test_a_wheel_that_unpacks_a_thousandfold_stops_at_the_cap(tmp_path):
    """A 200 MiB file of zeros is a wheel of ~200 KB: what uv writes is watched and the
    install stops at the kernel's remaining size, leaving nothing (review of the change:
    the cap was checked only after the unpacking)."""
    root = tmp_path / "index"
    (root / "files").mkdir(parents=True)
    make_wheel(root / "files", "smol-bomb", "1.0", {"smol_bomb/zeros.bin": bytes(200 << 20)})
    write_index(root)
    before = set(_leftovers())
    refused = pytest.raises(InstallError, match="larger than this kernel may still install")
    with serve_index(root) as url, refused:
        await _installer(url, max_install_mib=4).install(["smol-bomb"])
    assert set(_leftovers()) == before


async def test_installs_are_rate_limited(index):
    url, _ = index
    installer = _installer(url, max_installs_per_minute=1)
    (await installer.install(["smol-dep"])).discard()
    with pytest.raises(InstallError, match="at most 1 installs a minute"):
        await installer.install(["smol-dep"])


# ------------------------------------------------------------------ a notebook's own


def _notebook(path, *sources: str, raw: bytes | None = None):
    cells = [{"cell_type": "code", "source": s, "metadata": {}, "outputs": [],
              "execution_count": None} for s in sources]  # fmt: skip
    path.write_bytes(raw if raw is not None else json.dumps({"cells": cells}).encode())
    return str(path)


def _cell(source: str) -> bytes:
    return json.dumps({"cells": [{"cell_type": "code", "source": source}]}).encode()


BLOCK = '# /// script\n# dependencies = ["smol-top", "smol-dep>=1"]\n# ///\nimport smol_top\n'


def test_a_notebooks_dependencies_are_its_first_code_cells_script_block(tmp_path):
    nb = _notebook(tmp_path / "a.ipynb", BLOCK, "# /// script\n# dependencies = ['x']\n# ///\n")
    assert notebook_requirements(nb) == ["smol-top", "smol-dep>=1"]
    as_lines = _notebook(tmp_path / "b.ipynb", BLOCK.splitlines(keepends=True))  # type: ignore[arg-type]
    assert notebook_requirements(as_lines) == ["smol-top", "smol-dep>=1"]
    assert notebook_requirements(_notebook(tmp_path / "c.ipynb", "import os\n")) == []
    assert notebook_requirements(str(tmp_path / "unsaved.ipynb")) == []


@pytest.mark.parametrize(
    "raw",
    [b"not json", b"{}", b'{"cells": 3}', b'{"cells": [{"cell_type": "code", "source": 7}]}',
     b'{"worksheets": []}', b"[1, 2]"],
)  # fmt: skip
def test_a_file_that_is_not_a_notebook_has_no_dependencies(tmp_path, raw):
    """The server decides what a notebook is (a session may name any file, or an nbformat 3
    notebook): a kernel for it starts without dependencies, rather than not at all."""
    assert notebook_requirements(_notebook(tmp_path / "n.ipynb", raw=raw)) == []


@pytest.mark.parametrize(
    ("raw", "why"),
    [
        (_cell(BLOCK + BLOCK), "two '# /// script' blocks"),
        (_cell("# /// script\n# dependencies = 'x'\n# ///\n"), "list of strings"),
        (_cell("# /// script\n# dependencies = [\n# ///\n"), "not TOML"),
    ],
)
def test_a_dependencies_block_that_is_wrong_says_why(tmp_path, raw, why):
    with pytest.raises(RequirementError, match=why):
        notebook_requirements(_notebook(tmp_path / "n.ipynb", raw=raw))


def test_a_notebook_is_not_followed_through_a_link_nor_read_unbounded(tmp_path):
    secret = tmp_path / "secret.json"
    secret.write_text(json.dumps({"cells": [{"cell_type": "code", "source": BLOCK}]}))
    link = tmp_path / "link.ipynb"
    link.symlink_to(secret)
    assert notebook_requirements(str(link)) == []  # not followed
    assert notebook_requirements(str(secret)) == ["smol-top", "smol-dep>=1"]  # the control
    big = tmp_path / "big.ipynb"
    block = json.dumps({"cells": [{"cell_type": "code", "source": BLOCK}]}).encode()
    big.write_bytes(block + b" " * (32 << 20))  # the same notebook, past the bound
    assert notebook_requirements(str(big)) == []
