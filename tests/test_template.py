"""Snapshot clones: kernels start as copy-on-write clones of a template VM saved once per
configuration. Each clone must be fresh (entropy, clocks, ids, files, processes), the
template's RAM file must never change under its clones, and a template must be rebuilt
when anything it was built from changes."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
from dataclasses import replace

import pytest

from smol_kernel import template as tpl
from smol_kernel.kernel_vm import KernelPlan
from smol_kernel.vm.qemu import QemuBackend

from .conftest import install_spec
from .kernel_helpers import ram_digest, run_cell, start_kernel, stop_kernel


def plan(**changes) -> KernelPlan:
    base = KernelPlan(
        backend="qemu", image="default", vcpus=1, memory_mib=640, disk_mib=1024,
        network=False, dns=(), shares=(), argv=("python3", "-m", "ipykernel_launcher", "-f",
        "{connection_file}"), env=(("SMOL_KERNEL_ISOLATION", "tcg"),), cwd="/root",
        max_processes=1024, debugger=False,
    )  # fmt: skip
    return replace(base, **changes)


def test_a_template_is_keyed_on_everything_a_clone_depends_on(image, tmp_path, monkeypatch):
    backend = QemuBackend()
    key = tpl.template_key(plan(), backend, "tcg")
    assert key == tpl.template_key(plan(), backend, "tcg"), "stable"
    for change in ({"memory_mib": 768}, {"vcpus": 2}, {"network": True}, {"disk_mib": 2048},
                   {"env": (("SMOL_KERNEL_ISOLATION", "tcg"), ("X", "1"))}, {"cwd": "/tmp"},
                   {"max_processes": 10}, {"debugger": True}, {"argv": ("python3", "-m",
                   "ipykernel_launcher", "-f", "{connection_file}", "--x")}):  # fmt: skip
        assert tpl.template_key(plan(**change), backend, "tcg") != key, change
    assert tpl.template_key(plan(), backend, "kvm") != key
    # The allow-list lives in the clone's own network guard: one template serves every list.
    net = tpl.template_key(plan(network=True), backend, "tcg")
    assert tpl.template_key(plan(network=True, allow_hosts=("pypi.org",)), backend, "tcg") == net
    assert tpl.template_key(plan(), QemuBackend(tb_size_mib=128), "tcg") != key
    # The image: a rebuilt one (other file digests) is another template.
    from smol_kernel.image import store

    real = store.GuestImage.load

    def changed(name, root=None):
        img = real(name, root)
        files = {**img.manifest["files"], "root.ext4": {"size": 1, "sha256": "0" * 64}}
        return store.GuestImage(img.name, img.path, {**img.manifest, "files": files})

    monkeypatch.setattr(store.GuestImage, "load", staticmethod(changed))
    assert tpl.template_key(plan(), backend, "tcg") != key


def test_what_cannot_be_cloned_says_why(image, tmp_path):
    from smol_kernel.vm.share import parse_share

    backend = QemuBackend()
    assert tpl.why_not_cloneable(plan(), backend) is None
    assert "ipykernel_launcher" in tpl.why_not_cloneable(plan(argv=("R", "--vanilla")), backend)
    share = parse_share(f"{tmp_path}:/work:rw")
    assert "starts in a share" in tpl.why_not_cloneable(plan(shares=(share,), cwd="/work"),
                                                        backend)  # fmt: skip
    assert tpl.why_not_cloneable(plan(shares=(share,), cwd="/root"), backend) is None


# ------------------------------------------------------------------ against real clones
# Run when the template's kernel starts (before it is prepared and saved): generators a
# module makes at import, which every clone would share unless each is reseeded.
MADE_AT_PREPARE = ("import random, tempfile, numpy; made_random = random.Random(); "
                   "made_rng = numpy.random.default_rng(); made_state = numpy.random."
                   "RandomState(); tempfile.mktemp()")  # fmt: skip
# Every generator the interpreter holds, by address (a clone's objects made before the save
# sit where the template's did), with a draw from a copy of it.
GENERATORS = """
import copy, gc, random, numpy
kinds = (random.Random, numpy.random.RandomState, numpy.random.Generator)
found = {str(id(o)): float(copy.deepcopy(o).random()) for o in gc.get_objects()
         if isinstance(o, kinds) and not isinstance(o, random.SystemRandom)}
"""
FRESHNESS = (
    GENERATORS
    + """
