#!/usr/bin/env bash
# Start virtlogd and libvirtd (Debian 12, no systemd) unless a daemon already answers on qemu:///system.
set -euo pipefail
# /dev/kvm as Debian's udev rule leaves it (root:kvm 0660): without it libvirt re-probes QEMU on every
# domain definition (about 30 s each) and cannot start KVM guests.
if [ -c /dev/kvm ] && getent group kvm >/dev/null && [ "$(stat -c %G /dev/kvm)" != kvm ]; then
  chgrp kvm /dev/kvm && chmod 0660 /dev/kvm
fi
if virsh -c qemu:///system version >/dev/null 2>&1; then exit 0; fi
logdir="${VMMIG_CACHE:-$HOME/.cache/vmmigration}/logs"; mkdir -p "$logdir"
# running, not a zombie: a daemon killed after its parent went away stays a zombie where PID 1 does not reap
# (a Firecracker VM's init), and pgrep alone would take it for a live one and start nothing
alive() { ps -C "$1" -o stat= 2>/dev/null | grep -qv '^Z'; }
# (an `if`, not `alive x || ... &`: that backgrounds a subshell which keeps the caller's stdout open as long as the
# daemon lives, and a caller reading it, such as a test fixture, then waits for ever)
if ! alive virtlogd; then setsid nohup /usr/sbin/virtlogd >"$logdir/virtlogd.log" 2>&1 < /dev/null & fi
if ! alive libvirtd; then setsid nohup /usr/sbin/libvirtd >"$logdir/libvirtd.log" 2>&1 < /dev/null & fi
# a loaded host (or a restart right after a stop) can take several seconds to answer
# (measured: more than 60 s once in a while after a restart during a migration; callers wait 180 s)
deadline=$((SECONDS + ${LIBVIRTD_WAIT:-170}))
while ((SECONDS < deadline)); do
  virsh -c qemu:///system version >/dev/null 2>&1 && exit 0
  sleep 0.1
done
echo "libvirtd did not come up; see $logdir/libvirtd.log" >&2
tail -20 "$logdir/libvirtd.log" >&2 || true
exit 1
