"""Fixtures of the whole-migration tests."""

from __future__ import annotations

import pytest


@pytest.fixture
def s3(s3, monkeypatch):
    """The shared versitygw (tests/conftest.py) with its bucket ``vm-migrations``; the migrations reach it
    on loopback, which the address policy allows only when told to."""
    monkeypatch.setenv("VMMIGRATION_ALLOW_LOOPBACK", "true")
    return s3


from tests.e2e.kube_world import clean_cluster, engine, submitter  # noqa: E402, F401 - the engine's and the form's identities, a clean cluster
