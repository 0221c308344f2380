"""Lock-down: a Jupyter server that starts only smolvm kernels, and routes the kernel names
clients hard-code (``python3``) to one.

jupyter_client's ``allowed_kernelspecs`` only filters the *listing*: ``get_kernel_spec`` still
returns any installed kernelspec by name (a user's own ``~/.local/share/jupyter/kernels``
included), and ``python3`` falls back to ipykernel's native spec even with
``ensure_native_kernel = False``. A page or a client that POSTs ``/api/kernels {"name":
"python3"}`` would then start a kernel on the host. ``LockedKernelSpecManager`` (set as
``ServerApp.kernel_spec_manager_class`` by ``smol-kernel install --lockdown``):

* knows only ``allowed_kernelspecs`` (by exact, lower-case name); every other name is
  refused before any process starts, with HTTP 403 and the reason;
* takes an allowed kernelspec only from an administrator's folder: not the user's own
  Jupyter data folder (which a page can write through the contents API), the folder and its
  ``kernel.json`` owned by one of ``admin_uids`` and writable by no one else, nor any folder
  above them (others could rename one away and put theirs in its place); ``kernel.json`` is
  read once, through the folder's descriptor, and the kernelspec built from what was
  checked; a copy elsewhere that shadows it is skipped, so the admin's runs;
* takes it only if it names the smolvm provisioner: an allowed name that would start a
  process on the host is refused.

``RoutingKernelManager`` (``ServerApp.kernel_manager_class``, also set by ``--lockdown``, or
by ``install --alias NAME`` on a server that is not locked down) starts the kernelspec
``kernel_aliases`` maps a requested name to instead: ``python3`` -> ``smolvm`` by default,
so assistants and clients that ask for ``python3`` get a VM. The kernel's name (in
``/api/kernels``, to the client) is the kernelspec that ran; the server log and the audit
line say which name was asked for. ``/api/kernelspecs`` lists what can run, no aliases.

Lock-down also turns off terminals (a terminal is a shell on the host), JupyterLab's
extension manager's installs (pip on the host) and the server extensions of AI assistants
that run code on the host rather than in a kernel (``HOST_EXECUTING_EXTENSIONS``), unless
the administrator opts back in; the server extension names any of those still loaded.
"""

from __future__ import annotations

import json
import os
import stat

from jupyter_client.kernelspec import KernelSpec, KernelSpecManager, NoSuchKernel
from jupyter_core.paths import jupyter_data_dir
from jupyter_server.services.kernels.kernelmanager import MappingKernelManager
from tornado.web import HTTPError
from traitlets import Dict, List, Unicode

from .kernelspec import PROVISIONER_NAME

KERNEL_SPEC_MANAGER = "smol_kernel.lockdown.LockedKernelSpecManager"
KERNEL_MANAGER = "smol_kernel.lockdown.RoutingKernelManager"
# Server extensions of AI assistants that run programs or code on the host, not in a kernel
# (docs/ai-assistants.md): --lockdown turns them off, and a locked-down server that still
# loads one says so loudly at start.
HOST_EXECUTING_EXTENSIONS = {
    "jupyter_ai_jupyternaut": "Jupyternaut's bash tool runs commands on the host",
    "jupyter_ai_persona_manager": "jupyter-ai loads personas from .jupyter/personas/*.py "
    "into the server process, and starts agent programs (claude-agent-acp, codex-acp, ...)",
    "jupyter_ai_acp_client": "jupyter-ai's ACP agents run programs and terminals on the host",
    "jupyter_server_mcp": "jupyter-server-mcp serves tools on localhost outside Jupyter's "
    "token authentication",
    "notebook_intelligence": "notebook-intelligence's Claude mode runs Claude Code (Bash, "
    "Edit) and its command tool runs commands on the host",
}


class KernelspecNotAllowed(HTTPError, NoSuchKernel):
    """A kernelspec name this server must not start (HTTP 403; also a NoSuchKernel, which
    the sessions API and other callers already handle)."""

    def __init__(self, name: str, allowed: set[str], why: str | None = None) -> None:
        message = why or (
            f"kernelspec {name!r} is not allowed on this server, which is locked down to "
            f"{', '.join(sorted(allowed)) or 'no kernelspecs'} "
            "(KernelSpecManager.allowed_kernelspecs)"
        )
        HTTPError.__init__(self, 403, message.replace("%", "%%"))
        self.args = (message,)
        self.name, self.message = name, message

    def __str__(self) -> str:
        return self.message


