"""The ``smol-kernel`` command line."""

from __future__ import annotations

import argparse
import ipaddress
import json
import os
import sys

from .error_root import SmolKernelError
from .image.store import DEFAULT_IMAGE, ImageNotFound


def _fmt_size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"


# ------------------------------------------------------------------ image


def cmd_image_build(args: argparse.Namespace) -> int:
    from .image.builder import ImageBuilder
    from .image.progress import StageProgress

    if args.from_oci and not args.name:
        raise ValueError("name the image built from a container image: --name NAME")
    name = args.name or args.preset or DEFAULT_IMAGE
    builder = ImageBuilder(name=name, apt=args.apt, pip=args.pip, suite=args.suite,
                           requirements=args.requirements, preset=args.preset,
                           from_oci=args.from_oci)  # fmt: skip
    builder.progress = StageProgress(builder.stage_count())
    image = builder.build(force=args.force)
    print(image.path)
    return 0


def cmd_image_list(args: argparse.Namespace) -> int:
    from .image.store import list_images
    from .shown import printable as escaped_row

    images = list_images()
    if args.json:
        print(json.dumps([{"name": i.name, "path": str(i.path), **i.manifest} for i in images]))
        return 0
    if not images:
        print("no guest images; build one with: smol-kernel image build")
        return 0
    print(f"{'NAME':<16} {'CREATED':<21} {'KERNEL':<18} {'SIZE':>10}  EXTRA PACKAGES")
    for img in images:  # an imported image's manifest is the importer's: read it gently
        m, inputs = img.manifest, img.inputs
        files = m.get("files") if isinstance(m.get("files"), dict) else {}
        size = sum(f.get("size", 0) for f in files.values()
                   if isinstance(f, dict) and isinstance(f.get("size"), int))  # fmt: skip
        packages = [str(p) for key in ("apt", "pip") if isinstance(inputs.get(key), list)
                    for p in inputs[key]]  # fmt: skip
        extra = " ".join(packages) or "-"
        if "from_oci" in inputs:
            extra = f"from {inputs['from_oci']}" + (f" + {extra}" if extra != "-" else "")
        print(
            escaped_row(
                f"{img.name:<16} {m.get('created', '?')!s:<21} {img.kernel_release:<18} "
                f"{_fmt_size(size):>10}  {extra}"
            )
        )
    return 0


def cmd_image_export(args: argparse.Namespace) -> int:
    from pathlib import Path

    from .image.portable import export_image

    digest = export_image(args.name, Path(args.file), compress=args.compress)
    size = Path(args.file).stat().st_size
    print(f"exported image {args.name!r} to {args.file} ({_fmt_size(size)})")
    print(f"sha256 {digest}  (check it on import: --sha256 {digest})")
    return 0


def cmd_image_import(args: argparse.Namespace) -> int:
    from pathlib import Path

    from .image.portable import import_image

    image = import_image(Path(args.file), args.name, args.force, args.sha256)
    print(f"imported image {image.name!r} ({image.kernel_release}) into {image.path}")
    return 0


def cmd_image_rm(args: argparse.Namespace) -> int:
    from .image.store import remove_image

    for name in args.names:
        path = remove_image(name)
        print(f"removed {name} ({path})")
    return 0


# ------------------------------------------------------------------ kernelspec


def _provisioner_traits() -> dict:
    from .settings import KernelSettings

    return dict(KernelSettings.class_traits(config=True))


def _provisioner_config(args: argparse.Namespace) -> dict:
    """Provisioner settings given as flags (``_add_provisioner_flags``), checked."""
    from traitlets import Bool, List

    from .vm.share import ShareError, parse_share, split_share

    config: dict = {}
    for name, trait in _provisioner_traits().items():
        value = getattr(args, name, None)
        if value is None:
            continue
        trait_value = bool(value) if isinstance(trait, Bool) else value
        if isinstance(trait, List):  # strings from argparse, checked below
            config[name] = list(value)
            continue
        try:
            trait.validate(None, trait_value)
        except Exception as e:
            raise ValueError(f"--{name.replace('_', '-')}: {e}") from None
        config[name] = trait_value
    from .egress.allowlist import AllowList, AllowListError, check_cidr

    try:
        AllowList.parse(config.get("allow_hosts", []))
    except AllowListError as e:
        raise ValueError(f"--allow-host: {e}") from None
    try:
        for net in config.get("private_answer_ranges", []):
            check_cidr(net)
    except AllowListError as e:
        raise ValueError(f"--private-answer-range: {e}") from None
    for server in config.get("dns_servers", []):
        try:
            ipaddress.IPv4Address(server)
        except ValueError:
            raise ValueError(f"--dns-server {server!r}: not an IPv4 address") from None
    for text in config.get("shares", []):
        try:
            host = split_share(text)[0]
        except ShareError as e:
            raise ValueError(f"--share: {e}") from None
        host = os.path.expanduser(host)
        if os.path.isabs(host) and not os.path.isdir(host):
            print(f"warning: --share {text!r}: {host} does not exist yet; kernels will not "
                  "start until it does", file=sys.stderr)  # fmt: skip
        elif os.path.isabs(host):
            try:  # e.g. a rw share of a folder host code is imported from
                parse_share(text)
            except ShareError as e:
                raise ValueError(f"--share: {e}") from None
    return config


