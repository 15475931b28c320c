"""What a phase works with: one migration's spec, validated plan, run state, drivers and storage,
built lazily from the spec store (``MigrationContext``), and the pin that holds a run to its plan."""

from __future__ import annotations

import dataclasses
import logging
import os
import socket
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

from include import safefs
from include import status as st
from include.diskio import ProgressTracker, format_progress
from include.errors import InvalidMigration, MigrationDeleted, MigrationFailure, PlanChanged
from include.inventory import (
    BundleInventory,
    Inventory,
    ProviderInfo,
    Resolved,
    SecretsFrom,
    TracingInventory,
    resolve,
)
from include.ledger import Ledger
from include.model import DiskPlan, DiskRecord, Plan
from include.plan import pin_of, staging_root
from include.providers import driver_for
from include.providers.base import HypervisorDriver
from include.providers.session import Ownership, TargetSession
from include.spec import SpecValidationError, StorageSpec, VMMigration
from include.status import Phase
from include.storage import backend_for
from include.storage.base import StorageBackend
from include.store import FileStatusSink, SpecStore, StatusSink, StoreIndex

log = logging.getLogger("include.phases")
#: the run state document holding a cluster run's VMMigration and inventory (``MigrationContext.cluster_run``)
SPEC = "spec"

#: read size for local files: one S3 part (8 MiB), so that a part can go out without being copied
READ_CHUNK = 8 * 1024 * 1024

_PIN_WHAT = {"spec": "the VMMigration's spec", "source": "the source Provider's type or endpoint",
             "target": "the target Provider's type or endpoint", "storage": "the storage"}
_PIN_FIELD = {"spec": "spec", "source": "spec.sourceName", "target": "spec.targetProviderRef",
              "storage": "spec.storage"}


#: workers that share one staging folder (a volume mounted by every replica) name it as one place
STAGING_SCOPE_ENV = "VMMIGRATION_STAGING_SCOPE"


def host_scope() -> str:
    """The ledger's scope for files and folders on this worker's own host (staging): the host's name, or the name
    ``$VMMIGRATION_STAGING_SCOPE`` gives a staging folder that several workers share (then a disk's tasks may run
    on any of them)."""
    return f"host:{os.environ.get(STAGING_SCOPE_ENV) or socket.gethostname()}"


def failure_message(err: BaseException) -> str:
    if isinstance(err, SpecValidationError):
        return "; ".join(str(e) for e in err.errors)
    if isinstance(err, MigrationFailure):
        return str(err)
    return f"{type(err).__name__}: {err}"


