"""The "Migrations" page of the Airflow UI: every VMMigration of the spec store with its status and its
latest DAG run, served by a FastAPI app in the API server (``migrations_ui_plugin.py`` registers it)."""
