"""The ``smol-kernel`` command line: ``main`` runs what ``build_parser`` parsed."""

from __future__ import annotations

import sys

from ..error_root import SmolKernelError
from .parser import build_parser

__all__ = ["build_parser", "main"]


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except (SmolKernelError, ValueError) as e:
        from ..shown import printable

        # (a VM error may quote the guest's console: no terminal escapes get through)
        print(f"smol-kernel: error: {printable(str(e))}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
