"""Every setting of a smolvm kernel: the traits of ``SmolVMProvisioner``.

Set them in Jupyter's config (``c.SmolVMProvisioner.memory_mib = 2048``), in a kernelspec's
``metadata.kernel_provisioner.config`` (``smol-kernel install --memory-mib 2048``), or as
Sandbox arguments. README.md's table lists them all (tests/test_docs.py checks it).
"""

from __future__ import annotations

import ipaddress
import os
from collections.abc import Sequence
from typing import TypedDict

from traitlets import Bool, Enum, Float, HasTraits, Integer, List, Unicode, default

from .egress.allowlist import AllowList, AllowListError, check_cidr
from .error_root import SmolKernelError
from .vm.select import BACKENDS


class KernelSettings(HasTraits):
    """The provisioner's configurable traits (a mixin: the provisioner is the section)."""

    backend = Enum(
        BACKENDS,
        default_value="auto",
        config=True,
        help="VM backend: auto (libkrun, else QEMU with KVM, else QEMU with TCG), qemu, "
        "or libkrun.",
    )
    image = Unicode(
        "default", config=True, help="Guest image name (build it: smol-kernel image build)."
    )
    vcpus = Integer(1, config=True, help="Virtual CPUs of the kernel VM.")
    memory_mib = Integer(1024, config=True, help="Guest memory of the kernel VM, in MiB.")
    disk_mib = Integer(
        2048, config=True, help="Size cap of the VM's writable disk (sparse on the host), MiB."
    )
    max_processes = Integer(
        1024,
        config=True,
        help="Most tasks (processes and threads) the kernel and what it starts may have in "
        "the guest, 0 for the guest kernel's own limit. A fork bomb then fails with "
        "'Cannot fork' and the kernel stays usable.",
    )
    startup_timeout = Float(
        240.0,
        config=True,
        help="Seconds to wait for the VM to boot and the kernel to answer (the first start "
        "of a configuration also boots and saves its template); the guest console tail is "
        "shown when it expires. Sandboxes and smol-kernel run wait as long.",
    )
    require_hardware_isolation = Bool(
        False,
        config=True,
        help="Refuse to start unless the VM gets hardware virtualization (kvm or hvf); "
        "TCG software emulation is not a security boundary.",
    )
    guest_cwd = Unicode(
        "",
        config=True,
        help="Working directory of the kernel in the guest. Empty: the shared notebook "
        "folder when share_cwd is on, else /root.",
    )
    max_lifetime = Float(
        0.0,
        config=True,
        help="Stop the kernel's VM this many seconds after its kernel was ready (0: no "
        "limit); boot time does not count. The kernel is then reported dead, like any other "
        "exit.",
    )

    debugger = Bool(
        False,
        config=True,
        help="Load debugpy in the guest so JupyterLab's debugger works (smol-kernel install "
        "--debugger also sets the kernelspec's metadata.debugger). Off: the kernel starts "
        "faster and reports no debugger.",
    )
    pool_size = Integer(
        1,
        config=True,
        help="Warm pool: VMs this server process keeps booted, with the kernel imported and "
        "initialised, for each distinct kernel configuration that was started (or is "
        "listed when the server starts, with the smol_kernel server extension). A start "
        "takes one (instant); a refill boots in the background, never during a cold start. "
        "0: no pool, nothing runs in the background.",
    )
    max_vms = Integer(
        0,
        config=True,
        help="Most kernel VMs this server process runs at once, counting starting, running "
        "and warm-pool VMs (the pool gives way first); 0: no cap. A start over it fails "
        "with HTTP 403 and a message naming this setting.",
    )
    max_total_memory_mib = Integer(
        config=True,
        help="Most guest memory (MiB) this server process's kernel VMs may have in total, "
        "counted like max_vms; 0: no cap. Default: the spawner's MEM_LIMIT (JupyterHub sets "
        "it from Spawner.mem_limit), else 0.",
    )

    @default("max_total_memory_mib")
    def _default_max_total_memory_mib(self) -> int:
        try:
            return int(os.environ.get("MEM_LIMIT", "0")) // (1 << 20)
        except ValueError:
            return 0

    max_template_disk_mib = Integer(
        4096,
        config=True,
        help="Most disk (MiB) this user's kernel templates may take (one per configuration: "
        "image, memory, network, shares; ~210 MiB each). Each time one is built, the least "
        "recently used others go until the rest fit; never one a running VM maps or one "
        "used in the last 10 minutes. 0: no cap.",
    )
    template_max_idle_days = Float(
        14.0,
        config=True,
        help="Templates unused for this many days are removed, as are those of an image "
        "that was rebuilt or removed (checked each time a template is built; smol-kernel "
        "templates --prune does it now).",
    )
    pool_ttl = Float(
        3600.0,
        config=True,
        help="Seconds a pooled VM may wait unused before it is replaced by a fresh one.",
    )

    network = Bool(
        False,
        config=True,
        help="Give the kernel outbound network (TCP, UDP, DNS) through a per-VM passt proxy. "
        "Off: the guest has loopback only. Even on, the host's loopback (and so the Jupyter "
        "server) stays unreachable.",
    )
    dns_servers = List(
        Unicode(),
        default_value=[],
        config=True,
        help="With network on: IPv4 DNS servers the guest asks directly (they must not be "
        "host addresses, which the guest cannot reach). Empty: the host's resolver, "
        "forwarded by passt. With allow_hosts: the servers the host asks for allowed names "
        "(empty: the host's /etc/resolv.conf); the guest only asks the egress proxy.",
    )
    allow_hosts = List(
        Unicode(),
        default_value=[],
        config=True,
        help="The only destinations the kernel may reach, which turns the network on for "
        "them: host names (pypi.org), subdomains (*.example.com), IPv4 addresses and CIDR "
        "ranges, each optionally with :PORT or :PORT-PORT (a name without one: TLS and HTTP "
        "on 80 and 443). Every connection ends at a host-side proxy that judges it before "
        "connecting; other names get NXDOMAIN and other addresses a refusal. The host and "
        "local ranges stay blocked. Empty: network decides (all or nothing).",
    )
    private_answer_ranges = List(
        Unicode(),
        default_value=[],
        config=True,
        help="With allow_hosts: private or other non-global IPv4 ranges (CIDR) a DNS answer "
        "for an allowed name may open, e.g. 10.20.0.0/16 for an internal API. Empty: a name "
        "opens only globally routable addresses, so an allowed name pointed at a LAN "
        "address (DNS rebinding) opens nothing. Address entries in allow_hosts are not "
        "limited by this.",
    )
    shares = List(
        Unicode(),
        default_value=[],
        config=True,
        help="Host folders to show in the guest, as HOST:GUEST[:ro|rw] (read-only unless "
        ":rw). A relative HOST is relative to the notebook's folder.",
    )
    share_cwd = Enum(
        ["off", "ro", "rw"],
        default_value="off",
        config=True,
        help="Share the folder the kernel starts in (the notebook's folder) at cwd_guest_path "
        "and start the kernel there: off, ro (read-only) or rw.",
    )
    cwd_guest_path = Unicode(
        "/work", config=True, help="Where share_cwd mounts the notebook's folder in the guest."
    )
    allow_home_share = Bool(
        False,
        config=True,
        help="Allow a read-only share of the home folder itself. Everything in it becomes "
        "readable in the VM: ~/.ssh keys, cloud credentials, Jupyter's tokens and history "
        "included. Off: the home folder, and any folder of secrets, is refused even "
        "read-only.",
    )
    trusted_outputs = Bool(
        False,
        config=True,
        help="Show the kernel's outputs as the kernel sent them, JavaScript and all. This "
        "lets the code in the VM run script in your browser as you (and, through the "
        "Jupyter server's API, start programs on the host). Off: HTML, Markdown and SVG are "
        "sanitized and script outputs are replaced by a note (docs/security.md).",
    )
    iopub_backlog_mib = Integer(
        256,
        config=True,
        help="Most output (MiB) the host holds for this kernel's clients that they have not "
        "taken yet; over it, output messages are dropped and each client that missed some "
        "is told so in a stream line.",
    )

    restore_on_crash = Bool(
        False,
        config=True,
        help="When the kernel dies (out of memory, a crash, a stuck extension killed), the "
        "automatic restart resumes from the kernel's latest checkpoint instead of an empty "
        "kernel, and says so in a stream line.",
    )
    max_checkpoints = Integer(
        5,
        config=True,
        help="Checkpoints a kernel keeps; the oldest one not kept explicitly is removed "
        "when a new one is saved (0: no cap).",
    )
    checkpoint_interval = Float(
        5.0,
        config=True,
        help="Seconds between two checkpoints the kernel itself asks for (%%checkpoint); "
        "the host refuses the ones in between.",
    )
    guest_checkpoint_mib_per_s = Float(
        32.0,
        config=True,
        help="Disk bandwidth (MiB/s, on average) the checkpoints the kernel itself asks for "
        "may use: after one of S MiB the next waits at least S / this many seconds.",
    )
    restore_guest_checkpoints = Bool(
        False,
        config=True,
        help="With restore_on_crash, also restore a checkpoint the kernel itself asked for "
        "(%%checkpoint); by default only ones the host made (API, CLI, REST, a user's click) "
        "are, so code in the VM cannot choose what a crash brings back.",
    )
    package_installs = Bool(
        True,
        config=True,
        help="Whether the host installs packages a kernel asks for (%%pip install, "
        "Sandbox.install). The names and versions the guest picks reach the index: a "
        "narrow channel out of a VM with no network; turn this off, or use package_allow "
        "and a mirror that does not fetch through, where that matters.",
    )
    package_index_url = Unicode(
        "",
        config=True,
        help="The index the host installs packages from for a kernel (%%pip install, "
        "Sandbox.install; binary wheels only, resolved on the host with uv); empty: the one "
        "the host's pip uses (PIP_INDEX_URL or pip's config), else PyPI.",
    )
    max_install_mib = Integer(
        512, config=True, help="Size of the packages the host installs into one kernel, in all."
    )
    max_installs_per_minute = Integer(
        6, config=True, help="Package installs a kernel may ask the host for in a minute."
    )
    max_packages_per_install = Integer(
        20, config=True, help="Requirements one package install may name."
    )
    package_allow = List(
        Unicode(),
        config=True,
        help="Package names the host installs; empty: any (package_block still applies).",
    )
    package_block = List(Unicode(), config=True, help="Package names the host never installs.")


