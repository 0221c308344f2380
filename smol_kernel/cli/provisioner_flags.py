"""Provisioner settings as command-line flags, and the flags read back as checked settings."""

from __future__ import annotations

import argparse
import os
import sys


def _provisioner_traits() -> dict:
    from ..settings import KernelSettings

    return dict(KernelSettings.class_traits(config=True))


def _provisioner_config(args: argparse.Namespace) -> dict:
    """Provisioner settings given as flags (``_add_provisioner_flags``), checked."""
    from traitlets import Bool, List

    from ..vm.share import ShareError, parse_share, split_share

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
    from ..settings import SettingError, check_network

    try:
        check_network(config.get("allow_hosts", ()), config.get("private_answer_ranges", ()),
                      config.get("dns_servers", ()))  # fmt: skip
    except SettingError as e:  # the flag is the setting's singular: --allow-host
        raise ValueError(f"--{e.setting.replace('_', '-').removesuffix('s')}: {e}") from None
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
