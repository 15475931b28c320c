"""Behaviours added after a review: locality of libvirt URIs, bounded zstd decompression."""

from __future__ import annotations

import resource

import pytest

from include.compression import Compressor, decompress
from include.diskio import CHUNK, Segment
from include.providers.libvirt_driver import connection_uri, is_local_uri


@pytest.mark.parametrize(("uri", "local"), [
    ("qemu:///system", True),
    ("qemu+unix:///system?socket=/run/libvirt/libvirt-sock", True),
    ("qemu://kvm-host1/system", False),  # libvirt over TLS to another host, even if the same path exists here
    ("qemu+ssh://root@kvm-host1/system", False),
    ("qemu+tcp://127.0.0.1/system", False),
])
def test_only_a_hostless_qemu_uri_is_local(uri, local):
    assert is_local_uri(uri) is local


def test_ssh_key_goes_to_a_private_file_named_in_the_uri(tmp_path):
    import os

    uri, keyfile = connection_uri("qemu+ssh://root@h/system", {"ssh-privatekey": "-----KEY-----"})
    try:
        assert f"keyfile={keyfile}" in uri
        assert oct(os.stat(keyfile).st_mode & 0o777) == "0o600"
    finally:
        os.unlink(keyfile)
    assert connection_uri("qemu:///system", {"ssh-privatekey": "k"}) == ("qemu:///system", None)


def test_decompression_memory_is_bounded_whatever_the_ratio():
    comp = Compressor()
    zeros = bytes(CHUNK)
    packed = b"".join(comp.compress(zeros) for _ in range(256)) + comp.flush()  # 1 GiB of zeros
    assert len(packed) < 1024 * 1024
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    total = 0
    for seg in decompress(iter([Segment(length=len(packed), data=packed)])):
        assert seg.length <= CHUNK
        total += seg.length
    grown_mib = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
    assert total == 256 * CHUNK
    assert grown_mib < 64, f"peak RSS grew by {grown_mib:.0f} MiB"