def _env_flags(args: argparse.Namespace) -> dict[str, str]:
    env = {}
    for item in args.env or []:
        key, sep, val = item.partition("=")
        if not sep or not key:
            raise ValueError(f"--env {item!r}: use NAME=VALUE")
        env[key] = val
    return env


LIST_METAVARS = {"shares": "HOST:GUEST[:ro|rw]", "allow_hosts": "HOST[:PORT]",
                 "private_answer_ranges": "CIDR"}  # fmt: skip


def _add_provisioner_flags(parser: argparse.ArgumentParser) -> None:
    """One flag per provisioner trait (``--memory-mib``, repeatable ``--share``, ...) and
    repeatable ``--env NAME=VALUE``."""
    from traitlets import Bool, Float, Integer, List

    parser.add_argument("--env", action="append", metavar="NAME=VALUE",
                        help="environment variable for the kernel (repeatable)")  # fmt: skip
    for name, trait in _provisioner_traits().items():
        flag = "--" + name.replace("_", "-")
        helptext = (trait.help or "").replace("%", "%%")
        if isinstance(trait, Bool):
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=None,
                                help=helptext)  # fmt: skip
        elif isinstance(trait, List):  # --shares -> repeatable --share
            parser.add_argument(flag.rstrip("s"), action="append", default=None, dest=name,
                                metavar=LIST_METAVARS.get(name, "ADDRESS"),
                                help=helptext + " (repeatable)")  # fmt: skip
        else:
            typ = int if isinstance(trait, Integer) else float if isinstance(trait, Float) else str
            parser.add_argument(flag, type=typ, default=None, dest=name, help=helptext)


def display_name(name: str, image: str | None) -> str:
    """A launcher tile's name that tells kernelspecs apart: two installs under different
    names must not both read "Python (smolvm)"."""
    parts = [name] + ([f"image {image}"] if image and image != DEFAULT_IMAGE else [])
    return f"Python ({', '.join(parts)})"


def cmd_install(args: argparse.Namespace) -> int:
    import shutil
    import tempfile
    from importlib import resources
    from pathlib import Path

    from jupyter_client.kernelspec import NATIVE_KERNEL_NAME, KernelSpecManager

    from . import kernelspec
    from .image.store import GuestImage

    if args.lockdown and args.user and not (args.prefix or args.sys_prefix):
        raise ValueError(
            "--lockdown with --user: a locked-down server never starts a kernelspec from "
            "your own Jupyter data folder (a page can write there). Install as an "
            "administrator: --sys-prefix, --prefix, or system-wide (no --user)"
        )
    template = resources.files("smol_kernel.kernelspec")
    spec = kernelspec.template()
    config = _provisioner_config(args)
    spec["display_name"] = args.display_name or display_name(args.name, config.get("image"))
    spec["env"].update(_env_flags(args))
    spec["metadata"]["kernel_provisioner"]["config"] = config
    spec["metadata"]["debugger"] = bool(config.get("debugger"))  # JupyterLab's debugger UI
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / args.name
        src.mkdir()
        (src / "kernel.json").write_text(json.dumps(spec, indent=2) + "\n")
        for res in template.iterdir():
            if res.name.endswith((".png", ".svg")):
                with resources.as_file(res) as f:
                    shutil.copy(f, src / res.name)
        prefix = sys.prefix if args.sys_prefix else args.prefix
        dest = KernelSpecManager().install_kernel_spec(
            str(src), args.name, user=args.user and not prefix, prefix=prefix
        )
    print(f"installed kernelspec {args.name!r} ({spec['display_name']}) in {dest}")
    user = args.user and not prefix
    if args.lockdown:
        conf, default = _lock_down(args.name, user, prefix)
        print(f"locked down in {conf}: Jupyter servers offer and start only the smolvm "
              f"kernelspecs locked down so far; {default!r} is the default. See "
              "docs/deploy.md for what this does not stop.")  # fmt: skip
    aliases = [*args.alias, *((NATIVE_KERNEL_NAME,) if args.lockdown else ())]
    if aliases:
        conf, routed = _route_aliases(args.name, aliases, user, prefix)
        print(f"in {conf}: Jupyter servers start {args.name!r} when a client asks for "
              f"{', '.join(repr(a) for a in routed)}")  # fmt: skip
    if not args.no_server_extension:
        conf = _enable_server_extension(args.user and not prefix, prefix)
        print(f"enabled the smol_kernel server extension (fills the warm pool at server "
              f"start) in {conf}")  # fmt: skip
    image = config.get("image", "default")
    try:
        GuestImage.load(image)
    except ImageNotFound as e:
        print(f"note: {e}", file=sys.stderr)
    return 0


