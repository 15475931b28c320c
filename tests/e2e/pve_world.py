"""Proxmox VE test VMs on the test server (tests/servers/pve/server.py), made through its own helpers (not the
engine's driver), and the documents of a migration to or from it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tests.e2e.vsphere_world import pattern_disk

MiB = 1 << 20


def provider_docs(pve: Any, name: str, namespace: str = "default", *, token_secret: str | None = None,
                  node: str | None = None) -> list[dict]:
    """A proxmox Provider on the test server and its Secret: the API token, the server's CA, and SSH to node pve1
    (key, known host keys, port); ``node`` as its ``spec.defaults.cluster`` (the node VMs are created on)."""
    ssh = pve.ssh["pve1"]
    spec: dict[str, Any] = {"type": "proxmox", "endpoint": pve.url, "credentialSecretRef": {"name": f"{name}-creds"},
                            "runtime": {"mode": "Remote", "image": "virtrigaud/provider-proxmox:latest"}}
    if node:
        spec["defaults"] = {"cluster": node}
    return [
        {"apiVersion": "infra.virtrigaud.io/v1beta1", "kind": "Provider",
         "metadata": {"name": name, "namespace": namespace}, "spec": spec},
        {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": f"{name}-creds", "namespace": namespace},
         "type": "Opaque", "stringData": {
             "tokenId": pve.token_id, "tokenSecret": token_secret or pve.token_secret,
             "caBundle": Path(pve.ca_file).read_text(), "sshPrivateKey": Path(ssh.client_key).read_text(),
             "sshKnownHosts": Path(ssh.known_hosts).read_text(), "sshPort": str(ssh.port)}},
    ]


def create_vm(pve: Any, vmid: int, name: str, work: Path, *, running: bool = False) -> dict[str, Path]:
    """A shut-off (or ``running``) VM with a qcow2 disk on ``local`` (scsi0, 48 MiB) and a raw one on ``local-lvm``
    (scsi1, 24 MiB), a NIC on vmbr0; each disk's raw content (what a migrated disk must hold)."""
    raws = {}
    disks = []
    for index, (key, storage, fmt, size) in enumerate((("scsi0", "local", "qcow2", 48), ("scsi1", "local-lvm",
                                                                                        "raw", 24))):
        raw = work / f"{name}-{key}.raw"
        pattern_disk(raw, size, seed=index + 31)
        raws[key] = raw
        disks.append((key, storage, fmt, size * MiB, raw))
    pve.add_vm("pve1", vmid, name, disks=disks, cores=2, memory=1024, running=running)
    return raws
