#!/bin/bash
# The sender's memory during a large resend (docs/performance.md, "A
# resend's memory is bounded"): feeds BYTES through a tcp source, waits
# until every record is sent, asks `weir-sender resend` for the whole
# stream, and prints the sender's VmHWM / VmRSS and resent_records each
# second for 40 s.
# usage: resend-mem.sh BIN_DIR [BYTES]   env D (scratch dir)
# BIN_DIR holds weir-sender, weir-receiver, weir-tcpfeed, weir-tcpsink.
# Ports 47101-47103 on 127.0.0.1 must be free.
set -e
B=$1; BYTES=${2:-536870912}; D=${D:-/var/tmp/weir-resend-mem}; rm -rf $D; mkdir -p $D/store
$B/weir-sender keygen --out $D/link.key >/dev/null 2>&1
SRC=47101; DST=47102; LINK=47103; RATE=2Gbit
. "$(dirname "$0")/pair-configs.sh"
SPOOL_EXTRA='max_bytes = "4GiB"'
write_pair_configs
trap 'kill $SINK $RP $SP 2>/dev/null || true' EXIT
$B/weir-tcpsink --no-hash --listen 127.0.0.1:$DST --expect-bytes $((BYTES*2)) --timeout 600 --idle-timeout 30 --report $D/sink.json >/dev/null 2>$D/sink.log & SINK=$!
$B/weir-receiver run --config $D/receiver.toml 2>$D/receiver.log & RP=$!
$B/weir-sender run --config $D/sender.toml 2>$D/sender.log & SP=$!
sleep 1
$B/weir-tcpfeed --no-hash --connect 127.0.0.1:$SRC --bytes $BYTES > /dev/null
rss() { awk '/VmRSS|VmHWM/ {printf "%s %d MiB  ", $1, $2/1024}' /proc/$SP/status; echo; }
for i in $(seq 1 60); do
  sent=$(python3 -c "import json;print(json.load(open('$D/sender.json')).get('records_sent',0), json.load(open('$D/sender.json')).get('records_in',0))" 2>/dev/null || echo "0 1")
  set -- $sent; [ "$1" = "$2" ] && break; sleep 1
done
echo "all sent: $sent"; rss
$B/weir-sender resend --config $D/sender.toml --stream raw --from 0 2>&1 | tail -2
for i in $(seq 1 40); do sleep 1; echo -n "t=$i "; rss; python3 -c "import json;d=json.load(open('$D/sender.json'));print('  resent', d['resent_records'])"; done
