"""Snapshot clones: kernels start as copy-on-write clones of a template VM saved once per
configuration. Each clone must be fresh (entropy, clocks, ids, files, processes), the
template's RAM file must never change under its clones, and a template must be rebuilt
when anything it was built from changes."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import time
from dataclasses import replace
from pathlib import Path

import pytest

from smol_kernel import template as tpl
from smol_kernel.kernel_vm import KernelPlan
from smol_kernel.vm.qemu import QemuBackend

from .conftest import install_spec
from .kernel_helpers import run_cell, start_kernel, stop_kernel


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


def ram_digest(folder: Path) -> tuple[str, int]:
    """The RAM file's content and its allocated blocks (a discard punches holes: fewer). The
    file is flushed first: a file system may count blocks differently before its delayed
    allocation is written back (one block more was seen on CI with the same content)."""
    ram = folder / "ram"
    h = hashlib.sha256()
    with open(ram, "rb") as f:
        os.fsync(f.fileno())
        while chunk := f.read(8 << 20):
            h.update(chunk)
    return h.hexdigest(), ram.stat().st_blocks


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
