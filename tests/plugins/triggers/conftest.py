"""Fixtures of the trigger tests: the engine's identity on the session's API server, a clean cluster."""

from __future__ import annotations

from tests.e2e.kube_world import clean_cluster, engine  # noqa: F401 - the engine's identity, a clean cluster
