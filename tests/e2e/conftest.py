"""Fixtures of the whole-migration tests."""

from __future__ import annotations

import pytest

from tests.servers.s3 import start_s3_server


@pytest.fixture
def s3(tmp_path, monkeypatch):
    monkeypatch.setenv("VMMIGRATION_ALLOW_LOOPBACK", "true")
    server = start_s3_server(tmp_path / "s3")
    server.create_bucket("vm-migrations")
    yield server
    server.stop()
