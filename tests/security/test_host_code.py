"""A guest must never get code run on the host through files it wrote.

Root in the guest controls every file in a ``rw`` share. When the share is the folder the
Jupyter server runs in (``jupyter lab`` started in a project folder, ``share_cwd = "rw"``), the
guest can plant Python packages, ``sitecustomize``/``usercustomize`` modules, ``.pth`` files,
symlinked packages and executables named like our helpers there. These tests plant all of
them -- from a real guest for QEMU, from the test for the libkrun spawn paths (no guest boots
here) -- point every variable a careless spawn would honour at them, make smol-kernel start
its host helpers, and assert that not one planted file ran.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from smol_kernel import trusted
from smol_kernel.vm import process as vm_process
from smol_kernel.vm.share import ShareError, parse_share
from smol_kernel.vm.spec import VmSpec

from ..conftest import install_spec
from ..kernel_helpers import run_cell, start_kernel, stop_kernel

PY = f"python{sys.version_info.major}.{sys.version_info.minor}"

# Runs in the guest (or here, for libkrun): plants every variant under ROOT; each one, if it
# ever runs on the host, writes MARKERS/<variant>.
PLANT = r"""
import os
ROOT, MARKERS = {root!r}, {markers!r}
def payload(name):
    where = f"pathlib.Path({{MARKERS!r}}, {{name!r}})"
    return f"import os, pathlib; {{where}}.write_text(str(os.getuid()))\n"
def put(rel, text, mode=0o644):
    path = os.path.join(ROOT, rel)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        f.write(text)
    os.chmod(path, mode)
# A package named like ours in the working folder (what `python -m` put first on sys.path).
put("smol_kernel/__init__.py", payload("package"))
put("smol_kernel/vm/__init__.py", payload("package-vm"))
put("smol_kernel/egress/__init__.py", payload("package-egress"))
put("smol_kernel/egress/netfilter.py", payload("netfilter"))
put("smol_kernel/vm/krun_launcher.py", payload("krun_launcher"))
# Modules our helpers and their dependencies import. (Not when the guest plants: its own
# kernel starts in this folder too, and a json.py there breaks it as it would break a local
# kernel; the host-side tests plant them.)
for mod in ("cffi", "_cffi_backend", "json", "runpy", "ipaddress", "select")[:{n_modules}]:
    put(mod + ".py", payload("module-" + mod))
# Start-up hooks reached through PYTHONPATH and PYTHONUSERBASE.
put("pp/sitecustomize.py", payload("sitecustomize"))
put("pp/usercustomize.py", payload("usercustomize"))
put("ub/lib/{py}/site-packages/evil.pth", "import os; " + payload("pth").replace("\n", ""))
put("ub/lib/{py}/site-packages/usercustomize.py", payload("user-site"))
# A symlinked package (second PYTHONPATH entry) pointing at a folder with a payload.
put("evil/__init__.py", payload("symlinked-package"))
os.makedirs(os.path.join(ROOT, "pp2"), exist_ok=True)
if not os.path.islink(os.path.join(ROOT, "pp2/smol_kernel")):
    os.symlink("../evil", os.path.join(ROOT, "pp2/smol_kernel"))
# Executables named like our helpers, in a relative PATH entry.
for prog in ("passt", "qemu-system-x86_64", "vhost-device-vsock", "mke2fs", "python3",
             "{py}"):
    put("bin/" + prog, "#!/bin/sh\necho ran > " + MARKERS + "/exe-" + prog + "\nexit 1\n", 0o755)
