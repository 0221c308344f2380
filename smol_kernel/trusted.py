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

What this cannot cover -- a ``rw`` share of a folder these files live in, or of a folder on
``PATH`` -- is refused by ``share.check_host_folder`` (``protected_folders``); programs are
resolved once per process to absolute paths (``find_program``).
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import shutil
import sys
from dataclasses import dataclass
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


_programs: dict[tuple[str, str | None, str | None, str], str | None] = {}


def find_program(name: str, override_var: str | None = None) -> str | None:
    """An executable by name on ``trusted_path()``, as an absolute path, looked up once per
    process (a later change to a folder on PATH does not redirect us); ``override_var``
    (e.g. ``SMOL_KERNEL_QEMU``) may name one, and must then be an absolute path."""
    override = os.environ.get(override_var) if override_var else None
    key = (name, override_var, override, trusted_path())  # (a new PATH is a new lookup)
    if _programs.get(key) is None:  # (a program installed later is found then)
        if override:
            ok = os.path.isabs(override) and os.path.isfile(override)
            _programs[key] = override if ok and os.access(override, os.X_OK) else None
        else:
            found = shutil.which(name, path=trusted_path())
            _programs[key] = os.path.abspath(found) if found else None
    return _programs[key]


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


@dataclass(frozen=True)
class ProtectedFolder:
    """A folder shares are checked against. ``secret``: no share may be, contain or lie in it,
    not even read-only (keys, tokens, other kernels' connection files). Otherwise it holds
    code or configuration host programs run: no ``rw`` share may be, contain or lie in it.
    ``home``: the home folder, refused as a share unless the administrator allows it."""

    path: str
    why: str
    secret: bool = False
    home: bool = False


SYSTEM_FOLDERS = ("/usr", "/etc", "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32",
                  "/boot", "/opt", "/var/lib", "/snap")  # fmt: skip
# Under the home folder: keys, tokens, browser profiles, shell and IPython history.
HOME_SECRETS = (".ssh", ".gnupg", ".config", ".aws", ".azure", ".kube", ".docker",
                ".password-store", ".mozilla", ".ipython", ".local/share/keyrings",
                ".local/share/jupyter", ".jupyter")  # fmt: skip


def protected_folders() -> list[ProtectedFolder]:
    """What shares are checked against (``share.check_host_folder``), by identity."""
    import site
    import sysconfig

    from . import paths

    code = "Python code the Jupyter server and smol-kernel import"
    out = [ProtectedFolder(import_root("smol_kernel"), "smol-kernel's own code")]
    out += [ProtectedFolder(p, code) for p in sys.path if p and os.path.isabs(p)]
    for name in ("stdlib", "platstdlib", "purelib", "platlib", "scripts"):
        with contextlib.suppress(Exception):
            out.append(ProtectedFolder(sysconfig.get_path(name), code))
    with contextlib.suppress(Exception):
        out.append(ProtectedFolder(site.getusersitepackages(), code))  # even before it exists
    installation = "the Python installation the server runs"
    out.append(ProtectedFolder(sys.prefix, installation))
    out.append(ProtectedFolder(str(Path(sys.executable).parent), installation))
    # Every PATH entry, relative ones as this process would resolve them: a program planted
    # there runs the next time anyone on this host types its name.
    for entry in os.environ.get("PATH", "").split(os.pathsep):
        if entry:
            out.append(ProtectedFolder(os.path.abspath(entry), "a folder on PATH (programs)"))
    out += [ProtectedFolder(p, "the host's programs, libraries and configuration")
            for p in SYSTEM_FOLDERS]  # fmt: skip
    out.append(ProtectedFolder(str(paths.cache_dir()), "smol-kernel's images and helper programs"))
    out.append(ProtectedFolder(str(paths.runtime_dir()), "smol-kernel's per-VM runtime folders",
                               secret=True))  # fmt: skip
    with contextlib.suppress(Exception):
        from jupyter_core import paths as jpaths

        out += [ProtectedFolder(p, "Jupyter configuration (run as code, may hold secrets)",
                                secret=True) for p in jpaths.jupyter_config_path()]  # fmt: skip
        out += [ProtectedFolder(p, "Jupyter data (kernelspecs, server state)", secret=True)
                for p in jpaths.jupyter_path()]  # fmt: skip
        out.append(ProtectedFolder(jpaths.jupyter_runtime_dir(),
                                   "Jupyter connection files and tokens", secret=True))  # fmt: skip
    home = os.path.expanduser("~")
    if os.path.isabs(home):
        out.append(ProtectedFolder(home, "your home folder (keys, tokens, history)", home=True))
        out += [ProtectedFolder(os.path.join(home, name), "keys, tokens or credentials",
                                secret=True) for name in HOME_SECRETS]  # fmt: skip
    return [p for p in out if p.path]
