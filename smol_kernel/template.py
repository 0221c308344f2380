"""Templates: a kernel VM booted and prepared once per configuration, saved, and restored
as a copy-on-write clone for every kernel start.

A template is a folder ``<cache>/templates/u<uid>/<key>/``: ``ram`` (the guest's memory; clones map
it privately, so idle clones share its pages), ``state`` (QEMU's device state), the
writable disk as it was at the save, and ``template.json`` (what it was built from, sizes,
last use). The key is a hash of everything that must match for a clone to be the VM a cold
boot would give: the QEMU binary and version, the accelerator and translation-cache size,
the image's files, the guest files in it, and the kernel plan (sizes, network, shares,
argv, environment, working folder, limits). Anything else changes the key, and so builds
a new template; ``prune`` removes the ones nothing can use any more.

What a clone gets fresh at its claim (``kernel_vm.claim``): entropy (and a reseeded CRNG),
the wall clock, its key and environment, its shares mounted, a new session id and
reseeded ``random``/numpy in the kernel. Its own runtime folder, writable disk (a copy of
the template's), console, serial port and passt. What it shares with its siblings: the
address-space layout of the guest kernel and of the prepared Python (KASLR and ASLR were
drawn once, when the template booted), and Python's hash seed.

Not cloneable (boots cold, the log says why): a kernel whose working folder is a share
(it has to exist before the kernel starts; 9p is mounted only at the claim), a kernelspec
that cannot be prepared ahead (not ``python -m ipykernel_launcher``), a backend without
snapshots (libkrun).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import os
import shutil
import stat
import subprocess
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from . import paths
from .agent_client import GuestAgent
from .kernel_vm import KernelPlan, boot_kernel_vm, restore_and_connect
from .vm.base import Vm, VmBackend, VmError
from .vm.process import list_vms, vm_processes
from .vm.qemu import QemuBackend, Snapshot

log = logging.getLogger("smol_kernel.template")

TEMPLATE_FORMAT = 1  # bump when what a template holds, or how it is used, changes
_building: dict[str, asyncio.Future] = {}  # key -> the build in progress (this process)
RECENT_USE_S = 600.0  # a template used this recently is never removed to make room


@dataclass(frozen=True)
class TemplateBounds:
    """How much of the disk templates may take (``SmolVMProvisioner`` traits of the same
    names): checked each time a template is built (``tidy``)."""

    max_template_disk_mib: int = 4096  # 0: no cap
    template_max_idle_days: float = 14.0


def templates_dir() -> Path:
    """This user's templates: ``$SMOL_KERNEL_TEMPLATES_DIR``, else
    ``<cache>/templates/u<uid>`` (``paths.user_store``: private, checked on every use)."""
    return paths.user_store("templates", "SMOL_KERNEL_TEMPLATES_DIR")


def why_not_cloneable(plan: KernelPlan, backend: VmBackend) -> str | None:
    """Why kernels of ``plan`` cannot start as clones of a template (None: they can)."""
    if not isinstance(backend, QemuBackend):
        return f"the {backend.name} backend has no snapshots"
    if not plan.two_step:
        return "the kernelspec argv is not 'python3 -m ipykernel_launcher ...'"
    for share in plan.shares:
        if plan.cwd == share.guest or plan.cwd.startswith(share.guest.rstrip("/") + "/"):
            return (f"the kernel starts in a share ({share.guest}), which must be mounted "
                    "before it starts; clones mount shares when claimed")  # fmt: skip
    return None


def _file_digest(path: Path) -> str:
    st = path.stat()
    return f"{st.st_size}:{st.st_mtime_ns}:{st.st_ino}"


def template_key(plan: KernelPlan, backend: QemuBackend, isolation: str) -> str:
    """The hash of everything a clone must have in common with its template."""
    from .image.store import GuestImage

    image = GuestImage.load(plan.image)
    assert backend.qemu is not None
    inputs = {
        "format": TEMPLATE_FORMAT,
        "qemu": backend.qemu,
        "qemu_binary": _file_digest(Path(backend.qemu)),
        "qemu_version": _qemu_version(backend.qemu),
        "isolation": isolation,
        "tb_size_mib": backend.tb_size_mib,
        "image": plan.image,
        "image_files": image.manifest.get("files"),
        "image_inputs": image.inputs,
        "plan": {
            **asdict(plan),
            # A share's host folder is the clone's own; the template has the devices only.
            "shares": [(s.guest, s.read_only) for s in plan.shares],
            # The network guard or proxy is the clone's own, started with it; the guest is
            # the same but for the resolver it is told (the proxy's, with an allow-list).
            "allow_hosts": None,
            "private_answers": None,
            "dns": () if plan.allow_hosts else plan.dns,
        },
    }
    return hashlib.sha256(json.dumps(inputs, sort_keys=True, default=str).encode()).hexdigest()[:32]


_versions: dict[str, str] = {}


def _qemu_version(qemu: str) -> str:
    if qemu not in _versions:
        out = subprocess.run([qemu, "--version"], capture_output=True, text=True,
                             env={"PATH": "/usr/bin:/bin"}, timeout=30)  # fmt: skip
        _versions[qemu] = out.stdout.splitlines()[0] if out.stdout else "?"
    return _versions[qemu]


@dataclass
class Template:
    key: str
    folder: Path
    meta: dict

    @property
    def snapshot(self) -> Snapshot:
        return Snapshot(self.folder)

    @classmethod
    def load(cls, key: str) -> Template | None:
        folder = templates_dir() / key
        try:
            meta = json.loads((folder / "template.json").read_text())
        except (OSError, ValueError):
            return None
        snapshot = Snapshot(folder)
        if not all(_own_file(p) for p in (snapshot.ram, snapshot.state, snapshot.overlay)):
            return None
        return cls(key, folder, meta)

    def touch(self) -> None:
        """Note a use (``prune`` removes templates unused for long)."""
        with contextlib.suppress(OSError):
            os.utime(self.folder / "template.json")

    def last_used(self) -> float:
        try:
            return (self.folder / "template.json").stat().st_mtime
        except OSError:
            return 0.0

    def disk_bytes(self) -> int:
        """Blocks its files take (0 for a file that went meanwhile)."""
        total = 0
        with contextlib.suppress(OSError):
            for p in self.folder.iterdir():
                with contextlib.suppress(OSError):
                    st = p.lstat()
                    total += st.st_blocks * 512 if stat.S_ISREG(st.st_mode) else 0
        return total


def _own_file(path: Path) -> bool:
    """A regular file of this user's, not a symbolic link (QEMU maps ``ram`` by name)."""
    try:
        st = os.lstat(path)
    except OSError:
        return False
    return stat.S_ISREG(st.st_mode) and st.st_uid == os.getuid()


