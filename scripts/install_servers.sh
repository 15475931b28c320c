#!/usr/bin/env bash
# Install the servers that tests/servers/ starts: Debian nginx (WebDAV), openssh-server (qemu+ssh),
# versitygw (S3 gateway, POSIX backend) and our vCenter simulator tests/servers/vcsim (govmomi v0.56.0).
# Idempotent: apt runs only if nginx is missing, go builds only if the cached versitygw binary is missing,
# and vcsim is built only if $cache/bin/vcsim-<hash of its go.mod, go.sum and main.go> is missing (a change
# to those files builds a new one; older vcsim-* binaries are then removed).
# kube-apiserver v1.36.3 and etcd v3.6.16 (tests/servers/kube/kas and tests/servers/kube/etcd, wrapper modules
# on the Go module proxy) are cached the same way: $cache/bin/kube-apiserver-<key> and $cache/bin/etcd-<key>,
# each keyed by its own module's go.mod, go.sum and main.go.
# Prints the versitygw binary path at the end (tests/servers/s3.py looks there, or in $VERSITYGW).
# `install_servers.sh vcsim` does only the vcsim step and prints the vcsim binary path instead
# (tests/servers/vsphere.py calls it so when the binary is missing).
# `install_servers.sh kube` does only the kube step and prints two lines: the kube-apiserver path, then the etcd
# path (tests/servers/kube_api.py calls it so when a binary is missing). A cold build of both takes about
# 6 minutes on 2 cores (kube-apiserver ~150 MB, etcd ~40 MB).
set -euo pipefail

VERSITYGW_VERSION="${VERSITYGW_VERSION:-v1.8.0}"
cache="${VMMIG_CACHE:-$HOME/.cache/vmmigration}"
bin="$cache/bin/versitygw"
# one install at a time per cache (a test that finds a binary missing may call this while another runs it)
mkdir -p "$cache"
exec 9>"$cache/install_servers.lock"
flock 9
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
vcsim_src="$root/tests/servers/vcsim"
kas_src="$root/tests/servers/kube/kas"
etcd_src="$root/tests/servers/kube/etcd"

use_go() {
  if ! command -v go >/dev/null; then
    export PATH="$PATH:/usr/local/go/bin"
  fi
  command -v go >/dev/null || { echo "go not found (looked in PATH and /usr/local/go/bin)" >&2; exit 1; }
}

# go_build_cached NAME SRC WHAT [LDFLAGS]: the binary $cache/bin/NAME-<key> for the Go module in SRC, built if
# missing; the key is the same as tests/servers/vsphere.py and tests/servers/kube_api.py compute: the first 16
# hex digits of sha256(go.mod + go.sum + main.go). Older NAME-* binaries are removed after a new one is built.
# The LDFLAGS are not part of the key: after changing them here, delete the cached binary. Sets $built to the
# path. Quiet when the binary is cached.
go_build_cached() {
  local name="$1" src="$2" what="$3" ldflags="${4:-}" key out tmp
  key="$(cat "$src/go.mod" "$src/go.sum" "$src/main.go" | sha256sum | cut -c1-16)"
  out="$cache/bin/$name-$key"
  if [ ! -x "$out" ]; then
    use_go
    mkdir -p "$cache/bin"
    echo "building $name ($src, $what) into $out" >&2
    tmp="$out.tmp.$$"
    if ! (cd "$src" && GOFLAGS="-mod=mod -buildvcs=false" go build -trimpath -ldflags="$ldflags" -o "$tmp" .) >&2; then
      rm -f "$tmp"
      echo "$name build failed" >&2
      exit 1
    fi
    mv -f "$tmp" "$out"
    find "$cache/bin" -maxdepth 1 -name "$name-*" ! -name "$name-$key" -type f -delete
  fi
  [ -x "$out" ] || { echo "$name build did not produce $out" >&2; exit 1; }
  built="$out"
}

build_vcsim() {
  go_build_cached vcsim "$vcsim_src" "govmomi v0.56.0, about a minute the first time"
  vcsim_bin="$built"
}

# kube-apiserver gets the version of k8s.io/kubernetes in its go.mod stamped in (without it /version says
# v0.0.0-master), the way Kubernetes' own build scripts set it.
build_kube() {
  local kver parts v=k8s.io/component-base/version
  kver="$(awk '$1 == "k8s.io/kubernetes" && $2 ~ /^v[0-9]/ {print $2; exit}' "$kas_src/go.mod")"
  [ -n "$kver" ] || { echo "no k8s.io/kubernetes version in $kas_src/go.mod" >&2; exit 1; }
  IFS=. read -ra parts <<<"${kver#v}"
  go_build_cached kube-apiserver "$kas_src" "k8s.io/kubernetes $kver, about 5 minutes the first time" \
    "-X $v.gitVersion=$kver -X $v.gitMajor=${parts[0]} -X $v.gitMinor=${parts[1]} -X $v.gitTreeState=clean"
  kas_bin="$built"
  go_build_cached etcd "$etcd_src" "go.etcd.io/etcd v3.6.16, about 40 s the first time"
  etcd_bin="$built"
}

if [ "${1:-}" = vcsim ]; then
  build_vcsim
  echo "$vcsim_bin"
  exit 0
fi
if [ "${1:-}" = kube ]; then
  build_kube
  echo "$kas_bin"
  echo "$etcd_bin"
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
build_kube
echo "kube-apiserver: $kas_bin" >&2
echo "etcd: $etcd_bin" >&2
echo "$bin"
