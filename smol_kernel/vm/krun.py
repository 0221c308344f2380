"""libkrun backend: hardware isolation (KVM on Linux, Hypervisor.framework on macOS).

Per VM: one launcher process (``krun_launcher``) that becomes the VM. It boots libkrunfw's
kernel with a tiny per-VM virtio-fs boot dir (busybox + our /init, unpacked from the image's
initramfs; a private copy, because libkrun shares a root directory read-write), the image's
root disk read-only and a fresh capped overlay disk -- the same image as the QEMU backend.
The guest gets a vsock device with no TSI hijacking (so no network) and one host-listening
unix socket per guest port the relay needs. Opt-in: ``network`` adds a virtio-net device on
the same guarded passt link as QEMU (``network.py``); ``shares`` become virtio-fs devices,
read-only ones enforced by libkrun (``krun_add_virtiofs3``).
"""

from __future__ import annotations

import asyncio
import json
import os
import stat
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from ..egress.netfilter import GUEST_MAC
from ..guest.protocol import CHANNEL_PORTS, CONTROL_PORT
from ..image.initramfs import read_cpio
from ..image.store import MAX_INITRAMFS_BYTES, GuestImage, ImageNotFound
from ..trusted import helper_env, python_argv
from .base import BackendStatus, BackendUnavailable, VmError
from .krun_binding import FEATURE_NEEDS, Krun, KrunLoadError
from .kvm_probe import PROBE_MARKER, cached_probe, kvm_device_problem
from .process import ProcessVm, RuntimeDir, spawn
from .process_backend import Boot, ProcessBackend
from .spec import Isolation, VmSpec, share_tag

SUN_PATH_MAX = 107
PROBE_TIMEOUT = 20.0
INSTALL_HINT = (
    "install libkrun >= 1.17 with block support: Fedora 'sudo dnf install libkrun', Arch "
    "'sudo pacman -S libkrun', macOS 'brew tap slp/krun && brew install libkrun' "
    "(see docs/libkrun.md); or set SMOL_KERNEL_LIBKRUN to its path"
)


def _isolation() -> Isolation:
    return Isolation.HVF if sys.platform == "darwin" else Isolation.KVM


def vsock_socket_path(rt_path: Path, port: int) -> Path:
    path = rt_path / f"v-{port}.sock"
    if len(str(path).encode()) > SUN_PATH_MAX:
        raise VmError(
            f"unix socket path {path} is longer than {SUN_PATH_MAX} bytes; set "
            "SMOL_KERNEL_RUNTIME_DIR to a shorter directory"
        )
    return path


def make_boot_dir(image: GuestImage, dest: Path) -> None:
    """The per-VM virtio-fs root: the initramfs minus kernel modules and device nodes.

    An imported image's initramfs is untrusted input: its size is capped, entry names are
    plain relative paths (``read_cpio``), nothing is written through a symlink it made, and
    only folders, regular files and symlinks (kept as links, never followed here) come in."""
    with open(image.initramfs, "rb") as f:
        data = f.read(MAX_INITRAMFS_BYTES + 1)
    if len(data) > MAX_INITRAMFS_BYTES:
        raise VmError(f"{image.initramfs} is over {MAX_INITRAMFS_BYTES >> 20} MiB: not ours")
    try:
        entries = read_cpio(data)
    except (ValueError, UnicodeDecodeError) as e:
        raise VmError(f"{image.initramfs} is not a usable initramfs: {e}") from None
    dest.mkdir()
    try:
        _unpack_boot_files(entries, dest, str(image.initramfs))
    except OSError as e:
        raise VmError(f"{image.initramfs}: cannot unpack it: {e}") from None
    (dest / "dev").mkdir(exist_ok=True)


def _unpack_boot_files(entries: list[tuple[str, int, bytes]], dest: Path, where: str) -> None:
    links: set[str] = set()
    for name, mode, body in entries:
        if name.startswith("lib/modules/") or stat.S_ISCHR(mode):
            continue
        prefixes = ["/".join(name.split("/")[:i]) for i in range(1, name.count("/") + 1)]
        if any(p in links for p in prefixes):
            raise VmError(f"{where}: {name!r} lies beyond a symlink of the archive")
        target = dest / name
        if stat.S_ISDIR(mode):
            target.mkdir(parents=True, exist_ok=True)
        elif stat.S_ISLNK(mode):
            target.parent.mkdir(parents=True, exist_ok=True)
            target.symlink_to(body.decode())
            links.add(name)
        elif stat.S_ISREG(mode):
            target.parent.mkdir(parents=True, exist_ok=True)
            flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
            with os.fdopen(os.open(target, flags, stat.S_IMODE(mode) & 0o755), "wb") as out:
                out.write(b"" if name.startswith("modules.") else body)
        else:
            raise VmError(f"{where}: {name!r} is neither a file, folder nor link")


