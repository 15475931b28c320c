"""Reports what the spec store could not turn into a migration DAG, as an import error of this file.

Unreadable YAML, a document without ``metadata.name`` or a VMMigration defined twice never yields a
DAG; instead of disappearing silently, each problem is listed here (Airflow UI: DAG import errors).
The migration DAGs themselves come from vmmigrations.py and keep working.
"""

from __future__ import annotations

from include.store import SpecStore

_problems = SpecStore().index().problems
if _problems:
    raise ValueError("spec store problems:\n" + "\n".join(f"- {p}" for p in _problems))
