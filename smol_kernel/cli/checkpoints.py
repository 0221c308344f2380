"""``smol-kernel checkpoint|rewind|checkpoints``: running kernels' checkpoints."""

from __future__ import annotations

import argparse
import json
import sys

from .sizes import _fmt_size
from .vms import _find_vm


def _ask_kernel(ident: str, request: dict) -> dict | None:
    """Send a request to the process that runs kernel ``ident`` (kernel_control.py)."""
    from ..kernel_control import ask
    from ..vm.process import list_vms

    if (found := _find_vm(ident, list_vms())) is None:
        return None
    rt, _ = found
    try:
        reply = ask(rt.path, request)
    except (OSError, ValueError) as e:
        print(f"smol-kernel: error: {e}", file=sys.stderr)
        return None
    if not reply.get("ok"):
        from ..shown import printable

        print(f"smol-kernel: error: {printable(str(reply.get('error', 'refused')))}",
              file=sys.stderr)  # fmt: skip
        return None
    return reply


def cmd_checkpoint(args: argparse.Namespace) -> int:
    from ..checkpoint import CheckpointError, check_name

    try:
        name = check_name(args.name) if args.name else None
    except CheckpointError as e:
        print(f"smol-kernel: error: {e}", file=sys.stderr)
        return 2
    reply = _ask_kernel(args.id, {"op": "checkpoint", "name": name, "keep": args.keep})
    if reply is None:
        return 1
    cp = reply["checkpoint"]
    print(f"checkpoint {cp['name']} of kernel {cp['kernel_id']}: "
          f"{_fmt_size(int(cp['size_bytes']))}, kernel paused {cp['paused_s']:.2f}s")  # fmt: skip
    return 0


def cmd_rewind(args: argparse.Namespace) -> int:
    reply = _ask_kernel(args.id, {"op": "rewind", "name": args.name})
    if reply is None:
        return 1
    print(f"kernel {reply['checkpoint']['kernel_id']} rewound to checkpoint {args.name}")
    return 0


def cmd_checkpoints(args: argparse.Namespace) -> int:
    """Every kernel's checkpoints on disk (they are files: no running kernel needed)."""
    from .. import checkpoint as store

    found = [c for c in store.list_checkpoints()
             if not args.id or c.kernel_id.startswith(args.id)]  # fmt: skip
    if args.rm:
        gone = [c for c in found if args.rm in ("all", c.name)]
        for c in gone:
            store.remove(c)
            print(f"removed checkpoint {c.name} of kernel {c.kernel_id}")
        if not gone:
            print(f"smol-kernel: no checkpoint {args.rm!r} (see: smol-kernel checkpoints)",
                  file=sys.stderr)  # fmt: skip
            return 1
        return 0
    if args.json:
        print(json.dumps([c.as_dict() for c in found], indent=1))
        return 0
    total = sum(c.size_bytes for c in found)
    print(f"checkpoints in {store.checkpoints_dir()}: {len(found)}, {_fmt_size(total)} on disk")
    for c in found:
        print(f"  {c.kernel_id[:12]}  {c.describe()}  paused {c.paused_s:.2f}s")
    return 0
