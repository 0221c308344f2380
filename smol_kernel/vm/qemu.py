"""QEMU microvm backend: KVM where a guest really boots with it, TCG emulation otherwise.

Per VM: one ``qemu-system-x86_64 -M microvm`` with no default devices and ``-sandbox on``,
the image's root disk attached read-only, a fresh sparse ext4 overlay disk capped at
``disk_mib`` (the guest's only writable storage), and one virtio-serial port that carries
every host <-> guest stream (``transport/serial_mux.py``; unlike vhost-user-vsock it
migrates, and needs no helper process). Opt-in: a ``passt`` per VM behind a virtio-net
device (``VmSpec.network``), and host folders over virtio-9p (``VmSpec.shares``; the generic
Debian kernel has the 9p modules, the cloud kernel does not -- which is why images use the
generic one).

Snapshots (``template.py`` uses them): ``start(..., template=PATH)`` boots a VM whose RAM
is the file PATH, shared, with no balloon (a discard would punch holes in it); ``save``
writes its device state with ``x-ignore-shared`` (the RAM stays in the file, nothing is
copied); ``start(..., restore=Snapshot)`` starts a clone that maps that file privately
(copy-on-write) and loads the state: running again in a few hundredths of a second.

Checkpoints (``checkpoint.py``): ``checkpoint`` pauses a running VM, streams its memory
into a receiving QEMU whose guest never runs (``Receiver``), copies its disk, and lets it
run on; the receiver then saves the devices with ``x-ignore-shared`` and the memory becomes
the checkpoint's ``ram`` file. Restores map that file privately, as clones map a template:
a rewind or a fork costs about the same for 50 MB as for 2 GB, and forks share the pages
they have not written. A VM with a balloon (booted cold) is streamed into ``state`` instead
(its restores need the balloon, whose discards would punch holes into a mapped file) and
restored into fresh memory. Every VM has a QMP socket in its runtime folder for this.

This module holds the backend: its check, starting and restoring a VM, saving and
checkpointing it over QMP, and QEMU's command line (``QemuBackend._argv``). A saved VM's
files (``Snapshot``), the sparse copies of its disk and memory and the receiving QEMU are
in ``qemu_snapshot.py``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import platform
import shutil
from collections.abc import Awaitable, Callable
from pathlib import Path

from ..egress.netfilter import GUEST_MAC
from ..guest.mux import PORT_NAME as MUX_PORT
from ..image.store import GuestImage, ImageNotFound
from ..transport.serial_mux import HostMux
from ..trusted import find_program
from .base import BackendStatus, VmError
from .kvm_probe import probe_kvm
from .process import ProcessVm, RuntimeDir, spawn
from .process_backend import Boot, ProcessBackend
from .qemu_snapshot import MIGRATION_TIMEOUT, NEW_FILE, Receiver, Snapshot, copy_sparse
from .qmp import Qmp, QmpError
from .spec import Isolation, VmSpec, share_tag

# No PS/2 probe (microvm has no i8042), no reboot loop: a reboot or panic ends QEMU.
KERNEL_CMDLINE = "console=ttyS0 quiet reboot=t panic=-1 initcall_blacklist=i8042_init"
MUX_READY_TIMEOUT = 600.0  # the agent's own deadline (GuestAgent.connect) is the real one
# Bytes per second a save may stream. QEMU's default (128 MiB/s) is meant for live
# migration over a network; a paused VM saved to a local file should go at disk speed.
SAVE_BANDWIDTH = 64 << 30


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
    """QEMU is the VMM; streams go through its virtio-serial port (``HostMux``)."""

    streams_wait_for_guest = True

    def __init__(self, *args, mux: HostMux, balloon: bool, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.mux = mux
        self.balloon = balloon  # a checkpoint of it must be restored with the same devices
        self.qmp_path = self.runtime_dir / "qmp.sock"
        # The guest opens its end once the agent runs: streams wait for that.
        self._mux_ready = asyncio.ensure_future(mux.start(MUX_READY_TIMEOUT))
        self._mux_ready.add_done_callback(
            lambda t: t.cancelled() or t.exception()  # (a VM that died: seen by its users)
        )

    async def open_stream(self, port: int, timeout: float = 5.0):
        self._check_running()
        try:
            await asyncio.wait_for(asyncio.shield(self._mux_ready), timeout)
        except (TimeoutError, asyncio.TimeoutError, OSError) as e:
            raise ConnectionRefusedError(
                f"VM {self.id}: the guest's port is not open: {e}"
            ) from None
        return await self.mux.open_stream(port, timeout)

    async def close(self) -> None:
        self._mux_ready.cancel()
        await self.mux.close()
        await super().close()


class QemuBackend(ProcessBackend):
    """Runs guests with ``qemu-system-x86_64 -M microvm``."""

    name = "qemu"

    def __init__(self, qemu: str | None = None, tb_size_mib: int | None = None) -> None:
        super().__init__()
        self.qemu = qemu or find_qemu()
        # TCG translation cache: smaller saves host RSS, but below ~64 MiB ipykernel's
        # start-up code no longer fits and kernel start slows down ~3x.
        self.tb_size_mib = tb_size_mib or int(os.environ.get("SMOL_KERNEL_TCG_TB_MIB", "64"))

    # ------------------------------------------------------------------ check
    def check(self, image: str = "default") -> BackendStatus:
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
        try:
            img = GuestImage.load(image)
        except (ImageNotFound, ValueError) as e:
            return unavailable(str(e), "smol-kernel image build")
        steps.append(f"image {image!r}: {img.path}")
        if "mux.py" not in (img.inputs.get("guest_files") or {}):
            again = {"default": "smol-kernel image build",
                     "scipy": "smol-kernel image build --preset scipy"}.get(image)  # fmt: skip
            return unavailable(
                f"image {image!r} was built before the virtio-serial channel QEMU guests use",
                f"rebuild it: {again}"
                if again
                else "rebuild it: run the 'smol-kernel image "
                "build' that made it again (it rebuilds: the guest files changed)",
            )
        ok, why = probe_kvm(self.qemu, img.kernel, img.initramfs)
        steps.append(f"KVM probe: {'usable' if ok else 'not usable'}: {why}")
        if ok:
            return BackendStatus(self.name, True, Isolation.KVM, why, "", steps)
        return BackendStatus(
            self.name, True, Isolation.TCG,
            f"KVM not usable ({why}); using TCG software emulation, which is not a "
            "security boundary", "run on a host with working KVM for hardware isolation", steps,
        )  # fmt: skip

    # ------------------------------------------------------------------ start
    async def start(  # type: ignore[override]
        self, spec: VmSpec, *, template: Path | None = None, restore: Snapshot | None = None
    ) -> QemuVm:
        """Boot a VM for ``spec``; with ``template`` its RAM is that (new) file, shared,
        for ``save``; with ``restore`` it is a clone of that snapshot (a template's or a
        checkpoint's), running when this returns (its guest agent answers at once)."""
        vm = await super().start(spec, template=template, restore=restore)
        assert isinstance(vm, QemuVm)
        return vm

    async def _spawn(
        self, boot: Boot, *, template: Path | None, restore: Snapshot | None
    ) -> QemuVm:
        assert self.qemu is not None
        rt = boot.rt
        mux = HostMux(rt.path / "mux.sock")
        boot.cleanups.append(mux.close)
        state = None
        if restore is not None:
            overlay = await asyncio.to_thread(copy_sparse, restore.overlay, rt.overlay)
            if restore.console.is_file():  # the boot it comes from, for smol-kernel logs
                shutil.copyfile(restore.console, rt.path / "console.log")
            state = os.open(restore.state, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
            boot.fds.append(state)
        else:
            overlay = await asyncio.to_thread(rt.create_overlay, boot.spec.disk_mib)
        await mux.listen()
        streamed = restore is not None and restore.streamed
        ram = template if restore is None else None if streamed else restore.ram
        ram_fd = None
        if restore is not None and ram is not None:
            # Opened next to its state and inherited: QEMU maps this very file, whatever
            # replaces the name meanwhile (a checkpoint saved again, a template rebuilt).
            ram_fd = os.open(ram, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
            boot.fds.append(ram_fd)
            ram = Path(f"/proc/self/fd/{ram_fd}")
        # A balloon only where no RAM file is shared (see _argv), and in a restored
        # checkpoint exactly when the VM it saved had one.
        balloon = restore.balloon if streamed else ram is None
        argv = self._argv(boot.spec, boot.image, boot.isolation, rt, overlay, boot.net_fd,
                          boot.share_fds, ram=ram, private=restore is not None,
                          balloon=balloon, incoming=state)  # fmt: skip
        fds = tuple(fd for fd in (*boot.share_fds, boot.net_fd, state, ram_fd) if fd is not None)
        boot.vmm = await asyncio.to_thread(spawn, argv, rt.path / "qemu.log", None, fds)
        vm = QemuVm(boot.spec, rt, boot.isolation, boot.vmm, tuple(boot.net_procs),
                    mux=mux, balloon=balloon)  # fmt: skip
        vm.record_state(self.name)  # before waiting: a crash from now on is still reaped
        if restore is not None:
            await self._load(vm, state, ignore_shared=not streamed)
        else:
            await vm.confirm_started("QEMU", rt.path / "qemu.log")
        return vm

    async def _load(self, vm: QemuVm, state_fd: int | None, ignore_shared: bool) -> None:
        """Give a clone its saved state and let it run (``ignore_shared``: the memory is
        the mapped RAM file, not in the state)."""
        try:
            qmp = await Qmp.connect(vm.qmp_path)
        except QmpError as e:
            log = (vm.runtime_dir / "qemu.log").read_text(errors="replace")[-1000:]
            raise VmError(f"QEMU did not start for a clone: {e}: {log}") from None
        try:
            await qmp.execute("migrate-set-capabilities", capabilities=[
                {"capability": "x-ignore-shared", "state": ignore_shared}])  # fmt: skip
            await qmp.execute("migrate-incoming", uri=f"fd:{state_fd}")
            await qmp.wait_migration(MIGRATION_TIMEOUT)
            await qmp.execute("cont")
        except QmpError as e:
            raise VmError(f"VM {vm.id}: restoring the snapshot failed: {e}") from None
        finally:
            await qmp.close()

    async def save(self, vm: QemuVm, snapshot: Snapshot) -> None:
        """Stop a VM booted with ``template`` and write its state into ``snapshot``'s folder
        (the RAM already is its file); the VM is stopped for good afterwards."""
        qmp = await Qmp.connect(vm.qmp_path)
        fd = os.open(snapshot.state, NEW_FILE, 0o600)
        try:
            await qmp.execute("stop")
            await qmp.execute("migrate-set-capabilities", capabilities=[
                {"capability": "x-ignore-shared", "state": True}])  # fmt: skip
            await qmp.send_fd("snapshot", fd)
            await qmp.execute("migrate", uri="fd:snapshot")
            await qmp.wait_migration(MIGRATION_TIMEOUT)
        except QmpError as e:
            raise VmError(f"VM {vm.id}: saving it failed: {e}") from None
        finally:
            os.close(fd)
            await qmp.close()
        await asyncio.to_thread(copy_sparse, vm.rt.overlay, snapshot.overlay)
        snapshot.devices.write_text(json.dumps({"balloon": vm.balloon}))
        tail = vm.console_tail(64 << 10).encode()
        snapshot.console.write_bytes(tail + b"[smol-kernel: saved as a template]\n")

    async def checkpoint(self, vm: QemuVm, snapshot: Snapshot, timeout: float,
                         on_resumed: Callable[[], None] | None = None,
                         before_pause: Callable[[], Awaitable[None]] | None = None,
                         ) -> float:  # fmt: skip
        """Pause ``vm``, save its memory and device state into ``snapshot``'s folder, copy
        its disk, and let it run on. Returns the seconds it was paused. ``before_pause`` is
        awaited once everything is ready, just before the pause (an exception from it
        stops the save); ``on_resumed`` is called as soon as the VM runs again (what is
        left to write then is ours alone). VmError if QEMU cannot save it (a mounted 9p
        share, for one) or a file cannot be written; the VM runs on either way.

        A VM without a balloon (every clone) is saved as a RAM file to map: its memory
        streams into a receiving QEMU (``Receiver``) whose RAM is ``snapshot.ram``, shared,
        and that one saves its devices with ``x-ignore-shared``; restores then map the file
        copy-on-write, as clones map a template. A VM with a balloon streams into
        ``state``: its restores need the balloon back, whose discards would punch holes
        into a mapped file."""
        receiver = None
        try:
            if not vm.balloon:
                receiver = await Receiver.start(self, vm, snapshot)
            if before_pause is not None:
                await before_pause()
            return await self._pause_and_save(vm, snapshot, timeout, receiver, on_resumed)
        except (OSError, TimeoutError) as e:  # a full disk, a QEMU that stopped answering
            raise VmError(f"VM {vm.id}: saving a checkpoint failed: {e}") from None
        finally:
            if receiver is not None:
                await receiver.close()

    async def _pause_and_save(
        self, vm: QemuVm, snapshot: Snapshot, timeout: float, receiver: Receiver | None,
        on_resumed: Callable[[], None] | None,
    ) -> float:  # fmt: skip
        qmp = await Qmp.connect(vm.qmp_path)
        fd = receiver.source_fd if receiver else os.open(snapshot.state, NEW_FILE, 0o600)
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        try:
            await qmp.execute("stop")
            try:
                await qmp.execute("migrate-set-capabilities", capabilities=[
                    {"capability": "x-ignore-shared", "state": False}])  # fmt: skip
                await qmp.execute("migrate-set-parameters", **{"max-bandwidth": SAVE_BANDWIDTH})
                await qmp.send_fd("checkpoint", fd)
                await qmp.execute("migrate", uri="fd:checkpoint")
                await qmp.wait_migration(timeout)
                # Paused, so the disk is exactly what the saved memory expects.
                await asyncio.to_thread(copy_sparse, vm.rt.overlay, snapshot.overlay)
            finally:
                await qmp.execute("cont")
        except QmpError as e:
            with contextlib.suppress(QmpError):
                await qmp.execute("migrate_cancel")
            raise VmError(f"VM {vm.id}: saving a checkpoint failed: {e}") from None
        finally:
            if receiver is None:
                os.close(fd)
            await qmp.close()
        paused = loop.time() - t0
        if on_resumed is not None:
            on_resumed()
        if receiver is not None:
            await receiver.save(snapshot, timeout)
        snapshot.devices.write_text(json.dumps({"balloon": vm.balloon}))
        return paused

    def _argv(
        self,
        spec: VmSpec,
        image: GuestImage,
        isolation: Isolation,
        rt: RuntimeDir,
        overlay: Path,
        net_fd: int | None = None,
        share_fds: list[int] | None = None,
        ram: Path | None = None,
        private: bool = False,
        balloon: bool = True,
        incoming: int | None = None,
        frozen: bool = False,
    ) -> list[str]:
        """QEMU's command line. A template and its clones must get the same devices in the
        same order: only paths, descriptors, RAM sharing and ``-incoming`` differ.
        ``frozen``: the guest never runs (``-S``), whatever state arrives, and its RAM is
        allocated at the start."""
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
            # mapped-xattr: the guest's chmod/chown land in user.virtfs.* xattrs, and what
            # the guest creates is 0600/0700 on the host: no setuid, setgid or
            # world-writable file reaches the host through a share (``none`` applied them).
            extra += [
                "-fsdev", f"local,id=fs{i},path={_opt(path)},security_model=mapped-xattr"
                          + (",readonly=on" if share.read_only else ""),
                "-device", f"virtio-9p-device,fsdev=fs{i},mount_tag={share_tag(i)}",
            ]  # fmt: skip
        if ram is None:
            memory = f"memory-backend-memfd,id=mem,size={mem},share=on"
            if balloon:
                # Free page reporting: memory a cell allocated and freed goes back to the
                # host instead of staying in this VM's RSS (measured: 300 MiB freed ->
                # -250 MiB RSS).
                extra += ["-device", "virtio-balloon-device,free-page-reporting=on"]
        else:
            # A template's RAM file, shared (it is written there), or a clone's private,
            # copy-on-write view of it. No balloon: a discard punches a hole in the file,
            # which would zero those pages in every clone.
            memory = (f"memory-backend-file,id=mem,size={mem},mem-path={_opt(ram)},"
                      f"share={'off' if private else 'on'}")  # fmt: skip
            if frozen:  # every page in place before the state arrives, not faulted in then
                memory += ",prealloc=on"
        extra += ["-qmp", f"unix:{_opt(rt.path / 'qmp.sock')},server=on,wait=off"]
        if incoming is not None:
            extra += ["-incoming", "defer"]
        if frozen:
            extra += ["-S"]
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
            "-object", memory,
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
            # Every host <-> guest stream: QEMU connects to our listening socket.
            "-device", "virtio-serial-device,max_ports=2",
            "-chardev", f"socket,id=mux,path={_opt(rt.path / 'mux.sock')}",
            "-device", f"virtserialport,chardev=mux,name={MUX_PORT}",
            *extra,
        ]  # fmt: skip


def _opt(value: object) -> str:
    """A value inside a QEMU ``key=value,...`` option: commas are doubled."""
    return str(value).replace(",", ",,")
