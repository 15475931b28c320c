"""The latest DAG run of each migration's DAG, from Airflow's metadata database.

This runs in the API server only (the page's FastAPI app), never in a task: it is the API server's own
database, read the way its REST API reads it. One query per call, whatever the number of migrations: the
highest run id of every ``vmmigration__*`` DAG.
"""

from __future__ import annotations

import logging
from typing import Any

from include.store import DAG_ID_PREFIX

log = logging.getLogger(__name__)


def latest_runs() -> dict[str, dict[str, Any]] | None:
    """``{dag_id: {"run_id", "state", "start_date", "end_date"}}`` for the latest run of every migration DAG;
    None (logged) when the database cannot be read."""
    from airflow.models.dagrun import DagRun
    from airflow.utils.session import create_session
    from sqlalchemy import func, select
    from sqlalchemy.exc import SQLAlchemyError

    latest = (select(func.max(DagRun.id))
              .where(DagRun.dag_id.startswith(DAG_ID_PREFIX, autoescape=True))
              .group_by(DagRun.dag_id))
    query = select(DagRun.dag_id, DagRun.run_id, DagRun.state, DagRun.start_date, DagRun.end_date).where(
        DagRun.id.in_(latest.scalar_subquery()))
    try:
        with create_session() as session:
            rows = session.execute(query).all()
    except SQLAlchemyError as err:
        log.warning("The DAG runs of the migrations could not be read: %s", err)
        return None
    return {dag_id: {"run_id": run_id, "state": getattr(state, "value", state),
                     "start_date": start, "end_date": end}
            for dag_id, run_id, state, start, end in rows}