def find(plan: KernelPlan, backend: QemuBackend) -> Template | None:
    """The plan's template if one is built (no boot)."""
    return Template.load(template_key(plan, backend, plan.isolation))


async def get_or_build(
    plan: KernelPlan, backend: QemuBackend, timeout: float,
    logger: logging.Logger | logging.LoggerAdapter = log, on_vm=None,
    bounds: TemplateBounds | None = None,
) -> Template:  # fmt: skip
    """The plan's template, built now (a cold boot and a save) if there is none, and then
    the others tidied to ``bounds``. ``on_vm(vm)`` sees the template's VM while it boots
    (so a pool can stop it)."""
    key = template_key(plan, backend, plan.isolation)
    if (found := Template.load(key)) is not None:
        return found
    if key in _building:
        return await asyncio.shield(_building[key])
    future = asyncio.get_running_loop().create_future()
    _building[key] = future
    try:
        template = await _build(plan, backend, key, timeout, logger, on_vm)
        future.set_result(template)
    except BaseException as e:
        future.set_exception(e)
        future.exception()  # retrieved: the caller gets it raised
        raise
    finally:
        _building.pop(key, None)
    try:  # the template is built whatever tidying finds
        removed = await asyncio.to_thread(tidy, bounds or TemplateBounds(), key)
    except Exception as e:
        logger.warning("templates: tidying to max_template_disk_mib failed: %s", e)
    else:
        if removed:
            logger.info("templates removed to stay within max_template_disk_mib and "
                        "template_max_idle_days: %s", ", ".join(removed))  # fmt: skip
    return template


