"""QEMU microvm backend: KVM where a guest really boots with it, TCG emulation otherwise.

Per VM: one ``qemu-system-x86_64 -M microvm`` with no default devices and ``-sandbox on``,
the image's root disk attached read-only, a fresh sparse ext4 overlay disk capped at
``disk_mib`` (the guest's only writable storage), and one ``vhost-device-vsock`` daemon that
carries vsock (its own process and group, so no two guests can talk to each other).
Opt-in: a ``passt`` per VM behind a virtio-net device (``VmSpec.network``), and host folders
over virtio-9p (``VmSpec.shares``; the generic Debian kernel has the 9p modules, the cloud
kernel does not -- which is why images use the generic one).
"""

from __future__ import annotations

import asyncio
import os
import platform
import subprocess
import time
from pathlib import Path

from ..image.store import GuestImage, ImageNotFound
from ..image.tools import find_vhost_device_vsock
from ..transport.vhost_user_vsock import open_vsock_stream
from ..trusted import find_program
from .base import BackendStatus, BackendUnavailable, VmBackend, VmError
from .kvm_probe import probe_kvm
from .network import GUEST_MAC, start_network
from .process import ProcessVm, RuntimeDir, reap_orphans, spawn, stop_processes
from .share import open_share
from .spec import Isolation, VmSpec, share_tag

# No PS/2 probe (microvm has no i8042), no reboot loop: a reboot or panic ends QEMU.
KERNEL_CMDLINE = "console=ttyS0 quiet reboot=t panic=-1 initcall_blacklist=i8042_init"
GUEST_CID = 3


def tcg_clock_cmdline() -> str:
    """Kernel args that tell a TCG guest its TSC frequency instead of letting it measure.

    Under TCG the guest's TSC is the host's, but calibrating it against emulated timers fails
    when the host is busy ("could not calculate TSC khz") and the guest then hangs early in
    boot. Telling it the frequency removes both the hang and the calibration time.
    """
    try:
        with open("/proc/cpuinfo") as f:
            text = f.read()
    except OSError:
        return ""
    if "constant_tsc" not in text:
        return ""
    for line in text.splitlines():
        if line.startswith("cpu MHz"):
            khz = int(float(line.split(":")[1]) * 1000)
            lpj = khz * 1000 // 250  # Debian kernels: HZ=250
            return f"tsc_early_khz={khz} tsc=reliable no_timer_check lpj={lpj}"
    return ""


def find_qemu() -> str | None:
    return find_program("qemu-system-x86_64", "SMOL_KERNEL_QEMU")


class QemuVm(ProcessVm):
    """QEMU is the VMM; vhost-device-vsock is its one helper."""

    @property
    def vsock_path(self) -> Path:
        return self.runtime_dir / "vsock.sock"

    async def open_stream(self, port: int, timeout: float = 5.0):
        self._check_running()
        return await open_vsock_stream(self.vsock_path, port, timeout)