@dataclass
class MigrationContext:
    """Everything a phase needs about one migration, built lazily from the spec store."""

    namespace: str
    name: str
    store: SpecStore = field(default_factory=SpecStore)
    sink: StatusSink | None = None
    driver_factory: Callable[[ProviderInfo], HypervisorDriver] = driver_for
    storage_factory: Callable[..., StorageBackend] = backend_for
    logger: logging.Logger = log
    status_interval: float = 10.0
    #: reads a Secret (namespace, name) from the cluster, for a VMMigration mirrored from it (its Secrets are
    #: never copied to disk); None: Secrets come from the spec store
    cluster_secret: Callable[[str, str], dict[str, Any] | None] | None = None
    #: (uid, generation) of the cluster VMMigration this run is of (a run the Kubernetes watcher started): its
    #: Validating reads the VMMigration and its inventory from the cluster (``cluster_fetch``) and keeps them in
    #: the run state (``spec``), where every later task of the run reads them: no worker needs a mirror file
    cluster_run: tuple[str, int] | None = None
    #: True when ``cluster_run`` is the run's own (its conf); False when read from the mirror file's first line
    #: (a run started by hand on a mirror's DAG), where later tasks take the uid and generation Validating saved
    cluster_run_pinned: bool = True
    cluster_fetch: Callable[[str, str, str, int], list[dict[str, Any]]] | None = None
    #: whether the cluster still holds the VMMigration of that uid (asked before a run is handed over)
    cluster_present: Callable[[str, str, str], bool] | None = None

    def __post_init__(self) -> None:
        if self.sink is None:
            self.sink = FileStatusSink(self.store)

    # -- lazily resolved pieces --------------------------------------------------------------------
    #: set by Validating: the providers and storage come from the spec as it is now. Every later phase
    #: acts on the endpoints, paths and volumes the validated plan recorded (see ``_pinned``).
    validating: bool = False
    #: set by cleanup: it works on from the plan even when the spec no longer resolves
    cleaning: bool = False
    #: a status write that finds the cluster's VMMigration deleted stops the phase (MigrationDeleted); cleanup
    #: and the failure notifier go on (they are how the run ends)
    stop_when_deleted: bool = True

    @cached_property
    def index(self) -> StoreIndex:
        """The spec store as this task needs it. Validating reads every file; later phases read only the
        files the validated run was resolved from (recorded in the plan), so a task's cost does not grow
        with the store. When one of those no longer holds what it held, the whole store is read."""
        if self.cluster_run is not None:
            from include.kube_sync import mirror_path
            from include.store import index_documents

            return index_documents([(mirror_path(self.store.root, self.namespace, self.name),
                                     self._cluster_documents())])
        index = None if self.validating else self.store.own_index(self.namespace, self.name)
        if index is None and not self.validating:
            kept = self._kept_documents()
            if kept is not None:
                return kept
        if index is not None:
            try:
                migration = self._migration_in(index)
                resolve(migration, self.inventory_for(migration, BundleInventory(index.objects)))
                return index
            except (KeyError, SpecValidationError, MigrationFailure):
                self.logger.info("the spec files of the validated run changed; reading the whole store")
        return self.store.index()

    def _cluster_documents(self) -> list[dict[str, Any]]:
        """The run's documents: read from the cluster by Validating (or by a task that finds none saved, as in
        ``tasks test``) and saved in the run state; every later task reads the saved ones (the plan is pinned:
        an edit in the cluster is a new generation with its own run)."""
        from include.errors import ConfigurationError

        saved = self._adopt_saved_run()
        assert self.cluster_run is not None
        uid, generation = self.cluster_run
        if not self.validating and saved.get("documents") is not None:
            if (saved.get("uid"), saved.get("generation")) == (uid, generation):
                return list(saved["documents"])
            raise PlanChanged(f"this run is of generation {generation} (uid {uid}); the run state holds the spec "
                              f"of generation {saved.get('generation')} (uid {saved.get('uid')}), which another "
                              f"run validated: this run does not act on it", field="metadata.generation")
        if self.cluster_fetch is None:
            raise ConfigurationError(f"this run is of the cluster's VMMigration {self.namespace}/{self.name} (uid "
                                     f"{uid}, generation {generation}), and this worker has no cluster "
                                     f"connection: set $VMMIGRATION_KUBERNETES_CONN_ID")
        documents = self.cluster_fetch(self.namespace, self.name, uid, generation)
        self.store.state.write(self.namespace, self.name, SPEC, {"uid": uid, "generation": generation,
                                                                 "documents": documents})
        return documents

    def keep_documents(self, plan: Plan) -> None:
        """With ``$VMMIGRATION_STORE_QUEUE`` set (Validating runs on that queue, beside the spec store): keep the
        validated VMMigration and the inventory it resolved in the run state (``spec``, as a cluster run keeps
        its own), so that later tasks on workers without the store read them there. Never a Secret: only which
        Secrets the run needs, so that such a worker can say it cannot read them. Without the setting, a kept
        copy of an earlier run is dropped (every worker then reads the store)."""
        from include.store import STORE_QUEUE_ENV

        if self.cluster_run is not None:
            return  # a cluster run's documents are kept already (``_cluster_documents``)
        saved = self.store.state.read(self.namespace, self.name, SPEC)
        if not os.environ.get(STORE_QUEUE_ENV):
            if saved is not None and not saved.get("uid"):
                self.store.state.delete(self.namespace, self.name, SPEC)
            return
        inventory = TracingInventory(self.index.objects)
        resolve(self.migration, self.inventory_for(self.migration, inventory))
        used = sorted(k for k in inventory.used if k in self.index.objects)
        entry = self.index.migrations[f"{self.namespace}/{self.name}"]
        documents = [entry.doc]
        documents += [self.index.objects[k] for k in used if k[0] != "Secret"]
        self.store.state.write(self.namespace, self.name, SPEC, {
            "files": list(plan.spec_files), "file": str(entry.path.relative_to(self.store.root)),
            "documents": documents,
            "secrets": [f"{ns}/{name}" for kind, ns, name in used if kind == "Secret"]})

    def _kept_documents(self) -> StoreIndex | None:
        """The documents Validating kept for this plan (``keep_documents``), as this migration's index, for a
        worker whose store folder does not hold the validated run's files; None when none were kept for it.

        :raises ConfigurationError: the run needs Secrets, which stay with the store
        """
        from include.errors import ConfigurationError
        from include.store import index_documents

        saved = self.store.state.read(self.namespace, self.name, SPEC) or {}
        plan = self.store.load_plan(self.namespace, self.name) or {}
        files = saved.get("files")
        if saved.get("uid") or not isinstance(saved.get("documents"), list) or not files \
                or files != plan.get("specFiles"):
            return None
        if saved.get("secrets"):
            raise ConfigurationError(
                f"this worker's spec store {self.store.root} does not hold {', '.join(files)}, and the run needs "
                f"the Secrets {', '.join(saved['secrets'])}, which are never kept in the run state: run the "
                f"migration's tasks on workers that have the spec store")
        self.logger.info("the spec store here does not hold %s; using the documents Validating kept in the run "
                         "state", ", ".join(files))
        return index_documents([(self.store.root / str(saved.get("file") or files[0]), list(saved["documents"]))])

    def _adopt_saved_run(self) -> dict[str, Any]:
        """The run state's saved spec (``{}`` when none). A run known from the mirror's first line only
        (``cluster_run_pinned`` False) is, after Validating, the run Validating saved: read once, then pinned."""
        saved = self.store.state.read(self.namespace, self.name, SPEC) or {}
        if self.cluster_run is not None and not self.cluster_run_pinned and not self.validating:
            if saved.get("uid"):
                self.cluster_run = (str(saved["uid"]), int(saved.get("generation") or self.cluster_run[1]))
            self.cluster_run_pinned = True
        return saved

    def _migration_in(self, index: StoreIndex) -> VMMigration:
        entry = self.store.entry(self.namespace, self.name, index)
        if entry.error is not None:
            raise entry.error
        assert entry.migration is not None
        return entry.migration

    @cached_property
    def migration(self) -> VMMigration:
        return self._migration_in(self.index)

    def inventory_for(self, migration: VMMigration, base: Inventory) -> Inventory:
        """``base``, with the Secrets read from the cluster for a VMMigration mirrored from it."""
        from include.kube_sync import UID_ANNOTATION

        # only for a run whose documents come from the cluster (never for a file that carries the annotation)
        if (self.cluster_secret is not None and self.cluster_run is not None
                and migration.annotations.get(UID_ANNOTATION) == self.cluster_run[0]):
            return SecretsFrom(base, self.cluster_secret)
        return base

    @cached_property
    def resolved(self) -> Resolved:
        return resolve(self.migration, self.inventory_for(self.migration, BundleInventory(self.index.objects)))

    def spec_files(self) -> list[str]:
        """The store files this migration's resolution reads (relative to the store), for the plan."""
        inventory = TracingInventory(self.index.objects)
        resolve(self.migration, self.inventory_for(self.migration, inventory))
        paths = {self.index.migrations[f"{self.namespace}/{self.name}"].path}
        paths |= {self.index.origins[k] for k in inventory.used if k in self.index.origins}
        return sorted(str(p.relative_to(self.store.root)) for p in paths)

    @cached_property
    def plan(self) -> Plan:
        return self.load_plan(required=True)  # type: ignore[return-value]

    def load_plan(self, *, required: bool) -> Plan | None:
        """The plan Validating saved, typed (None when there is none and it is not ``required``)."""
        data = self.store.load_plan(self.namespace, self.name)
        if data is None:
            if not required:
                return None
            raise InvalidMigration(f"no plan for {self.namespace}/{self.name}: run the Validating phase first "
                                   f"(task validate_migration)")
        plan = Plan.from_dict(data)
        self.__dict__["plan"] = plan
        return plan

    def save_plan(self, plan: Plan) -> None:
        self.store.save_plan(self.namespace, self.name, plan.to_dict())
        self.__dict__["plan"] = plan

    @cached_property
    def ledger(self) -> Ledger:
        return Ledger.of(self.store, self.namespace, self.name)

    def _pinned(self, side: str) -> ProviderInfo:
        """The ``side`` provider held to the validated plan: its type and endpoint are the plan's.
        Credentials are read from the Provider's Secret as it is now, and only when the Provider is still
        the one validated; cleanup works on from the plan alone when the spec no longer resolves."""
        if self.validating:
            return self.resolved.source.provider if side == "source" else self.resolved.target
        recorded = self.plan.source if side == "source" else self.plan.target
        try:
            info = self.resolved.source.provider if side == "source" else self.resolved.target
        except (SpecValidationError, MigrationFailure, KeyError):
            if not self.cleaning:
                raise
            namespace, _, name = recorded.provider.partition("/")
            info = ProviderInfo(name=name, namespace=namespace, type=recorded.type, endpoint=recorded.endpoint)
        if info.ref != recorded.provider:
            info = dataclasses.replace(info, credentials=None)
        return dataclasses.replace(info, type=recorded.type, endpoint=recorded.endpoint)

    @cached_property
    def source(self) -> HypervisorDriver:
        return self.driver_factory(self._pinned("source"))

    @cached_property
    def target(self) -> HypervisorDriver:
        return self.driver_factory(self._pinned("target"))

    def open_target(self, plan: Plan) -> TargetSession:
        """This run's session on the target for ``plan`` (what it creates is recorded in the ledger)."""
        owned = Ownership(ledger=self.ledger, scope=plan.target.scope, migration=f"{self.namespace}/{self.name}",
                          logger=self.logger)
        return self.target.begin_target(plan.target, owned)

    @cached_property
    def target_session(self) -> TargetSession:
        return self.open_target(self.plan)

    @cached_property
    def storage(self) -> StorageBackend:
        if self.validating:
            return self.storage_factory(self.migration.spec.storage, self.resolved.storage_credentials)
        try:
            ref, credentials = self.migration.spec.storage.credentialsSecretRef, self.resolved.storage_credentials
        except (SpecValidationError, MigrationFailure, KeyError):
            if not self.cleaning:
                raise
            ref, credentials = None, None
        planned = self.plan.storage
        spec = StorageSpec(**{**planned.spec, "credentialsSecretRef": ref})
        from_secret = credentials.first("endpoint") if credentials is not None else None
        if (from_secret or spec.endpoint) != (planned.effective_endpoint or spec.endpoint):
            raise PlanChanged("the storage Secret now names another endpoint than the one validated; nothing is "
                              "sent there", field="spec.storage.credentialsSecretRef")
        return self.storage_factory(spec, credentials)

    def check_pinned(self) -> None:
        """Fail (PlanChanged) when the spec, a Provider or the storage changed since Validating."""
        was = self.plan.pin
        if not was:  # a plan made by hand (tests, tools): nothing to compare with
            return
        try:
            now = pin_of(self.resolved)
        except KeyError as err:  # the VMMigration is gone from the store
            raise PlanChanged(f"the VMMigration was removed from the spec store after Validating ({err})",
                              field="metadata.name") from None
        except SpecValidationError as err:
            raise PlanChanged(f"the spec or an object it refers to changed since Validating and no longer "
                              f"validates: {failure_message(err)}", field=err.errors[0].path) from None
        changed = sorted(k for k in set(now) | set(was) if now.get(k) != was.get(k))
        if changed:
            raise PlanChanged(
                f"{', '.join(_PIN_WHAT.get(k, k) for k in changed)} changed since Validating; this run keeps "
                f"to the validated plan and stops here (what it created is rolled back on the validated "
                f"endpoints): run the migration again to use the new values", field=_PIN_FIELD[changed[0]])

    @property
    def scope_source(self) -> str:
        return self.plan.source.scope

    @property
    def scope_target(self) -> str:
        return self.plan.target.scope

    @property
    def scope_storage(self) -> str:
        return self.plan.storage.scope

    @property
    def staging(self) -> Path:
        """This migration's private staging folder on this host (0700, a fresh unpredictable name,
        recorded in the ledger when made); later phases on the same host find it there and check it."""
        scope = host_scope()
        with self.store.state.lock(self.namespace, self.name, "staging"):
            for entry in self.ledger.entries("dir"):
                if entry.scope != scope or entry.ident.get("role") != "staging":
                    continue
                path = Path(entry.ident["path"])
                if not os.path.lexists(path):
                    continue
                if safefs.is_private_dir(path):
                    return path
                raise InvalidMigration(f"the staging folder {path} is no longer private to this engine (owner, "
                                       f"mode or type changed); refusing to use it")
            base = staging_root()
            safefs.ensure_base(base)
            path = Path(tempfile.mkdtemp(prefix=f"{self.namespace}.{self.name}.", dir=base))
            self.ledger.record("dir", scope, role="staging", path=str(path))
            return path

    def disk_plan(self, disk: str) -> DiskPlan:
        return self.plan.disk(disk)

    def record(self, disk: str, **values: Any) -> DiskRecord:
        """Merge ``values`` (DiskRecord fields) into the disk's record; returns the record as it is now."""
        return DiskRecord.from_dict(self.store.update_disk_record(self.namespace, self.name, disk,
                                                                  **DiskRecord.keys(**values)))

    def disk_record(self, disk: str) -> DiskRecord:
        return DiskRecord.from_dict(self.store.disk_record(self.namespace, self.name, disk))

    def update_status(self, mutate: Callable[[dict[str, Any]], None]) -> dict[str, Any] | None:
        """Status writes never fail a phase: a failed write is logged and the work goes on. The one exception:
        the cluster says the VMMigration was deleted (MigrationDeleted), which stops the run (it then rolls back
        what it created), but never cleanup nor the failure record."""
        try:
            assert self.sink is not None
            if self.cluster_run is not None and hasattr(self.sink, "expect"):
                if not self.cluster_run_pinned and not self.validating:
                    self._adopt_saved_run()  # once: it pins the run
                self.sink.expect(self.namespace, self.name, self.cluster_run[0])
            return self.sink.update(self.namespace, self.name, mutate)
        except MigrationDeleted:
            if self.stop_when_deleted and not self.cleaning:
                raise
            return None
        except Exception:  # noqa: BLE001 - a status write must never fail a disk copy
            self.logger.warning("could not write the status of %s/%s", self.namespace, self.name, exc_info=True)
            return None

    def progress(self, phase: Phase, disk: str, total: int | None, verb: str) -> ProgressTracker:
        """A tracker that logs and writes status at least every 5% or ``status_interval`` seconds. It counts the
        data that moves: ``total`` is the data expected (default: the disk's allocated bytes, from the plan); the
        disk's virtual size is shown beside it."""
        plan = self.disk_plan(disk)
        virtual = plan.size_bytes
        expected = max(int(plan.allocated_bytes if total is None else total), 1)

        def report(done: int, total_: int, rate: float, eta: float | None) -> None:
            self.logger.info("%s %s: %s", verb, disk, format_progress(done, total_, rate, eta, virtual=virtual))
            self.update_status(lambda s: st.report_bytes(s, phase, disk, done, total_, rate=rate, eta=eta,
                                                         virtual=virtual))

        return ProgressTracker(expected, report, interval=self.status_interval, percent_step=5.0, virtual=virtual)

    def close(self) -> None:
        for attr in ("source", "target", "storage"):
            if attr in self.__dict__ and hasattr(self.__dict__[attr], "close"):
                self.__dict__[attr].close()
