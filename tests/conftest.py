"""Shared fixtures. Every VM here is real (QEMU microvm; TCG on machines without usable KVM).

The guest image must be built first (the README's test command does it). Tests that do not
need a fresh VM share one; tests where isolation is the point boot their own.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import tempfile
from pathlib import Path

import pytest

from smol_kernel import paths
from smol_kernel.image.store import DEFAULT_IMAGE, GuestImage, ImageNotFound
from smol_kernel.vm.qemu import QemuBackend

BOOT_TIMEOUT = 90.0

# The suite's own runtime dir (short: unix socket paths), so tests that snapshot it or reap
# orphans never touch a real user's VMs, and servers the tests start inherit it.
_RUNTIME = tempfile.mkdtemp(prefix="smolrt-", dir="/tmp")
os.environ["SMOL_KERNEL_RUNTIME_DIR"] = _RUNTIME
# Kernel templates of this run (not the user's): made by the first process and inherited by
# the test workers, so a configuration's template is built once for the whole run.
if "SMOL_KERNEL_TEMPLATES_DIR" not in os.environ:  # (a worker must not make one it never uses)
    os.environ["SMOL_KERNEL_TEMPLATES_DIR"] = tempfile.mkdtemp(prefix="smol-templates-")


def pytest_sessionfinish(session, exitstatus) -> None:
    if not os.environ.get("PYTEST_XDIST_WORKER"):  # the run's own process
        shutil.rmtree(os.environ["SMOL_KERNEL_TEMPLATES_DIR"], ignore_errors=True)
    left = sorted(os.listdir(_RUNTIME)) if os.path.isdir(_RUNTIME) else []
    shutil.rmtree(_RUNTIME, ignore_errors=True)
    if left and exitstatus == 0:
        session.exitstatus = 1
        print(f"\nVM runtime dirs left behind by the suite: {left}")


@pytest.fixture(scope="session")
def image() -> GuestImage:
    try:
        return GuestImage.load(DEFAULT_IMAGE)
    except ImageNotFound as e:
        pytest.fail(f"{e}\n(the README's test command builds it before running pytest)")


@pytest.fixture(scope="session")
def qemu_backend(image) -> QemuBackend:
    backend = QemuBackend()
    status = backend.check(image.name)
    assert status.available, f"QEMU backend unusable here: {status.reason} ({status.fix})"
    return backend


def processes_mentioning(text: str) -> list[int]:
    """PIDs whose command line contains ``text`` (e.g. a VM runtime dir)."""
    out = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit() or int(d.name) == os.getpid():
            continue
        try:
            cmdline = (d / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if text in cmdline:
            out.append(int(d.name))
    return out


def vmm_accel(pid: int) -> str:
    """The accelerator a VMM process really runs with, from its command line: QEMU's
    ``-accel`` value; the libkrun launcher has only hardware virtualization."""
    argv = Path(f"/proc/{pid}/cmdline").read_bytes().decode().split("\0")
    if "-accel" in argv:
        return argv[argv.index("-accel") + 1].split(",")[0]
    if any("krun_launcher" in a for a in argv):
        return "hvf" if os.uname().sysname == "Darwin" else "kvm"
    raise AssertionError(f"not a VMM we know: {argv[:3]}")


def runtime_entries() -> set[str]:
    base = paths.runtime_dir()
    return {p.name for p in base.iterdir()} if base.exists() else set()


# ---------------------------------------------------------------- kernelspecs

SECRET_ENV = "SMOL_TEST_HOST_SECRET"


@pytest.fixture(scope="session")
def jupyter_prefix(tmp_path_factory, image):
    """A private Jupyter data dir holding test kernelspecs (installed with our CLI)."""
    prefix = tmp_path_factory.mktemp("jupyter-prefix")
    os.environ["JUPYTER_PATH"] = str(prefix / "share" / "jupyter")
    # A host secret that must never reach a guest.
    os.environ[SECRET_ENV] = "host-only-value"
    return prefix


def install_spec(prefix: Path, name: str, *args: str) -> str:
    """Test kernelspecs have no warm pool unless they ask (``--pool-size N``): most tests
    want exactly the VMs they start, and refills would double the CPU load."""
    from smol_kernel.cli import main

    if "--pool-size" not in args:
        args = (*args, "--pool-size", "0")
    argv = ["install", "--prefix", str(prefix), "--name", name, "--no-server-extension", *args]
    assert main(argv) == 0
    return name


def close_warm_pool() -> None:
    """Close this process's pooled VMs and forget every plan (refills stop)."""
    from smol_kernel.ioloop import io_loop
    from smol_kernel.pool import warm_pool

    asyncio.run_coroutine_threadsafe(warm_pool().close(), io_loop()).result(60)


@pytest.fixture(scope="session", autouse=True)
def _close_warm_pool():
    """Pooled VMs are this process's: close them before the runtime-dir check at the end."""
    yield
    close_warm_pool()


@pytest.fixture(scope="session")
def smolvm_spec(jupyter_prefix) -> str:
    return install_spec(
        jupyter_prefix, "smolvm-test", "--env", "SMOL_SPEC_VAR=from-kernelspec",
        "--memory-mib", "768",
    )  # fmt: skip


@pytest.fixture(scope="module", params=["qemu", "qemu-pooled", "libkrun"])
def backend_spec(request, jupyter_prefix, image):
    """One kernelspec per backend: the kernel conformance tests run against each backend
    that can boot a guest here, and skip the others with the reason doctor gives.
    ``qemu-pooled`` runs them on kernels claimed from the warm pool."""
    from smol_kernel.vm.select import select_backend

    name = request.param
    backend, _, pooled = name.partition("-")
    sel = select_backend(backend, image.name)
    if sel.backend is None:
        assert sel.error is not None
        pytest.skip(f"{backend} cannot boot a kernel VM on this host: {sel.error.reason}")
    yield install_spec(
        jupyter_prefix, f"smolvm-{name}", "--backend", backend,
        "--env", "SMOL_SPEC_VAR=from-kernelspec", "--memory-mib", "768",
        # jupyter_client fills ${VAR} from the host: the guest must get it literally
        "--env", "SMOL_SPEC_REF=${" + SECRET_ENV + "}",
        "--pool-size", "1" if pooled else "0",
    )  # fmt: skip
    if pooled:
        close_warm_pool()
