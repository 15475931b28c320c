"""Ready or Failed: the last task of every migration, cleaning up by cleanupPolicy."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from airflow.sdk import BaseOperator
from airflow.sdk.exceptions import AirflowFailException

if TYPE_CHECKING:
    from airflow.sdk import Context


class FinalizeMigrationOperator(BaseOperator):
    """Runs whatever happened upstream (``trigger_rule="all_done"``).

    When the target validated, it applies cleanupPolicy (intermediate files, snapshot, and the source
    only when ``deleteSource``) and marks the migration Ready. Otherwise it removes what the run
    half-created on the target, never touches the source, marks it Failed and fails itself so that
    the DAG run fails too.

    :param namespace: the VMMigration's namespace (templated)
    :param migration_name: the VMMigration's name (templated)
    :param store_path: the spec store folder; default ``$VMMIGRATION_STORE``
    """

    template_fields: Sequence[str] = ("namespace", "migration_name")
    ui_color = "#e5e7eb"

    def __init__(self, *, namespace: str, migration_name: str, store_path: str | None = None,
                 validated_task_id: str = "validate_target", **kwargs: Any) -> None:
        kwargs.setdefault("trigger_rule", "all_done")
        super().__init__(**kwargs)
        self.namespace = namespace
        self.migration_name = migration_name
        self.store_path = store_path
        self.validated_task_id = validated_task_id

    def execute(self, context: Context) -> dict[str, Any]:
        from include.errors import AlreadyMigrated
        from include.phases import finalize
        from operators.base import pipeline_context

        ctx = pipeline_context(self.namespace, self.migration_name, store_path=self.store_path, logger=self.log,
                               airflow_context=context)
        try:
            succeeded, failure = self._outcome(context, ctx)
            try:
                result = finalize(ctx, succeeded=succeeded, failure=None if succeeded else failure)
            except AlreadyMigrated as err:  # this run was refused at Validating: its migration stays as it was
                raise AirflowFailException(str(err)) from None
            # finalize may find the run lost after all (its VMMigration deleted from the cluster meanwhile)
            succeeded, failure = bool(result.pop("succeeded", succeeded)), result.pop("failure", None) or failure
        finally:
            ctx.close()
        if not succeeded:
            raise AirflowFailException(f"migration {self.namespace}/{self.migration_name} failed: "
                                       f"{failure or 'see the failed task'}; cleaned up: {result['removed']}")
        self.log.info("migration %s/%s is Ready", self.namespace, self.migration_name)
        summary = result.get("summary")
        if summary:
            # the run summary travels with the asset event this task emits (visible on the asset's page)
            for outlet in self.outlets or ():
                try:
                    context["outlet_events"][outlet].extra = {
                        "migration": f"{self.namespace}/{self.migration_name}", **summary}
                except Exception:  # noqa: BLE001 - an outlet that takes no extra still gets its event
                    self.log.warning("could not attach the run summary to %s", outlet, exc_info=True)
        return result

    def _outcome(self, context: Context, ctx: Any) -> tuple[bool, str | None]:
        """This run's validate_target succeeded (its XCom), or, in a step-by-step ``tasks test`` session,
        the run state says the target validated in this run and nothing failed since. Status is never
        read back: it is a projection for people (and, later, the cluster)."""
        from include.phases import run_outcome

        if context["ti"].xcom_pull(task_ids=self.validated_task_id) is not None:
            return True, None
        return run_outcome(ctx)