MAX_SPEC_BYTES = 1 << 20


def _not_admins(st: os.stat_result, admin_uids: set[int]) -> str | None:
    """Why a file or folder with ``st`` is not an administrator's (None: it is)."""
    if st.st_uid not in admin_uids:
        return f"belongs to uid {st.st_uid}, not to an administrator ({sorted(admin_uids)})"
    if st.st_mode & 0o022:
        return f"has mode {stat.S_IMODE(st.st_mode):o}: others can change it"
    return None


def _ancestors_ok(folder: str, admin_uids: set[int]) -> str | None:
    """Why someone else could swap what is in ``folder`` by renaming a folder above it
    (None: no one but an administrator can): each folder up to ``/`` an administrator's,
    writable by no one else unless sticky (others cannot rename what they do not own)."""
    path = os.path.realpath(folder)  # (the folders themselves, not links to them)
    while True:
        try:
            st = os.lstat(path)
        except OSError as e:
            return f"lies in {path}, which cannot be read ({e.strerror})"
        if st.st_uid not in admin_uids:
            return (f"lies in {path}, which belongs to uid {st.st_uid}, not to an "
                    f"administrator ({sorted(admin_uids)})")  # fmt: skip
        if st.st_mode & 0o022 and not st.st_mode & stat.S_ISVTX:
            mode = stat.S_IMODE(st.st_mode)
            return f"lies in {path}, which has mode {mode:o}: others can change it"
        parent = os.path.dirname(path)
        if parent == path:
            return None
        path = parent


def read_admin_spec(path: str, admin_uids: set[int]) -> tuple[dict | None, str | None]:
    """The kernel.json of the kernelspec folder ``path``, read once through descriptors
    (the folder, not a link, opened first, then kernel.json in it): (its fields, None), or
    (None, why it is not an administrator's)."""
    if (why := _ancestors_ok(os.path.dirname(path), admin_uids)) is not None:
        return None, why
    try:
        folder = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
    except OSError as e:
        return None, f"cannot be opened as a folder ({e.strerror}; a link is not followed)"
    try:
        if (why := _not_admins(os.fstat(folder), admin_uids)) is not None:
            return None, why
        try:
            fd = os.open("kernel.json", os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK,
                         dir_fd=folder)  # fmt: skip
        except OSError as e:
            return None, f"has no kernel.json of its own ({e.strerror})"
        with os.fdopen(fd, "rb") as f:
            st = os.fstat(f.fileno())
            if not stat.S_ISREG(st.st_mode):
                return None, "has a kernel.json that is not a file"
            if (why := _not_admins(st, admin_uids)) is not None:
                return None, f"kernel.json {why}"
            data = f.read(MAX_SPEC_BYTES + 1)
    finally:
        os.close(folder)
    try:
        spec = json.loads(data) if len(data) <= MAX_SPEC_BYTES else None
    except ValueError:
        spec = None
    if not isinstance(spec, dict):
        return None, "has a kernel.json that is not a JSON object"
    return spec, None


def _names_our_provisioner(spec: dict) -> bool:
    meta = spec.get("metadata")
    provisioner = meta.get("kernel_provisioner") if isinstance(meta, dict) else None
    return isinstance(provisioner, dict) and provisioner.get("provisioner_name") == (
        PROVISIONER_NAME
    )


