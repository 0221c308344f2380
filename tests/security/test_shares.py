"""Host folder shares, attacked from a real kernel: a read-only share stays read-only even
for root in the guest (remount included), and no symlink -- planted on the host or made in
the guest -- reaches a host file outside the shared folder."""

from __future__ import annotations

import os
import stat

import pytest

from ..conftest import install_spec
from ..kernel_helpers import run_cell, start_kernel, stop_kernel

pytestmark = pytest.mark.vm
SECRET = "outside-secret-" + "9157"  # split so this file's text in a cell cannot match


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("shares")
    ro, rw, notebook, outside = (root / n for n in ("ro", "rw", "notebook", "outside"))
    for d in (ro, rw, notebook, outside):
        d.mkdir()
    (outside / "secret.txt").write_text(SECRET)
    (ro / "data.csv").write_text("a,b\n1,2\n")
    (ro / "rel-link").symlink_to("../outside/secret.txt")
    (ro / "abs-link").symlink_to(outside / "secret.txt")
    (ro / "dir-link").symlink_to(outside)
    (notebook / "analysis.ipynb").write_text("{}")
    return {"ro": ro, "rw": rw, "notebook": notebook, "outside": outside}


@pytest.fixture(scope="module")
async def shared_kernel(jupyter_prefix, folders):
    spec = install_spec(
        jupyter_prefix, "smolvm-shares", "--backend", "qemu", "--memory-mib", "512",  # 9p
        "--share", f"{folders['ro']}:/data", "--share", f"{folders['rw']}:/out:rw",
        "--share-cwd", "ro",
    )  # fmt: skip
    km, kc = await start_kernel(spec, cwd=str(folders["notebook"]))
    yield km, kc
    await stop_kernel(km, kc)


def snapshot(path) -> dict:
    return {
        str(p.relative_to(path)): (p.is_symlink(), p.read_bytes() if p.is_file() else None)
        for p in sorted(path.rglob("*"))
    }


async def test_shares_are_mounted_where_asked_and_cwd_is_the_notebook_folder(shared_kernel,
                                                                             folders):  # fmt: skip
    _, kc = shared_kernel
    r = await run_cell(kc, """
import os
print(os.getcwd(), sorted(os.listdir('.')))
print(open('/data/data.csv').read().splitlines())
mounts = {l.split()[1]: l.split()[3].split(',')[0] for l in open('/proc/mounts') if ' 9p ' in l}
print(sorted(mounts.items()))
""")  # fmt: skip
    lines = r.stdout.splitlines()
    assert lines[0] == "/work ['analysis.ipynb']"
    # The server can map the kernel's paths inside shares back to host files.
    prov = shared_kernel[0].provisioner
    assert prov.resolve_path("analysis.ipynb") == str(folders["notebook"] / "analysis.ipynb")
    assert prov.resolve_path("/data/data.csv") == str(folders["ro"] / "data.csv")
    assert prov.resolve_path("/etc/passwd") is None and prov.resolve_path("/data/nope") is None
    assert prov.resolve_path("/data/abs-link") is None, "a link out of the share maps nowhere"
    assert lines[1] == "['a,b', '1,2']"
    assert lines[2] == "[('/data', 'ro'), ('/out', 'rw'), ('/work', 'ro')]"


async def test_read_only_share_resists_root_in_the_guest(shared_kernel, folders):
    _, kc = shared_kernel
    before = snapshot(folders["ro"])
    r = await run_cell(kc, """
import os, subprocess
attempts = {
    'write': lambda: open('/data/data.csv', 'a').write('x'),
    'create': lambda: open('/data/new.txt', 'w').write('x'),
    'unlink': lambda: os.unlink('/data/data.csv'),
    'rename': lambda: os.rename('/data/data.csv', '/data/moved.csv'),
    'chmod': lambda: os.chmod('/data/data.csv', 0o777),
    'mkdir': lambda: os.mkdir('/data/newdir'),
    'symlink': lambda: os.symlink('/', '/data/root-link'),
}
def run_all(tag):
    for name, attempt in attempts.items():
        try:
            attempt(); print(tag, name, 'SUCCEEDED')
        except OSError as e:
            print(tag, name, 'refused', e.errno)
run_all('mounted-ro')
# Root can remount the guest's view read-write; the host side must still refuse.
rc = subprocess.run(['mount', '-o', 'remount,rw', '/data'], capture_output=True).returncode
mode = next(l.split()[3].split(',')[0] for l in open('/proc/mounts') if l.split()[1] == '/data')
print('remount', rc, mode)
run_all('remounted')
""")  # fmt: skip
    assert r.status == "ok", (r.ename, r.evalue)
    # The second round must meet the host's readonly=on, not the guest's own ro mount.
    assert "remount 0 rw" in r.stdout, r.stdout
    assert "SUCCEEDED" not in r.stdout, r.stdout
    assert r.stdout.count("refused") == 14, r.stdout
    assert snapshot(folders["ro"]) == before, "the read-only folder changed on the host"


