"""``smol-kernel run``: execute a notebook in a smolvm kernel and print its outputs."""

from __future__ import annotations

import argparse
import os
import sys


def _print_outputs(cell, index: int) -> None:
    """A cell's outputs on the terminal: guest-written, so no control characters."""
    import base64

    from ..shown import printable

    first = cell.source.strip().splitlines()[0] if cell.source.strip() else ""
    lines = [f"--- [{index}] {first[:90]}\n"]
    for out in cell.get("outputs", []):
        kind = out.get("output_type")
        if kind == "stream":
            lines.append(str(out.get("text", "")))
        elif kind in ("execute_result", "display_data"):
            data = out.get("data", {})
            for mime, value in data.items():
                if mime == "text/plain":
                    continue
                if mime.startswith("image/"):
                    size = len(base64.b64decode(value)) if isinstance(value, str) else 0
                    lines.append(f"[{mime}: {size} bytes]\n")
                else:
                    lines.append(f"[{mime}]\n")
            if "text/plain" in data:
                lines.append(f"{data['text/plain']}\n")
        elif kind == "error":
            lines.append(f"{out.get('ename')}: {out.get('evalue')}\n")
    sys.stdout.write(printable("".join(lines)))
    sys.stdout.flush()


def cmd_run(args: argparse.Namespace) -> int:
    import nbformat
    from nbclient import NotebookClient
    from nbclient.exceptions import CellExecutionError

    from ..pool import warm_pool
    from ..settings import default_of
    from ..shown import printable

    nb = nbformat.read(args.notebook, as_version=4)
    index = 0

    def on_cell_executed(cell, cell_index, execute_reply):  # nbclient hook
        nonlocal index
        index += 1
        _print_outputs(cell, index)

    client = NotebookClient(
        nb,
        kernel_name=args.kernel,
        timeout=args.timeout,
        startup_timeout=args.startup_timeout or default_of("startup_timeout"),
        allow_errors=args.allow_errors,
        interrupt_on_timeout=True,
        on_cell_executed=on_cell_executed,
        # The kernel starts in the notebook's folder, as under Jupyter (matters for share_cwd).
        resources={"metadata": {"path": os.path.dirname(os.path.abspath(args.notebook))}},
    )
    # Name the notebook as jupyter_server does: its kernel installs its dependencies block.
    session = os.environ.get("JPY_SESSION_NAME")
    os.environ["JPY_SESSION_NAME"] = os.path.abspath(args.notebook)
    pool = warm_pool()
    pool.enabled = False  # one kernel, then exit: a pool would only burn CPU
    try:
        client.execute()
        status = 0
    except CellExecutionError as e:
        print(printable(f"smol-kernel: cell {index} failed: {e.ename}: {e.evalue}"),
              file=sys.stderr)  # fmt: skip
        status = 1
    finally:
        pool.enabled = True
        if session is None:
            os.environ.pop("JPY_SESSION_NAME", None)
        else:
            os.environ["JPY_SESSION_NAME"] = session
    if args.output:
        nbformat.write(nb, args.output)
        print(f"wrote {args.output}")
    return status