class LockedKernelSpecManager(KernelSpecManager):
    """A KernelSpecManager that knows only ``allowed_kernelspecs``, each from an
    administrator's folder and naming the smolvm provisioner (see the module doc). With an
    empty allow-list it allows nothing."""

    admin_uids = List(
        [0],
        config=True,
        help="Owners whose kernelspec folders a locked-down server trusts (root by default; "
        "add a service account that installs kernelspecs and that the server does not run as).",
    )

    def _allowed(self) -> set[str]:
        return {name.lower() for name in self.allowed_kernelspecs}

    def _admin_dirs(self) -> list[str]:
        """The kernel folders an allowed kernelspec may come from, in Jupyter's order:
        every one but the user's own data folder."""
        user = os.path.realpath(os.path.join(jupyter_data_dir(), "kernels"))
        return [d for d in self.kernel_dirs if os.path.realpath(d) != user]

    def _admin_spec(self, kernel_name: str) -> tuple[str | None, dict | None, list[str]]:
        """The admin's folder of ``kernel_name`` and its kernel.json as read (or Nones), and
        why copies were skipped."""
        uids = {int(u) for u in self.admin_uids}
        skipped = []
        for kernels in self._admin_dirs():
            try:
                names = os.listdir(kernels)
            except OSError:
                continue
            for entry in names:
                if entry.lower() != kernel_name.lower():
                    continue
                path = os.path.join(kernels, entry)
                spec, why = read_admin_spec(path, uids)
                if spec is not None:
                    return path, spec, skipped
                skipped.append(f"{path} {why}")
        return None, None, skipped

    def _find_spec_directory(self, kernel_name: str) -> str | None:
        if kernel_name.lower() not in self._allowed():
            return None
        path, _, skipped = self._admin_spec(kernel_name)
        for why in skipped:
            self.log.warning("lock-down: skipping kernelspec folder %s", why)
        return path

    def find_kernel_specs(self) -> dict[str, str]:
        out = {}
        for name in sorted(self._allowed()):
            path, spec, _ = self._admin_spec(name)
            if path is not None and spec is not None and _names_our_provisioner(spec):
                out[name] = path
        return out

    def get_kernel_spec(self, kernel_name: str) -> KernelSpec:
        """The kernelspec, built from the kernel.json bytes that were checked (not read
        again by path: a folder swapped in between would otherwise be what runs)."""
        allowed = set(self.allowed_kernelspecs)
        if not isinstance(kernel_name, str) or kernel_name.lower() not in self._allowed():
            raise KernelspecNotAllowed(str(kernel_name), allowed)
        path, spec, skipped = self._admin_spec(kernel_name)
        for why in skipped:
            self.log.warning("lock-down: skipping kernelspec folder %s", why)
        if path is None or spec is None:
            why = (f"kernelspec {kernel_name!r} is allowed, but no administrator's copy of it "
                   "is installed (a copy in your own Jupyter data folder, or one others can "
                   "change, is not used on a locked-down server; see the server log)")  # fmt: skip
            raise KernelspecNotAllowed(kernel_name, allowed, why)
        if not _names_our_provisioner(spec):
            why = (f"kernelspec {kernel_name!r} in {path} does not name the smolvm "
                   "provisioner: its kernels would run on the host, which this locked-down "
                   "server refuses")  # fmt: skip
            raise KernelspecNotAllowed(kernel_name, allowed, why)
        try:
            return self.kernel_spec_class(resource_dir=path, **spec)
        except Exception as e:  # (fields KernelSpec does not take, of the wrong type)
            raise KernelspecNotAllowed(kernel_name, allowed, f"{path}/kernel.json: {e}") from None


class RoutingKernelManager(MappingKernelManager):
    """A MappingKernelManager that starts ``kernel_aliases[name]`` when ``name`` is asked
    for (see the module doc)."""

    kernel_aliases = Dict(
        default_value={"python3": "smolvm"},
        key_trait=Unicode(),
        value_trait=Unicode(),
        config=True,
        help="Kernel names a client may ask for and the kernelspec started instead (the "
        "names clients hard-code, python3 first, to a smolvm kernelspec).",
    )

    def route(self, kernel_name: str | None) -> str:
        name = kernel_name or self.default_kernel_name
        aliases = {k.lower(): v for k, v in self.kernel_aliases.items()}
        return aliases.get(name.lower(), name)

    def pre_start_kernel(self, kernel_name, kwargs):  # type: ignore[override]
        requested = kernel_name or self.default_kernel_name
        target = self.route(requested)
        km, name, kernel_id = super().pre_start_kernel(target, kwargs)
        if target != requested:
            km.smol_requested_name = requested  # the audit line says what was asked for
            self.log.info("kernel %s: %r was asked for; starting kernelspec %r instead "
                          "(RoutingKernelManager.kernel_aliases)", kernel_id, requested,
                          target)  # fmt: skip
        return km, name, kernel_id


def host_executing_extensions(serverapp) -> list[str]:
    """What a locked-down server loads that runs code on the host (each with why)."""
    enabled = getattr(serverapp, "jpserver_extensions", {}) or {}
    return [f"{name}: {why}" for name, why in HOST_EXECUTING_EXTENSIONS.items()
            if enabled.get(name)]  # fmt: skip
