#!/usr/bin/env bash
# Build (or fetch from the cache) the tiny bootable test guest: a FAT "superfloppy" raw disk image with
# syslinux, the Debian kernel and an initramfs made of busybox-static, a few virtio modules, tests/guest/init
# (PID 1: record writer) and tests/guest/agent.sh (guest agent stand-in). Nothing is installed on the host
# except the build tools (apt-get, only when missing); the kernel package is downloaded and extracted only.
#
# Usage: tests/guest/build_guest.sh            -> prints the path of boot.raw as the last stdout line
# Env:   VMMIG_CACHE  cache root (default ~/.cache/vmmigration); result in $VMMIG_CACHE/guest-<key>/
#        GUEST_IMAGE_MIB  image size (default 32)
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
cache="${VMMIG_CACHE:-$HOME/.cache/vmmigration}"
key="$(cat "$here/build_guest.sh" "$here/init" "$here/agent.sh" | sha256sum | cut -c1-12)"
out="$cache/guest-$key"
image="$out/boot.raw"

# fast path: no apt, no subprocess beyond the hashing above
if [ -f "$out/.complete" ] && [ -f "$image" ]; then
  echo "$image"
  exit 0
fi

log() { echo "build_guest: $*" >&2; }
started=$(date +%s)

# one build at a time per key; whoever waited finds the finished image
mkdir -p "$cache"
exec 9>"$cache/.guest-$key.lock"
flock 9
if [ -f "$out/.complete" ] && [ -f "$image" ]; then
  echo "$image"
  exit 0
fi

# ---- host tools (installed only if missing) ----
need=(syslinux syslinux-common mtools dosfstools cpio xz-utils gzip)
missing=()
for pkg in "${need[@]}"; do
  dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
done
if [ "${#missing[@]}" -gt 0 ]; then
  log "installing host tools: ${missing[*]}"
  apt-get update -qq >&2
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >&2
fi

work="$(mktemp -d "$cache/.guest-build.XXXXXX")"
trap 'rm -rf "$work"' EXIT

# ---- packages: the current Debian kernel image and busybox-static, downloaded and extracted ----
kpkg="$(apt-cache depends linux-image-amd64 2>/dev/null | sed -n 's/^ *Depends: \(linux-image-[0-9][^ ]*\)$/\1/p' | head -1)"
if [ -z "$kpkg" ]; then
  apt-get update -qq >&2
  kpkg="$(apt-cache depends linux-image-amd64 | sed -n 's/^ *Depends: \(linux-image-[0-9][^ ]*\)$/\1/p' | head -1)"
fi
[ -n "$kpkg" ] || { log "cannot resolve the kernel package behind linux-image-amd64"; exit 1; }
log "downloading $kpkg busybox-static"
# apt-get download drops privileges to _apt: download into a temp folder it can reach and write
dl="$(mktemp -d)"
trap 'rm -rf "$work" "$dl"' EXIT
chmod 0755 "$dl"
mkdir -m 0777 "$dl/debs"
ln -s "$dl/debs" "$work/debs"
if ! (cd "$work/debs" && apt-get download -q "$kpkg" busybox-static >&2); then
  apt-get update -qq >&2
  (cd "$work/debs" && apt-get download -q "$kpkg" busybox-static >&2)
fi
mkdir -p "$work/kernel" "$work/bb"
dpkg-deb -x "$work/debs/${kpkg}"_*.deb "$work/kernel"
dpkg-deb -x "$work/debs"/busybox-static_*.deb "$work/bb"

kver="${kpkg#linux-image-}"
vmlinuz="$work/kernel/boot/vmlinuz-$kver"
moddir="$work/kernel/lib/modules/$kver"
[ -f "$vmlinuz" ] || { log "no $vmlinuz in $kpkg"; exit 1; }
busybox="$work/bb/bin/busybox"
[ -x "$busybox" ] || { log "no busybox binary in busybox-static"; exit 1; }
applets="$("$busybox" --list)"
for applet in sh mount insmod dd sha256sum setsid sleep sed grep head cut cat mkdir touch rm tr printf hexdump; do
  grep -qx "$applet" <<<"$applets" || { log "busybox lacks the $applet applet"; exit 1; }
done