def required_features(spec: VmSpec) -> list[str]:
    """libkrun features a VM needs (see ``krun_binding.FEATURE_SYMBOLS``): checked by the
    backend before booting, and again by the launcher (``require`` in its config)."""
    out = ["blk"]  # the guest image is a disk
    out += ["net"] if spec.network else []
    out += sorted({"virtiofs_ro" if s.read_only else "virtiofs" for s in spec.shares})
    return out


def launcher_config(
    spec: VmSpec,
    image: GuestImage,
    rt_path: Path,
    krun: dict,
    probe: bool = False,
    net_fd: int | None = None,
    share_fds: list[int] | None = None,
) -> dict:
    """What the launcher builds. ``env`` is complete: the host environment never enters.
    ``net_fd`` is the launcher's inherited end of the guarded passt link; ``share_fds`` the
    share folders we opened and checked (``share.open_share``), inherited too."""
    ports = {} if probe else {
        str(p): str(vsock_socket_path(rt_path, p)) for p in (CONTROL_PORT, *CHANNEL_PORTS.values())
    }  # fmt: skip
    env = {"KRUN_INIT_PID1": "1", "SMOL_LIBKRUN": "1", "PATH": "/bin"}
    if probe:
        env["SMOL_PROBE"] = "1"
    else:
        env.update(spec.boot_env())
    return {
        "libkrun": krun.get("libkrun"),
        "libkrunfw": krun.get("libkrunfw"),
        "parent_pid": os.getpid(),
        "vcpus": spec.vcpus,
        "memory_mib": spec.memory_mib,
        "root_dir": str(rt_path / "boot"),
        "disks": [
            {"id": "root", "path": str(image.root_disk), "read_only": True},
            *(
                []
                if probe
                else [{"id": "rw", "path": str(RuntimeDir(rt_path).overlay), "read_only": False}]
            ),
        ],
        "require": required_features(spec),
        "shares": [
            {
                "tag": share_tag(i),
                "read_only": s.read_only,
                "path": f"/proc/self/fd/{share_fds[i]}" if share_fds else s.host,
            }
            for i, s in enumerate(spec.shares)
        ],
        "keep_fds": [*(share_fds or []), *([] if net_fd is None else [net_fd])],
        "net": None if net_fd is None else {"fd": net_fd, "mac": GUEST_MAC},
        "vsock_ports": ports,
        "console": str(rt_path / "console.log"),
        "workdir": "/",
        "exec": "/init",
        "argv": [],
        "env": env,
    }


def launcher_argv(config_path: Path) -> list[str]:
    """The launcher runs isolated (``trusted.python_argv``): it imports only our package and
    cffi, from where this process imported them."""
    return python_argv(
        "smol_kernel.vm.krun_launcher", str(config_path), deps=("cffi", "_cffi_backend"),
        python=os.environ.get("SMOL_KERNEL_KRUN_PYTHON") or None,
    )  # fmt: skip


class KrunVm(ProcessVm):
    """The launcher process is the VMM (it became the VM in krun_start_enter)."""

    async def open_stream(self, port: int, timeout: float = 5.0):
        self._check_running()
        path = vsock_socket_path(self.runtime_dir, port)
        return await asyncio.wait_for(
            asyncio.open_unix_connection(str(path), limit=1 << 20), timeout
        )


