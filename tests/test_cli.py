"""The smol-kernel CLI: doctor, ps, kill, and run (the README's main job) on real VMs."""

from __future__ import annotations

import asyncio
import base64
import json
from pathlib import Path

import pytest

from smol_kernel.cli import main

from .conftest import install_spec, processes_mentioning
from .kernel_helpers import start_kernel, stop_kernel

ROOT = Path(__file__).resolve().parent.parent


def test_doctor_explains_the_choice(capsys, qemu_backend, image):
    status = qemu_backend.check(image.name)
    assert main(["doctor"]) == 0
    out = capsys.readouterr().out
    assert "KVM probe" in out
    assert f"isolation {status.isolation}" in out
    if not status.isolation.hardware:
        assert "not a security boundary" in out
        assert main(["doctor", "--require-hardware-isolation"]) == 1
        out = capsys.readouterr().out
        assert "would NOT start" in out and "To fix" in out


def test_doctor_names_a_missing_image(capsys):
    assert main(["doctor", "--image", "never-built"]) == 1
    assert "smol-kernel image build --name never-built" in capsys.readouterr().out


@pytest.mark.vm
async def test_ps_lists_and_kill_stops_a_kernel_vm(smolvm_spec, capsys):
    km, kc = await start_kernel(smolvm_spec)
    try:
        rt = km.provisioner.vm.runtime_dir
        assert main(["ps", "--json"]) == 0
        rows = json.loads(capsys.readouterr().out)
        mine = [r for r in rows if r["kernel_id"] == km.kernel_id]
        assert len(mine) == 1
        row = mine[0]
        assert row["state"] == "running" and row["isolation"] in ("kvm", "tcg")
        assert row["rss_mib"] > 10 and row["pid"] > 1
        assert row["network"] is False and row["shares"] == [], "nothing opted in"
        assert main(["ps"]) == 0
        assert km.kernel_id in capsys.readouterr().out

        assert main(["kill", km.kernel_id[:8]]) == 0
        assert processes_mentioning(str(rt)) == []
        assert not rt.exists()
        for _ in range(50):
            if not await km.is_alive():
                break
            await asyncio.sleep(0.1)
        assert not await km.is_alive(), "the manager must see the killed kernel as dead"
        assert main(["kill", "no-such-vm"]) == 1
    finally:
        await stop_kernel(km, kc)


@pytest.mark.vm
def test_run_executes_the_demo_notebook(smolvm_spec, capsys):
    probe = Path("/tmp/smol-kernel-demo-host-file.txt")  # the path the notebook tries
    ours = not probe.exists()  # (the demo script's own is left alone)
    probe.write_text("host only\n")
    try:
        assert main(["run", str(ROOT / "notebooks" / "demo.ipynb"), "--kernel", smolvm_spec]) == 0
    finally:
        if ours:
            probe.unlink()
    out = capsys.readouterr().out
    assert "isolation    : " in out
    assert "interfaces: ['lo']" in out
    assert "network: blocked" in out
    assert "not visible in the VM" in out
    assert "[image/png:" in out
    assert "only in this VM" in out


@pytest.mark.vm
def test_run_executes_the_scipy_notebook_with_a_plot(jupyter_prefix, tmp_path, capsys):
    from smol_kernel.image.store import GuestImage, ImageNotFound

    try:
        GuestImage.load("scipy")
    except ImageNotFound:
        pytest.skip("the scipy image is not built here: smol-kernel image build --preset scipy "
                    "(scripts/setup.sh builds it)")  # fmt: skip
    spec = install_spec(jupyter_prefix, "smolvm-scipy", "--image", "scipy")
    out_nb = tmp_path / "scipy-out.ipynb"
    assert main(["run", str(ROOT / "notebooks" / "scipy-demo.ipynb"), "--kernel", spec,
                 "--output", str(out_nb)]) == 0  # fmt: skip
    assert "trend: " in capsys.readouterr().out
    nb = json.loads(out_nb.read_text())
    outputs = [o for c in nb["cells"] if c["cell_type"] == "code" for o in c["outputs"]]
    table = [o for o in outputs if o.get("output_type") == "execute_result"]
    assert table and "visits" in "".join(table[0]["data"]["text/plain"])
    (plot,) = [o for o in outputs if "image/png" in o.get("data", {})]
    assert base64.b64decode(plot["data"]["image/png"]).startswith(b"\x89PNG\r\n\x1a\n")
