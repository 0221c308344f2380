"""``build_parser``: every ``smol-kernel`` command, its flags and the function that runs it."""

from __future__ import annotations

import argparse

from ..image.store import DEFAULT_IMAGE
from .assistants import cmd_agent, cmd_mcp
from .checkpoints import cmd_checkpoint, cmd_checkpoints, cmd_rewind
from .images import (
    cmd_image_build,
    cmd_image_export,
    cmd_image_import,
    cmd_image_list,
    cmd_image_rm,
)
from .install import cmd_install
from .provisioner_flags import _add_provisioner_flags
from .run import cmd_run
from .vms import cmd_doctor, cmd_kill, cmd_logs, cmd_ps, cmd_templates


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="smol-kernel",
        description="Jupyter kernels in microVMs: build images, install "
        "the kernelspec, inspect and stop kernel VMs.",
    )
    sub = parser.add_subparsers(dest="command", required=True)

    image = sub.add_parser("image", help="build, list and remove guest images")
    isub = image.add_subparsers(dest="image_command", required=True)
    b = isub.add_parser("build", help="build (or update) a guest image")
    b.add_argument("--name", help="image name (default: the preset's name, else 'default')")
    b.add_argument("--preset", choices=["scipy"],
                   help="scipy: numpy, pandas, matplotlib, scipy, ... from Debian")  # fmt: skip
    b.add_argument("--requirements", "-r", metavar="FILE",
                   help="pip requirements file installed into the image at build time")  # fmt: skip
    b.add_argument("--apt", nargs="+", default=[], metavar="PKG", help="extra Debian packages")
    b.add_argument("--pip", nargs="+", default=[], metavar="PKG", help="extra pip packages")
    b.add_argument("--suite", default="bookworm", help="Debian suite (default: %(default)s)")
    b.add_argument("--from-oci", metavar="PATH",
                   help="root from a container image on disk: an OCI image layout (folder or "
                   "tar) or a `docker save` tar; needs --name")  # fmt: skip
    b.add_argument("--force", action="store_true", help="rebuild even if inputs are unchanged")
    b.set_defaults(func=cmd_image_build)
    ls = isub.add_parser("list", help="list built images")
    ls.add_argument("--json", action="store_true")
    ls.set_defaults(func=cmd_image_list)
    ex = isub.add_parser("export", help="write an image to one portable file")
    ex.add_argument("name", metavar="NAME")
    ex.add_argument("file", metavar="FILE")
    ex.add_argument("--compress", action="store_true", help="gzip it (smaller, slower)")
    ex.set_defaults(func=cmd_image_export)
    im = isub.add_parser("import", help="install an image from a file made by 'image export'")
    im.add_argument("file", metavar="FILE")
    im.add_argument("--name", help="install under this name (default: the image's own)")
    im.add_argument("--force", action="store_true", help="replace an image of that name")
    im.add_argument("--sha256", help="refuse the file unless it has this sha256 (from export)")
    im.set_defaults(func=cmd_image_import)
    rm = isub.add_parser("rm", help="remove images")
    rm.add_argument("names", nargs="+", metavar="NAME")
    rm.set_defaults(func=cmd_image_rm)

    inst = sub.add_parser("install", help="install the 'Python (smolvm)' kernelspec")
    where = inst.add_mutually_exclusive_group()
    where.add_argument("--system", action="store_true",
                       help="install for every user of this machine (the default)")  # fmt: skip
    where.add_argument("--user", action="store_true", help="install for the current user")
    where.add_argument("--sys-prefix", action="store_true", help="install into sys.prefix")
    where.add_argument("--prefix", help="install under this prefix")
    inst.add_argument("--name", default="smolvm", help="kernelspec name (default: %(default)s)")
    inst.add_argument("--display-name", default=None,
                      help="the name JupyterLab shows (default: from --name and --image, "
                      "e.g. 'Python (smolvm)', 'Python (smolvm-sci, image scipy)')")  # fmt: skip
    inst.add_argument("--lockdown", action="store_true",
                      help="also configure Jupyter servers to offer and start only smolvm "
                      "kernelspecs, with this one as the default, and to start this one "
                      "when a client asks for python3 (implies --alias python3)")  # fmt: skip
    inst.add_argument("--alias", action="append", default=[], metavar="NAME",
                      help="Jupyter servers start this kernelspec when a client asks for "
                      "kernel NAME (e.g. python3, which assistants hard-code); "
                      "repeatable")  # fmt: skip
    inst.add_argument("--no-server-extension", action="store_true",
                      help="do not enable the server extension that fills the warm pool "
                      "when a Jupyter server starts")  # fmt: skip
    _add_provisioner_flags(inst)
    inst.set_defaults(func=cmd_install)

    doc = sub.add_parser("doctor", help="say which backend and isolation a kernel would get")
    doc.add_argument("--backend", default="auto", help="auto, qemu or libkrun")
    doc.add_argument("--image", default=DEFAULT_IMAGE)
    doc.add_argument("--require-hardware-isolation", action="store_true")
    doc.set_defaults(func=cmd_doctor)

    ps = sub.add_parser("ps", help="list running kernel VMs")
    ps.add_argument("--json", action="store_true")
    ps.set_defaults(func=cmd_ps)

    run = sub.add_parser("run", help="execute a notebook in a smolvm kernel, print outputs")
    run.add_argument("notebook")
    run.add_argument("--kernel", default="smolvm", help="kernelspec name (default: %(default)s)")
    run.add_argument("--timeout", type=float, default=600, help="per-cell timeout, seconds")
    run.add_argument("--startup-timeout", type=float, default=None,
                     help="seconds to wait for the kernel (default: the provisioner's "
                     "startup_timeout, 240)")  # fmt: skip
    run.add_argument("--allow-errors", action="store_true", help="keep going after errors")
    run.add_argument("--output", help="also write the executed notebook here")
    run.set_defaults(func=cmd_run)

    mcp = sub.add_parser("mcp", help="MCP server: run_python and friends in microVM sandboxes")
    mcp.add_argument("--http", metavar="HOST:PORT",
                     help="serve streamable HTTP, not stdio (bearer token required)")  # fmt: skip
    mcp.add_argument("--token", help="bearer token for --http (default: generated, printed)")
    mcp.add_argument("--max-sessions", type=int, default=4,
                     help="sandboxes open at once (default: %(default)s)")  # fmt: skip
    mcp.add_argument("--max-output-chars", type=int, default=20_000,
                     help="output a call returns, characters (default: %(default)s)")  # fmt: skip
    _add_provisioner_flags(mcp)
    mcp.set_defaults(func=cmd_mcp)

    agent = sub.add_parser("agent", help="let Claude solve TASK by running Python in a sandbox")
    agent.add_argument("task", help="what to do, in words")
    agent.add_argument("--model", help="Claude model (default: claude_agent.DEFAULT_MODEL)")
    agent.add_argument("--max-turns", type=int, default=10,
                       help="model calls at most (default: %(default)s)")  # fmt: skip
    agent.add_argument("--max-tokens", type=int, default=4096)
    agent.add_argument("--base-url", help="Messages API base URL (default: the SDK's)")
    agent.add_argument("--max-output-chars", type=int, default=20_000,
                       help="tool result size cap, characters (default: %(default)s)")  # fmt: skip
    _add_provisioner_flags(agent)
    agent.set_defaults(func=cmd_agent)

    logs = sub.add_parser("logs", help="print a kernel VM's guest console (boot and kernel output)")
    logs.add_argument("id", metavar="ID", help="VM id or kernel id (prefix)")
    logs.add_argument("--bytes", type=int, default=1 << 20, help="at most the last N bytes")
    logs.add_argument("--network", action="store_true", help="the network log instead: every "
                      "destination the guest tried, allowed or blocked")  # fmt: skip
    logs.add_argument("--json", action="store_true", help="with --network: as JSON")
    logs.set_defaults(func=cmd_logs)

    tp = sub.add_parser("templates", help="list, remove or prune kernel templates (the "
                        "saved VMs kernel starts clone)")  # fmt: skip
    tp.add_argument("--json", action="store_true")
    tp.add_argument("--rm", metavar="KEY", help="remove the template(s) whose key starts so "
                    "('all': every one)")  # fmt: skip
    tp.add_argument(
        "--prune",
        action="store_true",
        help="remove templates of changed or missing images, and unused ones",
    )
    tp.add_argument(
        "--idle-days",
        type=float,
        default=14.0,
        help="with --prune: unused for this long (default: %(default)s)",
    )
    tp.set_defaults(func=cmd_templates)

    cp = sub.add_parser("checkpoint", help="save a running kernel (idle) under a name")
    cp.add_argument("id", metavar="KERNEL_ID", help="kernel id or VM id (prefix)")
    cp.add_argument("name", nargs="?", help="checkpoint name (default: cp1, cp2, ...)")
    cp.add_argument("--keep", action="store_true",
                    help="keep it when the kernel is shut down")  # fmt: skip
    cp.set_defaults(func=cmd_checkpoint)
    rw = sub.add_parser("rewind", help="bring a running kernel back to one of its checkpoints")
    rw.add_argument("id", metavar="KERNEL_ID", help="kernel id or VM id (prefix)")
    rw.add_argument("name", help="checkpoint name")
    rw.set_defaults(func=cmd_rewind)
    cps = sub.add_parser("checkpoints", help="list or remove kernels' checkpoints")
    cps.add_argument("id", metavar="KERNEL_ID", nargs="?", help="only this kernel's (prefix)")
    cps.add_argument("--json", action="store_true")
    cps.add_argument("--rm", metavar="NAME", help="remove checkpoint NAME ('all': every one)")
    cps.set_defaults(func=cmd_checkpoints)

    kill = sub.add_parser("kill", help="kill kernel VMs by VM id or kernel id (prefix)")
    kill.add_argument("ids", nargs="+", metavar="ID")
    kill.set_defaults(func=cmd_kill)
    return parser
