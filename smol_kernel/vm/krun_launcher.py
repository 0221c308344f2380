"""One libkrun VM per process: ``python -m smol_kernel.vm.krun_launcher CONFIG.json``.

``krun_start_enter`` never returns on success: the process *becomes* the VM and ends with
``_exit(<guest exit code>)``, so the parent learns the guest's status with ``waitpid``.
Before building the context the launcher closes every inherited descriptor and makes sure
it dies with its parent. A failing krun_* call is reported on stderr as
``smol-kernel launcher: <function> failed: <ERRNO> (...)`` and ends the process with
``LAUNCHER_FAILED``.

Call sequence (see docs/libkrun.md for why):
  set_log_level, create_ctx, set_vm_config, set_root (per-VM boot dir), add_disk2 (root image
  read-only, then the per-VM overlay), add_virtiofs3/add_virtiofs per share,
  disable_implicit_vsock, add_vsock(0) -- no TSI hijacking --, add_net_unixstream (only with
  network=True: an inherited fd to the guarded passt link), add_vsock_port2(listen=true) per
  port, set_console_output, set_workdir, set_exec (explicit env, never the host's),
  start_enter.
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time

LAUNCHER_FAILED = 70


def _die_with_parent(parent: int) -> None:
    if sys.platform.startswith("linux"):
        import ctypes
        import signal

        ctypes.CDLL(None).prctl(1, signal.SIGKILL, 0, 0, 0)  # PR_SET_PDEATHSIG
        if os.getppid() != parent:
            os._exit(LAUNCHER_FAILED)
        return

    def watch() -> None:  # macOS has no parent-death signal: poll
        while os.getppid() == parent:
            time.sleep(0.5)
        os._exit(LAUNCHER_FAILED)

    threading.Thread(target=watch, daemon=True).start()


def read_only_boot_dir(path: str) -> None:
    """Make the VM's root (libkrun shares it read-write with the guest) read-only for this
    process, the VMM: a private user and mount namespace with a read-only bind mount of the
    folder over itself. Without it, root in the guest could remount its root and grow the
    boot folder -- in the runtime folder, often a tmpfs, i.e. host memory -- without a cap.
    OSError if this host does not allow unprivileged user namespaces."""
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    clone_newuser, clone_newns = 0x10000000, 0x00020000
    ms_rdonly, ms_remount, ms_bind, ms_rec, ms_private = 1, 32, 4096, 16384, 1 << 18
    uid, gid = os.getuid(), os.getgid()

    def check(rc: int, what: str) -> None:
        if rc != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"{what}: {os.strerror(err)}")

    check(libc.unshare(clone_newuser | clone_newns), "unshare(user, mount namespaces)")
    for name, text in (("setgroups", "deny"), ("uid_map", f"{uid} {uid} 1"),
                       ("gid_map", f"{gid} {gid} 1")):  # fmt: skip
        with open(f"/proc/self/{name}", "w") as f:
            f.write(text)
    target = path.encode()
    check(libc.mount(None, b"/", None, ms_rec | ms_private, None), "make mounts private")
    check(libc.mount(target, target, None, ms_bind | ms_rec, None), f"bind {path}")
    check(libc.mount(None, target, None, ms_bind | ms_remount | ms_rdonly, None),
          f"remount {path} read-only")  # fmt: skip


def build_and_start(cfg: dict) -> int:
    from .krun_binding import COMPAT_NET_FEATURES, KRUN_DISK_FORMAT_RAW, Krun

    k = Krun(cfg.get("libkrun"), cfg.get("libkrunfw"))
    for feature in cfg.get("require", []):
        k.require(feature)
    k.call("krun_set_log_level", int(cfg.get("log_level", 0)))
    ctx = k.call("krun_create_ctx")
    try:
        k.call("krun_set_vm_config", ctx, int(cfg["vcpus"]), int(cfg["memory_mib"]))
        k.call("krun_set_root", ctx, k.cstr(cfg["root_dir"]))
        for disk in cfg.get("disks", []):
            k.call("krun_add_disk2", ctx, k.cstr(disk["id"]), k.cstr(disk["path"]),
                   KRUN_DISK_FORMAT_RAW, bool(disk["read_only"]))  # fmt: skip
        for share in cfg.get("shares", []):
            tag, path = k.cstr(share["tag"]), k.cstr(share["path"])
            if share["read_only"]:
                k.call("krun_add_virtiofs3", ctx, tag, path, 0, True)
            else:
                k.call("krun_add_virtiofs", ctx, tag, path)
        k.call("krun_disable_implicit_vsock", ctx)
        k.call("krun_add_vsock", ctx, 0)  # no TSI_HIJACK_INET / _UNIX
        if net := cfg.get("net"):
            k.call("krun_add_net_unixstream", ctx, k.ffi.NULL, int(net["fd"]), k.mac(net["mac"]),
                   COMPAT_NET_FEATURES, 0)  # fmt: skip
        for port, path in sorted(cfg.get("vsock_ports", {}).items(), key=lambda p: int(p[0])):
            k.call("krun_add_vsock_port2", ctx, int(port), k.cstr(path), True)
        k.call("krun_set_console_output", ctx, k.cstr(cfg["console"]))
        k.call("krun_set_workdir", ctx, k.cstr(cfg.get("workdir", "/")))
        env = [f"{key}={val}" for key, val in cfg.get("env", {}).items()]
        k.call("krun_set_exec", ctx, k.cstr(cfg["exec"]), k.cstr_array(cfg.get("argv", [])),
               k.cstr_array(env))  # fmt: skip
    except BaseException:
        k.lib.krun_free_ctx(ctx)
        raise
    k.call("krun_start_enter", ctx)  # only returns on failure
    return LAUNCHER_FAILED


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print("usage: python -m smol_kernel.vm.krun_launcher CONFIG.json", file=sys.stderr)
        return 2
    with open(argv[0]) as f:
        cfg = json.load(f)
    _die_with_parent(int(cfg.get("parent_pid") or os.getppid()))
    max_fd = os.sysconf("SC_OPEN_MAX") if hasattr(os, "sysconf") else 1024
    # The network link and the share folders are what the VM inherits on purpose.
    keep = sorted({int(fd) for fd in cfg.get("keep_fds", [])})
    low = 3
    for fd in keep:
        os.closerange(low, fd)
        low = fd + 1
    os.closerange(low, max_fd)
    from .krun_binding import KrunError, KrunLoadError

    if sys.platform.startswith("linux"):  # the boot probe too: it fails where VMs would
        try:
            read_only_boot_dir(cfg["root_dir"])
        except OSError as e:
            print(f"smol-kernel launcher: cannot make the VM's boot folder read-only ({e}); "
                  "libkrun needs unprivileged user namespaces (sysctl "
                  "kernel.unprivileged_userns_clone=1, or an AppArmor profile allowing them), "
                  "or use the qemu backend", file=sys.stderr, flush=True)  # fmt: skip
            return LAUNCHER_FAILED
    try:
        return build_and_start(cfg)
    except (KrunError, KrunLoadError) as e:
        print(f"smol-kernel launcher: {e}", file=sys.stderr, flush=True)
        return LAUNCHER_FAILED


if __name__ == "__main__":
    sys.exit(main())
