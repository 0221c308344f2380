"""``smol-kernel image build|list|export|import|rm``: guest images."""

from __future__ import annotations

import argparse
import json

from ..image.store import DEFAULT_IMAGE
from .sizes import _fmt_size


def cmd_image_build(args: argparse.Namespace) -> int:
    from ..image.builder import ImageBuilder
    from ..image.progress import StageProgress

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
    from ..image.store import list_images
    from ..shown import printable as escaped_row

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

    from ..image.portable import export_image

    digest = export_image(args.name, Path(args.file), compress=args.compress)
    size = Path(args.file).stat().st_size
    print(f"exported image {args.name!r} to {args.file} ({_fmt_size(size)})")
    print(f"sha256 {digest}  (check it on import: --sha256 {digest})")
    return 0


def cmd_image_import(args: argparse.Namespace) -> int:
    from pathlib import Path

    from ..image.portable import import_image

    image = import_image(Path(args.file), args.name, args.force, args.sha256)
    print(f"imported image {image.name!r} ({image.kernel_release}) into {image.path}")
    return 0


def cmd_image_rm(args: argparse.Namespace) -> int:
    from ..image.store import remove_image

    for name in args.names:
        path = remove_image(name)
        print(f"removed {name} ({path})")
    return 0
