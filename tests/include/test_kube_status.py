"""ClusterStatus against the real API server: progress-only changes throttled per migration (across writers,
through the memo beside the status file), significant ones at once, Events only for what changed, a migration
absent from the cluster skipped."""

from __future__ import annotations

import uuid

from include import status as st
from include.kube_status import INTERVAL, ClusterStatus, events_between

GROUP, VERSION = "infra.virtrigaud.io", "v1beta1"


def _migration(kube_api, name: str) -> None:
    kube_api.apply_yaml({"apiVersion": f"{GROUP}/{VERSION}", "kind": "VMMigration",
                         "metadata": {"name": name, "namespace": "default"},
                         "spec": {"sourceName": "vm", "targetProviderRef": {"name": "p"}, "targetName": "t",
                                  "storage": {"type": "nfs", "path": "/share"}}})


def test_progress_is_throttled_and_phases_are_not(kube_api, tmp_path):
    name = f"thr-{uuid.uuid4().hex[:6]}"
    _migration(kube_api, name)
    now = [1000.0]
    memo = tmp_path / "status.json.cluster"
    writers = [ClusterStatus(lambda: kube_api.client(), clock=lambda: now[0]) for _ in range(2)]
    s0 = st.new_status()
    s1 = st.new_status()
    st.enter_phase(s1, st.Phase.TRANSFERRING, message="Transferring")
    assert writers[0].publish("default", name, s0, s1, memo=memo)
    s2 = dict(s1, progress=50)
    now[0] += 1
    assert not writers[1].publish("default", name, s1, s2, memo=memo), "progress alone, within the interval"
    now[0] += INTERVAL
    assert writers[1].publish("default", name, s1, s2, memo=memo), "progress alone, after the interval"
    got = kube_api.request("GET", f"/apis/{GROUP}/{VERSION}/namespaces/default/vmmigrations/{name}")[1]
    assert (got["status"]["phase"], got["status"]["progress"]) == ("Transferring", 50)
    assert not writers[0].publish("default", f"absent-{name}", s0, s1, memo=tmp_path / "absent")


def test_events_name_what_changed():
    a = st.new_status()
    b = st.new_status()
    st.enter_phase(b, st.Phase.VALIDATING, message="Validating")
    assert events_between(a, b) == [("Normal", "PhaseValidating", "Validating")]
    c = dict(b, conditions=[{"type": "Validating", "status": "True", "reason": "Retrying", "message": "attempt 1/3"}])
    assert events_between(b, c) == [("Warning", "Retrying", "Validating: attempt 1/3")]
    assert events_between(c, c) == []
    d = dict(c, phase="Failed", message="VM x not found",
             conditions=[{"type": "Validated", "status": "False", "reason": "NotFound", "message": "VM x"}])
    assert events_between(c, d) == [("Warning", "NotFound", "VM x not found")]
