"""Checkpoint, rewind and fork live kernels (timeline.py): through the provisioner as a
Jupyter server drives it, the magics in a notebook run by nbclient, the Sandbox API, the
command line; and what is refused (busy, shares, quota, bad names, a flood from the guest)."""

from __future__ import annotations

import asyncio
import json
import time

import pytest

from smol_kernel import checkpoint as store
from smol_kernel.checkpoint import CheckpointError
from smol_kernel.cli import main

from .conftest import install_spec, processes_mentioning, runtime_entries
from .kernel_helpers import (
    ram_digest,
    run_cell,
    start_kernel,
    stop_kernel,
    written_since_mapped_mib,
)

pytestmark = pytest.mark.vm


@pytest.fixture(scope="module")
async def kernel(smolvm_spec):
    km, kc = await start_kernel(smolvm_spec)
    yield km, kc
    kid = km.kernel_id
    await stop_kernel(km, kc)
    assert store.list_checkpoints(kid) == [], "a kernel's checkpoints go with it"
    assert not store.kernel_folder(kid).exists()


async def announced(kc, words: str, timeout: float = 20) -> str:
    """The stream line a restored kernel sends its clients (read from iopub)."""
    deadline = time.monotonic() + timeout
    seen = []
    while time.monotonic() < deadline:
        try:
            msg = await kc.get_iopub_msg(timeout=1)
        except Exception:
            continue
        if msg["msg_type"] == "stream":
            seen.append(msg["content"]["text"])
            if words in msg["content"]["text"]:
                return msg["content"]["text"]
    raise AssertionError(f"no stream line with {words!r} within {timeout}s: {seen}")


async def test_rewind_brings_back_variables_and_files_with_the_client_connected(kernel):
    km, kc = kernel
    prov = km.provisioner
    r = await run_cell(kc, "x = 1\nopen('/root/f.txt', 'w').write('before')\n"
                       "import subprocess; p = subprocess.Popen(['sleep', '4343'])")  # fmt: skip
    assert r.status == "ok", r.evalue
    cp = await prov.checkpoint("one")
    assert cp.name == "one" and cp.size_bytes > 1 << 20 and cp.paused_s > 0
    r = await run_cell(kc, "x = 2\nopen('/root/f.txt', 'w').write('after')\np.kill()\n"
                       "y = 'only after'")  # fmt: skip
    assert r.status == "ok", r.evalue
    old_vm, before = prov.vm, runtime_entries()
    old_dir = old_vm.runtime_dir
    await prov.rewind("one")
    assert "rewound to checkpoint one" in await announced(kc, "rewound to checkpoint one")
    assert prov.vm is not old_vm and km.kernel_id == prov.kernel_id
    assert processes_mentioning(str(old_dir)) == [] and not old_dir.exists()
    assert len(runtime_entries()) == len(before), "one VM folder for the kernel, as before"
    r = await run_cell(kc, "import os\nprint(x, open('/root/f.txt').read(), p.poll(), "
                       "'y' in globals())")  # fmt: skip
    assert r.stdout.split() == ["1", "before", "None", "False"], (r.stdout, r.evalue)
    # The same client, a second time: rewinds do not pile up state.
    await run_cell(kc, "x = 3")
    await prov.rewind("one")
    r = await run_cell(kc, "print(x)")
    assert r.stdout.strip() == "1"
    names = [c.name for c in await prov.checkpoints()]
    assert names == ["one"]


