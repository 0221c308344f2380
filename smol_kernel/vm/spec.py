"""What a VM should be (``VmSpec``) and what isolation it got (``Isolation``)."""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from enum import Enum

from ..egress.allowlist import AllowList, AllowListError
from ..egress.netfilter import guest_net_config
from ..error_root import SmolKernelError
from .share import Share, ShareError, check_shares


class Isolation(str, Enum):
    """How the guest is separated from the host.

    ``kvm`` and ``hvf`` are hardware virtualization: a security boundary. ``tcg`` is QEMU's
    software emulation, which QEMU's own security policy says is *not* one.
    """

    KVM = "kvm"
    HVF = "hvf"
    TCG = "tcg"

    @property
    def hardware(self) -> bool:
        return self in (Isolation.KVM, Isolation.HVF)

    def __str__(self) -> str:
        return self.value


MIN_MEMORY_MIB = 256
MIN_DISK_MIB = 64


class VmSpecError(SmolKernelError, ValueError):
    """A VmSpec asks for something impossible; the message says what is allowed."""


@dataclass(frozen=True)
class VmSpec:
    """A request for one microVM.

    image:      name of a built guest image (``smol-kernel image build --name NAME``)
    vcpus:      virtual CPUs
    memory_mib: guest RAM
    disk_mib:   size cap of the per-VM writable overlay disk (sparse on the host)
    label:      free text shown by ``smol-kernel ps`` (the kernel id, for kernels)
    network:    give the guest outbound network through a per-VM passt (default: loopback only)
    dns:        DNS servers the guest asks directly (IPv4); default: the host's resolvers,
                through passt. With ``allow_hosts`` the egress proxy asks them instead
    allow_hosts: with network, the only destinations (``egress/allowlist.py`` entries), reached
                through the egress proxy; empty: any the network guard allows
    egress_carry: the runtime folder of the VM this one replaces (a rewind): its egress
                log and names go on in this one
    private_answers: non-global IPv4 ranges a DNS answer for an allowed name may open
    shares:     host folders visible in the guest (see ``share.py``)
    shares_at_claim: mount the shares when the kernel is claimed, not at boot (a VM that
                is saved cannot have 9p mounted; its clones mount what they are given)
    """

    image: str = "default"
    vcpus: int = 1
    memory_mib: int = 512
    disk_mib: int = 1024
    label: str = ""
    network: bool = False
    dns: tuple[str, ...] = ()
    allow_hosts: tuple[str, ...] = ()
    private_answers: tuple[str, ...] = ()
    shares: tuple[Share, ...] = ()
    shares_at_claim: bool = False
    egress_carry: str = ""

    def validate(self) -> None:
        if not isinstance(self.vcpus, int) or not 1 <= self.vcpus <= 64:
            raise VmSpecError(f"vcpus={self.vcpus!r}: choose a whole number from 1 to 64")
        if not isinstance(self.memory_mib, int) or self.memory_mib < MIN_MEMORY_MIB:
            raise VmSpecError(
                f"memory_mib={self.memory_mib!r} is too small: the guest (Linux, Python and "
                f"ipykernel) needs at least {MIN_MEMORY_MIB} MiB"
            )
        if self.memory_mib > 1 << 20:
            raise VmSpecError(f"memory_mib={self.memory_mib!r} is more than 1 TiB")
        if not isinstance(self.disk_mib, int) or self.disk_mib < MIN_DISK_MIB:
            raise VmSpecError(
                f"disk_mib={self.disk_mib!r} is too small: the writable disk needs at least "
                f"{MIN_DISK_MIB} MiB"
            )
        for server in self.dns:
            try:
                ipaddress.IPv4Address(server)
            except ValueError:
                raise VmSpecError(
                    f"DNS server {server!r} is not an IPv4 address (e.g. 192.0.2.53)"
                ) from None
        if self.allow_hosts and not self.network:
            raise VmSpecError("allow_hosts needs network=True (it limits the network)")
        try:
            AllowList.parse(self.allow_hosts)
        except AllowListError as e:
            raise VmSpecError(str(e)) from None
        for net in self.private_answers:
            try:
                ipaddress.IPv4Network(net, strict=False)
            except ValueError:
                raise VmSpecError(
                    f"private answer range {net!r} is not an IPv4 CIDR range (e.g. 10.0.0.0/8)"
                ) from None
        try:
            check_shares(self.shares)
        except ShareError as e:
            raise VmSpecError(str(e)) from None

    def boot_env(self) -> dict[str, str]:
        """Settings the guest's /init reads from its environment (kernel command line under
        QEMU, the exec environment under libkrun): network addressing and share mounts."""
        env = {}
        if self.network:  # (an allow-listed guest asks the egress proxy, 10.0.2.3)
            env["SMOL_NET"] = guest_net_config(() if self.allow_hosts else self.dns)
        if self.shares and self.shares_at_claim:
            env["SMOL_9P"] = "1"  # load 9p, mount nothing: the claim says what
        elif self.shares:
            env["SMOL_SHARES"] = ",".join(
                f"{share_tag(i)}:{s.guest}:{s.mode}" for i, s in enumerate(self.shares)
            )
        return env

    def claim_mounts(self) -> list[dict[str, str]]:
        """The shares a clone's agent mounts at the claim (``shares_at_claim``)."""
        if not self.shares_at_claim:
            return []
        return [{"tag": share_tag(i), "path": s.guest, "mode": s.mode}
                for i, s in enumerate(self.shares)]  # fmt: skip


def share_tag(index: int) -> str:
    """The 9p mount tag / virtio-fs tag of the index-th share."""
    return f"smol{index}"
