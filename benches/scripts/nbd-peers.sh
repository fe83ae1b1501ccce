#!/usr/bin/env bash
# Side-by-side fio (nbd engine) against Ballast and the peers a user would
# otherwise pick, all serving from the same disk and prefilled with the same
# random 1 GiB:
#   ballast   a dedup+lz4 volume on ballastd (io_uring backend)
#   qemu-nbd  a raw file, default cache and --cache=none, --aio=io_uring
#   nbdkit    file plugin on a raw file; null plugin = protocol ceiling
# Workloads: 4 KiB random read/write at QD 32, 4 KiB random read at QD 1,
# 1 MiB sequential read/write. Prints a Markdown table.
#
# At QD 1 on this 2-vCPU VM most of a request's time is the wake-up of
# whichever side runs on the other vCPU, so the scheduler's placement
# decides the result more than the server does (a server on fio's vCPU
# answers in a third of the time). The "qd1 pinned" row therefore runs the
# same workload with fio on CPU 0 and the server's threads on CPU 1, which
# gives every server the same placement. So does "write 1m pinned": fio is
# the busier side of 1 MiB writes (it generates every buffer), and a
# server thread the scheduler puts beside it costs it throughput.
#
# This VM moves one server's figure by ±10% between minutes, more than the
# differences the table is for. With ROUNDS > 1 each workload runs ROUNDS
# times per target, in turns (each round starting one target later), and
# a cell shows the median with the range: "median (min–max)".
#
#   benches/scripts/nbd-peers.sh [WORK_DIR] [SECONDS] [ROUNDS]
#
# WORKLOADS replaces the list ("RW BS QD [pinned]" separated by ";"), e.g.
# WORKLOADS="randread 4k 1;write 1m 8 pinned" to repeat the noisy rows.
set -euo pipefail
root=$(cd "$(dirname "$0")/../.." && pwd)
work=${1:-/var/tmp/ballast-peers}
secs=${2:-10}
rounds=${3:-1}
mkdir -p "$work"
cargo build --release -q --bins --manifest-path "$root/Cargo.toml"
bin=$(cargo metadata --format-version 1 --manifest-path "$root/Cargo.toml" | /usr/bin/python3 -c 'import json,sys;print(json.load(sys.stdin)["target_directory"])')/release
pids=()
cleanup() { for p in "${pids[@]:-}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; }
trap cleanup EXIT
port() { /usr/bin/python3 -c 'import socket;s=socket.socket();s.bind(("127.0.0.1",0));print(s.getsockname()[1])'; }
wait_port() { for _ in $(seq 200); do (exec 3<>/dev/tcp/127.0.0.1/$1) 2>/dev/null && return 0; sleep 0.1; done; echo "port $1 never opened" >&2; return 1; }

head -c 1G /dev/urandom >"$work/fill.bin"
declare -A uri spid
# Ballast
rm -rf "$work/ballast"; bp=$(port); ap=$(port)
"$bin/ballastd" --data "$work/ballast" --listen-nbd 127.0.0.1:$bp --listen-api 127.0.0.1:$ap >"$work/ballastd.log" 2>&1 &
pids+=($!); spid[ballast]=$!; wait_port $bp; wait_port $ap
"$bin/ballast" --api http://127.0.0.1:$ap volume create bench --size 1G >/dev/null
uri[ballast]="nbd://127.0.0.1:$bp/bench"
# qemu-nbd, two cache modes, each on its own raw file
for mode in default none; do
  f="$work/qemu-$mode.raw"; rm -f "$f"; truncate -s 1G "$f"; p=$(port)
  extra=(); [ "$mode" = none ] && extra=(--cache=none)
  qemu-nbd -f raw --aio=io_uring "${extra[@]}" -x bench -b 127.0.0.1 -p $p -e 8 -t "$f" >/dev/null 2>&1 &
  pids+=($!); spid[qemu-$mode]=$!; wait_port $p; uri[qemu-$mode]="nbd://127.0.0.1:$p/bench"
done
f="$work/nbdkit.raw"; rm -f "$f"; truncate -s 1G "$f"; p=$(port)
nbdkit -f -p $p -i 127.0.0.1 file "$f" >/dev/null 2>&1 & pids+=($!); spid[nbdkit-file]=$!; wait_port $p; uri[nbdkit-file]="nbd://127.0.0.1:$p/"
p=$(port); nbdkit -f -p $p -i 127.0.0.1 null 1G >/dev/null 2>&1 & pids+=($!); spid[nbdkit-null]=$!; wait_port $p; uri[nbdkit-null]="nbd://127.0.0.1:$p/"

targets=(ballast qemu-default qemu-none nbdkit-file nbdkit-null)
for t in "${targets[@]}"; do
  [ "$t" = nbdkit-null ] && continue
  nbdcopy "$work/fill.bin" "${uri[$t]}"
done
# Ballast completes writes into its write-back buffer and stores them
# (hash, dedup, lz4, commit) later, as the peers' page cache writes back
# later. A FLUSH after each Ballast run waits for that work, so that it
# does not run during the next target's measurement.
settle() {
  /usr/bin/python3 -c 'import nbd,sys; h=nbd.NBD(); h.connect_uri(sys.argv[1]); h.flush(); h.shutdown()' "$1"
}
settle "${uri[ballast]}"

run() { # target rw bs qd [pinned] -> "iops MB/s"
  local pin=()
  if [ "${5:-}" = pinned ]; then
    taskset -a -p -c 1 "${spid[$1]}" >/dev/null
    pin=(taskset -c 0)
  fi
  "${pin[@]}" fio --name=$1 --ioengine=nbd --uri="${uri[$1]}" --rw=$2 --bs=$3 --iodepth=$4 --size=1G \
      --time_based --runtime=$secs --refill_buffers=1 --output-format=json 2>/dev/null |
    /usr/bin/python3 -c 'import json,sys
t=sys.stdin.read(); d=json.loads(t[t.index("{"):])["jobs"][0]
print("%.0f %.0f" % (d["read"]["iops"]+d["write"]["iops"], (d["read"]["bw_bytes"]+d["write"]["bw_bytes"])/1e6))'
  if [ "${5:-}" = pinned ]; then taskset -a -p -c 0-$(($(nproc) - 1)) "${spid[$1]}" >/dev/null; fi
}
IFS=';' read -r -a workloads <<<"${WORKLOADS:-randread 4k 32;randwrite 4k 32;randread 4k 1;randread 4k 1 pinned;read 1m 8;write 1m 8;write 1m 8 pinned}"
printf '| workload |'; for t in "${targets[@]}"; do printf ' %s |' "$t"; done; echo
printf '|---'; for _ in "${targets[@]}"; do printf '|---'; done; echo '|'
# "v1 v2 ..." -> "median" or "median (min–max)"
summary() { /usr/bin/python3 -c 'import sys,statistics
v=sorted(int(x) for x in sys.argv[1:])
m=round(statistics.median(v))
print(m if len(v)==1 else "%d (%d–%d)" % (m, v[0], v[-1]))' "$@"; }
n=${#targets[@]}
for w in "${workloads[@]}"; do
  read -r rw bs qd pinned <<<"$w"
  unit=IOPS; [ "$bs" = 1m ] && unit=MB/s
  declare -A got=()
  for r in $(seq 0 $((rounds - 1))); do
    for i in $(seq 0 $((n - 1))); do
      t=${targets[$(( (i + r) % n ))]}
      read -r iops mbps <<<"$(run "$t" "$rw" "$bs" "$qd" "$pinned")"
      if [ "$t" = ballast ]; then settle "${uri[ballast]}"; fi
      if [ "$bs" = 1m ]; then got[$t]="${got[$t]:-} $mbps"; else got[$t]="${got[$t]:-} $iops"; fi
    done
  done
  row="| $rw $bs qd$qd${pinned:+ $pinned} |"
  # shellcheck disable=SC2086 # the values are words by design
  for t in "${targets[@]}"; do row="$row $(summary ${got[$t]}) $unit |"; done
  echo "$row"
done