async def test_a_checkpoint_is_a_ram_file_its_restores_map_and_nobody_writes(kernel):
    """A clone's checkpoint keeps its memory as a RAM file: a rewind and a fork map it
    copy-on-write (a fork copies none of the data it reads, and the pages it writes), and
    the file stays as saved while they run, write and free memory (the template test's
    proof: content and allocated blocks)."""
    from jupyter_client.manager import AsyncKernelManager

    km, kc = kernel
    prov = km.provisioner
    r = await run_cell(kc, "import hashlib, os\nheld = [os.urandom(1 << 20) for _ in range(150)]"
                       "\nheld_sum = hashlib.sha256(b''.join(held)).hexdigest()")  # fmt: skip
    assert r.status == "ok", r.evalue
    cp = await prov.checkpoint("mapped")
    state = (cp.folder / "state").stat().st_size
    assert (cp.folder / "ram").is_file() and state < 4 << 20, f"device state {state} bytes"
    assert cp.size_bytes > 150 << 20, "the RAM file holds what the kernel wrote"
    before = ram_digest(cp.folder)
    # (read in place: a join would write a copy of it)
    check = "h = hashlib.sha256()\nfor b in held: h.update(b)\nprint(h.hexdigest() == held_sum)"
    writes = (
        "held = [os.urandom(1 << 20) for _ in range(150)]\n"
        "big = bytearray(200 << 20); big[::4096] = b'x' * (len(big) // 4096); del big"
    )
    await run_cell(kc, "held.clear()")
    await prov.rewind("mapped")
    await announced(kc, "rewound to checkpoint mapped")
    assert (await run_cell(kc, check)).stdout.strip() == "True"
    assert (await run_cell(kc, writes)).status == "ok"
    fkm = AsyncKernelManager(kernel_name=km.kernel_name)
    await fkm.start_kernel(restore_from=cp)
    fkc = fkm.client()
    fkc.start_channels()
    try:
        await fkc.wait_for_ready(timeout=60)
        assert (await run_cell(fkc, check)).stdout.strip() == "True"
        pid = fkm.provisioner.vm.pid
        own = written_since_mapped_mib(pid, cp.folder / "ram")
        assert own < 100, f"a fork of a kernel holding 150 MiB copied {own} MiB of it"
        assert (await run_cell(fkc, writes)).status == "ok"
        wrote = written_since_mapped_mib(pid, cp.folder / "ram") - own
        assert wrote >= 140, f"the probe: 150 MiB written, {wrote} MiB seen copied"
    finally:
        await stop_kernel(fkm, fkc)
    assert ram_digest(cp.folder) == before, "the checkpoint's RAM file changed under its VMs"
    await run_cell(kc, "del held")
    store.remove(cp)


async def test_a_host_request_on_a_busy_kernel_is_refused_and_the_cell_goes_on(kernel):
    km, kc = kernel
    msg_id = kc.execute("import time; time.sleep(4); print('slept')")
    await asyncio.sleep(1)
    with pytest.raises(CheckpointError, match="running a cell"):
        await km.provisioner.checkpoint("busy")
    with pytest.raises(CheckpointError, match="running a cell"):
        await km.provisioner.rewind("one")
    while True:  # the cell finishes as if nothing happened
        msg = await kc.get_iopub_msg(timeout=30)
        if msg["parent_header"].get("msg_id") != msg_id:
            continue
        if msg["msg_type"] == "stream":
            assert msg["content"]["text"] == "slept\n"
        if msg["msg_type"] == "status" and msg["content"]["execution_state"] == "idle":
            break
    assert "busy" not in [c.name for c in await km.provisioner.checkpoints()]


async def test_bad_names_and_unknown_checkpoints_say_what_to_do(kernel):
    km, _ = kernel
    for bad in ("../x", "a/b", "", ".hidden", "x" * 65, "a\nb"):
        with pytest.raises(CheckpointError, match="not a checkpoint name"):
            await km.provisioner.checkpoint(bad or "\x00")
    with pytest.raises(CheckpointError, match="has no checkpoint 'nope'"):
        await km.provisioner.rewind("nope")
    assert main(["checkpoint", km.kernel_id, "../x"]) == 2
    assert main(["rewind", "no-such-kernel", "one"]) == 1


async def test_the_command_line_saves_lists_and_rewinds(kernel, capsys):
    km, kc = kernel
    await run_cell(kc, "z = 'cli'")
    assert main(["checkpoint", km.kernel_id[:8], "from-cli"]) == 0
    assert "checkpoint from-cli of kernel" in capsys.readouterr().out
    await run_cell(kc, "z = 'changed'")
    assert await asyncio.to_thread(main, ["rewind", km.kernel_id[:8], "from-cli"]) == 0
    r = await run_cell(kc, "print(z)")
    assert r.stdout.strip() == "cli"
    capsys.readouterr()
    assert main(["checkpoints", km.kernel_id, "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert "from-cli" in {r["name"] for r in rows}


async def test_magics_from_a_notebook_run_by_nbclient(kernel, smolvm_spec):
    import nbformat
    from nbclient import NotebookClient

    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(c) for c in (
        "a = 41",
        "%checkpoint base",
        "a += 1\nopen('/root/nb.txt', 'w').write('x')\nprint(a)",
        "%rewind base",
        "import os\nprint(a, os.path.exists('/root/nb.txt'))\n%checkpoint base",
        "%checkpoints",
        "import time\ntime.sleep(checkpoint_interval := 5.5)\nok, last = 0, ''\n"
        "for i in range(20):\n"
        "    try:\n"
        "        get_ipython().run_line_magic('checkpoint', f'flood{i}'); ok += 1\n"
        "    except Exception as e:\n"
        "        last = str(e)\n"
        "print(ok, last)",
        "%checkpoints",
        "import os\nprint(os.environ['KERNEL_ID'])",
    )])  # fmt: skip
    client = NotebookClient(nb, kernel_name=smolvm_spec, timeout=120, allow_errors=True)
    await client.async_execute()
    out = ["".join(o.get("text", "") for o in c.outputs) for c in nb.cells]
    assert "checkpoint base saved" in out[1]
    assert out[2].strip() == "42"
    assert "rewound to checkpoint base" in out[3]
    assert out[4].splitlines()[0] == "41 False", out
    assert "never replaces one" in out[4], out[4]  # the kernel cannot overwrite a checkpoint
    assert "base" in out[5]
    # A guest flooding %checkpoint: one is saved, the rest refused (checkpoint_interval).
    lines = out[6].strip().splitlines()
    assert lines[0].startswith("checkpoint flood0 saved"), out[6]
    ok, why = lines[-1].split(" ", 1)
    assert ok == "1" and ("rate-limited" in why or "busy with" in why), out[6]
    assert "flood0" in out[7] and "flood1" not in out[7], out[7]
    kid = out[8].strip()
    assert store.list_checkpoints(kid) == [] and not store.kernel_folder(kid).exists(), (
        "the notebook's kernel was shut down: its checkpoints went with it"
    )


