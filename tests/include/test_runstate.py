"""The run-state stores (include/runstate.py): the file store and the SQL store keep the same contract,
read-modify-write is atomic across processes, a claim has exactly one holder."""

from __future__ import annotations

import multiprocessing
import threading
from pathlib import Path

import pytest

from include.claims import NameClaims
from include.errors import Conflict
from include.ledger import Ledger
from include.runstate import FileRunState, SqlRunState
from include.store import SpecStore


@pytest.fixture(params=["files", "sql"])
def store(request, tmp_path, monkeypatch):
    """A spec store whose run state is files beside the spec, or a table in an SQL database."""
    monkeypatch.delenv("VMMIGRATION_RUN_STATE", raising=False)
    if request.param == "files":
        store = SpecStore(tmp_path / "store")
        assert isinstance(store.state, FileRunState)
        return store
    return SpecStore(tmp_path / "store", state=SqlRunState(f"sqlite:///{tmp_path / 'state.db'}"))


def test_documents_round_trip_and_update_returns_what_mutate_returns(store):
    state = store.state
    assert state.read("ns", "web", "plan") is None
    state.write("ns", "web", "plan", {"disks": [{"name": "vda"}], "note": "é"})
    assert state.read("ns", "web", "plan") == {"disks": [{"name": "vda"}], "note": "é"}
    state.write("ns", "web", "plan", {"disks": []})  # a write replaces the whole document
    assert state.read("ns", "web", "plan") == {"disks": []}
    assert state.update("ns", "web", "run", lambda d: d.setdefault("n", 41) + 1) == 42
    assert state.read("ns", "web", "run") == {"n": 41}
    state.delete("ns", "web", "plan")
    assert state.read("ns", "web", "plan") is None
    assert state.read("ns", "other", "run") is None  # documents are per migration


def test_disk_records_are_cleared_by_prefix_and_nothing_else(store):
    store.update_disk_record("ns", "web", "vda", exported=True)
    store.update_disk_record("ns", "web", "vdb", exported=True)
    store.update_run_record("ns", "web", run="r1")
    store.update_disk_record("ns", "db", "vda", exported=True)
    assert store.disk_record("ns", "web", "vda") == {"name": "vda", "exported": True}
    store.clear_disk_records("ns", "web")
    assert store.disk_record("ns", "web", "vda") == {"name": "vda"}
    assert store.run_record("ns", "web") == {"run": "r1"}
    assert store.disk_record("ns", "db", "vda") == {"name": "vda", "exported": True}


def test_the_ledger_and_the_claims_live_in_the_run_state(store):
    ledger = Ledger.of(store, "ns", "web")
    run = ledger.new_run()
    entry = ledger.record("volume", "libvirt:qemu:///system", pool="p", volume="v", key="/k")
    assert ledger.run() == run and ledger.owns("volume", "libvirt:qemu:///system", key="/k")
    ledger.forget(entry)
    assert not ledger.owns("volume", "libvirt:qemu:///system", key="/k")
    claims = NameClaims.of(store)
    claims.acquire("libvirt:host", "web-new", "ns/web", run)
    claims.acquire("libvirt:host", "web-new", "ns/web", "a-later-run")  # its own claim: taken over
    with pytest.raises(Conflict, match="claimed by migration ns/web") as info:
        claims.acquire("libvirt:host", "web-new", "ns/other", "r")
    assert info.value.field == "spec.targetName"
    assert not claims.release("libvirt:host", "web-new", "ns/other")  # never someone else's
    assert claims.release("libvirt:host", "web-new", "ns/web")
    claims.acquire("libvirt:host", "web-new", "ns/other", "r")


def _bump(url: str, times: int) -> None:
    state = SqlRunState(url)
    for _ in range(times):
        state.update("ns", "web", "run", lambda d: d.__setitem__("n", d.get("n", 0) + 1))