class KernelOptions(TypedDict, total=False):
    """The settings above as keyword arguments (``AsyncSandbox(memory_mib=2048)``), typed
    for an IDE: one key per setting, none with a default of its own (a key left out is the
    setting's default above). tests/test_settings.py checks it against the traits."""

    allow_home_share: bool
    allow_hosts: Sequence[str]
    backend: str
    checkpoint_interval: float
    cwd_guest_path: str
    debugger: bool
    disk_mib: int
    dns_servers: Sequence[str]
    guest_checkpoint_mib_per_s: float
    guest_cwd: str
    image: str
    iopub_backlog_mib: int
    max_checkpoints: int
    max_install_mib: int
    max_installs_per_minute: int
    max_lifetime: float
    max_packages_per_install: int
    max_processes: int
    max_template_disk_mib: int
    max_total_memory_mib: int
    max_vms: int
    memory_mib: int
    network: bool
    package_allow: Sequence[str]
    package_block: Sequence[str]
    package_index_url: str
    package_installs: bool
    pool_size: int
    pool_ttl: float
    private_answer_ranges: Sequence[str]
    require_hardware_isolation: bool
    restore_guest_checkpoints: bool
    restore_on_crash: bool
    share_cwd: str
    shares: Sequence[str]
    startup_timeout: float
    template_max_idle_days: float
    trusted_outputs: bool
    vcpus: int


