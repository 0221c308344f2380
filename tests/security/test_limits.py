"""Resource limits are settings the guest really gets: vCPUs, memory, and a lifetime cap."""

from __future__ import annotations

import asyncio
import time

import pytest

from ..conftest import install_spec, processes_mentioning
from ..kernel_helpers import run_cell, start_kernel, stop_kernel

pytestmark = pytest.mark.vm


async def test_vcpus_memory_and_max_lifetime_are_enforced(jupyter_prefix):
    spec = install_spec(jupyter_prefix, "smolvm-limits", "--vcpus", "2", "--memory-mib", "640",
                        "--max-lifetime", "25")  # fmt: skip
    km, kc = await start_kernel(spec)
    try:
        ready = km.provisioner.ready_at  # the lifetime counts from here, not from boot
        assert ready is not None
        rt = km.provisioner.vm.runtime_dir
        r = await run_cell(kc, """
import os
mem = next(int(l.split()[1]) for l in open('/proc/meminfo') if l.startswith('MemTotal'))
print(os.cpu_count(), mem // 1024)
""")  # fmt: skip
        cpus, mem_mib = map(int, r.stdout.split())
        assert cpus == 2
        assert 500 < mem_mib <= 640
        while await km.is_alive():
            assert time.monotonic() - ready < 25 + 30, "max_lifetime did not stop the VM"
            await asyncio.sleep(0.2)
        lived = time.monotonic() - ready
        assert 25 <= lived < 25 + 30, f"the kernel lived {lived:.1f}s after it was ready"
        assert processes_mentioning(str(rt)) == []
    finally:
        await stop_kernel(km, kc)
