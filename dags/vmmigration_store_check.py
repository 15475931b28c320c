"""Reports what the spec store could not turn into a migration DAG, as an import error of this file.

Unreadable YAML (not UTF-8, anchors or aliases, a repeated key), a document without a valid
``metadata.name``/``namespace`` or a VMMigration defined twice never yields a DAG; instead of
disappearing silently, each problem is listed here (Airflow UI: DAG import errors). The list comes
from ``include.store.dag_entries``, the call vmmigrations.py builds its DAGs from, so both files
agree. The migration DAGs themselves come from vmmigrations.py and keep working.
"""

from __future__ import annotations

from include.store import SpecStore, dag_entries

_problems = dag_entries(SpecStore().index())[1]
if _problems:
    raise ValueError("spec store problems:\n" + "\n".join(f"- {p}" for p in _problems))
