"""The "Python (smolvm)" kernelspec template (installed by ``smol-kernel install``).

``kernel.json`` is the one place the provisioner's name and the kernel's argv are written;
the Sandbox API and the server extension read them from here.
"""

from __future__ import annotations

import json
from importlib import resources


def template() -> dict:
    """A fresh copy of the kernelspec template (``kernel.json``)."""
    return json.loads(resources.files(__name__).joinpath("kernel.json").read_text())


PROVISIONER_NAME: str = template()["metadata"]["kernel_provisioner"]["provisioner_name"]
