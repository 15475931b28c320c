#!/usr/bin/env bash
# Idempotent set-up on Debian 12: system packages, a cached virtualenv, the Airflow metadata DB.
# Safe to run again: it only installs what is missing. Cache: $VMMIG_CACHE (default ~/.cache/vmmigration).
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cache="${VMMIG_CACHE:-$HOME/.cache/vmmigration}"
mkdir -p "$cache"
# one bootstrap at a time per cache: a second one waits, then finds everything built
exec 9>"$cache/bootstrap.lock"
flock 9

# 1. Debian packages: libvirt daemon + client, qemu-img, build deps of libvirt-python, and the
#    servers the tests start (nginx, sshd, etcd are used by later suites), Chromium for the UI tests,
#    PostgreSQL and Redis for the Celery scale-out test.
pkgs=(libvirt-daemon-system libvirt-daemon libvirt-daemon-driver-qemu libvirt-clients qemu-utils
      qemu-system-x86 libvirt-dev pkg-config python3-venv python3-dev gcc
      chromium postgresql redis-server)
missing=()
for p in "${pkgs[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
  echo "bootstrap: installing ${missing[*]}"
  SUDO=""; [ "$(id -u)" = 0 ] || SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

# 2. The virtualenv, keyed by the requirement files so a change rebuilds it; .venv points at it.
key=$(cat "$here/requirements.txt" "$here/requirements-dev.txt" | sha256sum | cut -c1-12)
venv="$cache/venv-$key"
if [ ! -x "$venv/bin/airflow" ] || [ ! -f "$venv/.complete" ]; then
  echo "bootstrap: building virtualenv $venv"
  rm -rf "$venv"
  python3 -m venv "$venv"
  "$venv/bin/pip" install -q --upgrade pip >/dev/null
  "$venv/bin/pip" install -q -r "$here/requirements-dev.txt"
  touch "$venv/.complete"
fi
ln -sfn "$venv" "$here/.venv"
echo "bootstrap: ready (venv $venv)"
