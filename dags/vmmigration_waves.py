"""One DAG per MigrationWavePlan in the spec store (``$VMMIGRATION_STORE``): ``vmwave__<namespace>__<plan>``.

Its schedule is the first wave's window (a cron schedule, or a one-off at its start time; none: by hand), with
catchup off and one run at a time. Each wave is a task group, run in order:

- ``window``: waits (rescheduling, holding no slot) until the wave's window opens; fails when the wave before
  had a failure and its ``onFailure`` is stop (then nothing of this wave starts);
- ``prepare``: submits each VM's VMMigration (``include.submit``); Ready VMs, and every VM once the window has
  ended, are skipped naming why;
- ``migrate``: one ``WaveMigrationOperator`` per prepared VM, at most ``maxConcurrent`` at once, each under its
  leases (per source provider, target provider, storage; ``include.waves.Leases``);
- ``summary`` (all_done): the wave's table in its log, its return value (XCom) and an event of the plan's asset.

``plan_summary`` ends the run: it fails when a wave had a failure or did not run. Parsing reads the store's
local files that mention the kind (no network); planning lives in ``include/waves.py``.
"""

from __future__ import annotations

import logging
import os
from datetime import timedelta

from airflow.sdk import DAG, Asset, get_parsing_context, task, task_group

from include.store import SpecStore
from include.waves import DAG_ID_PREFIX, PlanEntry, WavePlan, plan_entries
from operators.waves import WaveMigrationOperator

log = logging.getLogger(__name__)
STORE = SpecStore()
VIA = "the wave plan {plan}"
POKE_SECONDS = 3.0
#: a plan's DAG reads its plan file and writes the spec store: with $VMMIGRATION_STORE_QUEUE its tasks run beside
#: the store (that worker's concurrency must then allow the plan's maxConcurrent launchers, which only poll)
STORE_QUEUE = os.environ.get("VMMIGRATION_STORE_QUEUE") or None


def _schedule(plan: WavePlan) -> tuple[object, dict]:
    """The DAG's schedule from the first wave's window: its cron, or a one-off at its start (a cron of that minute
    with the DAG ending then: Airflow 3.3's EventsTimetable does not survive serialization); none: by hand."""
    first = plan.waves[0].window if plan.waves else None
    if first is None:
        return None, {}
    from airflow.sdk import CronTriggerTimetable

    if first.schedule:
        return CronTriggerTimetable(first.schedule, timezone="UTC"), {}
    at = first.start
    return (CronTriggerTimetable(f"{at.minute} {at.hour} {at.day} {at.month} *", timezone="UTC"),
            {"start_date": at.replace(second=0, microsecond=0), "end_date": at})


def _asset(entry: PlanEntry) -> Asset:
    return Asset(name=f"vmwave-{entry.namespace}-{entry.name}", uri=f"vmwave://{entry.namespace}/{entry.name}")


def _invalid_dag(entry: PlanEntry) -> DAG:
    with DAG(dag_id=entry.dag_id, schedule=None, catchup=False, max_active_runs=1, tags=["vmmigration", "wave-plan"],
             description=f"INVALID MigrationWavePlan {entry.key}: {len(entry.errors)} problem(s)",
             doc_md=f"MigrationWavePlan **{entry.key}** from `{entry.path.name}` is not valid:\n\n"
                    + "\n".join(f"- `{e}`" for e in entry.errors)) as dag:

        @task(task_id="validate_plan", retries=0)
        def validate_plan(errors: list[str]) -> None:
            from airflow.sdk.exceptions import AirflowFailException

            raise AirflowFailException("the MigrationWavePlan is not valid:\n" + "\n".join(f"- {e}" for e in errors))

        validate_plan(entry.errors)
    return dag


