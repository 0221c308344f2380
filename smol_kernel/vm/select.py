"""Choosing a backend: the same decision for kernels and for ``smol-kernel doctor``.

``auto`` tries, in order: libkrun (when it loads and a guest really boots), QEMU with KVM,
QEMU with TCG. With ``require_hardware_isolation`` a TCG-only outcome is refused with the
reason, never silently accepted. There is no fallback that runs a kernel on the host.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .base import BackendStatus, BackendUnavailable, VmBackend
from .qemu import QemuBackend

BACKENDS = ("auto", "qemu", "libkrun")


@dataclass
class Selection:
    backend: VmBackend | None
    status: BackendStatus | None
    steps: list[str] = field(default_factory=list)
    error: BackendUnavailable | None = None


def _candidates(name: str) -> list[VmBackend]:
    if name not in BACKENDS:
        raise ValueError(f"backend={name!r}: choose one of {', '.join(BACKENDS)}")
    out: list[VmBackend] = []
    if name in ("auto", "libkrun"):
        try:
            from .krun import KrunBackend
        except ImportError:
            pass
        else:
            out.append(KrunBackend())
    if name in ("auto", "qemu"):
        out.append(QemuBackend())
    return out


# libkrun's virtio-fs server (passthrough.rs) applies the guest's chmod and create modes to
# host files as they are: setuid, setgid and world-write included. QEMU's 9p in mapped-xattr
# mode keeps them in xattrs.
KRUN_RW_SHARES = (
    "its virtio-fs server writes the guest's file modes (setuid, world-writable) to the "
    "host files of a rw share; QEMU's 9p keeps them apart"
)


def select_backend(
    name: str = "auto", image: str = "default", require_hardware_isolation: bool = False,
    writable_shares: bool = False,
) -> Selection:  # fmt: skip
    """Pick a backend; never raises for an unusable host (see ``Selection.error``).
    ``writable_shares``: the kernel shares a folder ``rw``, which libkrun cannot do safely."""
    steps: list[str] = []
    last: BackendStatus | None = None
    candidates = _candidates(name)
    if name == "libkrun" and not candidates:
        steps.append("libkrun: backend not available in this installation")
    for backend in candidates:
        if writable_shares and backend.name == "libkrun":
            steps.append(f"libkrun: skipped for a rw share: {KRUN_RW_SHARES}")
            if name == "libkrun":
                reason = f"libkrun cannot share a folder rw: {KRUN_RW_SHARES}"
                fix = "use backend='qemu', or share the folder read-only (:ro)"
                steps.append(f"no backend: {reason}")
                return Selection(None, None, steps, BackendUnavailable(name, reason, fix))
            continue
        status = backend.check(image)
        last = status
        steps += [f"{backend.name}: {s}" for s in status.steps or []]
        if not status.available or status.isolation is None:
            steps.append(f"{backend.name}: skipped: {status.reason}")
            continue
        if require_hardware_isolation and not status.isolation.hardware:
            steps.append(
                f"{backend.name}: would give {status.isolation} (software emulation), but "
                "hardware isolation is required"
            )
            continue
        steps.append(f"chosen: {backend.name} with {status.isolation} isolation")
        backend.remember(image, status)  # its starts need not check again
        return Selection(backend, status, steps)
    if require_hardware_isolation:
        reason = "hardware isolation is required but no backend can provide it here"
        fix = (
            "run on a host with working KVM (Linux) or Hypervisor.framework (macOS), or set "
            "require_hardware_isolation=False to accept TCG emulation (not a security boundary)"
        )
    elif last is not None:
        reason, fix = last.reason, last.fix
    else:
        reason, fix = f"no {name} backend is available", ""
    steps.append(f"no backend: {reason}")
    return Selection(None, last, steps, BackendUnavailable(name, reason, fix))
