"""Starting host programs so that nothing a guest (or a user's working folder) holds runs.

Root in a guest controls every file in a ``rw`` share, and a share may be the folder the
Jupyter server runs in. So every host process smol-kernel starts for a VM:

* starts in a folder we own (the VM's runtime dir), never the server's working folder;
* gets only ``PATH`` in its environment, made of absolute entries only (``trusted_path``),
  so no ``PYTHON*``/``LD_*`` variable and no relative ``PATH`` entry reaches it;
* is found through that ``PATH`` (``find_program``), never through ``.`` or a relative entry;
* if it is one of our Python helpers, runs as ``python -I`` (isolated mode: no working
  folder or script folder on ``sys.path``, no user site-packages, no ``PYTHON*`` variables)
  with ``sys.path`` prefixed by exactly the folders the server imported ``smol_kernel`` and
  the helper's dependencies from (``python_argv``). That works for system, venv, user-site
  and editable installs alike: the helper imports the same files the server did.

What this cannot cover -- a ``rw`` share of a folder these files live in -- is refused by
``share.check_host_folder``.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import shutil
import sys
from pathlib import Path

DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"

# Runs in the helper interpreter: sys.argv = ["-c", ROOTS_JSON, MODULE, ARGS...].
_BOOTSTRAP = (
    "import json, runpy, sys\n"
    "roots, module, *args = sys.argv[1:]\n"
    "sys.path[:0] = json.loads(roots)\n"
    "sys.argv = [module, *args]\n"
    "runpy.run_module(module, run_name='__main__', alter_sys=True)\n"
)


def trusted_path() -> str:
    """The server's ``PATH`` without relative (working-folder) entries."""
    entries = [p for p in os.environ.get("PATH", "").split(os.pathsep) if os.path.isabs(p)]
    return os.pathsep.join(dict.fromkeys(entries)) or DEFAULT_PATH


def helper_env() -> dict[str, str]:
    """The whole environment of a VM's host processes."""
    return {"PATH": trusted_path()}


def find_program(name: str, override_var: str | None = None) -> str | None:
    """An executable by name on ``trusted_path()``; ``override_var`` (e.g.
    ``SMOL_KERNEL_QEMU``) may name one, and must then be an absolute path."""
    override = os.environ.get(override_var) if override_var else None
    if override:
        ok = os.path.isabs(override) and os.path.isfile(override) and os.access(override, os.X_OK)
        return override if ok else None
    return shutil.which(name, path=trusted_path())


def import_root(module: str) -> str:
    """The ``sys.path`` folder this process imports top-level ``module`` from."""
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.origin or spec.origin in ("built-in", "frozen"):
        raise ImportError(f"{module} is not importable from a file; install it")
    origin = Path(spec.origin).resolve()
    return str(origin.parent.parent if spec.submodule_search_locations else origin.parent)


def python_argv(module: str, *args: str, deps: tuple[str, ...] = (),
                python: str | None = None) -> list[str]:  # fmt: skip
    """argv running ``python -m module args`` safely (see the module docstring). ``deps``:
    top-level modules besides the standard library and ``smol_kernel`` it imports."""
    if not module.startswith("smol_kernel."):
        raise ValueError(f"not one of our helpers: {module}")
    roots = list(dict.fromkeys(import_root(m) for m in ("smol_kernel", *deps)))
    return [python or sys.executable, "-I", "-c", _BOOTSTRAP, json.dumps(roots), module, *args]


def protected_folders() -> list[tuple[str, str]]:
    """(folder, why) pairs: folders whose contents decide what host processes run or hold
    secrets of other kernels. A guest must never be able to write into them."""
    import site
    import sysconfig

    from . import paths

    out: list[tuple[str, str]] = []
    code = "Python code the Jupyter server and smol-kernel import"
    out.append((import_root("smol_kernel"), "smol-kernel's own code"))
    for p in sys.path:
        if p and os.path.isabs(p):
            out.append((p, code))
    for name in ("stdlib", "platstdlib", "purelib", "platlib", "scripts"):
        with contextlib.suppress(Exception):
            out.append((sysconfig.get_path(name), code))
    with contextlib.suppress(Exception):
        out.append((site.getusersitepackages(), code))  # even before it exists
    out.append((sys.prefix, "the Python installation the server runs"))
    out.append((str(Path(sys.executable).parent), "the Python installation the server runs"))
    out.append((str(paths.cache_dir()), "smol-kernel's images and helper programs"))
    out.append((str(paths.runtime_dir()), "smol-kernel's per-VM runtime folders"))
    with contextlib.suppress(Exception):
        from jupyter_core import paths as jpaths

        out += [(p, "Jupyter configuration (run as code)") for p in jpaths.jupyter_config_path()]
        out += [(p, "Jupyter data (kernelspecs)") for p in jpaths.jupyter_path()]
        out.append((jpaths.jupyter_runtime_dir(), "Jupyter connection files and tokens"))
    seen: dict[str, str] = {}
    for folder, why in out:
        if folder:
            seen.setdefault(os.path.realpath(folder), why)
    return list(seen.items())