def build_dag(entry: PlanEntry) -> DAG:
    plan = entry.plan
    ns, name = plan.namespace, plan.name
    asset = _asset(entry)
    schedule, bounds = _schedule(plan)
    with DAG(
        dag_id=entry.dag_id,
        dag_display_name=f"wave plan {ns}/{name}",
        description=f"MigrationWavePlan {entry.key}: {len(plan.waves)} wave(s), "
                    f"{sum(len(w.vms) for w in plan.waves)} VM(s)",
        schedule=schedule,
        **bounds,
        catchup=False,
        max_active_runs=1,
        default_args={"retries": 0, **({"queue": STORE_QUEUE} if STORE_QUEUE else {})},
        tags=["vmmigration", "wave-plan", f"namespace:{ns}"],
        doc_md=f"MigrationWavePlan **{entry.key}** from `{entry.path.name}`.",
    ) as dag:
        previous = None
        summaries = []
        for index, wave in enumerate(plan.waves):
            before = plan.waves[index - 1].name if index else None

            @task_group(group_id=wave.name)
            def one_wave(wave_name: str = wave.name, before: str | None = before,
                         max_concurrent: int = wave.limits.maxConcurrent) -> object:
                @task.sensor(task_id="window", poke_interval=30, mode="reschedule", timeout=timedelta(days=366),
                             trigger_rule="all_done")
                def window(wave_name: str, before: str | None):
                    from datetime import UTC, datetime

                    from airflow.sdk import PokeReturnValue, get_current_context
                    from airflow.sdk.exceptions import AirflowFailException

                    from include import waves

                    current = waves.find_plan(SpecStore(), ns, name)
                    ti = get_current_context()["ti"]
                    prev = ti.xcom_pull(task_ids=f"{before}.summary") if before else None
                    why = waves.gate(prev, current.wave(before) if before else None)
                    if why:
                        raise AirflowFailException(f"wave {wave_name} does not start: {why}")
                    state = waves.window_state(current.wave(wave_name), datetime.now(UTC))
                    if not state["open"] and not state["ended"]:
                        log.info("wave %s waits for its window to open at %s", wave_name, state["opens"])
                    return PokeReturnValue(is_done=state["open"] or state["ended"], xcom_value=state)

                @task(task_id="prepare", retries=2, retry_delay=timedelta(seconds=10),
                      execution_timeout=timedelta(minutes=10))
                def prepare(wave_name: str, state: dict) -> list[dict]:
                    """The migrate task's kwargs, one dict per VM to launch; all of it (skipped, refused) as the XCom
                    ``prepared``."""
                    from airflow.sdk import get_current_context

                    from include import waves

                    store = SpecStore()
                    current = waves.find_plan(store, ns, name)
                    out = waves.prepare_wave(store, current, current.wave(wave_name), via=VIA.format(plan=entry.key),
                                             closes=state.get("closes"))
                    for item in out["skipped"]:
                        log.info("%s: skipped: %s", item["migration"], item["reason"])
                    for item in out["refused"]:
                        log.error("%s: refused: %s", item["migration"], item["reason"])
                    log.info("wave %s launches %d migration(s)", wave_name, len(out["launch"]))
                    get_current_context()["ti"].xcom_push(key="prepared", value=out)
                    return out["launch"]

                @task(task_id="summary", trigger_rule="all_done", outlets=[asset], retries=1)
                def summary(wave_name: str, before: str | None) -> dict:
                    from airflow.sdk import get_current_context

                    from include import waves
                    from include.store import FileStatusSink

                    context = get_current_context()
                    ti = context["ti"]
                    store = SpecStore()
                    current = waves.find_plan(store, ns, name)
                    wave_ = current.wave(wave_name)
                    prepared = ti.xcom_pull(task_ids=f"{wave_name}.prepare", key="prepared")
                    states = ti.get_task_states(dag_id=ti.dag_id, run_ids=[ti.run_id],
                                                task_ids=[f"{wave_name}.migrate"]).get(ti.run_id, {})
                    by_index = {k.rsplit("_", 1)[1]: v for k, v in states.items() if "_" in k}
                    sink = FileStatusSink(store)
                    statuses = {i["migration_name"]: sink.get(i["namespace"], i["migration_name"])
                                for i in (prepared or {}).get("launch", [])}
                    prev = ti.xcom_pull(task_ids=f"{before}.summary") if before else None
                    why = waves.gate(prev, current.wave(before) if before else None)
                    result = waves.wave_result(current, wave_, prepared, by_index, statuses,
                                               reason=f"did not start: {why}" if why and prepared is None else "")
                    log.info("wave %s of %s:\n%s", wave_name, entry.key, waves.table(result))
                    context["outlet_events"][asset].extra = {"plan": entry.key, "wave": wave_name, "summary": result}
                    return result

                opened = window(wave_name, before)
                prepared = prepare(wave_name, opened)
                moving = WaveMigrationOperator.partial(
                    task_id="migrate", pool="default_pool", max_active_tis_per_dagrun=max_concurrent,
                    map_index_template="{{ task.migration_name }}", retries=1, retry_delay=timedelta(seconds=30),
                    execution_timeout=timedelta(hours=72), poke_interval=POKE_SECONDS,
                ).expand_kwargs(prepared)
                done = summary(wave_name, before)
                moving >> done
                prepared >> done
                return done

            done = one_wave()
            summaries.append((wave.name, done))
            if previous is not None:
                previous >> dag.get_task(f"{wave.name}.window")
            previous = done

        @task(task_id="plan_summary", trigger_rule="all_done", retries=0)
        def plan_summary(wave_names: list[str]) -> dict:
            from airflow.sdk import get_current_context
            from airflow.sdk.exceptions import AirflowFailException

            from include import waves

            ti = get_current_context()["ti"]
            results = [ti.xcom_pull(task_ids=f"{w}.summary") or {"wave": w, "started": False} for w in wave_names]
            for r in results:
                if r.get("vms") is not None:
                    log.info("\n%s", waves.table(r))
            bad = [r["wave"] for r in results if r.get("failed") or not r.get("started")]
            total = {"plan": entry.key, "waves": results, "failedWaves": bad,
                     "done": sum(r.get("done", 0) for r in results), "failed": sum(r.get("failed", 0) for r in results),
                     "skipped": sum(r.get("skipped", 0) for r in results),
                     "bytesMoved": sum(r.get("bytesMoved", 0) for r in results)}
            if bad:
                ti.xcom_push(key="plan_summary", value=total)
                raise AirflowFailException(f"plan {entry.key}: wave(s) {', '.join(bad)} had failures or did not run")
            return total

        final = plan_summary([w.name for w in plan.waves])
        for _, done in summaries:
            done >> final
    return dag


_wanted = get_parsing_context().dag_id
if _wanted is None or _wanted.startswith(DAG_ID_PREFIX):
    for _entry in plan_entries(STORE):
        if _wanted is not None and _wanted != _entry.dag_id:
            continue
        try:
            globals()[_entry.dag_id] = build_dag(_entry) if _entry.plan is not None else _invalid_dag(_entry)
        except Exception:  # noqa: BLE001 - a plan that parses but cannot be built must not hide the others
            log.exception("MigrationWavePlan %s from %s: its DAG could not be built", _entry.key, _entry.path)
