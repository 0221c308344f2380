"""QEMU microvm backend: KVM where a guest really boots with it, TCG emulation otherwise.

Per VM: one ``qemu-system-x86_64 -M microvm`` with no default devices and ``-sandbox on``,
the image's root disk attached read-only, a fresh sparse ext4 overlay disk capped at
``disk_mib`` (the guest's only writable storage), and one ``vhost-device-vsock`` daemon that
carries vsock (its own process and group, so no two guests can talk to each other).
"""

from __future__ import annotations

import asyncio
import os
import platform
import shutil
import subprocess
import time
from pathlib import Path

from ..image.store import GuestImage, ImageNotFound
from ..image.tools import find_vhost_device_vsock
from ..transport.vhost_user_vsock import open_vsock_stream
from .base import BackendStatus, BackendUnavailable, VmBackend, VmError
from .kvm_probe import probe_kvm
from .process import ProcessVm, RuntimeDir, reap_orphans, spawn
from .spec import Isolation, VmSpec

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
    return os.environ.get("SMOL_KERNEL_QEMU") or shutil.which("qemu-system-x86_64")


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
        vhost = qemu = None
        try:
            overlay = rt.path / "overlay.ext4"
            await asyncio.to_thread(self._make_overlay, overlay, spec.disk_mib)
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
            argv = self._argv(spec, image, status.isolation, rt, overlay, vu_sock)
            qemu = await asyncio.to_thread(spawn, argv, rt.path / "qemu.log")
            vm = QemuVm(spec, rt, status.isolation, qemu, (vhost,))
            vm.record_state(self.name)
            await vm.confirm_started("QEMU", rt.path / "qemu.log")
            return vm
        except BaseException:
            for proc in (qemu, vhost):
                if proc is not None and proc.poll() is None:
                    proc.kill()
                if proc is not None:
                    proc.wait()
            rt.remove()
            raise

    @staticmethod
    def _make_overlay(path: Path, size_mib: int) -> None:
        with open(path, "wb") as f:
            f.truncate(size_mib << 20)
        proc = subprocess.run(
            ["mke2fs", "-q", "-F", "-t", "ext4", "-O", "^has_journal", "-m", "0",
             "-E", "lazy_itable_init=1", str(path)],
            capture_output=True, text=True,
        )  # fmt: skip
        if proc.returncode != 0:
            raise VmError(f"cannot create the writable overlay disk: {proc.stderr.strip()}")

    def _argv(
        self,
        spec: VmSpec,
        image: GuestImage,
        isolation: Isolation,
        rt: RuntimeDir,
        overlay: Path,
        vu_sock: Path,
    ) -> list[str]:
        assert self.qemu is not None
        mem = f"{spec.memory_mib}M"
        cmdline = KERNEL_CMDLINE
        if isolation is Isolation.TCG:
            cmdline += " " + tcg_clock_cmdline()
        accel = ["-accel", "kvm", "-cpu", "host"] if isolation is Isolation.KVM else [
            "-accel", f"tcg,tb-size={self.tb_size_mib}"]  # fmt: skip
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
            "-serial", f"file:{rt.path / 'console.log'}",
            "-drive", f"id=root,file={image.root_disk},format=raw,if=none,readonly=on",
            "-device", "virtio-blk-device,drive=root",
            "-drive", f"id=rw,file={overlay},format=raw,if=none,discard=unmap",
            "-device", "virtio-blk-device,drive=rw",
            "-chardev", f"socket,id=vsock,path={vu_sock}",
            "-device", "vhost-user-vsock-device,chardev=vsock",
        ]  # fmt: skip