class KrunBackend(ProcessBackend):
    """Runs guests with libkrun, one launcher process per VM."""

    name = "libkrun"

    def __init__(self, libkrun: str | None = None, libkrunfw: str | None = None) -> None:
        super().__init__()
        # Absolute paths only (Krun refuses others), else the system's, found in fixed
        # folders: never through the working folder or a search the PATH could steer.
        self.libkrun = libkrun or os.environ.get("SMOL_KERNEL_LIBKRUN") or None
        self.libkrunfw = libkrunfw or os.environ.get("SMOL_KERNEL_LIBKRUNFW") or None

    @property
    def _krun_cfg(self) -> dict:
        return {"libkrun": self.libkrun, "libkrunfw": self.libkrunfw}

    def check(self, image: str = "default") -> BackendStatus:
        steps: list[str] = []

        def unavailable(reason: str, fix: str) -> BackendStatus:
            steps.append(f"unavailable: {reason}")
            return BackendStatus(self.name, False, None, reason, fix, steps)

        try:
            krun = Krun(self.libkrun, self.libkrunfw)
        except KrunLoadError as e:
            return unavailable(str(e), INSTALL_HINT)
        steps.append(f"loaded {krun.path}")
        features = krun.features()
        steps.append("features: " + ", ".join(f"{k}={'yes' if v else 'no'}"
                                              for k, v in features.items()))  # fmt: skip
        if not features["blk"]:
            return unavailable(
                f"{krun.path} lacks block-device support (krun_add_disk2)",
                "install a libkrun built with BLK=1 (Fedora's and Homebrew's are)",
            )
        if sys.platform.startswith("linux") and (problem := kvm_device_problem()):
            return unavailable(problem, "enable KVM and give your user access to /dev/kvm")
        try:
            img = GuestImage.load(image)
        except (ImageNotFound, ValueError) as e:
            return unavailable(str(e), "smol-kernel image build")
        ok, why = self._probe(img)
        steps.append(f"boot probe: {why}")
        if not ok:
            return unavailable(f"libkrun loads but a guest does not boot: {why}",
                               "use the qemu backend on this host")  # fmt: skip
        return BackendStatus(self.name, True, _isolation(), why, "", steps)

    def _probe(self, image: GuestImage) -> tuple[bool, str]:
        """Boot a guest whose /init prints a marker and exits; cached like the KVM probe."""
        key = f"libkrun|{self.libkrun}|{self.libkrunfw}|{image.root_disk.stat().st_mtime}"
        return cached_probe(key, lambda: self._boot_probe(image))

    def _boot_probe(self, image: GuestImage) -> tuple[bool, str]:
        with tempfile.TemporaryDirectory(prefix="smol-krun-probe-") as tmp:
            rt = Path(tmp)
            make_boot_dir(image, rt / "boot")
            cfg_path = rt / "launcher.json"
            cfg = launcher_config(VmSpec(memory_mib=256), image, rt, self._krun_cfg, probe=True)
            cfg_path.write_text(json.dumps(cfg))
            t0 = time.monotonic()
            console_file = rt / "console.log"
            try:
                proc = subprocess.run(
                    launcher_argv(cfg_path), capture_output=True, text=True,
                    timeout=PROBE_TIMEOUT, cwd=rt, env=helper_env(),
                )  # fmt: skip
            except subprocess.TimeoutExpired:
                return False, f"no guest output within {PROBE_TIMEOUT:.0f}s"
            console = console_file.read_bytes() if console_file.exists() else b""
            if PROBE_MARKER in console:
                return True, f"a guest booted in {time.monotonic() - t0:.1f}s"
            detail = proc.stderr or console.decode(errors="replace")
            return False, f"launcher exited {proc.returncode}: {detail[-300:]}"

    async def _spawn(self, boot: Boot) -> KrunVm:
        rt = boot.rt
        await asyncio.to_thread(make_boot_dir, boot.image, rt.path / "boot")
        await asyncio.to_thread(rt.create_overlay, boot.spec.disk_mib)
        cfg = launcher_config(boot.spec, boot.image, rt.path, self._krun_cfg,
                              net_fd=boot.net_fd, share_fds=boot.share_fds)  # fmt: skip
        cfg_path = rt.path / "launcher.json"
        cfg_path.write_text(json.dumps(cfg))
        boot.vmm = await asyncio.to_thread(
            spawn, launcher_argv(cfg_path), rt.path / "launcher.log", None,
            tuple(cfg["keep_fds"]),
        )  # fmt: skip
        vm = KrunVm(boot.spec, rt, boot.isolation, boot.vmm, tuple(boot.net_procs))
        vm.record_state(self.name)  # before waiting: a crash from now on is still reaped
        await vm.confirm_started("libkrun launcher", rt.path / "launcher.log")
        return vm

    def _validate(self, spec: VmSpec) -> None:
        """Refuse before booting when the library cannot give what the spec asks for."""
        needed = [f for f in required_features(spec) if f != "blk"]  # check() verified blk
        if not needed:
            return
        try:
            features = Krun(self.libkrun, self.libkrunfw).features()
        except KrunLoadError as e:
            raise BackendUnavailable(self.name, str(e), INSTALL_HINT) from None
        for feature in needed:
            if not features.get(feature):
                raise BackendUnavailable(self.name, FEATURE_NEEDS[feature], INSTALL_HINT)
