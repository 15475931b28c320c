#!/usr/bin/env bash
# The demo: installs what it needs (idempotent, cached), then runs a real libvirt -> NFS folder ->
# libvirt migration through a local Airflow. `./scripts/demo.sh --kubernetes` runs it through a local
# kube-apiserver instead (kubectl apply, the watcher DAG, the status in the cluster).
# `./scripts/demo.sh stop` stops that Airflow (and the API server).
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$here"
if [ "${1:-}" != stop ]; then
  bash scripts/bootstrap.sh
  bash scripts/libvirtd.sh
  for arg in "$@"; do
    # kube-apiserver and etcd, built once into the cache (about 6 minutes the first time)
    if [ "$arg" = --kubernetes ]; then bash scripts/install_servers.sh kube >/dev/null; fi
  done
fi
source scripts/airflow_env.sh
exec "$here/.venv/bin/python" scripts/demo.py "$@"