def _claim(url: str, who: str, results) -> None:
    state = SqlRunState(url)
    try:
        NameClaims(state).acquire("libvirt:host", "web-new", who, "r")
        results.put(who)
    except Conflict:
        results.put(None)


def test_sql_read_modify_write_is_atomic_across_processes(tmp_path):
    url = f"sqlite:///{tmp_path / 'state.db'}"
    SqlRunState(url)  # the table, made once
    ctx = multiprocessing.get_context("spawn")
    workers = [ctx.Process(target=_bump, args=(url, 40)) for _ in range(4)]
    for w in workers:
        w.start()
    for w in workers:
        w.join(60)
        assert w.exitcode == 0
    assert SqlRunState(url).read("ns", "web", "run") == {"n": 160}  # no update lost


def test_sql_claim_race_has_exactly_one_winner(tmp_path):
    url = f"sqlite:///{tmp_path / 'state.db'}"
    SqlRunState(url)
    ctx = multiprocessing.get_context("spawn")
    results = ctx.Queue()
    workers = [ctx.Process(target=_claim, args=(url, f"ns/m{i}", results)) for i in range(6)]
    for w in workers:
        w.start()
    for w in workers:
        w.join(60)
    winners = [r for r in (results.get(timeout=10) for _ in workers) if r]
    assert len(winners) == 1


def test_sql_lock_excludes_and_a_dead_holders_lease_is_taken_over(tmp_path):
    state = SqlRunState(f"sqlite:///{tmp_path / 'state.db'}")
    inside: list[str] = []

    def second() -> None:
        with state.lock("ns", "web", "staging"):
            inside.append("2")

    with state.lock("ns", "web", "staging"):
        t = threading.Thread(target=second)
        t.start()
        t.join(0.5)
        assert inside == []  # the second taker waits while the first holds it
        # the run state stays usable inside the lock (no transaction is held open)
        state.update("ns", "web", "ledger", lambda d: d.setdefault("entries", []))
    t.join(10)
    assert inside == ["2"]
    # a holder that died: its lease expires and the lock is taken over
    stale = SqlRunState(state.url)
    with stale.lock("ns", "web", "other", lease=0.0), state.lock("ns", "web", "other", wait=5):
        pass


def test_sql_reads_do_not_wait_for_a_writer(tmp_path):
    """On SQLite a read begins deferred: it goes through while another connection holds the write lock."""
    import sqlite3

    path = tmp_path / "state.db"
    state = SqlRunState(f"sqlite:///{path}")
    state.write("ns", "web", "plan", {"disks": []})
    writer = sqlite3.connect(path, isolation_level=None)
    writer.execute("BEGIN IMMEDIATE")
    try:
        assert state.read("ns", "web", "plan") == {"disks": []}
    finally:
        writer.execute("ROLLBACK")
        writer.close()


def test_a_run_state_database_is_not_reached_until_used(tmp_path, monkeypatch):
    """The DAG files build a SpecStore at parse: naming an unreachable database changes nothing there."""
    from airflow.dag_processing.dagbag import DagBag

    from include.demo import DemoWorld, store_documents, write_store

    folder = tmp_path / "store"
    folder.mkdir()
    write_store(folder, "m.yaml", store_documents(DemoWorld(uri="qemu:///system", prefix="x", root=tmp_path),
                                                  name="lazy"))
    monkeypatch.setenv("VMMIGRATION_STORE", str(folder))
    monkeypatch.setenv("VMMIGRATION_RUN_STATE", "sqlite:////nonexistent/folder/state.db")
    bag = DagBag(dag_folder=str(Path(__file__).resolve().parents[2] / "dags"))
    assert not bag.import_errors, bag.import_errors
    assert "vmmigration__default__lazy" in bag.dags
    with pytest.raises(Exception, match="unable to open database file"):
        SpecStore(folder).load_plan("default", "lazy")  # the first use is where it fails, and it does