def _server_config_dir(user: bool, prefix: str | None):
    """The Jupyter config folder that goes with where the kernelspec went."""
    from pathlib import Path

    from jupyter_core.paths import ENV_CONFIG_PATH, SYSTEM_CONFIG_PATH, jupyter_config_dir

    if prefix:
        base = Path(prefix) / "etc" / "jupyter"
    elif user:
        base = Path(jupyter_config_dir())
    else:  # like KernelSpecManager's system-wide default (/etc/jupyter)
        base = Path(SYSTEM_CONFIG_PATH[0] if SYSTEM_CONFIG_PATH else ENV_CONFIG_PATH[0])
    base.mkdir(parents=True, exist_ok=True)
    return base


def _enable_server_extension(user: bool, prefix: str | None) -> str:
    # jupyter_server reads only jpserver_extensions from jupyter_server_config.d
    conf = _server_config_dir(user, prefix) / "jupyter_server_config.d" / "smol_kernel.json"
    conf.parent.mkdir(exist_ok=True)
    conf.write_text(
        json.dumps({"ServerApp": {"jpserver_extensions": {"smol_kernel": True}}}, indent=2) + "\n"
    )
    return str(conf)


def _server_config(user: bool, prefix: str | None):
    conf = _server_config_dir(user, prefix) / "jupyter_server_config.json"
    try:
        return conf, json.loads(conf.read_text())
    except FileNotFoundError:
        return conf, {}
    except ValueError as e:
        raise ValueError(f"{conf} is not valid JSON ({e}); fix it first") from None


def _route_aliases(name: str, aliases: list[str], user: bool,
                   prefix: str | None) -> tuple[str, list[str]]:  # fmt: skip
    """Servers start ``name`` when a client asks for one of ``aliases`` (merged into
    jupyter_server_config.json; an alias routed earlier keeps its kernelspec)."""
    from .lockdown import KERNEL_MANAGER

    conf, config = _server_config(user, prefix)
    server = config.setdefault("ServerApp", {})
    current = server.setdefault("kernel_manager_class", KERNEL_MANAGER)
    if current != KERNEL_MANAGER:
        raise ValueError(f"{conf} sets ServerApp.kernel_manager_class to {current!r}; kernel "
                         f"aliases need {KERNEL_MANAGER} (a subclass of jupyter_server's "
                         "MappingKernelManager)")  # fmt: skip
    table = config.setdefault("RoutingKernelManager", {}).setdefault("kernel_aliases", {})
    routed = []
    for alias in dict.fromkeys(a.lower() for a in aliases):
        if alias == name.lower():
            continue
        if table.setdefault(alias, name) == name:
            routed.append(alias)
    conf.write_text(json.dumps(config, indent=2) + "\n")
    return str(conf), routed