class QemuBackend(VmBackend):
    """Runs guests with ``qemu-system-x86_64 -M microvm``."""

    name = "qemu"

    def __init__(self, qemu: str | None = None, tb_size_mib: int | None = None) -> None:
        self.qemu = qemu or find_qemu()
        # TCG translation cache: smaller saves host RSS, but below ~64 MiB ipykernel's
        # start-up code no longer fits and kernel start slows down ~3x.
        self.tb_size_mib = tb_size_mib or int(os.environ.get("SMOL_KERNEL_TCG_TB_MIB", "64"))

    # ------------------------------------------------------------------ check
    def check(self, image: str = "default", accel: str = "auto") -> BackendStatus:
        steps: list[str] = []

        def unavailable(reason: str, fix: str) -> BackendStatus:
            steps.append(f"unavailable: {reason}")
            return BackendStatus(self.name, False, None, reason, fix, steps)

        if platform.machine() != "x86_64":
            return unavailable(f"QEMU microvm guests need an x86_64 host, not {platform.machine()}",
                               "use the libkrun backend")  # fmt: skip
        if not self.qemu or not os.access(self.qemu, os.X_OK):
            return unavailable("qemu-system-x86_64 is not installed",
                               "sudo apt-get install qemu-system-x86")  # fmt: skip
        steps.append(f"qemu: {self.qemu}")
        vhost = find_vhost_device_vsock()
        if not vhost:
            return unavailable(
                "vhost-device-vsock is not installed (it carries vsock for QEMU)",
                "smol-kernel image build (installs it into the tools dir)",
            )
        steps.append(f"vhost-device-vsock: {vhost}")
        try:
            img = GuestImage.load(image)
        except (ImageNotFound, ValueError) as e:
            return unavailable(str(e), "smol-kernel image build")
        steps.append(f"image {image!r}: {img.path}")
        if accel == "tcg":
            steps.append("accel=tcg requested: KVM not tried")
            return BackendStatus(self.name, True, Isolation.TCG, "TCG requested", "", steps)
        ok, why = probe_kvm(self.qemu, img.kernel, img.initramfs)
        steps.append(f"KVM probe: {'usable' if ok else 'not usable'}: {why}")
        if ok:
            return BackendStatus(self.name, True, Isolation.KVM, why, "", steps)
        if accel == "kvm":
            return unavailable(f"KVM requested but not usable: {why}",
                               "run on a host with hardware virtualization")  # fmt: skip
        return BackendStatus(
            self.name, True, Isolation.TCG,
            f"KVM not usable ({why}); using TCG software emulation, which is not a "
            "security boundary", "run on a host with working KVM for hardware isolation", steps,
        )  # fmt: skip

    # ------------------------------------------------------------------ start
    async def start(self, spec: VmSpec) -> QemuVm:
        spec.validate()
        image = GuestImage.load(spec.image)
        status = await asyncio.to_thread(self.check, spec.image, spec.accel)
        if not status.available or status.isolation is None:
            raise BackendUnavailable(self.name, status.reason, status.fix)
        assert self.qemu is not None
        vhost_bin = find_vhost_device_vsock()
        assert vhost_bin is not None
        await asyncio.to_thread(reap_orphans)

        rt = RuntimeDir.create()
        vhost = qemu = net_sock = None
        net_procs: list[subprocess.Popen] = []
        share_fds: list[int] = []
        try:
            # The folders themselves, opened and checked again now: QEMU gets them as
            # descriptors, so no rename or symlink since planning can redirect a share.
            for share in spec.shares:
                share_fds.append(open_share(share))
            if spec.network:
                net_procs, net_sock = await asyncio.to_thread(start_network, spawn, rt.path)
            overlay = await asyncio.to_thread(rt.create_overlay, spec.disk_mib)
            vu_sock = rt.path / "vu.sock"
            vhost = await asyncio.to_thread(
                spawn,
                [
                    str(vhost_bin), "--guest-cid", str(GUEST_CID), "--socket", str(vu_sock),
                    "--uds-path", str(rt.path / "vsock.sock"), "--groups", f"smol-{rt.id}",
                ],
                rt.path / "vhost.log",
            )  # fmt: skip
            deadline = time.monotonic() + 5
            while not vu_sock.exists():
                if vhost.poll() is not None or time.monotonic() > deadline:
                    raise VmError(
                        "vhost-device-vsock did not start: "
                        + (rt.path / "vhost.log").read_text(errors="replace")[-500:]
                    )
                await asyncio.sleep(0.01)
            net_fd = net_sock.fileno() if net_sock else None
            argv = self._argv(spec, image, status.isolation, rt, overlay, vu_sock, net_fd,
                              share_fds)  # fmt: skip
            fds = (*share_fds, *(() if net_fd is None else (net_fd,)))
            qemu = await asyncio.to_thread(spawn, argv, rt.path / "qemu.log", None, fds)
            vm = QemuVm(spec, rt, status.isolation, qemu, (vhost, *net_procs))
            vm.record_state(self.name)
            await vm.confirm_started("QEMU", rt.path / "qemu.log")
            return vm
        except BaseException:
            stop_processes((qemu, vhost, *net_procs))
            rt.remove()
            raise
        finally:
            if net_sock is not None:
                net_sock.close()  # QEMU has its own copy
            for fd in share_fds:
                os.close(fd)

    def _argv(
        self,
        spec: VmSpec,
        image: GuestImage,
        isolation: Isolation,
        rt: RuntimeDir,
        overlay: Path,
        vu_sock: Path,
        net_fd: int | None = None,
        share_fds: list[int] | None = None,
    ) -> list[str]:
        assert self.qemu is not None
        mem = f"{spec.memory_mib}M"
        cmdline = KERNEL_CMDLINE
        if isolation is Isolation.TCG:
            cmdline += " " + tcg_clock_cmdline()
        # name=value words the kernel does not know become /init's environment.
        cmdline += "".join(f" {k}={v}" for k, v in spec.boot_env().items())
        extra: list[str] = []
        if net_fd is not None:
            extra += [
                "-netdev", f"stream,id=net0,server=off,addr.type=fd,addr.str={net_fd}",
                "-device", f"virtio-net-device,netdev=net0,mac={GUEST_MAC}",
            ]  # fmt: skip
        for i, share in enumerate(spec.shares):
            # Inherited as the same number: QEMU opens the very folder we checked.
            path = f"/proc/self/fd/{share_fds[i]}" if share_fds else share.host
            extra += [
                "-fsdev", f"local,id=fs{i},path={_opt(path)},security_model=none"
                          + (",readonly=on" if share.read_only else ""),
                "-device", f"virtio-9p-device,fsdev=fs{i},mount_tag={share_tag(i)}",
            ]  # fmt: skip
        # max: every feature TCG emulates. qemu64 advertised 3DNow!, so OpenBLAS picked
        # kernels TCG cannot run (numpy.dot died of SIGILL in matplotlib). +arat: without
        # "APIC timer always running" the guest keeps its 250 Hz tick even when idle (no
        # broadcast timer on microvm), and each emulated tick costs host CPU.
        accel = ["-accel", "kvm", "-cpu", "host"] if isolation is Isolation.KVM else [
            "-accel", f"tcg,tb-size={self.tb_size_mib}", "-cpu", "max,+arat"]  # fmt: skip
        return [
            self.qemu,
            "-name", f"smol-{rt.id}",
            "-M", "microvm,memory-backend=mem,x-option-roms=off,rtc=on",
            *accel,
            "-smp", str(spec.vcpus),
            "-m", mem,
            "-object", f"memory-backend-memfd,id=mem,size={mem},share=on",
            "-nodefaults", "-no-user-config", "-nographic", "-no-reboot", "-display", "none",
            "-sandbox", "on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny",
            "-kernel", str(image.kernel),
            "-initrd", str(image.initramfs),
            "-append", cmdline,
            # append=on: O_APPEND, so the console cap (console.py) can cut the log back.
            "-chardev", f"file,id=con,path={_opt(rt.path / 'console.log')},append=on",
            "-serial", "chardev:con",
            "-drive", f"id=root,file={image.root_disk},format=raw,if=none,readonly=on",
            "-device", "virtio-blk-device,drive=root",
            "-drive", f"id=rw,file={overlay},format=raw,if=none,discard=unmap",
            "-device", "virtio-blk-device,drive=rw",
            "-chardev", f"socket,id=vsock,path={vu_sock}",
            "-device", "vhost-user-vsock-device,chardev=vsock",
            # Free page reporting: memory a cell allocated and freed goes back to the host
            # instead of staying in this VM's RSS (measured: 300 MiB freed -> -250 MiB RSS).
            "-device", "virtio-balloon-device,free-page-reporting=on",
            *extra,
        ]  # fmt: skip


def _opt(value: object) -> str:
    """A value inside a QEMU ``key=value,...`` option: commas are doubled."""
    return str(value).replace(",", ",,")
