"""One root for the errors smol-kernel raises to its users (issue 32: 32 exception classes in
26 modules had none, and the command line listed six of them by hand)."""

from __future__ import annotations

import importlib
import inspect
from pathlib import Path

import smol_kernel
from smol_kernel import errors
from smol_kernel.cli import main
from smol_kernel.error_root import SmolKernelError

# Raised and handled inside one room, never to a user.
INTERNAL = {
    "Rejected": "a guest message the relay drops and counts",
    "MarkdownTooLarge": "output the policy replaces with a notice",
    "ZmtpError": "a connection the relay closes",
    "FramingLost": "a frame stream the network guard resets",
    "MuxClosed": "a serial port the mux gives up (a ConnectionError its callers expect)",
    "KernelspecNotAllowed": "jupyter_server's NoSuchKernel as a 403 (the server shows it)",
}


def host_error_classes() -> dict[str, type]:
    found = {}
    root = Path(smol_kernel.__file__).parent
    for path in sorted(root.rglob("*.py")):  # (image/ is a namespace package)
        name = ".".join(("smol_kernel", *path.relative_to(root).with_suffix("").parts))
        if name.startswith("smol_kernel.guest") or name.endswith("__main__"):
            continue  # the guest's runs in the VM, with nothing of ours
        module = importlib.import_module(name.removesuffix(".__init__"))
        for name, cls in inspect.getmembers(module, inspect.isclass):
            if (cls.__module__ == module.__name__ and issubclass(cls, BaseException)
                    and not name.startswith("_")):  # fmt: skip
                found[name] = cls
    return found


def test_every_error_a_user_can_meet_derives_from_smol_kernel_error():
    classes = host_error_classes()
    assert {"VmError", "CheckpointError", "SandboxError", "ImageNotFound"} <= classes.keys()
    stray = sorted(n for n, c in classes.items()
                   if not issubclass(c, SmolKernelError) and n not in INTERNAL)  # fmt: skip
    assert stray == [], f"errors without the root: {stray}"
    assert set(INTERNAL) <= classes.keys(), "INTERNAL names a class that is gone"


def test_the_public_errors_are_named_in_one_place():
    for name in errors.__all__:
        cls = getattr(errors, name)
        assert issubclass(cls, SmolKernelError), name
        assert cls.__name__ == name
    public = {n for n, c in host_error_classes().items() if c.__module__ != "smol_kernel.errors"}
    assert {"VmError", "CheckpointError", "SandboxError", "ImageNotFound"} <= set(errors.__all__)
    assert set(errors.__all__) - public - set(vars(errors)) == set()


def test_the_command_line_reports_any_of_them_as_an_error(capsys, tmp_path, monkeypatch):
    """A PrivateDirError (not one of the six the command line listed before: it printed a
    traceback) is a message saying what to do, and exit status 2."""
    shared = tmp_path / "everyones"
    shared.mkdir()
    shared.chmod(0o777)
    monkeypatch.setenv("SMOL_KERNEL_TEMPLATES_DIR", str(shared))
    assert main(["templates"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("smol-kernel: error: ") and "chmod 700" in err, err