def _lock_down(name: str, user: bool, prefix: str | None) -> tuple[str, str]:
    """Only smolvm kernelspecs may start, and new notebooks get ``name``: merged into
    jupyter_server_config.json (the .d folder holds only extension switches). Kernelspecs
    locked down earlier stay allowed; the first one stays the default. Terminals,
    JupyterLab's extension installs and the server extensions of assistants that run code
    on the host (``lockdown.HOST_EXECUTING_EXTENSIONS``) are turned off unless the file
    already turns them on, and nbconvert exports read no templates from the server's
    working folder. Running it again changes nothing."""
    from .lockdown import HOST_EXECUTING_EXTENSIONS, KERNEL_SPEC_MANAGER

    conf, config = _server_config(user, prefix)
    ksm = config.setdefault("KernelSpecManager", {})
    mkm = config.setdefault("MultiKernelManager", {})
    server = config.setdefault("ServerApp", {})
    ksm["allowed_kernelspecs"] = sorted({*(ksm.get("allowed_kernelspecs") or []), name})
    ksm["ensure_native_kernel"] = False
    server["kernel_spec_manager_class"] = KERNEL_SPEC_MANAGER
    server.setdefault("terminals_enabled", False)
    extensions = server.setdefault("jpserver_extensions", {})
    for extension in HOST_EXECUTING_EXTENSIONS:  # assistants' tools that run on the host
        extensions.setdefault(extension, False)
    config.setdefault("LabApp", {}).setdefault("extension_manager", "readonly")
    # nbconvert reads templates (Jinja, unsandboxed) from the server's working folder,
    # which the contents API can write: exports use the installed templates only.
    config.setdefault("TemplateExporter", {})["extra_template_basedirs"] = []
    default = mkm.setdefault("default_kernel_name", name)
    conf.write_text(json.dumps(config, indent=2) + "\n")
    return str(conf), default


# ------------------------------------------------------------------ doctor / ps / kill


def cmd_doctor(args: argparse.Namespace) -> int:
    from .vm.select import select_backend

    sel = select_backend(args.backend, args.image, args.require_hardware_isolation)
    print(f"backend selection (backend={args.backend}, image={args.image}, "
          f"require_hardware_isolation={args.require_hardware_isolation}):")  # fmt: skip
    for step in sel.steps:
        print(f"  - {step}")
    if sel.backend is None:
        assert sel.error is not None
        print(f"\nA kernel would NOT start: {sel.error.reason}")
        if sel.error.fix:
            print(f"To fix: {sel.error.fix}")
        return 1
    assert sel.status is not None and sel.status.isolation is not None
    print(f"\nA kernel would run with backend {sel.backend.name}, isolation "
          f"{sel.status.isolation}.")  # fmt: skip
    if not sel.status.isolation.hardware:
        print(
            "WARNING: TCG is software emulation, not a security boundary. Run on a host "
            "with working KVM for hardware isolation, or set require_hardware_isolation "
            "to refuse TCG."
        )
    return 0


