"""What a guest may ask to install: requirement names, parsed strictly.

The guest names requirements only (``numpy``, ``pandas[parquet]>=2``, ``attrs; python_version
>= "3.8"``). Each is parsed with ``packaging`` (PEP 508) and written anew from the parsed form;
a URL, a path, an option (``-r``, ``--index-url``, ``-e``) or anything else that does not
parse is refused with a message that says what is accepted. The host hands only the
re-serialized requirements to the resolver, in a file, never as arguments.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from packaging.requirements import InvalidRequirement, Requirement
from packaging.utils import canonicalize_name

from ..error_root import SmolKernelError

MAX_REQUIREMENT_CHARS = 200
ACCEPTED = "a package name with optional extras, version and marker, e.g. 'pandas>=2'"


class RequirementError(SmolKernelError, ValueError):
    """A requirement the host will not resolve; the message says why and what is accepted."""


def parse_requirements(
    texts: Sequence[str], max_packages: int, allow: Iterable[str] = (), block: Iterable[str] = ()
) -> list[Requirement]:
    """The requirements in ``texts``, parsed and checked (RequirementError otherwise)."""
    if not isinstance(texts, (list, tuple)) or not texts:
        raise RequirementError(f"name at least one requirement: {ACCEPTED}")
    if len(texts) > max_packages:
        raise RequirementError(
            f"{len(texts)} requirements in one install; at most {max_packages} "
            "(SmolVMProvisioner.max_packages_per_install)"
        )
    allowed = {canonicalize_name(n) for n in allow}
    blocked = {canonicalize_name(n) for n in block}
    out, seen = [], set()
    for text in texts:
        req = _parse_one(text)
        name = canonicalize_name(req.name)
        if name in blocked or (allowed and name not in allowed):
            raise RequirementError(f"{name!r} is not a package this server installs "
                                   "(SmolVMProvisioner.package_allow / package_block)")  # fmt: skip
        if name in seen:
            raise RequirementError(f"{name!r} is named twice")
        seen.add(name)
        out.append(req)
    return out


def _parse_one(text: object) -> Requirement:
    if not isinstance(text, str) or not text.strip():
        raise RequirementError(f"not a requirement: {str(text)[:60]!r}; give {ACCEPTED}")
    shown = text[:60]
    # No double quote, comment, variable or brace: what packaging writes back must be what
    # uv reads (packaging quotes marker values with ", unescaped).
    if len(text) > MAX_REQUIREMENT_CHARS or any(c in text for c in '\r\n\0\\"#${}'):
        raise RequirementError(f"not a requirement: {shown!r}; give {ACCEPTED}")
    if text.lstrip().startswith("-"):
        raise RequirementError(
            f"{shown!r}: pip options (index, requirement files, editable) are not taken; "
            f"the server chooses the index. Give {ACCEPTED}"
        )
    if "/" in text or ":" in text.split(";")[0] or text.lstrip().startswith((".", "~")):
        raise RequirementError(
            f"{shown!r}: URLs and paths are not taken (packages come from the server's "
            f"index only); give {ACCEPTED}"
        )
    try:
        req = Requirement(text)
    except InvalidRequirement as e:
        raise RequirementError(f"{shown!r} is not a requirement ({e}); give {ACCEPTED}") from None
    if req.url is not None or "/" in text or "://" in text:
        raise RequirementError(
            f"{shown!r}: URLs and paths are not taken (packages come from the server's "
            f"index only); give {ACCEPTED}"
        )
    again = Requirement(str(req))  # written anew: what the resolver gets is the parsed form
    if str(again) != str(req) or again.marker != req.marker:
        raise RequirementError(f"{shown!r} does not read back the same; give {ACCEPTED}")
    return again


def check_names(names: Iterable[str], allow: Iterable[str] = (), block: Iterable[str] = ()) -> None:
    """Every package an install would bring (dependencies too) passes the server's lists."""
    allowed = {canonicalize_name(n) for n in allow}
    blocked = {canonicalize_name(n) for n in block}
    for name in map(canonicalize_name, names):
        if name in blocked or (allowed and name not in allowed):
            raise RequirementError(f"{name!r} is not a package this server installs "
                                   "(SmolVMProvisioner.package_allow / package_block)")  # fmt: skip
