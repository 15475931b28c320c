"""The shared shape of every phase operator: find the migration in the spec store, run the phase's
body from ``include.phases``, and turn its errors into Airflow's retry semantics."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, ClassVar

from airflow.sdk import BaseOperator
from airflow.sdk.exceptions import AirflowFailException

from include.status import Phase

if TYPE_CHECKING:
    from airflow.sdk import Context

    from include.phases import MigrationContext


def pipeline_context(namespace: str, name: str, *, store_path: str | None, logger: Any,
                     airflow_context: Any = None) -> MigrationContext:
    """The one place the pipeline builds a migration's context: its spec store and run state, its status
    sink, and drivers and backends through the Airflow hooks. Every operator, finalize and the status
    notifier use it; a Kubernetes status sink is chosen here, not in each of them. A run the Kubernetes
    watcher started (its conf names the VMMigration's uid and generation) reads its spec from the cluster
    at Validating and from the run state after, never from a file (``MigrationContext.cluster_run``)."""
    from hooks.factories import driver_from_hook, storage_from_hook
    from include.phases import MigrationContext
    from include.store import FileStatusSink, SpecStore

    store = SpecStore(store_path) if store_path else SpecStore()
    run, pinned = cluster_run_of(airflow_context), True
    if run is None and cluster_fetcher() is not None:
        # a run of a mirror's DAG started otherwise (by hand, an older watcher): still a cluster run, of the
        # VMMigration the mirror is of, its spec read from the cluster (never from the file)
        from include.kube_sync import mirror_path, read_header

        try:
            mirrored = read_header(mirror_path(store.root, namespace, name))
        except ValueError:
            mirrored = None
        if mirrored is not None:
            run, pinned = (mirrored.uid, mirrored.generation), False
    return MigrationContext(namespace=namespace, name=name, store=store, sink=status_sink(store, logger) or
                            FileStatusSink(store), driver_factory=driver_from_hook, storage_factory=storage_from_hook,
                            logger=logger, cluster_secret=cluster_secret_reader(), cluster_run=run,
                            cluster_run_pinned=pinned, cluster_fetch=cluster_fetcher(),
                            cluster_present=cluster_presence())


def cluster_run_of(airflow_context: Any) -> tuple[str, int] | None:
    """(uid, generation) of the VMMigration a watcher-started run is of (its conf, see
    dags/vmmigration_kubernetes.py), None for any other run. Only identifies: the spec is read from the
    cluster."""
    if not airflow_context:
        return None
    try:
        conf = getattr(airflow_context.get("dag_run"), "conf", None) or {}
    except Exception:  # noqa: BLE001 - a context without a run (a bare callback): not a watcher run
        return None
    uid, generation = conf.get("uid"), conf.get("generation")
    if not isinstance(uid, str) or not uid or isinstance(generation, bool):
        return None
    try:
        return uid, int(generation)
    except (TypeError, ValueError):
        return None


def _on_cluster(fn: Any) -> Any:
    """With ``$VMMIGRATION_KUBERNETES_CONN_ID`` set: ``fn(inventory, *args)`` bound to that cluster (an
    ``include.kube_sync.ClusterInventory`` through the KubernetesHook, made at each call); None otherwise."""
    import os

    conn_id = os.environ.get(KUBERNETES_CONN_ENV)
    if not conn_id:
        return None

    def call(*args: Any) -> Any:
        from airflow.providers.cncf.kubernetes.hooks.kubernetes import KubernetesHook

        from include.kube_sync import ClusterInventory

        return fn(ClusterInventory(KubernetesHook(conn_id=conn_id).get_conn()), *args)

    return call


def cluster_presence() -> Any:
    """Whether the cluster still holds a VMMigration of a uid (include.kube_sync.present); None without one."""
    from include.kube_sync import present

    return _on_cluster(present)


def cluster_fetcher() -> Any:
    """Reads a run's documents from the cluster (include.kube_sync.fetch_run_documents); None without one."""
    from include.kube_sync import fetch_run_documents

    return _on_cluster(fetch_run_documents)


#: names the Airflow connection (type kubernetes) of the cluster whose VMMigrations' status is written back
KUBERNETES_CONN_ENV = "VMMIGRATION_KUBERNETES_CONN_ID"


def status_sink(store: Any, logger: Any) -> Any:
    """With ``$VMMIGRATION_KUBERNETES_CONN_ID`` set: a sink that also writes each status change to the
    VMMigration of the same namespace/name in that cluster (``/status`` and Events), through the cncf-kubernetes
    provider's KubernetesHook; None otherwise (the status stays in the run's files)."""
    import os

    conn_id = os.environ.get(KUBERNETES_CONN_ENV)
    if not conn_id:
        return None
    from airflow.providers.cncf.kubernetes.hooks.kubernetes import KubernetesHook

    from include.kube_status import ClusterStatus, MirroredSink

    return MirroredSink(store, ClusterStatus(lambda: KubernetesHook(conn_id=conn_id).get_conn(), logger=logger))


def cluster_secret_reader() -> Any:
    """With ``$VMMIGRATION_KUBERNETES_CONN_ID`` set: reads a Secret from that cluster (for VMMigrations mirrored
    from it, whose Secrets are never written to disk), as the engine's own identity; None otherwise."""
    import os

    conn_id = os.environ.get(KUBERNETES_CONN_ENV)
    if not conn_id:
        return None
    from include.kube_sync import read_secret

    clients: list[Any] = []

    def read(namespace: str, name: str) -> dict[str, Any] | None:
        if not clients:
            from airflow.providers.cncf.kubernetes.hooks.kubernetes import KubernetesHook

            clients.append(KubernetesHook(conn_id=conn_id).get_conn())
        return read_secret(clients[0], namespace, name)

    return read


class MigrationPhaseOperator(BaseOperator):
    """Runs one phase of one VMMigration.

    :param namespace: the VMMigration's namespace (templated)
    :param migration_name: the VMMigration's name (templated)
    :param store_path: the spec store folder; default ``$VMMIGRATION_STORE``
    """

    template_fields: Sequence[str] = ("namespace", "migration_name")
    phase: ClassVar[Phase]
    #: the phase's body: the name of its function in ``include.phases`` (called with the context, and the
    #: disk for a per-disk phase); a subclass only names it
    body: ClassVar[str]
    #: "source" or "target": the VM this phase works on, linked from the task on its hypervisor's web UI
    links_vm: ClassVar[str | None] = None

    def __init__(self, *, namespace: str, migration_name: str, store_path: str | None = None, **kwargs: Any) -> None:
        from notifiers.migration_status import MigrationStatusNotifier

        common = {"namespace": namespace, "migration_name": migration_name, "phase": self.phase.value,
                  "store_path": store_path}
        kwargs.setdefault("on_failure_callback", [MigrationStatusNotifier(**common, final=True)])
        kwargs.setdefault("on_retry_callback", [MigrationStatusNotifier(**common, final=False)])
        super().__init__(**kwargs)
        self.namespace = namespace
        self.migration_name = migration_name
        self.store_path = store_path
        self._migration_ctx: MigrationContext | None = None

    def _context(self, context: Any = None) -> MigrationContext:
        return pipeline_context(self.namespace, self.migration_name, store_path=self.store_path, logger=self.log,
                                airflow_context=context)

    def execute(self, context: Context) -> Any:
        from include.phases import failure_message, is_permanent

        ctx = self._migration_ctx = self._context(context)
        try:
            result = self.run_phase(ctx, context)
            if self.links_vm:
                self._push_vm_url(ctx, context)
            return result
        except Exception as err:
            if is_permanent(err):
                # Retrying cannot fix bad input or a missing VM: fail now, the status says why.
                raise AirflowFailException(failure_message(err)) from err
            raise
        finally:
            ctx.close()
            self._migration_ctx = None

    def _push_vm_url(self, ctx: MigrationContext, context: Context) -> None:
        """The URL of the VM this task worked on, on its hypervisor's web UI, for the task's link."""
        from include import registry
        from operators.links import ATTRIBUTE

        try:
            side = ctx.plan.source if self.links_vm == "source" else ctx.plan.target
            if not registry.has_web_ui(side.type):
                return
            if self.links_vm == "source":
                vm_id = ctx.plan.source.vm_id
            else:
                try:
                    vm_id = ctx.target.get_vm(side.vm).id
                except Exception:  # noqa: BLE001 - without its id the link opens the hypervisor's UI at its start
                    vm_id = None
            url = registry.vm_ui_url(side.type, side.endpoint, side.vm, vm_id)
            if url:
                setattr(self, ATTRIBUTE, url)
                self.log.info("the %s VM on its hypervisor's web UI: %s", self.links_vm, url)
        except Exception:  # noqa: BLE001 - a link is a convenience: it never fails the phase
            self.log.warning("no link to the %s VM", self.links_vm, exc_info=True)

    def run_phase(self, ctx: MigrationContext, context: Context) -> Any:
        from include import phases

        return getattr(phases, self.body)(ctx, *self.phase_args())

    def phase_args(self) -> tuple[Any, ...]:
        return ()

    def on_kill(self) -> None:
        if self._migration_ctx is not None:
            self._migration_ctx.close()


class DiskPhaseOperator(MigrationPhaseOperator):
    """A phase mapped per disk: ``disk_name`` labels the map index.

    :param disk_name: the guest-visible disk (``vda``) this instance moves
    """

    template_fields: Sequence[str] = ("namespace", "migration_name", "disk_name")

    def __init__(self, *, disk_name: str, **kwargs: Any) -> None:
        kwargs.setdefault("map_index_template", "{{ task.disk_name }}")
        super().__init__(**kwargs)
        self.disk_name = disk_name

    def phase_args(self) -> tuple[Any, ...]:
        return (self.disk_name,)