async def _build(
    plan: KernelPlan, backend: QemuBackend, key: str, timeout: float,
    logger: logging.Logger | logging.LoggerAdapter, on_vm=None,
) -> Template:  # fmt: skip
    t0 = time.monotonic()
    final = templates_dir() / key
    work = templates_dir() / f".{key}.{os.getpid()}.building"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True, mode=0o700)
    vm: Vm | None = None
    agent: GuestAgent | None = None
    try:
        logger.info("template %s: building for %s", key, plan.describe())

        async def start(spec):
            from dataclasses import replace

            return await backend.start(replace(spec, shares_at_claim=True),
                                       template=work / "ram")  # fmt: skip

        vm, agent = await boot_kernel_vm(backend, plan, time.monotonic() + timeout,
                                         label="template", start=start, on_vm=on_vm)  # fmt: skip
        await agent.close()
        agent = None
        assert isinstance(backend, QemuBackend)
        await backend.save(vm, Snapshot(work))  # type: ignore[arg-type]
        await vm.close()
        vm = None
        meta = {"key": key, "created": time.time(), "plan": plan.describe(),
                "image": plan.image, "image_files": _image_files(plan.image),
                "memory_mib": plan.memory_mib,
                "build_s": round(time.monotonic() - t0, 1)}  # fmt: skip
        (work / "template.json").write_text(json.dumps(meta))
        try:
            os.rename(work, final)
        except OSError:  # another process built it meanwhile: use theirs
            shutil.rmtree(work, ignore_errors=True)
        template = Template.load(key)
        if template is None:
            raise VmError(f"template {key} vanished right after it was built")
        logger.info("template %s: ready in %.1fs (%d MiB on disk)", key,
                    time.monotonic() - t0, template.disk_bytes() >> 20)  # fmt: skip
        return template
    except BaseException:
        if agent is not None:
            await agent.close()
        if vm is not None:
            await vm.close()
        shutil.rmtree(work, ignore_errors=True)
        raise


async def restore_kernel_vm(
    template: Template, plan: KernelPlan, backend: QemuBackend, deadline: float,
    label: str = "", on_vm=None,
) -> tuple[Vm, GuestAgent]:  # fmt: skip
    """A clone of ``template``, running, its kernel prepared (claim it next)."""
    spec = plan.vm_spec(label, shares_at_claim=True)
    template.touch()  # before: tidying leaves a template used in the last minutes alone
    vm, agent = await restore_and_connect(
        backend, spec, template.snapshot, deadline, on_vm,
        lambda agent: agent.kernel_prepared.is_set(),
        f"a clone of template {template.key}, its kernel should be prepared",
    )  # fmt: skip
    return vm, agent


async def prepared_vm(
    plan: KernelPlan, backend: VmBackend, deadline: float, label: str = "", on_vm=None,
    logger: logging.Logger | logging.LoggerAdapter = log, bounds: TemplateBounds | None = None,
) -> tuple[Vm, GuestAgent, str]:  # fmt: skip
    """A VM for ``plan`` whose kernel is prepared (claim it next), and how it came: a clone
    of the plan's template ("clone"; the template is built first if there is none, within
    ``bounds``), or a cold boot ("cold", when the plan cannot be cloned or building its
    template failed)."""
    why = why_not_cloneable(plan, backend)
    if why is None:
        assert isinstance(backend, QemuBackend)
        try:
            template = await get_or_build(plan, backend, deadline - time.monotonic(), logger,
                                          on_vm=on_vm, bounds=bounds)  # fmt: skip
            vm, agent = await restore_kernel_vm(template, plan, backend, deadline, label, on_vm)
            return vm, agent, "clone"
        except (VmError, OSError) as e:
            if time.monotonic() >= deadline:
                raise  # out of time: a cold boot now could only be later still
            logger.warning("no clone for %s, booting cold: %s", plan.describe(), e)
    else:
        logger.info("booting cold: %s", why)
    vm, agent = await boot_kernel_vm(backend, plan, deadline, label=label, on_vm=on_vm)
    return vm, agent, "cold"