async def test_forks_start_from_the_parent_then_diverge(kernel):
    from jupyter_client.manager import AsyncKernelManager

    km, kc = kernel
    r = await run_cell(kc, "secret = 'parent'\nopen('/root/shared.txt', 'w').write('p')")
    assert r.status == "ok"
    source, temporary = await km.provisioner.fork_source()
    assert temporary
    forks = []
    try:
        for _ in range(2):
            fkm = AsyncKernelManager(kernel_name=km.kernel_name)
            await fkm.start_kernel(restore_from=source)
            fkc = fkm.client()
            fkc.start_channels()
            await fkc.wait_for_ready(timeout=60)
            forks.append((fkm, fkc))
        assert all(f.provisioner.start_kind == "fork" for f, _ in forks)
        store.remove(source)
        probe = ("import os, random, json\nprint(json.dumps([secret, "
                 "open('/root/shared.txt').read(), os.urandom(8).hex(), random.random(), "
                 "globals().get('mine')]))")  # fmt: skip
        seen = [json.loads((await run_cell(c, probe)).stdout) for _, c in forks]
        assert [s[:2] for s in seen] == [["parent", "p"]] * 2
        assert seen[0][2] != seen[1][2] and seen[0][3] != seen[1][3], "fresh entropy each"
        await run_cell(forks[0][1], "mine = 'fork0'\nopen('/root/shared.txt', 'w').write('0')")
        seen = [json.loads((await run_cell(c, probe)).stdout) for _, c in [*forks, (km, kc)]]
        assert [s[1] for s in seen] == ["0", "p", "p"]
        assert [s[4] for s in seen] == ["fork0", None, None]
    finally:
        for fkm, fkc in forks:
            await stop_kernel(fkm, fkc)


async def test_quota_refusal_names_the_cap(kernel):
    km, _ = kernel
    prov = km.provisioner
    saved = prov.max_total_memory_mib
    prov.max_total_memory_mib = 800  # the kernel's 768 MiB and nothing more
    try:
        with pytest.raises(CheckpointError, match="max_total_memory_mib"):
            await prov.checkpoint("too-much")
    finally:
        prov.max_total_memory_mib = saved
    assert "too-much" not in [c.name for c in await prov.checkpoints()]


async def test_the_cap_drops_the_oldest(kernel):
    km, _ = kernel
    prov = km.provisioner
    saved = prov.max_checkpoints
    prov.max_checkpoints = 2
    try:
        for name in ("c1", "c2", "c3"):
            await prov.checkpoint(name)
        names = [c.name for c in await prov.checkpoints()]
        assert names[-2:] == ["c2", "c3"] and len(names) == 2
    finally:
        prov.max_checkpoints = saved


async def test_kernels_with_shares_are_refused(jupyter_prefix, tmp_path):
    spec = install_spec(jupyter_prefix, "smolvm-cp-share", "--share-cwd", "ro",
                        "--memory-mib", "768")  # fmt: skip
    km, kc = await start_kernel(spec, cwd=str(tmp_path))
    try:
        with pytest.raises(CheckpointError, match="shared"):
            await km.provisioner.checkpoint()
        r = await run_cell(kc, "%checkpoint")  # IPython shows a UsageError on stderr
        assert r.status == "error" and "shared" in r.stderr, r
    finally:
        await stop_kernel(km, kc)
