#!/usr/bin/env bash
# Install the servers that tests/servers/ starts: Debian nginx (WebDAV), openssh-server (qemu+ssh) and
# versitygw (S3 gateway, POSIX backend).
# Idempotent: apt runs only if nginx is missing, go builds only if the cached versitygw binary is missing.
# Prints the versitygw binary path at the end (tests/servers/s3.py looks there, or in $VERSITYGW).
set -euo pipefail

VERSITYGW_VERSION="${VERSITYGW_VERSION:-v1.8.0}"
cache="${VMMIG_CACHE:-$HOME/.cache/vmmigration}"
bin="$cache/bin/versitygw"

missing=()
for p in nginx openssh-server openssh-client; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
  echo "installing ${missing[*]}" >&2
  apt_get=(apt-get)
  [ "$(id -u)" -eq 0 ] || apt_get=(sudo apt-get)
  "${apt_get[@]}" update -qq
  DEBIAN_FRONTEND=noninteractive "${apt_get[@]}" install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
command -v nginx >/dev/null || [ -x /usr/sbin/nginx ] || { echo "nginx is still missing after apt-get" >&2; exit 1; }

if [ ! -x "$bin" ]; then
  if ! command -v go >/dev/null; then
    export PATH="$PATH:/usr/local/go/bin"
  fi
  command -v go >/dev/null || { echo "go not found (looked in PATH and /usr/local/go/bin)" >&2; exit 1; }
  mkdir -p "$cache/bin"
  echo "building versitygw $VERSITYGW_VERSION into $cache/bin (takes a few minutes the first time)" >&2
  GOBIN="$cache/bin" go install "github.com/versity/versitygw/cmd/versitygw@$VERSITYGW_VERSION"
fi
[ -x "$bin" ] || { echo "versitygw build did not produce $bin" >&2; exit 1; }
echo "$bin"
