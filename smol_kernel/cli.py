"""The ``smol-kernel`` command line."""

from __future__ import annotations

import argparse
import json
import sys

from .image.debian import HostToolError
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

    builder = ImageBuilder(name=args.name, apt=args.apt, pip=args.pip, suite=args.suite)
    stages = 6 + (1 if args.pip else 0)
    builder.progress = StageProgress(stages)
    image = builder.build(force=args.force)
    print(image.path)
    return 0


def cmd_image_list(args: argparse.Namespace) -> int:
    from .image.store import list_images

    images = list_images()
    if args.json:
        print(json.dumps([{"name": i.name, "path": str(i.path), **i.manifest} for i in images]))
        return 0
    if not images:
        print("no guest images; build one with: smol-kernel image build")
        return 0
    print(f"{'NAME':<16} {'CREATED':<21} {'KERNEL':<18} {'SIZE':>10}  EXTRA PACKAGES")
    for img in images:
        m = img.manifest
        size = sum(f["size"] for f in m.get("files", {}).values())
        extra = " ".join(m["inputs"].get("apt", []) + m["inputs"].get("pip", [])) or "-"
        print(
            f"{img.name:<16} {m.get('created', '?'):<21} {img.kernel_release:<18} "
            f"{_fmt_size(size):>10}  {extra}"
        )
    return 0


def cmd_image_rm(args: argparse.Namespace) -> int:
    from .image.store import remove_image

    for name in args.names:
        path = remove_image(name)
        print(f"removed {name} ({path})")
    return 0


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
    b.add_argument("--name", default=DEFAULT_IMAGE, help="image name (default: %(default)s)")
    b.add_argument("--apt", nargs="+", default=[], metavar="PKG", help="extra Debian packages")
    b.add_argument("--pip", nargs="+", default=[], metavar="PKG", help="extra pip packages")
    b.add_argument("--suite", default="bookworm", help="Debian suite (default: %(default)s)")
    b.add_argument("--force", action="store_true", help="rebuild even if inputs are unchanged")
    b.set_defaults(func=cmd_image_build)
    ls = isub.add_parser("list", help="list built images")
    ls.add_argument("--json", action="store_true")
    ls.set_defaults(func=cmd_image_list)
    rm = isub.add_parser("rm", help="remove images")
    rm.add_argument("names", nargs="+", metavar="NAME")
    rm.set_defaults(func=cmd_image_rm)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except (HostToolError, ImageNotFound, ValueError) as e:
        print(f"smol-kernel: error: {e}", file=sys.stderr)
        return 2
    except Exception as e:
        from .image.builder import ImageBuildError

        if isinstance(e, ImageBuildError):
            print(f"smol-kernel: error: {e}", file=sys.stderr)
            return 2
        raise
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