def default_of(name: str) -> object:
    """The default of setting ``name`` on this host (some depend on it: the memory cap)."""
    return getattr(KernelSettings(), name)


class SettingError(SmolKernelError, ValueError):
    """A setting's value is wrong; ``setting`` names it."""

    def __init__(self, setting: str, message: str) -> None:
        super().__init__(message)
        self.setting = setting


def check_network(allow_hosts: Sequence[str] = (), private_answer_ranges: Sequence[str] = (),
                  dns_servers: Sequence[str] = ()) -> None:  # fmt: skip
    """The network settings' one check, for the command line, sandboxes and a kernel's plan:
    SettingError names the first that does not parse. (The network guard parses its
    allow-list again: it trusts nothing a host process hands it.)"""
    try:
        AllowList.parse(allow_hosts)
    except AllowListError as e:
        raise SettingError("allow_hosts", str(e)) from None
    for net in private_answer_ranges:
        try:
            check_cidr(net)
        except AllowListError as e:
            raise SettingError("private_answer_ranges", str(e)) from None
    for server in dns_servers:
        try:
            ipaddress.IPv4Address(server)
        except ValueError:
            raise SettingError("dns_servers", f"{server!r} is not an IPv4 address") from None


def network_on(network: bool, allow_hosts: Sequence[str]) -> bool:
    """Whether a kernel gets a network: ``allow_hosts`` turns it on (and limits it)."""
    return network or bool(allow_hosts)