import os, uuid, random, time, numpy, ssl, tempfile
print(json.dumps({"urandom": os.urandom(16).hex(), "uuid": str(uuid.uuid4()),
                  "random": random.random(), "numpy": float(numpy.random.random()),
                  "rng": float(numpy.random.default_rng().random()),
                  "made_random": made_random.random(), "made_rng": made_rng.random(),
                  "made_state": made_state.random(), "tempname": tempfile.mktemp(),
                  "ssl": ssl.RAND_bytes(16).hex(), "generators": found,
                  "ids": [str(id(o)) for o in (made_random, made_rng, made_state)],
                  "session": get_ipython().kernel.session.session, "time": time.time(),
                  "files": sorted(os.listdir("/root")), "sleepers": sum(
                      1 for p in os.listdir("/proc") if p.isdigit() and
                      open(f"/proc/{p}/cmdline", "rb").read() == b"sleep\\x004242\\x00"),
                  "leftover": globals().get("leftover")}))
"""
)


@pytest.mark.vm
async def test_clones_are_fresh_and_the_template_never_changes(jupyter_prefix):
    from smol_kernel.image.store import GuestImage, ImageNotFound

    try:
        GuestImage.load("scipy")
    except ImageNotFound:
        pytest.fail("the scipy image is not built: smol-kernel image build --preset scipy")
    spec = install_spec(jupyter_prefix, "smolvm-clones", "--image", "scipy",
                        "--memory-mib", "768")  # fmt: skip
    spec_file = jupyter_prefix / "share" / "jupyter" / "kernels" / spec / "kernel.json"
    kernel_json = json.loads(spec_file.read_text())
    kernel_json["argv"].append(f"--IPKernelApp.exec_lines={MADE_AT_PREPARE}")
    spec_file.write_text(json.dumps(kernel_json))
    t0 = time.monotonic()
    km, kc = await start_kernel(spec)
    first_start = time.monotonic() - t0
    try:
        assert km.provisioner.start_kind == "clone"
        template = tpl.find(km.provisioner.plan, QemuBackend())
        assert template is not None
        before = ram_digest(template.folder)
        seen = []
        for i in range(2):
            r = await run_cell(kc, "import json\n" + FRESHNESS)
            seen.append(json.loads(r.stdout))
            # Leave traces a restart must not carry over: a file, a process, a variable;
            # and allocate and free memory (a discard reaching the template would zero it).
            r = await run_cell(kc, "import subprocess\nopen('/root/trace.txt', 'w').write('x')\n"
                               "subprocess.Popen(['sleep', '4242'])\nleftover = 1\n"
                               "big = bytearray(200 << 20); big[::4096] = b'x' * (len(big) "
                               "// 4096); del big")  # fmt: skip
            assert r.status == "ok", r.evalue
            if i == 0:
                t1 = time.monotonic()
                await km.restart_kernel(now=True)
                restart = time.monotonic() - t1
                kc.stop_channels()
                kc = km.client()
                kc.start_channels()
                await kc.wait_for_ready(timeout=60)
                assert km.provisioner.start_kind == "clone"
        a, b = seen
        for field in ("urandom", "uuid", "random", "numpy", "rng", "session", "made_random",
                      "made_rng", "made_state", "tempname", "ssl"):  # fmt: skip
            assert a[field] != b[field], f"two clones share {field}: {a[field]}"
        # Freshness is a property of every generator, not of a list: each one both clones
        # hold (made before the save) draws differently. The probe finds the generators
        # made at prepare time in both clones at one address (its control).
        common = a["generators"].keys() & b["generators"].keys()
        assert set(a["ids"]) == set(b["ids"]) and set(a["ids"]) <= common, (a["ids"], b["ids"])
        same = [i for i in common if a["generators"][i] == b["generators"][i]]
        assert same == [], f"{len(same)} of {len(common)} generators are shared by two clones"
        for s in seen:
            assert "trace.txt" not in s["files"] and s["sleepers"] == 0
            assert s["leftover"] is None
        assert abs(b["time"] - time.time()) < 5, "the clone's clock is the host's"
        after = ram_digest(template.folder)
        assert after == before, "the template's RAM file changed under its clones"
        print(f"first start (template build) {first_start:.1f}s, restart {restart:.2f}s")
        assert restart < first_start / 3, (restart, first_start)
    finally:
        await stop_kernel(km, kc)


@pytest.mark.vm
async def test_templates_command_lists_and_removes(jupyter_prefix, capsys):
    from smol_kernel.cli import main

    assert main(["templates", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert rows, "the kernels above built templates"
    assert all(r["disk_bytes"] > 0 and os.path.isdir(r["folder"]) for r in rows)
    key = rows[0]["key"]
    assert main(["templates", "--rm", key[:10]]) == 0
    assert key not in {t.key for t in tpl.list_templates()}
    assert main(["templates", "--rm", "nothing-like-this"]) == 1
    await asyncio.sleep(0)


def fake_template(key: str, mib: int, idle_s: float, image_files: object) -> str:
    """A template folder as a build leaves it, with ``mib`` of RAM written, last used
    ``idle_s`` ago."""
    folder = tpl.templates_dir() / key
    folder.mkdir(mode=0o700)
    (folder / "ram").write_bytes(os.urandom(mib << 20))
    (folder / "state").write_bytes(b"s")
    (folder / "overlay.ext4").write_bytes(b"o")
    meta = {"key": key, "image": "default", "image_files": image_files, "memory_mib": 640}
    (folder / "template.json").write_text(json.dumps(meta))
    os.utime(folder / "template.json", (time.time() - idle_s,) * 2)
    return key


@pytest.fixture
def own_templates(image, tmp_path, monkeypatch):
    """An empty template store and runtime folder of this test's own."""
    monkeypatch.setenv("SMOL_KERNEL_TEMPLATES_DIR", str(tmp_path / "templates"))
    monkeypatch.setenv("SMOL_KERNEL_RUNTIME_DIR", str(tmp_path / "run"))
    return tpl._image_files("default")