def _rss_kib(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def cmd_ps(args: argparse.Namespace) -> int:
    import time

    from .shown import escaped
    from .vm.process import _alive, list_vms, reap_orphans, vm_processes

    _say_reaped(reap_orphans())
    rows = []
    for rt, state in list_vms():
        pids = vm_processes(rt, state)
        owner_alive = _alive(state.get("owner_pid"), state.get("owner_start"))
        rows.append(
            {
                "vm": rt.id,
                "kernel_id": state.get("label", ""),
                "backend": state.get("backend", "?"),
                "isolation": state.get("isolation", "?"),
                "pid": (state.get("pids") or {}).get("vmm"),
                "uptime_s": round(time.time() - state["created"], 1)
                if "created" in state
                else None,
                "rss_mib": round(sum(_rss_kib(p) for p in pids) / 1024, 1),
                "memory_mib": state.get("memory_mib"),
                "network": bool(state.get("network")),
                "shares": state.get("shares") or [],
                # A pool VM is "booting" until its kernel is prepared, then "pooled".
                "state": (
                    ("pooled" if state.get("pool_ready") else "booting")
                    if state.get("pooled")
                    else "running"
                )
                if pids and owner_alive
                else ("orphaned" if pids else "stale"),
                "owner_pid": state.get("owner_pid"),
                "user": str(state.get("user") or "-"),
            }
        )
    if args.json:
        print(json.dumps(rows))
        return 0
    from . import template as tpl

    saved = tpl.list_templates()
    if saved:  # what clones map: shared between them, on disk until pruned
        size = _fmt_size(sum(t.disk_bytes() for t in saved))
        print(f"{len(saved)} template(s), {size}, in {tpl.templates_dir()} "
              "(smol-kernel templates)")  # fmt: skip
    if not rows:
        print("no kernel VMs running")
        return 0
    print(f"{'VM':<9} {'KERNEL ID':<37} {'USER':<12} {'BACKEND':<8} {'ISOL':<5} {'PID':>7} "
          f"{'UPTIME':>8} {'RSS':>9} {'STATE':<8} {'NET':<3} SHARES")  # fmt: skip
    for r in rows:  # client-chosen kernel ids and user names: shown escaped
        up = f"{r['uptime_s']:.0f}s" if r["uptime_s"] is not None else "?"
        net = "on" if r["network"] else "off"
        shares = " ".join(escaped(s) for s in r["shares"]) or "-"
        print(f"{escaped(r['vm']):<9} {escaped(r['kernel_id']) or '-':<37} "
              f"{escaped(r['user'])[:12]:<12} {escaped(r['backend']):<8} "
              f"{escaped(r['isolation']):<5} {escaped(r['pid'] or '-'):>7} {up:>8} "
              f"{r['rss_mib']:>6.0f}MiB {r['state']:<8} {net:<3} {shares}")  # fmt: skip
    return 0


def cmd_templates(args: argparse.Namespace) -> int:
    """List, remove or prune kernel templates (saved VMs clones start from)."""
    from . import template as tpl

    templates = tpl.list_templates()
    if args.prune:
        removed = tpl.prune(args.idle_days)
        print(f"removed {len(removed)} template(s)" + "".join(f"\n  {k}" for k in removed))
        return 0
    if args.rm:
        chosen = [t for t in templates if args.rm == "all" or t.key.startswith(args.rm)]
        if not chosen:
            print(f"smol-kernel: no template matches {args.rm!r}", file=sys.stderr)
            return 1
        for t in chosen:
            size = t.disk_bytes()
            tpl.remove(t)
            print(f"removed template {t.key} ({_fmt_size(size)})")
        return 0
    rows = [{"key": t.key, "folder": str(t.folder), "disk_bytes": t.disk_bytes(), **t.meta}
            for t in templates]  # fmt: skip
    if args.json:
        print(json.dumps(rows))
        return 0
    print(f"templates in {tpl.templates_dir()}: {len(rows)}, "
          f"{_fmt_size(sum(r['disk_bytes'] for r in rows))} on disk")  # fmt: skip
    for r in rows:
        print(f"  {r['key'][:12]}  {_fmt_size(r['disk_bytes']):>10}  built in "
              f"{r.get('build_s', '?')}s  {r.get('plan', '')}")  # fmt: skip
    return 0


def _say_reaped(ids: list[str]) -> None:
    """Leftovers of exited owners (a SIGKILLed server) go whenever we look at VMs."""
    if ids:
        print(f"smol-kernel: removed {len(ids)} leftover VM(s) whose owner had exited: "
              f"{', '.join(ids)}", file=sys.stderr)  # fmt: skip


def _find_vm(ident: str, vms: list) -> tuple | None:
    """The one VM whose id or kernel id starts with ``ident``; says why on stderr if none."""
    matches = [
        (rt, st) for rt, st in vms
        if rt.id.startswith(ident) or (st.get("label") or "").startswith(ident)
    ]  # fmt: skip
    if not matches:
        print(f"smol-kernel: no kernel VM matches {ident!r} (see: smol-kernel ps)",
              file=sys.stderr)  # fmt: skip
        return None
    if len(matches) > 1:
        ids = ", ".join(rt.id for rt, _ in matches)
        print(f"smol-kernel: {ident!r} matches several VMs ({ids}); be more specific",
              file=sys.stderr)  # fmt: skip
        return None
    return matches[0]


def cmd_kill(args: argparse.Namespace) -> int:
    from .shown import escaped
    from .vm.process import kill_vm_dir, list_vms, reap_orphans

    _say_reaped(reap_orphans())
    status = 0
    vms = list_vms()
    for ident in args.ids:
        if (found := _find_vm(ident, vms)) is None:
            status = 1
            continue
        rt, st = found
        kill_vm_dir(rt, st)
        label = f" (kernel {escaped(st['label'])})" if st.get("label") else ""
        print(f"killed VM {rt.id}{label}")
    return status


def _ask_kernel(ident: str, request: dict) -> dict | None:
    """Send a request to the process that runs kernel ``ident`` (kernel_control.py)."""
    from .kernel_control import ask
    from .vm.process import list_vms

    if (found := _find_vm(ident, list_vms())) is None:
        return None
    rt, _ = found
    try:
        reply = ask(rt.path, request)
    except (OSError, ValueError) as e:
        print(f"smol-kernel: error: {e}", file=sys.stderr)
        return None
    if not reply.get("ok"):
        from .shown import printable

        print(f"smol-kernel: error: {printable(str(reply.get('error', 'refused')))}",
              file=sys.stderr)  # fmt: skip
        return None
    return reply


def cmd_checkpoint(args: argparse.Namespace) -> int:
    from .checkpoint import CheckpointError, check_name

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
    from . import checkpoint as store

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


def cmd_logs(args: argparse.Namespace) -> int:
    from .shown import printable
    from .vm.base import read_tail
    from .vm.process import list_vms

    if (found := _find_vm(args.id, list_vms())) is None:
        return 1
    rt, _ = found
    if args.network:
        return _print_egress(rt.path, args.json)
    # Guest-written: no terminal escape sequences or other control characters get through.
    sys.stdout.write(printable(read_tail(rt.path / "console.log", args.bytes)))
    return 0


def _print_egress(rt_path, as_json: bool) -> int:
    import time

    from .shown import printable
    from .vm.network import describe_destination, read_egress_log

    log = read_egress_log(rt_path)
    if log is None:
        print("no network log: the kernel has no network (or its guard has not written yet)",
              file=sys.stderr)  # fmt: skip
        return 1
    if as_json:
        print(json.dumps(log, indent=1))
        return 0
    allow = log.get("allow_hosts")
    print(f"allow-list: {', '.join(allow) if allow else 'none (network on for every destination)'}")
    print(f"allowed: {log.get('allowed', 0)}  blocked: {log.get('blocked', 0)}")
    for e in sorted(log.get("entries", []), key=lambda e: e.get("first", 0)):
        when = time.strftime("%H:%M:%S", time.localtime(e.get("last", 0)))
        # Names come from the guest's queries (sanitized by the guard; printable() anyway).
        print(printable(f"{e.get('verdict', '?'):8} {e.get('count', 0):6}x  last {when}  "
                        f"{describe_destination(e)}"))  # fmt: skip
    if log.get("entries_lost"):
        print(f"({log['entries_lost']} attempts to further destinations not itemized)")
    return 0


# ------------------------------------------------------------------ run


def _print_outputs(cell, index: int) -> None:
    """A cell's outputs on the terminal: guest-written, so no control characters."""
    import base64

    from .shown import printable

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

    from .pool import warm_pool
    from .shown import printable

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
        startup_timeout=args.startup_timeout,
        allow_errors=args.allow_errors,
        interrupt_on_timeout=True,
        on_cell_executed=on_cell_executed,
        # The kernel starts in the notebook's folder, as under Jupyter (matters for share_cwd).
        resources={"metadata": {"path": os.path.dirname(os.path.abspath(args.notebook))}},
    )
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
    if args.output:
        nbformat.write(nb, args.output)
        print(f"wrote {args.output}")
    return status


