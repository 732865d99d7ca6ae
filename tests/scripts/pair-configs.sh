# Sourced by bulk-pair.sh and resend-mem.sh: write_pair_configs writes
# $D/receiver.toml and $D/sender.toml for one loopback pair (a tcp source
# on 127.0.0.1:$SRC -> UDP to $LINK at $RATE -> a tcp sink to $DST),
# authenticated with $D/link.key, the spool and journal under $D/store,
# metrics in $D/sender.json and $D/receiver.json. Optional lines:
# LINK_EXTRA (both [link] tables), SENDER_EXTRA (tables of the sender's
# own), SPOOL_EXTRA ([spool]), SOURCE_EXTRA (the tcp source).
write_pair_configs() {
  cat > $D/receiver.toml <<T
[auth]
key_files = ["$D/link.key"]
[link]
listen = "127.0.0.1:$LINK"
${LINK_EXTRA:-}
[audit]
path = "$D/audit.jsonl"
[journal]
path = "$D/store/journal"
[metrics]
path = "$D/receiver.json"
log_interval_s = 0
[[sinks]]
name = "replay"
type = "tcp"
connect = "127.0.0.1:$DST"
T
  cat > $D/sender.toml <<T
[auth]
key_file = "$D/link.key"
[link]
destination = "127.0.0.1:$LINK"
rate = "$RATE"
${LINK_EXTRA:-}
${SENDER_EXTRA:-}
[spool]
path = "$D/store/spool"
${SPOOL_EXTRA:-}
[metrics]
path = "$D/sender.json"
log_interval_s = 0
[[sources]]
name = "raw"
type = "tcp"
listen = "127.0.0.1:$SRC"
${SOURCE_EXTRA:-}
T
}