print("planted", sorted(os.listdir(ROOT)))
"""


def plant_code(root: Path, markers: Path, shadow_stdlib: bool = True) -> str:
    n = 6 if shadow_stdlib else 2
    return PLANT.format(root=str(root), markers=str(markers), py=PY, n_modules=n)


def hostile_environment(monkeypatch, root: Path, path_entry: bool = True) -> dict[str, str]:
    """What a careless spawn would honour: the working folder, PYTHON* variables and (with
    ``path_entry``) a relative PATH entry, all pointing at the planted files."""
    monkeypatch.chdir(root)
    env = {
        "PYTHONPATH": f"{root / 'pp'}:{root / 'pp2'}",
        "PYTHONUSERBASE": str(root / "ub"),
        "PYTHONSTARTUP": str(root / "pp" / "sitecustomize.py"),
    }
    if path_entry:
        env["PATH"] = "bin:" + os.environ["PATH"]
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    return env


def assert_nothing_ran(markers: Path) -> None:
    ran = sorted(p.name for p in markers.iterdir())
    assert ran == [], f"planted code ran on the host: {ran}"


@pytest.fixture
def planted(tmp_path, monkeypatch):
    root, markers = tmp_path / "project", tmp_path / "markers"
    root.mkdir()
    markers.mkdir()
    return root, markers


# ------------------------------------------------------------------- QEMU, from a real guest


@pytest.mark.vm
async def test_code_a_guest_plants_in_the_servers_folder_never_runs_on_the_host(
    jupyter_prefix, planted, monkeypatch
):
    root, markers = planted
    spec = install_spec(jupyter_prefix, "smolvm-hostcode", "--backend", "qemu", "--network",
                        "--share-cwd", "rw", "--memory-mib", "512")  # fmt: skip
    # (A PATH entry in the folder would make its rw share refused outright: tested below.)
    hostile_environment(monkeypatch, root, path_entry=False)
    km, kc = await start_kernel(spec, cwd=str(root))
    try:
        # The guest sees the server's folder at its working folder; it plants there.
        r = await run_cell(kc, "import os; print(os.getcwd())")
        guest_root = r.stdout.strip()
        r = await run_cell(kc, plant_code(Path(guest_root), markers, shadow_stdlib=False))
        assert r.status == "ok" and r.stdout.startswith("planted"), (r.stdout, r.evalue)
        assert (root / "smol_kernel" / "__init__.py").exists(), "the plant did not reach the host"
        # Through 9p's mapped-xattr model the guest's symlink is a regular file on the host
        # and its executables are not executable there (0600): less reaches the host than
        # the guest meant. (Links and executables planted on the host: `planted`, below.)
        assert (root / "pp2" / "smol_kernel").is_file()
        assert not (root / "pp2" / "smol_kernel").is_symlink()
        assert (root / "bin" / "passt").stat().st_mode & 0o777 == 0o600
        # A restart starts a new VM: network guard, passt, vhost-device-vsock, QEMU, mke2fs.
        await km.restart_kernel(now=True)
        kc.stop_channels()
        kc = km.client()
        kc.start_channels()
        await kc.wait_for_ready(timeout=120)
        r = await run_cell(kc, "print('after restart')")
        assert r.stdout.strip() == "after restart"
        assert km.provisioner.vm.runtime_dir.exists()
    finally:
        await stop_kernel(km, kc)
    assert_nothing_ran(markers)


# ------------------------------------------------------- libkrun's spawn paths, with a stub


@pytest.fixture
def krun_stub(tmp_path_factory) -> str:
    from .. import test_krun

    cc = subprocess.run(["sh", "-c", "command -v cc || command -v gcc"],
                        capture_output=True, text=True).stdout.strip()  # fmt: skip
    if not cc:
        pytest.skip("no C compiler to build the libkrun stand-in (apt-get install gcc)")
    out = tmp_path_factory.mktemp("krun-stub") / "libkrun.so.1"
    subprocess.run([cc, "-shared", "-fPIC", "-o", str(out), str(test_krun.STUB_SRC)], check=True)
    return str(out)


def leaky_helper_env(monkeypatch, module, hostile: dict[str, str], log: Path) -> None:
    """Make the helpers' environment as hostile as the server's, plus the stub's call log,
    so the test also shows that ``python -I`` ignores what might leak in."""
    real = trusted.helper_env

    def env() -> dict[str, str]:
        return {**real(), **hostile, "KRUN_STUB_LOG": str(log)}

    monkeypatch.setattr(module, "helper_env", env)


async def test_libkrun_launcher_and_network_guard_ignore_planted_code(
    krun_stub, image, planted, monkeypatch, tmp_path
):
    from smol_kernel.vm import krun as krun_mod
    from smol_kernel.vm.base import VmError
    from smol_kernel.vm.network import find_passt

    root, markers = planted
    exec(plant_code(root, markers), {})
    hostile = hostile_environment(monkeypatch, root)
    log = tmp_path / "calls.jsonl"
    leaky_helper_env(monkeypatch, vm_process, hostile, log)
    backend = krun_mod.KrunBackend(libkrun=krun_stub)
    monkeypatch.setattr(krun_mod.KrunBackend, "_probe", lambda self, img: (True, "stub"))
    monkeypatch.setattr(krun_mod, "kvm_device_problem", lambda: None)
    network = find_passt() is not None
    # The stand-in's krun_start_enter exits at once: the start fails, or the VM ends soon.
    try:
        vm = await backend.start(VmSpec(image=image.name, network=network, memory_mib=256))
    except VmError:
        pass
    else:
        assert await vm.wait(timeout=30) == 0
        await vm.close()
        assert not vm.runtime_dir.exists()
    calls = [json.loads(line)["fn"] for line in log.read_text().splitlines()]
    assert "krun_start_enter" in calls, "the launcher did not run: nothing was tested"
    assert_nothing_ran(markers)


def test_libkrun_boot_probe_ignores_planted_code(krun_stub, image, planted, monkeypatch,
                                                 tmp_path):  # fmt: skip
    from smol_kernel.vm import krun as krun_mod

    root, markers = planted
    exec(plant_code(root, markers), {})
    hostile = hostile_environment(monkeypatch, root)
    log = tmp_path / "calls.jsonl"
    leaky_helper_env(monkeypatch, krun_mod, hostile, log)
    ok, why = krun_mod.KrunBackend(libkrun=krun_stub)._boot_probe(image)
    assert not ok  # the stand-in boots nothing
    calls = [json.loads(line)["fn"] for line in log.read_text().splitlines()]
    assert "krun_start_enter" in calls, f"the probe's launcher did not run: {why}"
    assert_nothing_ran(markers)


def test_the_plants_would_run_under_a_plain_python_m(planted, monkeypatch):
    """Control: the same plants and environment do run code under the spawn we had before
    (``python -m`` in the server's folder), so the tests above can fail."""
    root, markers = planted
    exec(plant_code(root, markers), {})
    hostile_environment(monkeypatch, root)
    subprocess.run([sys.executable, "-m", "smol_kernel.egress.netfilter"], capture_output=True,
                   timeout=60)  # fmt: skip
    assert "package" in {p.name for p in markers.iterdir()}
    for p in markers.iterdir():
        p.unlink()
    subprocess.run(["sh", "-c", "passt --version"], capture_output=True, timeout=60)
    assert (markers / "exe-passt").exists(), "a relative PATH entry finds the planted passt"


def test_helpers_find_programs_only_on_absolute_path_entries(planted, monkeypatch):
    root, _ = planted
    exec(plant_code(root, planted[1]), {})
    hostile_environment(monkeypatch, root)
    assert "bin" not in trusted.trusted_path().split(os.pathsep)
    found = trusted.find_program("passt")
    assert found is None or not Path(found).resolve().is_relative_to(root.resolve())
    monkeypatch.setenv("SMOL_KERNEL_PASST", "bin/passt")
    assert trusted.find_program("passt", "SMOL_KERNEL_PASST") is None, "relative override"


# ------------------------------------------------------------ shares that would allow it


@pytest.mark.parametrize("which", ["smol_kernel", "purelib", "user-site", "usr-bin"])
def test_rw_share_of_a_folder_host_code_comes_from_is_refused(which, tmp_path):
    import site
    import sysconfig

    folder = {
        "smol_kernel": trusted.import_root("smol_kernel"),
        "purelib": sysconfig.get_path("purelib"),
        "user-site": site.getusersitepackages(),
        "usr-bin": "/usr/bin",
    }[which]
    Path(folder).mkdir(parents=True, exist_ok=True)
    with pytest.raises(ShareError, match="could run code on the host") as e:
        parse_share(f"{folder}:/x:rw")
    assert "read-only" in str(e.value), "the error says what to do instead"
    # A folder that contains it is refused too (e.g. the home folder holding ~/.local).
    with pytest.raises(ShareError):
        parse_share(f"{Path(folder).parent}:/x:rw")


@pytest.mark.parametrize("which", ["jupyter-config", "jupyter-data", "jupyter-runtime",
                                   "runtime"])  # fmt: skip
def test_any_share_of_a_folder_of_secrets_is_refused(which):
    from jupyter_core import paths as jpaths

    from smol_kernel import paths

    folder = {
        "jupyter-config": jpaths.jupyter_config_dir(),
        "jupyter-data": jpaths.jupyter_data_dir(),
        "jupyter-runtime": jpaths.jupyter_runtime_dir(),
        "runtime": str(paths.runtime_dir()),
    }[which]
    Path(folder).mkdir(parents=True, exist_ok=True)
    for mode in ("ro", "rw"):
        with pytest.raises(ShareError, match="a guest must not see it"):
            parse_share(f"{folder}:/x:{mode}")


def test_ro_share_of_code_is_fine_but_not_of_the_runtime_dir():
    from smol_kernel import paths

    share = parse_share(f"{trusted.import_root('smol_kernel')}:/src:ro")
    assert share.read_only
    runtime = paths.runtime_dir()
    runtime.mkdir(parents=True, exist_ok=True)
    with pytest.raises(ShareError, match="must not see it"):
        parse_share(f"{runtime}:/x:ro")


def test_rw_share_of_a_data_folder_is_fine(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    assert not parse_share(f"{data}:/data:rw").read_only


def test_install_refuses_such_a_share(jupyter_prefix, capsys):
    from smol_kernel.cli import main

    share = f"{trusted.import_root('smol_kernel')}:/src:rw"
    rc = main(["install", "--prefix", str(jupyter_prefix), "--name", "smolvm-refused",
               "--share", share])  # fmt: skip
    assert rc != 0
    assert "could run code on the host" in capsys.readouterr().err
    assert not (jupyter_prefix / "share" / "jupyter" / "kernels" / "smolvm-refused").exists()


@pytest.mark.vm
async def test_a_kernel_with_a_refused_share_does_not_boot(jupyter_prefix, smolvm_spec, tmp_path):
    """The check also runs at start (a kernelspec written by hand, or a folder made later)."""
    from jupyter_client.manager import AsyncKernelManager

    from ..conftest import runtime_entries

    kernels = jupyter_prefix / "share" / "jupyter" / "kernels"
    src, dst = kernels / smolvm_spec, kernels / "smolvm-badshare"
    spec = json.loads((src / "kernel.json").read_text())
    spec["metadata"]["kernel_provisioner"]["config"]["shares"] = [
        f"{trusted.import_root('smol_kernel')}:/src:rw"
    ]
    dst.mkdir(exist_ok=True)
    (dst / "kernel.json").write_text(json.dumps(spec))
    before = runtime_entries()
    km = AsyncKernelManager(kernel_name="smolvm-badshare")
    with pytest.raises(Exception) as err:
        await km.start_kernel(cwd=str(tmp_path))
    assert "could run code on the host" in " ".join(str(err.value).split())  # (wrapped)
    assert runtime_entries() == before, "no VM was started"


# ------------------------------------------------- what the server runs from its own PATH

FAKE_TOOLS = ("gcc", "cc", "ld", "objdump", "ldconfig", "mke2fs")


def plant_tools(folder: Path, markers: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for tool in FAKE_TOOLS:
        path = folder / tool
        path.write_text(f"#!/bin/sh\necho ran > {markers}/tool-{tool}\nexit 1\n")
        path.chmod(0o755)


def test_backend_selection_runs_nothing_from_path_or_the_working_folder(planted, monkeypatch):
    """With backend auto, a kernel start looks for libkrun. cffi asked ctypes.util for a
    library it could not open by name, which runs gcc, cc, ld and objdump from the server's
    PATH (relative entries included) in its working folder: a guest with a rw share of that
    folder chose the program. Now libkrun is only opened by absolute path."""
    import ctypes.util

    from smol_kernel.vm import krun_binding
    from smol_kernel.vm.select import select_backend

    root, markers = planted
    plant_tools(root / "bin", markers)
    plant_tools(root / "abs-bin", markers)
    monkeypatch.chdir(root)
    monkeypatch.setenv("PATH", f"bin:{root / 'abs-bin'}:{os.environ['PATH']}")
    monkeypatch.delenv("SMOL_KERNEL_LIBKRUN", raising=False)
    monkeypatch.setattr(krun_binding, "find_library", lambda name: None)  # as if absent
    krun_binding._load_failures.clear()
    selection = select_backend("auto")
    assert "libkrun" in " ".join(selection.steps)  # it was looked for
    assert_nothing_ran(markers)
    # The positive control: the lookup cffi fell back to does run the planted compiler.
    ctypes.util.find_library("krun-that-does-not-exist")
    assert {p.name for p in markers.iterdir()} & {"tool-gcc", "tool-cc", "tool-ld"}


@pytest.mark.vm
async def test_a_rw_share_holding_a_path_entry_is_refused_before_any_vm(jupyter_prefix, planted,
                                                                       monkeypatch):  # fmt: skip
    """direnv's ``PATH_add bin`` or ``node_modules/.bin``: an absolute PATH entry inside the
    notebook folder. Shared rw, a cell could plant ``bin/mke2fs`` (or passt, or QEMU) and the
    next VM start would run it. Such a share is refused."""
    from jupyter_client.manager import AsyncKernelManager

    from ..conftest import runtime_entries

    root, markers = planted
    plant_tools(root / "bin", markers)
    monkeypatch.setenv("PATH", f"{root / 'bin'}:{os.environ['PATH']}")
    spec = install_spec(jupyter_prefix, "smolvm-pathshare", "--backend", "qemu",
                        "--share-cwd", "rw", "--memory-mib", "512")  # fmt: skip
    before = runtime_entries()
    km = AsyncKernelManager(kernel_name=spec)
    with pytest.raises(Exception) as err:
        await km.start_kernel(cwd=str(root))
    assert "a folder on PATH" in " ".join(str(err.value).split())
    assert runtime_entries() == before, "no VM was started"
    assert_nothing_ran(markers)
    # The positive control: a program started by name with this PATH is the planted one.
    subprocess.run(["sh", "-c", "mke2fs -V"], capture_output=True, timeout=30)
    assert (markers / "tool-mke2fs").exists()


def _server(prefix: Path, root: Path, env: dict, log: Path):
    from ..web_helpers import free_port

    port = free_port()
    argv = [sys.executable, "-m", "jupyter_server", "--no-browser", "--allow-root",
            "--ServerApp.ip=127.0.0.1", f"--ServerApp.port={port}",
            "--IdentityProvider.token=t", f"--ServerApp.root_dir={root}"]  # fmt: skip
    with open(log, "wb") as f:
        proc = subprocess.Popen(argv, cwd=root, env=env, stdout=f, stderr=subprocess.STDOUT)
    return proc, f"http://127.0.0.1:{port}"


def _host_kernel_imports_from(root: Path, prefix: Path, markers: Path, extension: bool) -> bool:
    """Start a server (with or without our extension) in ``root``, where a guest planted
    ``ipykernel_launcher.py``; start a plain host python3 kernel there; did the plant run?"""
    import time

    import requests

    from ..web_helpers import wait_until_up

    config = prefix / ("with" if extension else "without")
    (config / "jupyter_server_config.d").mkdir(parents=True, exist_ok=True)
    (config / "jupyter_server_config.d" / "smol_kernel.json").write_text(json.dumps(
        {"ServerApp": {"jpserver_extensions": {"smol_kernel": extension}}}))  # fmt: skip
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
    env["JUPYTER_CONFIG_PATH"] = str(config)
    proc, base = _server(prefix, root, env, config / "server.log")
    try:
        wait_until_up(lambda: requests.get(f"{base}/api/status?token=t").ok, proc,
                      config / "server.log")  # fmt: skip
        r = requests.post(f"{base}/api/kernels?token=t", json={"name": "python3", "path": ""})
        assert r.status_code == 201, r.text
        deadline = time.monotonic() + 30
        while not (markers / "module-ipykernel_launcher").exists():
            if time.monotonic() > deadline:
                return False
            time.sleep(0.5)
        return True
    finally:
        proc.terminate()
        proc.wait(30)


def test_host_kernels_the_server_starts_do_not_import_from_a_shared_folder(planted, tmp_path):
    """With share_cwd=rw a guest can write an ``ipykernel_launcher.py`` into the notebook
    folder; a plain host kernel later started there (``python -m ipykernel_launcher``) would
    import it. Our server extension sets PYTHONSAFEPATH=1 for what the server starts."""
    root, markers = planted
    (root / "ipykernel_launcher.py").write_text(
        f"import pathlib; pathlib.Path({str(markers)!r}, 'module-ipykernel_launcher')"
        ".write_text('ran')\n")  # fmt: skip
    assert not _host_kernel_imports_from(root, tmp_path / "cfg", markers, extension=True)
    # The positive control: the same server without the extension imports the plant.
    assert _host_kernel_imports_from(root, tmp_path / "cfg", markers, extension=False)
