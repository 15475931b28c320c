#!/bin/sh
# Minimal QEMU guest agent stand-in (busybox sh) for the vmmigration test guest. Speaks the QGA protocol on
# the virtio-serial port named org.qemu.guest_agent.0: one JSON command per line in, one JSON object per
# line out. Implements guest-sync, guest-sync-delimited (0xFF sentinel before the reply), guest-ping,
# guest-info, guest-fsfreeze-freeze(-list), guest-fsfreeze-thaw, guest-fsfreeze-status and guest-shutdown;
# anything else gets a CommandNotFound error. "Freezing" pauses the record writer of /init (the guest has no
# filesystem to freeze): see checkpoint() there.
export PATH=/bin:/sbin
state=/run/vmmig
mkdir -p "$state"
version=1.0-vmmig

log() { echo "vmmig-agent: $*" >/dev/console; }

port=
i=0
while [ $i -lt 100 ]; do
  for n in /sys/class/virtio-ports/*/name; do
    [ -f "$n" ] || continue
    if [ "$(cat "$n")" = org.qemu.guest_agent.0 ]; then
      p=${n%/name}
      port=/dev/${p##*/}
    fi
  done
  [ -n "$port" ] && [ -c "$port" ] && break
  port=
  usleep 100000
  i=$((i + 1))
done
if [ -z "$port" ]; then
  log "no org.qemu.guest_agent.0 port, agent not started"
  exit 0
fi
log "listening on $port"
exec 3<>"$port"

reply() { printf '%s\n' "$1" >&3; }

commands="guest-sync guest-sync-delimited guest-ping guest-info guest-fsfreeze-freeze guest-fsfreeze-freeze-list"
commands="$commands guest-fsfreeze-thaw guest-fsfreeze-status guest-shutdown"

info() {
  list=
  for c in $commands; do
    list="$list${list:+, }{\"name\": \"$c\", \"enabled\": true, \"success-response\": $([ "$c" = guest-shutdown ] && echo false || echo true)}"
  done
  reply "{\"return\": {\"version\": \"$version\", \"supported_commands\": [$list]}}"
}

freeze() {
  if [ -e "$state/freeze" ]; then
    reply '{"error": {"class": "GenericError", "desc": "The command guest-fsfreeze-freeze has been disabled: already frozen"}}'
    return
  fi
  tok="$$-$(cat /proc/sys/kernel/random/uuid)"
  echo "$tok" >"$state/freeze.tmp" && mv "$state/freeze.tmp" "$state/freeze"
  if [ -e "$state/writer" ]; then
    n=0
    while [ "$(cat "$state/paused" 2>/dev/null)" != "$tok" ]; do
      n=$((n + 1))
      if [ $n -gt 500 ]; then   # 10 s
        rm -f "$state/freeze"
        reply '{"error": {"class": "GenericError", "desc": "the record writer did not pause"}}'
        return
      fi
      usleep 20000
    done
  fi
  log "frozen (writer paused at next=$(cat "$state/next" 2>/dev/null))"
  reply '{"return": 1}'
}

thaw() {
  if [ -e "$state/freeze" ]; then
    rm -f "$state/freeze"
    log "thawed"
    reply '{"return": 1}'
  else
    reply '{"return": 0}'
  fi
}

while :; do
  line=
  if ! IFS= read -r line <&3 && [ -z "$line" ]; then
    # EOF: nobody is connected on the host side; poll until someone is
    usleep 200000
    continue
  fi
  line=$(printf '%s' "$line" | tr -d '\377\r')
  case "$line" in
    *'"execute"'*) ;;
    *) [ -n "$line" ] && log "ignoring: $line"; continue ;;
  esac
  cmd=${line#*\"execute\"}
  cmd=${cmd#*\"}
  cmd=${cmd%%\"*}
  log "<- $(printf "%s" "$line" | cut -c1-160)"
  case "$cmd" in
    guest-sync | guest-sync-delimited)
      id=${line#*\"id\"}
      id=${id#*:}
      id=${id%%[,\}]*}
      set -- $id
      id=${1:-0}
      if [ "$cmd" = guest-sync-delimited ]; then
        printf '\377{"return": %s}\n' "$id" >&3
      else
        reply "{\"return\": $id}"
      fi
      ;;
    guest-ping) reply '{"return": {}}' ;;
    guest-info) info ;;
    guest-fsfreeze-freeze | guest-fsfreeze-freeze-list) freeze ;;
    guest-fsfreeze-thaw) thaw ;;
    guest-fsfreeze-status)
      if [ -e "$state/freeze" ]; then reply '{"return": "frozen"}'; else reply '{"return": "thawed"}'; fi
      ;;
    guest-shutdown)
      # no reply on success, as qemu-ga; mode "reboot" reboots, anything else powers off
      sync
      case "$line" in
        *'"reboot"'*) reboot -f ;;
        *) poweroff -f ;;
      esac
      ;;
    *) reply "{\"error\": {\"class\": \"CommandNotFound\", \"desc\": \"The command $cmd has not been found\"}}" ;;
  esac
done
