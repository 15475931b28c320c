# Source me: Airflow settings for running this project locally (SQLite, LocalExecutor, loopback).
# Override VMMIG_VAR to keep state elsewhere (tests use a temporary folder).
here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
export VMMIG_VAR="${VMMIG_VAR:-$here/var}"
export AIRFLOW_HOME="${AIRFLOW_HOME:-$VMMIG_VAR/airflow}"
export AIRFLOW__CORE__DAGS_FOLDER="$here/dags"
export AIRFLOW__CORE__PLUGINS_FOLDER="$here/plugins"
export AIRFLOW__CORE__LOAD_EXAMPLES=False
export AIRFLOW__CORE__DAGS_ARE_PAUSED_AT_CREATION=False
export AIRFLOW__CORE__PARALLELISM="${AIRFLOW__CORE__PARALLELISM:-4}"
export AIRFLOW__API__HOST="${AIRFLOW__API__HOST:-127.0.0.1}"
export AIRFLOW__API__PORT="${AIRFLOW__API__PORT:-8080}"
export AIRFLOW__CORE__EXECUTION_API_SERVER_URL="http://127.0.0.1:${AIRFLOW__API__PORT}/execution/"
export AIRFLOW__LOGGING__WORKER_LOG_SERVER_PORT="${AIRFLOW__LOGGING__WORKER_LOG_SERVER_PORT:-28793}"
export AIRFLOW__LOGGING__TRIGGER_LOG_SERVER_PORT="${AIRFLOW__LOGGING__TRIGGER_LOG_SERVER_PORT:-28794}"
export VMMIGRATION_STORE="${VMMIGRATION_STORE:-$VMMIG_VAR/store}"
export VMMIGRATION_STAGING="${VMMIGRATION_STAGING:-$VMMIG_VAR/staging}"
export VMMIGRATION_LIVE_DIR="${VMMIGRATION_LIVE_DIR:-$VMMIG_VAR/live}"
# NFS shares (spec.storage.path) must lie under one of these folders (docs/security.md)
export VMMIGRATION_ALLOWED_ROOTS="${VMMIGRATION_ALLOWED_ROOTS:-$VMMIG_VAR}"
export PYTHONPATH="$here${PYTHONPATH:+:$PYTHONPATH}"
export PATH="$here/.venv/bin:$PATH"