async def test_symlinks_never_reach_host_files_outside_the_share(shared_kernel, folders):
    _, kc = shared_kernel
    r = await run_cell(kc, f"""
import os, subprocess
for link in ('/data/rel-link', '/data/abs-link', '/data/dir-link/secret.txt'):
    try:
        print(link, repr(open(link).read()[:40]))
    except OSError as e:
        print(link, 'error', e.errno)
# Links made in the guest, in the writable share, pointing at the host paths.
os.symlink({str(folders['outside'] / 'secret.txt')!r}, '/out/abs-made')
os.symlink('../outside/secret.txt', '/out/rel-made')
os.symlink('/', '/out/root-made')
for link in ('/out/abs-made', '/out/rel-made'):
    try:
        print(link, repr(open(link).read()[:40]))
    except OSError as e:
        print(link, 'error', e.errno)
print('dotdot', sorted(os.listdir('/data/..'))[:3])
needle = 'outside-secret-' + '9157'
found = subprocess.run(['grep', '-rls', needle, '/data/', '/out/', '/work/', '/out/root-made/tmp'],
                       capture_output=True, text=True).stdout
print('found', repr(found))
""")  # fmt: skip
    assert r.status == "ok", (r.ename, r.evalue)
    assert SECRET not in r.stdout.replace("found ''", ""), r.stdout
    assert "found ''" in r.stdout
    # The guest's links are not even symlinks on the host: with 9p's mapped-xattr model a
    # link made in the guest is a regular file holding its target.
    made = folders["rw"] / "root-made"
    assert not made.is_symlink() and made.read_text() == "/"
    assert (folders["outside"] / "secret.txt").read_text() == SECRET


async def test_writable_share_round_trips_both_ways(shared_kernel, folders):
    _, kc = shared_kernel
    (folders["rw"] / "from-host.txt").write_text("written on the host")
    r = await run_cell(kc, """
print(open('/out/from-host.txt').read())
with open('/out/from-guest.txt', 'w') as f:
    f.write('written in the guest')
""")  # fmt: skip
    assert r.stdout.strip() == "written on the host"
    assert (folders["rw"] / "from-guest.txt").read_text() == "written in the guest"
    # The notebook folder was shared read-only: the guest could not write next to it.
    r = await run_cell(kc, "open('/work/out.txt', 'w')")
    assert r.ename == "OSError" and "Read-only" in r.evalue
    assert sorted(p.name for p in folders["notebook"].iterdir()) == ["analysis.ipynb"]


async def test_modes_the_guest_sets_never_reach_host_files(shared_kernel, folders):
    """Issue 30: with 9p's ``security_model=none`` a file the guest made setuid in a rw
    share was setuid on the host (owned by the Jupyter server's user), and a folder it made
    0777 was world-writable there. The guest still sees the modes it set (the probe ran);
    the host files keep 0600/0700 and the host's own files keep their modes."""
    _, kc = shared_kernel
    (folders["rw"] / "host-file").write_text("x")
    os.chmod(folders["rw"] / "host-file", 0o640)
    r = await run_cell(kc, """
import os, shutil, stat
shutil.copy('/bin/true', '/out/suid')
os.chmod('/out/suid', 0o6755)
os.mkdir('/out/open-dir'); os.chmod('/out/open-dir', 0o777)
open('/out/open-dir/f', 'w').close(); os.chmod('/out/open-dir/f', 0o666)
os.chmod('/out/host-file', 0o4777)
print(*(oct(stat.S_IMODE(os.stat(p).st_mode)) for p in
        ('/out/suid', '/out/open-dir', '/out/open-dir/f', '/out/host-file')))
""")  # fmt: skip
    assert r.stdout.split() == ["0o6755", "0o777", "0o666", "0o4777"], (r.stdout, r.stderr)
    modes = {name: stat.S_IMODE(os.stat(folders["rw"] / name).st_mode)
             for name in ("suid", "open-dir", "open-dir/f", "host-file")}  # fmt: skip
    assert modes == {"suid": 0o600, "open-dir": 0o700, "open-dir/f": 0o600,
                     "host-file": 0o640}, {k: oct(v) for k, v in modes.items()}  # fmt: skip


async def test_a_guest_cannot_redirect_a_share_with_a_symlink(jupyter_prefix, tmp_path):
    """One kernel shares a project folder rw; another shares its ``data`` subfolder ro.
    The first replaces ``data`` by a symlink to ``..``: the second's next start would have
    shared the parent (the user's home, here a secret beside the project). A link the guest
    makes is a regular file on the host (9p mapped-xattr), which the next start refuses (a
    symlink planted on the host is refused as well: tests/test_share.py). (Both shares in
    one kernel -- share_cwd rw plus a relative share inside it -- are refused up front as
    nested: tests/test_share.py.)"""
    project = tmp_path / "project"
    (project / "data").mkdir(parents=True)
    (project / "data" / "x.txt").write_text("the data")
    (tmp_path / "beside.txt").write_text(SECRET)
    attacker = install_spec(jupyter_prefix, "smolvm-redirect-rw", "--backend", "qemu",
                            "--memory-mib", "512", "--share", f"{project}:/proj:rw")  # fmt: skip
    victim = install_spec(jupyter_prefix, "smolvm-redirect-ro", "--backend", "qemu",
                          "--memory-mib", "512", "--share", f"{project}/data:/data:ro")  # fmt: skip
    km, kc = await start_kernel(victim)
    try:
        r = await run_cell(kc, "import os; print(sorted(os.listdir('/data')))")
        assert r.stdout.strip() == "['x.txt']"  # the positive control: the real share
        km_a, kc_a = await start_kernel(attacker)
        try:
            r = await run_cell(kc_a, "import os, shutil\nshutil.rmtree('/proj/data')\n"
                               "os.symlink('..', '/proj/data')\nprint('planted')")  # fmt: skip
            assert r.stdout.strip() == "planted"
        finally:
            await stop_kernel(km_a, kc_a)
        assert not (project / "data").is_symlink() and (project / "data").is_file()
        kc.stop_channels()
        with pytest.raises(Exception, match="data is not a folder"):
            await km.restart_kernel(now=True)
    finally:
        kc.stop_channels()
        if km.has_kernel:
            await km.shutdown_kernel(now=True)
