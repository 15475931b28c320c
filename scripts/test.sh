#!/usr/bin/env bash
# Every test: installs what the tests need (idempotent, cached), starts libvirtd, lints, runs pytest.
# Extra arguments go to pytest (e.g. ./scripts/test.sh tests/include -q).
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$here"
bash scripts/bootstrap.sh
bash scripts/install_servers.sh
bash scripts/libvirtd.sh
"$here/.venv/bin/ruff" check .
exec "$here/.venv/bin/python" -m pytest "$@"
