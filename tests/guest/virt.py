"""Which libvirt domain type runs the test guest on this host."""

from __future__ import annotations

import os


def virt_type() -> str:
    """kvm where KVM can run the guest; qemu (TCG) otherwise. This host's KVM (kvm_pvm, a paravirtual KVM
    without hardware virtualisation) cannot run SYSLINUX or an unmodified Linux kernel, see README.md."""
    forced = os.environ.get("VMMIG_GUEST_VIRT")
    if forced:
        return forced
    if not os.path.exists("/dev/kvm") or os.path.exists("/sys/module/kvm_pvm"):
        return "qemu"
    return "kvm"