# ------------------------------------------------------------------ AI assistants


def _host_port(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"--http {text!r}: use HOST:PORT, e.g. 127.0.0.1:8765")
    return host.strip("[]") or "127.0.0.1", int(port)


def cmd_mcp(args: argparse.Namespace) -> int:
    try:
        from .mcp_server import serve
    except ImportError as e:
        raise ValueError(f"{e}; install the MCP extra: pip install 'smol-kernel[mcp]'") from None
    import asyncio
    import secrets

    config = _provisioner_config(args)
    http = _host_port(args.http) if args.http else None
    token = args.token
    if http is not None and not token:
        token = secrets.token_urlsafe(32)
        print(f"smol-kernel mcp: bearer token (send 'Authorization: Bearer TOKEN'): {token}",
              file=sys.stderr, flush=True)  # fmt: skip
    if http is not None:
        print(f"smol-kernel mcp: streamable HTTP on http://{http[0]}:{http[1]}/mcp",
              file=sys.stderr, flush=True)  # fmt: skip
    asyncio.run(serve(config, _env_flags(args), args.max_output_chars, args.max_sessions,
                      http, token))  # fmt: skip
    return 0


def cmd_agent(args: argparse.Namespace) -> int:
    try:
        from .claude_agent import run_agent_cli
    except ImportError as e:
        raise ValueError(
            f"{e}; install the agent extra: pip install 'smol-kernel[agent]'"
        ) from None
    return run_agent_cli(args, _provisioner_config(args), _env_flags(args))


# ------------------------------------------------------------------ main


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
    run.add_argument("--startup-timeout", type=float, default=300)
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


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except (SmolKernelError, ValueError) as e:
        from .shown import printable

        # (a VM error may quote the guest's console: no terminal escapes get through)
        print(f"smol-kernel: error: {printable(str(e))}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