def mapping_vm(ram) -> subprocess.Popen:
    """A process recorded as a running VM (as ``smol-kernel ps`` finds one) that maps
    ``ram`` privately, as a clone maps its template."""
    from smol_kernel.vm.process import RuntimeDir, owner_state, proc_start_time

    code = ("import mmap, sys\nf = open(sys.argv[1], 'rb')\n"
            "m = mmap.mmap(f.fileno(), 0, prot=mmap.PROT_READ)\nprint('mapped', flush=True)\n"
            "sys.stdin.read()")  # fmt: skip
    proc = subprocess.Popen([sys.executable, "-c", code, str(ram)], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True)  # fmt: skip
    assert proc.stdout.readline().strip() == "mapped"
    rt = RuntimeDir.create()
    rt.write_state({**owner_state(), "id": rt.id, "pids": {"vmm": proc.pid},
                    "starts": {"vmm": proc_start_time(proc.pid)}})  # fmt: skip
    return proc


def test_templates_beyond_the_disk_cap_go_least_recently_used_first(own_templates):
    """Issue 32: templates had no bound on disk. The least recently used go first until
    the rest fit, never one a running VM maps, one used in the last ten minutes, or the
    one just built."""
    day = 86400
    mapped = fake_template("a-mapped", 3, 9 * day, own_templates)
    old = fake_template("b-old", 3, 8 * day, own_templates)
    older = fake_template("c-older", 3, 8.5 * day, own_templates)
    fresh = fake_template("d-recent", 3, 60, own_templates)
    built = fake_template("e-built", 3, 10 * day, own_templates)
    vm = mapping_vm(tpl.templates_dir() / mapped / "ram")
    try:
        assert tpl.in_use() == {mapped}
        bounds = tpl.TemplateBounds(max_template_disk_mib=10, template_max_idle_days=14)
        assert tpl.tidy(bounds, keep=built) == [older, old]
    finally:
        vm.kill()
        vm.wait()
    left = {t.key for t in tpl.list_templates()}
    assert left == {mapped, fresh, built}
    # Control: with nothing mapping it, the oldest goes next.
    assert tpl.tidy(tpl.TemplateBounds(6, 14), keep=built) == [mapped]


def test_stale_templates_go_on_their_own(own_templates):
    """Unused for template_max_idle_days, or of an image that was rebuilt or removed: gone
    at the next tidy (each build runs one), with no cap set. Control: a template used
    within the days, of the image as it is, stays."""
    kept = fake_template("kept", 1, 3 * 86400, own_templates)
    idle = fake_template("idle", 1, 15 * 86400, own_templates)
    rebuilt = fake_template("rebuilt", 1, 60, {"vmlinuz": {"sha256": "before"}})
    gone = fake_template("gone", 1, 60, own_templates)
    meta = json.loads((tpl.templates_dir() / gone / "template.json").read_text())
    (tpl.templates_dir() / gone / "template.json").write_text(
        json.dumps({**meta, "image": "no-such-image"}))  # fmt: skip
    removed = tpl.tidy(tpl.TemplateBounds(max_template_disk_mib=0, template_max_idle_days=14))
    assert sorted(removed) == sorted([idle, rebuilt, gone])
    assert [t.key for t in tpl.list_templates()] == [kept]
