#!/usr/bin/env bash
# The demo: installs what it needs (idempotent, cached), then runs a real libvirt -> NFS folder ->
# libvirt migration through a local Airflow. `./scripts/demo.sh stop` stops that Airflow.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$here"
if [ "${1:-}" != stop ]; then
  bash scripts/bootstrap.sh
  bash scripts/libvirtd.sh
fi
source scripts/airflow_env.sh
exec "$here/.venv/bin/python" scripts/demo.py "$@"