def _image_files(image: str) -> object:
    from .image.store import GuestImage

    return GuestImage.load(image).manifest.get("files")


# ------------------------------------------------------------------ listing and pruning
def list_templates() -> list[Template]:
    base = templates_dir()
    out = []
    for folder in sorted(base.iterdir()) if base.is_dir() else []:
        if not folder.name.startswith(".") and (t := Template.load(folder.name)) is not None:
            out.append(t)
    return out


def remove(template: Template) -> None:
    """Clones that run keep their mapping of the RAM file; the files go from the folder."""
    shutil.rmtree(template.folder, ignore_errors=True)


def in_use() -> set[str]:
    """Keys of this user's templates whose RAM file a running VM maps (a clone, or a
    template being built), matched by device and inode (not by path: links and relative
    settings would not match)."""
    by_file = {}
    for template in list_templates():
        with contextlib.suppress(OSError):
            st = os.stat(template.snapshot.ram)
            by_file[(os.major(st.st_dev), os.minor(st.st_dev), st.st_ino)] = template.key
    keys = set()
    for rt, state in list_vms():
        for pid in vm_processes(rt, state):
            try:
                maps = Path(f"/proc/{pid}/maps").read_text()
            except OSError:
                continue
            for line in maps.splitlines():
                fields = line.split(maxsplit=5)
                if len(fields) < 5 or ":" not in fields[3]:
                    continue
                major, _, minor = fields[3].partition(":")
                try:
                    found = (int(major, 16), int(minor, 16), int(fields[4]))
                except ValueError:
                    continue
                if found in by_file:
                    keys.add(by_file[found])
    return keys


def tidy(bounds: TemplateBounds, keep: str | None = None) -> list[str]:
    """``prune`` (stale templates), then the least recently used until the rest fit in
    ``max_template_disk_mib``: never ``keep``, one a running VM maps, or one used in the
    last ``RECENT_USE_S``. Returns the keys removed."""
    busy = in_use() | ({keep} if keep else set())
    removed = prune(bounds.template_max_idle_days, busy)
    cap = bounds.max_template_disk_mib << 20
    if cap <= 0:
        return removed
    templates = sorted(list_templates(), key=lambda t: t.last_used())
    total = sum(t.disk_bytes() for t in templates)
    for t in templates:
        if total <= cap:
            break
        if t.key in busy or time.time() - t.last_used() < RECENT_USE_S:
            continue
        total -= t.disk_bytes()
        remove(t)
        removed.append(t.key)
    return removed


def prune(max_idle_days: float = 14.0, keep: set[str] = frozenset()) -> list[str]:
    """Remove templates of images that changed or are gone, of another QEMU, and ones not
    used for ``max_idle_days``; and leftovers of interrupted builds; never one in ``keep``.
    Returns their keys."""
    from .image.store import GuestImage, ImageNotFound

    removed = []
    base = templates_dir()
    for folder in sorted(base.iterdir()) if base.is_dir() else []:
        if folder.name.startswith(".") and folder.name.endswith(".building"):
            pid = folder.name.rsplit(".", 2)[-2]
            if not pid.isdigit() or not Path(f"/proc/{pid}").exists():
                shutil.rmtree(folder, ignore_errors=True)
            continue
        if folder.name in keep:
            continue
        template = Template.load(folder.name)
        if template is None:
            shutil.rmtree(folder, ignore_errors=True)
            removed.append(folder.name)
            continue
        stale = time.time() - template.last_used() > max_idle_days * 86400
        try:
            GuestImage.load(str(template.meta.get("image")))
            stale = stale or template.meta.get("image_files") != _image_files(
                str(template.meta.get("image"))
            )
        except (ImageNotFound, ValueError):
            stale = True
        if stale:
            remove(template)
            removed.append(template.key)
    return removed
