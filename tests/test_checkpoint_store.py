"""The checkpoint store's rules, on files alone (no VM): names, the cap, what goes with a
kernel and what a kernel's own checkpoints may push out."""

from __future__ import annotations

import time

import pytest

from smol_kernel import checkpoint as store
from smol_kernel.checkpoint import CheckpointError

KID = "0f0e0d0c-1111-2222-3333-444455556666"


@pytest.fixture(autouse=True)
def checkpoints_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("SMOL_KERNEL_CHECKPOINTS_DIR", str(tmp_path / "cps"))
    return tmp_path / "cps"


def save(name: str, keep: bool = False, by_kernel: bool = False) -> store.Checkpoint:
    work = store.staging(KID, name)
    (work / "state").write_bytes(b"x" * 4096)
    cp = store.commit(work, KID, name, paused_s=0.1, keep=keep, plan_key="k", memory_mib=768,
                      description="test", by_kernel=by_kernel)  # fmt: skip
    time.sleep(0.01)  # distinct creation times: "oldest" is well defined
    return cp


@pytest.mark.parametrize("bad", ["../x", "a/b", "", ".hidden", "-x", "x" * 65, "a\nb", "é"])
def test_names_that_could_be_paths_or_options_are_refused(bad):
    with pytest.raises(CheckpointError, match="not a checkpoint name"):
        store.check_name(bad)
    with pytest.raises(CheckpointError):
        store.kernel_folder("../" + KID)


def test_the_cap_drops_the_oldest_not_kept(checkpoints_dir):
    save("a", keep=True)
    save("b")
    save("c")
    dropped = store.enforce_cap(KID, 2)
    assert [c.name for c in dropped] == ["b"]
    assert [c.name for c in store.list_checkpoints(KID)] == ["a", "c"]


def test_a_kernels_own_checkpoints_push_out_only_its_own(checkpoints_dir):
    save("host1")
    save("host2")
    save("mine1", by_kernel=True)
    save("mine2", by_kernel=True)
    dropped = store.enforce_cap(KID, 2, by_kernel=True)
    assert [c.name for c in dropped] == ["mine1", "mine2"]
    assert [c.name for c in store.list_checkpoints(KID)] == ["host1", "host2"]
    # Positive control: the same cap asked by the host takes the oldest, whoever made it.
    save("mine3", by_kernel=True)
    assert [c.name for c in store.enforce_cap(KID, 2)] == ["host1"]


def test_a_kernels_checkpoints_go_with_it_but_kept_ones(checkpoints_dir):
    save("gone")
    save("kept", keep=True)
    (store.kernel_folder(KID) / ".half.123.saving").mkdir()  # an interrupted save
    removed = store.remove_kernel(KID)
    assert [c.name for c in removed] == ["gone"]
    assert [p.name for p in store.kernel_folder(KID).iterdir()] == ["kept"]


async def test_every_overlapping_magic_request_gets_an_answer():
    """A kernel sends its next %checkpoint as soon as it has the last answer, which can be
    before the host's own exchange for that answer ended. Each overlapping request must be
    answered "busy" (the magic waits for its answer): one was dropped when a "busy" answer
    was still on its way, and the cell hung."""
    import asyncio
    import logging

    from smol_kernel.kernel_state import KernelState
    from smol_kernel.provisioner import SmolVMProvisioner
    from smol_kernel.timeline import Timeline

    answered: list[tuple[int, bool, str]] = []

    class Agent:
        async def request(self, op, rid, ok, text, timeout):
            await asyncio.sleep(0.05)  # the guest acks a moment later
            answered.append((rid, ok, text))

    state = KernelState(log=logging.getLogger("test"), agent=Agent())  # type: ignore[arg-type]
    timeline = Timeline(SmolVMProvisioner(), state, None, None)  # type: ignore[arg-type]
    serving = asyncio.get_running_loop().create_future()  # a request being served
    timeline._guest_task = serving
    for rid in (2, 3, 4):
        timeline.on_kernel_request({"rid": rid, "request": "checkpoint", "name": f"f{rid}"})
    await asyncio.sleep(0.5)
    serving.cancel()
    assert sorted(rid for rid, _, _ in answered) == [2, 3, 4]
    assert all(not ok and "busy" in text for _, ok, text in answered)
