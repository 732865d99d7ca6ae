#!/bin/bash
# One bulk run as weir-bench's bulk row makes it, with the binaries of one
# directory, for before/after comparisons of two builds (docs/performance.md):
#   weir-tcpfeed -> weir-sender (tcp source, spool on disk) -> UDP, RS 32+8,
#   MTU 1500, authenticated -> weir-receiver (journal on disk, tcp sink) ->
#   weir-tcpsink. Prints goodput, CPU s/GB per side (/proc/PID/stat) and
#   peak RSS, and each side's CPU and minor page faults by thread. With a third argument `p`, records each side with perf
#   (PG: perf's call-graph flags, default -g) into $D/sender.perf, receiver.perf.
# usage: bulk-pair.sh BIN_DIR BYTES [p]   env RATE (default 4Gbit), D (scratch dir),
#   CHUNK (the tcp source's chunk_size; default: the source's default)
# Ports 47001-47003 on 127.0.0.1 must be free.
set -e
B=$1; BYTES=$2; P=$3; RATE=${RATE:-4Gbit}; PG=${PG:--g}
D=${D:-/var/tmp/weir-bulk-pair}; rm -rf $D; mkdir -p $D/store
$B/weir-sender keygen --out $D/link.key >/dev/null 2>&1 || true
SRC=47001; DST=47002; LINK=47003
. "$(dirname "$0")/pair-configs.sh"
LINK_EXTRA="mtu = 1500"
SENDER_EXTRA=$'[fec]\ndata_shards = 32\nparity_shards = 8'
SOURCE_EXTRA="${CHUNK:+chunk_size = '$CHUNK'}"
write_pair_configs
# Whatever stops the script (a failed feed under set -e) stops the pair too.
trap 'kill $SINK $RP $SP ${PS:-} ${PR:-} 2>/dev/null || true' EXIT
$B/weir-tcpsink --no-hash --listen 127.0.0.1:$DST --expect-bytes $BYTES --timeout 600 --idle-timeout 10 --report $D/sink.json >/dev/null 2>$D/sink.log &
SINK=$!
$B/weir-receiver run --config $D/receiver.toml 2>$D/receiver.log & RP=$!
$B/weir-sender run --config $D/sender.toml 2>$D/sender.log & SP=$!
sleep 1
if [ "$P" = p ]; then
  perf record -F 499 $PG -o $D/sender.perf -p $SP 2>/dev/null & PS=$!
  perf record -F 499 $PG -o $D/receiver.perf -p $RP 2>/dev/null & PR=$!
fi
T0=$(date +%s.%N)
$B/weir-tcpfeed --no-hash --connect 127.0.0.1:$SRC --bytes $BYTES > $D/feed.json
wait $SINK || true
T1=$(date +%s.%N)
cpu() { awk '{print ($14+$15)/100}' /proc/$1/stat; }
CS=$(cpu $SP); CR=$(cpu $RP)
# Each side's CPU by thread name (threads of one name summed), user and
# system apart, in s/GB: which stage costs what, kernel work included.
threads() {
  for t in /proc/$1/task/*; do
    echo "$(tr ' ' _ < $t/comm) $(sed 's/.*) //' $t/stat | awk '{print $12, $13, $8}')"
  done | awk -v gb=$(python3 -c "print($BYTES/1e9)") -v side=$2 \
    '{u[$1]+=$2; s[$1]+=$3; f[$1]+=$4} END {printf "%s by thread (user+sys s/GB, minor page faults per GB):", side;
      for (n in u) if (u[n]+s[n] > 0) printf " %s %.2f+%.2f %.0fk", n, u[n]/100/gb, s[n]/100/gb, f[n]/gb/1000; print ""}'
}
TS=$(threads $SP sender); TR=$(threads $RP receiver)
if [ "$P" = p ]; then kill -INT $PS $PR; wait $PS $PR 2>/dev/null || true; fi
HS=$(grep VmHWM /proc/$SP/status | awk '{print $2}'); HR=$(grep VmHWM /proc/$RP/status | awk '{print $2}')
kill $SP $RP; wait $SP $RP 2>/dev/null || true
python3 - <<PY
b=$BYTES/1e9; el=$T1-$T0
print(f"elapsed {el:.2f}s goodput {b*1000/el:.0f} MB/s sender {($CS)/b:.2f} s/GB receiver {($CR)/b:.2f} s/GB  rss {$HS//1024}/{$HR//1024} MiB")
PY
echo "$TS"; echo "$TR"
cat $D/sink.json | head -c 300; echo
