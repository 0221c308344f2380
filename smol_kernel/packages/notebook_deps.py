"""A notebook's own dependencies: the PEP 723 block (``# /// script`` ... ``# ///``, as juv
and uv write it) in its first code cell, read on the host before its kernel runs a cell.

The notebook file may have been written by a guest (through a share): it is opened without
following a link, read up to a bound, parsed as strict JSON, and only the block's
``dependencies`` list of strings is taken (then checked like any requirement). A file that
is not such a notebook has no dependencies; only a block that is there but wrong is an
error.
"""

from __future__ import annotations

import json
import os
import re
import stat

try:
    import tomllib
except ImportError:  # Python 3.10
    import tomli as tomllib  # type: ignore[no-redef]

from .requirements import RequirementError

MAX_NOTEBOOK_BYTES = 32 << 20
# PEP 723's reference expression: a "# /// TYPE" line, "#" lines, a "# ///" line.
_BLOCK = re.compile(r"(?m)^# /// (?P<type>[a-zA-Z0-9-]+)$\s(?P<content>(^#(| .*)$\s)+)^# ///$")


def notebook_requirements(path: str) -> list[str]:
    """The ``dependencies`` of the notebook's first code cell's ``script`` block. A file
    that is not a notebook this can read (missing, a link, too large, not JSON, not
    nbformat 4) has none: the server decides what a notebook is, this only looks for a
    block. RequirementError for a block that is there but wrong."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
    except OSError:
        return []  # not saved yet, or a link: nothing to read
    with open(fd, "rb") as f:
        if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):
            return []
        data = f.read(MAX_NOTEBOOK_BYTES + 1)
    if len(data) > MAX_NOTEBOOK_BYTES or b"# /// script" not in data:
        return []  # (every start reads the notebook: most have no block, parse none)
    try:
        nb = json.loads(data)
    except (ValueError, RecursionError):
        return []
    cells = nb.get("cells") if isinstance(nb, dict) else None
    for cell in cells if isinstance(cells, list) else ():
        if isinstance(cell, dict) and cell.get("cell_type") == "code":
            source = cell.get("source")
            if isinstance(source, list) and all(isinstance(s, str) for s in source):
                source = "".join(source)
            return script_dependencies(source) if isinstance(source, str) else []
    return []


def script_dependencies(source: str) -> list[str]:
    """The ``dependencies`` of a PEP 723 ``script`` block in ``source`` ([] without one)."""
    blocks = [m for m in _BLOCK.finditer(source) if m.group("type") == "script"]
    if not blocks:
        return []
    if len(blocks) > 1:
        raise RequirementError("the first code cell has two '# /// script' blocks")
    lines = blocks[0].group("content").splitlines(keepends=True)
    toml = "".join(line[2:] if line.startswith("# ") else line[1:] for line in lines)
    try:
        meta = tomllib.loads(toml)
    except tomllib.TOMLDecodeError as e:
        raise RequirementError(f"the '# /// script' block is not TOML: {e}") from None
    deps = meta.get("dependencies", [])
    if not isinstance(deps, list) or not all(isinstance(d, str) for d in deps):
        raise RequirementError("the script block's dependencies must be a list of strings")
    return deps
