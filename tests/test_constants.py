"""Values written once: the copies that used to drift are now read from their one place."""

from __future__ import annotations

from importlib.metadata import entry_points
from pathlib import Path

from smol_kernel import kernelspec
from smol_kernel.guest import protocol as P
from smol_kernel.image.build_steps import init_script
from smol_kernel.provisioner import SmolVMProvisioner
from smol_kernel.sandbox.async_sandbox import kernel_spec


def test_the_installed_entry_point_is_the_kernelspec_provisioner_name():
    found = entry_points(
        group="jupyter_client.kernel_provisioners", name=kernelspec.PROVISIONER_NAME
    )
    assert [ep.load() for ep in found] == [SmolVMProvisioner]


def test_a_sandbox_kernelspec_is_the_installed_template_with_its_settings():
    template = kernelspec.template()
    spec = kernel_spec({"A": "1"}, {"image": "scipy"})
    assert spec.argv == template["argv"]
    assert spec.interrupt_mode == template["interrupt_mode"]
    provisioner = spec.metadata["kernel_provisioner"]
    assert provisioner == {"provisioner_name": kernelspec.PROVISIONER_NAME,
                           "config": {"image": "scipy"}}  # fmt: skip
    assert kernelspec.template()["metadata"]["kernel_provisioner"]["config"] == {}, "a copy"


def test_the_guest_init_starts_the_agent_from_the_one_agent_folder():
    script = init_script().decode()
    assert f"{P.GUEST_AGENT_DIR}/agent.py" in script
    assert "@" not in script.split("AGENT=", 1)[1].splitlines()[0]


def test_every_guest_module_is_copied_into_the_image():
    """The guest imports its siblings from the agent folder, which holds only GUEST_FILES:
    a module of smol_kernel/guest/ left out of the list would fail the guest's boot."""
    from smol_kernel.image.build_steps import GUEST_FILES

    modules = {p.name for p in Path(P.__file__).parent.glob("*.py")}
    assert "agent.py" in modules and "protocol.py" in modules
    assert {p.name for p in GUEST_FILES} == modules and all(p.is_file() for p in GUEST_FILES)
