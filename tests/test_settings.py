"""The settings' typed faces agree with the traits (no VM)."""

import inspect
import typing

import pytest
from traitlets import Bool, Enum, Float, Integer, List, Unicode

from smol_kernel.provisioner import SmolVMProvisioner
from smol_kernel.sandbox import AsyncSandbox, SandboxOptions
from smol_kernel.settings import KernelOptions, KernelSettings, SettingError, default_of

PYTHON_TYPE = {Bool: bool, Integer: int, Float: float, Unicode: str, Enum: str, List: list}


def test_kernel_options_name_every_setting_with_its_type():
    traits = KernelSettings.class_traits(config=True)
    hints = typing.get_type_hints(KernelOptions)
    assert set(hints) == set(traits)
    for name, trait in traits.items():
        hint = typing.get_origin(hints[name]) or hints[name]
        want = PYTHON_TYPE[type(trait)]
        assert hint is want or (want is list and issubclass(list, hint)), (name, hints[name])


def test_a_sandbox_has_no_defaults_of_its_own():
    """What a sandbox leaves out is the provisioner's default: the kernelspec it starts has
    only what was asked for, and its wait for the kernel is the provisioner's deadline."""
    plain = AsyncSandbox()
    assert plain._config == {}
    assert plain._spec.metadata["kernel_provisioner"]["config"] == {}
    assert plain.startup_timeout == default_of("startup_timeout") == 240.0
    assert plain.startup_timeout == SmolVMProvisioner().startup_timeout
    asked = AsyncSandbox(startup_timeout=30, shares=("/tmp:/data",), memory_mib=512)
    assert asked._config == {"startup_timeout": 30, "shares": ["/tmp:/data"], "memory_mib": 512}
    assert asked.startup_timeout == 30.0


def test_sandbox_options_are_the_settings_and_the_sandboxs_own_arguments():
    params = inspect.signature(AsyncSandbox.__init__).parameters
    own = {n for n, p in params.items() if p.kind is inspect.Parameter.KEYWORD_ONLY}
    assert own == {"env", "max_output_chars", "max_file_bytes", "interrupt_grace"}
    assert set(typing.get_type_hints(SandboxOptions)) == own | set(
        typing.get_type_hints(KernelOptions)
    )


def test_a_sandbox_checks_its_network_settings_with_the_one_check():
    """The command line, sandboxes and a kernel's plan share one check (settings.py); a
    sandbox refuses before any VM, naming the setting."""
    bad = [("allow_hosts", ["http://x"], "allow_hosts entry"),
           ("dns_servers", ["dns.example"], "not an IPv4 address"),
           ("private_answer_ranges", ["bad"], "not an IPv4 CIDR")]  # fmt: skip
    for setting, value, match in bad:
        with pytest.raises(SettingError, match=match) as caught:
            AsyncSandbox(**{setting: value})
        assert caught.value.setting == setting and isinstance(caught.value, ValueError)
    AsyncSandbox(allow_hosts=["pypi.org"], dns_servers=["192.0.2.53"])  # the control
