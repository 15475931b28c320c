#!/usr/bin/env bash
# Install the servers that tests/servers/ starts: Debian nginx (WebDAV), openssh-server (qemu+ssh),
# versitygw (S3 gateway, POSIX backend) and our vCenter simulator tests/servers/vcsim (govmomi v0.56.0).
# Idempotent: apt runs only if nginx is missing, go builds only if the cached versitygw binary is missing,
# and vcsim is built only if $cache/bin/vcsim-<hash of its go.mod, go.sum and main.go> is missing (a change
# to those files builds a new one; older vcsim-* binaries are then removed).
# Prints the versitygw binary path at the end (tests/servers/s3.py looks there, or in $VERSITYGW).
# `install_servers.sh vcsim` does only the vcsim step and prints the vcsim binary path instead
# (tests/servers/vsphere.py calls it so when the binary is missing).
set -euo pipefail

VERSITYGW_VERSION="${VERSITYGW_VERSION:-v1.8.0}"
cache="${VMMIG_CACHE:-$HOME/.cache/vmmigration}"
bin="$cache/bin/versitygw"
vcsim_src="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)/tests/servers/vcsim"

use_go() {
  if ! command -v go >/dev/null; then
    export PATH="$PATH:/usr/local/go/bin"
  fi
  command -v go >/dev/null || { echo "go not found (looked in PATH and /usr/local/go/bin)" >&2; exit 1; }
}

# The vcsim binary for the current sources; the key is the same as tests/servers/vsphere.py computes:
# the first 16 hex digits of sha256(go.mod + go.sum + main.go).
build_vcsim() {
  local key out tmp
  key="$(cat "$vcsim_src/go.mod" "$vcsim_src/go.sum" "$vcsim_src/main.go" | sha256sum | cut -c1-16)"
  out="$cache/bin/vcsim-$key"
  if [ ! -x "$out" ]; then
    use_go
    mkdir -p "$cache/bin"
    echo "building vcsim ($vcsim_src, govmomi v0.56.0) into $out (about a minute the first time)" >&2
    tmp="$out.tmp.$$"
    if ! (cd "$vcsim_src" && GOFLAGS="-mod=mod -buildvcs=false" go build -trimpath -o "$tmp" .) >&2; then
      rm -f "$tmp"
      echo "vcsim build failed" >&2
      exit 1
    fi
    mv -f "$tmp" "$out"
    find "$cache/bin" -maxdepth 1 -name 'vcsim-*' ! -name "vcsim-$key" -type f -delete
  fi
  [ -x "$out" ] || { echo "vcsim build did not produce $out" >&2; exit 1; }
  vcsim_bin="$out"
}

if [ "${1:-}" = vcsim ]; then
  build_vcsim
  echo "$vcsim_bin"
  exit 0
fi

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
  use_go
  mkdir -p "$cache/bin"
  echo "building versitygw $VERSITYGW_VERSION into $cache/bin (takes a few minutes the first time)" >&2
  GOBIN="$cache/bin" go install "github.com/versity/versitygw/cmd/versitygw@$VERSITYGW_VERSION"
fi
[ -x "$bin" ] || { echo "versitygw build did not produce $bin" >&2; exit 1; }
build_vcsim
echo "vcsim: $vcsim_bin" >&2
echo "$bin"