# ---- initramfs tree ----
root="$work/root"
mkdir -p "$root"/{bin,sbin,dev,proc,sys,tmp,run,etc,lib/modules}
cp "$busybox" "$root/bin/busybox"
for applet in $applets; do
  [ -e "$root/bin/$applet" ] || ln -s busybox "$root/bin/$applet"
done
install -m 0755 "$here/init" "$root/init"
install -m 0755 "$here/agent.sh" "$root/bin/vmmig-agent"

# modules: resolve each wanted module's "depends=" (from .modinfo; the package ships no modules.dep) and
# write them in dependency order; modules built into the kernel (modules.builtin) are skipped.
declare -A modpath=() done_mod=()
while IFS= read -r f; do
  base="$(basename "$f")"; base="${base%%.ko*}"; modpath[${base//-/_}]="$f"
done < <(find "$moddir/kernel" -name '*.ko' -o -name '*.ko.xz' -o -name '*.ko.zst' -o -name '*.ko.gz')
order=()
add_module() {
  local m="${1//-/_}" dep f
  [ -n "${done_mod[$m]:-}" ] && return 0
  done_mod[$m]=1
  if [ -z "${modpath[$m]:-}" ]; then
    if grep -q "/${1}\.ko" "$moddir/modules.builtin" 2>/dev/null || grep -q "/${m}\.ko" "$moddir/modules.builtin" 2>/dev/null; then
      log "module $m is built in"
      return 0
    fi
    log "module $m not found"; return 1
  fi
  f="$work/mod-$m.ko"
  case "${modpath[$m]}" in
    *.ko.xz) xz -dc "${modpath[$m]}" >"$f" ;;
    *.ko.zst) zstd -qdc "${modpath[$m]}" >"$f" ;;
    *.ko.gz) gzip -dc "${modpath[$m]}" >"$f" ;;
    *) cp "${modpath[$m]}" "$f" ;;
  esac
  for dep in $(tr '\0' '\n' <"$f" | sed -n 's/^depends=//p' | head -1 | tr ',' ' '); do
    add_module "$dep"
  done
  cp "$f" "$root/lib/modules/$m.ko"
  order+=("$m")
}
for m in virtio_ring virtio virtio_pci_modern_dev virtio_pci_legacy_dev virtio_pci virtio_blk virtio_console; do
  if [ "$m" = virtio_pci_modern_dev ] || [ "$m" = virtio_pci_legacy_dev ]; then
    [ -n "${modpath[$m]:-}" ] || continue   # older/newer kernels may not split these out
  fi
  add_module "$m"
done
printf '%s\n' "${order[@]}" >"$root/lib/modules/order"
log "modules (load order): ${order[*]}"
echo "$kver" >"$root/etc/kernel-release"

(cd "$root" && find . -print0 | LC_ALL=C sort -z | cpio --null -o -H newc --owner=0:0 --quiet) | gzip -9 -n >"$work/initrd.img"

# ---- FAT superfloppy + syslinux ----
cat >"$work/syslinux.cfg" <<'EOF'
DEFAULT guest
PROMPT 0
TIMEOUT 0
SERIAL 0 115200
LABEL guest
  KERNEL vmlinuz
  INITRD initrd.img
  APPEND console=ttyS0,115200 quiet loglevel=1 panic=5 tsc=reliable
EOF
mib="${GUEST_IMAGE_MIB:-32}"
raw="$work/boot.raw"
mkfs.vfat -C -n VMMGUEST -i 564d4d47 "$raw" $((mib * 1024)) >/dev/null
syslinux --install "$raw"
mcopy -i "$raw" "$vmlinuz" ::vmlinuz
mcopy -i "$raw" "$work/initrd.img" ::initrd.img
mcopy -i "$raw" "$work/syslinux.cfg" ::syslinux.cfg
echo "$kpkg" | mcopy -i "$raw" - ::kernel.txt

rm -rf "$out"
mkdir -p "$out"
mv "$raw" "$image"
cp "$work/syslinux.cfg" "$out/syslinux.cfg"
echo "$kpkg" >"$out/kernel-package"
chmod 0755 "$out"
chmod 0644 "$image"
touch "$out/.complete"
log "built $image ($(du -h --apparent-size "$image" | cut -f1), initrd $(du -h "$work/initrd.img" | cut -f1)) in $(($(date +%s) - started)) s"
echo "$image"
