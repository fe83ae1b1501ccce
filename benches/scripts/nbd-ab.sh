#!/usr/bin/env bash
# Side-by-side runs of two (or more) ballastd builds through fio's nbd
# engine, interleaved, with ballastd's CPU per request: for telling an
# engine or server change apart from this VM's drift, which moves the
# absolute figures by ±15% between minutes.
#
#   benches/scripts/nbd-ab.sh WORK_DIR SECONDS ROUNDS BIN_DIR...
#
# Each BIN_DIR holds a `ballastd` and a `ballast`. Per round and per
# BIN_DIR: a fresh ballastd on free loopback ports, a 1 GiB dedup+lz4
# volume prefilled with the same random 1 GiB (nbdcopy), then read 1m qd8,
# randread 4k qd32, randwrite 4k qd32 and write 1m qd8 for SECONDS each
# (--randrepeat=0: a rerun writes new content, not dedup hits). Prints one
# line per run: MB/s and ms of ballastd CPU per MB for 1 MiB workloads,
# IOPS and µs of ballastd CPU per I/O for 4 KiB ones. After each workload a
# FLUSH waits for the writes still in ballastd's write-back buffer to be
# stored; its CPU counts in the figure and its time is shown ("flush").
# WORKLOADS replaces the list, e.g. WORKLOADS="randread 4k 1;read 1m 8".
set -euo pipefail
work=$1; secs=$2; rounds=$3; shift 3; bins=("$@")
mkdir -p "$work"
port() { /usr/bin/python3 -c 'import socket;s=socket.socket();s.bind(("127.0.0.1",0));print(s.getsockname()[1])'; }
cpu() { awk '{print $14+$15}' "/proc/$1/stat"; }
[ -f "$work/fill.bin" ] || head -c 1G /dev/urandom >"$work/fill.bin"
# FLUSH through libnbd; prints the seconds it took.
flush() {
  /usr/bin/python3 -c 'import nbd,sys,time
h=nbd.NBD(); h.connect_uri("nbd://127.0.0.1:%s/bench" % sys.argv[1]); t=time.time(); h.flush(); print("%.2f" % (time.time()-t)); h.shutdown()' "$1"
}
pid=
trap '[ -n "$pid" ] && kill $pid 2>/dev/null; wait 2>/dev/null || true' EXIT
IFS=';' read -r -a wls <<<"${WORKLOADS:-read 1m 8;randread 4k 32;randwrite 4k 32;write 1m 8}"
for r in $(seq "$rounds"); do
  for bin in "${bins[@]}"; do
    rm -rf "$work/data"
    bp=$(port); ap=$(port)
    "$bin/ballastd" --data "$work/data" --listen-nbd 127.0.0.1:$bp --listen-api 127.0.0.1:$ap >"$work/ballastd.log" 2>&1 &
    pid=$!
    for _ in $(seq 100); do (exec 3<>/dev/tcp/127.0.0.1/$ap) 2>/dev/null && break; sleep 0.1; done
    "$bin/ballast" --api http://127.0.0.1:$ap volume create bench --size 1G >/dev/null
    nbdcopy "$work/fill.bin" nbd://127.0.0.1:$bp/bench
    flush $bp >/dev/null
    sleep 1
    line="round $r $bin:"
    for wl in "${wls[@]}"; do
      read -r rw bs qd <<<"$wl"
      c0=$(cpu $pid)
      read -r io n iops mbs < <(fio --name=ab --ioengine=nbd --uri=nbd://127.0.0.1:$bp/bench --rw=$rw --bs=$bs \
          --iodepth=$qd --size=1G --time_based --runtime=$secs --refill_buffers=1 --randrepeat=0 \
          --output-format=json 2>/dev/null | /usr/bin/python3 -c 'import json,sys
t=sys.stdin.read(); d=json.loads(t[t.index("{"):])["jobs"][0]
r, w = d["read"], d["write"]
print(r["io_bytes"]+w["io_bytes"], r["total_ios"]+w["total_ios"], round(r["iops"]+w["iops"]), round((r["bw_bytes"]+w["bw_bytes"])/1e6))')
      fl=$(flush $bp)
      ticks=$(( $(cpu $pid) - c0 ))
      hz=$(getconf CLK_TCK)
      if [ "$bs" = 1m ]; then
        line="$line | $wl ${mbs} MB/s $(/usr/bin/python3 -c "print('%.3f' % ($ticks/$hz*1e3/($io/1e6)))") ms/MB flush ${fl}s"
      else
        line="$line | $wl ${iops} IOPS $(/usr/bin/python3 -c "print('%.1f' % ($ticks/$hz*1e6/$n))") us/io flush ${fl}s"
      fi
    done
    echo "$line"
    kill $pid; wait $pid 2>/dev/null || true; pid=
  done
done
