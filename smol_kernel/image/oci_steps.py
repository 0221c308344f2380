"""The two steps of a ``--from-oci`` build that must look like root to the file system.

``unpack`` applies the image's layers into a folder and finds its Python; ``finish`` adds
our pieces and makes the ext4 root image from the folder. The image's files must keep their
owners (root, service users) in the ext4, and only root can give files owners. When the
build does not run as root, each step runs as ``fakeroot python -m smol_kernel.image.
oci_steps STEP ...`` sharing one fakeroot state file: the owners live there, and mke2fs,
run inside the second step, reads them from it.

Run as a helper, a step prints one JSON line: its result, or ``{"error": message}``.
"""

from __future__ import annotations

import dataclasses
import errno
import json
import subprocess
import sys
from pathlib import Path

from ..error_root import SmolKernelError
from ..trusted import find_program
from .oci import OciError, open_image, unpack
from .oci_root import (
    GUEST_DIR,
    GuestPython,
    find_python,
    link_python,
    make_dirs,
    put_tree,
    remove,
    tree_size,
)


class StepError(SmolKernelError):
    """A host tool of a step failed; the message has its output."""


def unpack_step(source: str, identity: str, tree: str) -> dict:
    """Apply the layers of the image at ``source`` (which must still be ``identity``) into
    the new folder ``tree``; its kind, layer count, what was skipped, and its Python."""
    Path(tree).mkdir(mode=0o755)
    with open_image(Path(source)) as image:
        if image.identity != identity:
            raise OciError(f"{source} changed since the build started; run it again")
        stats = unpack(image, Path(tree))
        kind = image.kind
    python = find_python(Path(tree))
    return {"kind": kind, "layers": stats.layers, "skipped": stats.skipped,
            "python": dataclasses.asdict(python)}  # fmt: skip


def finish_step(tree: str, python: str, site_files: str, guest_files: str, image: str) -> dict:
    """Add ``guest_files`` (a folder) as GUEST_AGENT_DIR and ``site_files`` (a folder, or
    "") into the Python's site folder, then write the ext4 root image ``image``."""
    root, py = Path(tree), GuestPython(**json.loads(python))
    if site_files:
        put_tree(root, py.site, Path(site_files))
    make_dirs(root, "root", "run/smol-kernel", "tmp", "proc", "sys", "dev")
    remove(root, GUEST_DIR)  # ours only: nothing of the image's own copy stays beside it
    put_tree(root, GUEST_DIR, Path(guest_files))
    link_python(root, py)
    used, inodes = tree_size(root)
    mke2fs = find_program("mke2fs") or "mke2fs"
    cmd = [mke2fs, "-q", "-F", "-t", "ext4", "-O", "^has_journal", "-m", "0", "-L", "smolroot",
           "-N", str(inodes * 5 // 4 + 1024), "-d", tree, image,
           f"{used * 5 // 4 // (1 << 20) + 96}M"]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise StepError(f"mke2fs (root image) failed: {(proc.stderr or proc.stdout).strip()}")
    return {"bytes": used, "inodes": inodes}


STEPS = {"unpack": unpack_step, "finish": finish_step}


def main(argv: list[str]) -> int:
    step, *args = argv
    try:
        result = STEPS[step](*args)
    except (OciError, StepError, OSError) as e:
        enospc = getattr(e, "errno", 0) == errno.ENOSPC or "No space left" in str(e)
        print(json.dumps({"error": str(e), "oci": isinstance(e, OciError), "enospc": enospc}))
        return 1
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
