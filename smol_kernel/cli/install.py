"""``smol-kernel install``: the kernelspec, and the Jupyter server config that goes with it."""

from __future__ import annotations

import argparse
import json
import sys

from ..image.store import DEFAULT_IMAGE, ImageNotFound
from .provisioner_flags import _env_flags, _provisioner_config


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

    from .. import kernelspec
    from ..image.store import GuestImage

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
    from ..lockdown import KERNEL_MANAGER

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
    from ..lockdown import HOST_EXECUTING_EXTENSIONS, KERNEL_SPEC_MANAGER

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
