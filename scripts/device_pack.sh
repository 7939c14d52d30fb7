#!/usr/bin/env bash
# Keep a device call's results coming back even if the call is killed at its time limit:
#   bash scripts/device_pack.sh DIR NAME [SECONDS] &   (then, at the end of the call: kill %1; bash scripts/device_pack.sh DIR NAME 0)
# re-archives DIR into $OUT/NAME.tgz every SECONDS (default 60), each time through a temporary file
# renamed into place, so $OUT always holds one complete archive (the device tool returns what is
# under $OUT when a command runs past its limit). SECONDS = 0: archive once and exit.
set -u
dir=$1; name=$2; every=${3:-60}
out=${OUT:?OUT is not set (the device tool sets it)}
pack() { tar czf "$out/.$name.tgz.tmp" -C "$dir" . 2>/dev/null && mv -f "$out/.$name.tgz.tmp" "$out/$name.tgz"; }
if [ "$every" = 0 ]; then pack; exit 0; fi
while :; do sleep "$every"; pack; done
