#!/usr/bin/env python3
"""Source-to-sink latency over loopback: a generator on weir-sender, a
stdout sink on weir-receiver, both spooling/journaling with fsync on. Each
line is timestamped on arrival; latency = arrival - the point's `ts`.

usage: sink_latency.py BIN_DIR [seconds=20] [rate=1000] [warmup=2]
Prints p50/p90/p99/max in ms. Needs only the two release binaries.
"""
import calendar, json, os, subprocess, sys, tempfile, time

bin_dir = sys.argv[1]
seconds = float(sys.argv[2]) if len(sys.argv) > 2 else 20.0
rate = float(sys.argv[3]) if len(sys.argv) > 3 else 1000.0
warmup = float(sys.argv[4]) if len(sys.argv) > 4 else 2.0

work = tempfile.mkdtemp(prefix="weir-latency-")
key = os.path.join(work, "link.key")
with open(key, "wb") as f:
    f.write(os.urandom(32))
os.chmod(key, 0o600)
import socket
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind(("127.0.0.1", 0))
port = s.getsockname()[1]
s.close()

with open(os.path.join(work, "r.toml"), "w") as f:
    f.write(f"""[auth]
key_files = ["{key}"]
[link]
listen = "127.0.0.1:{port}"
[journal]
path = "{work}/journal"
[audit]
path = "{work}/audit.jsonl"
[[sinks]]
name = "out"
type = "stdout"
""")
with open(os.path.join(work, "s.toml"), "w") as f:
    f.write(f"""[auth]
key_file = "{key}"
[link]
destination = "127.0.0.1:{port}"
rate = "100Mbit"
[spool]
path = "{work}/spool"
[[sources]]
name = "gen"
type = "generator"
tags = 100
rate = {rate}
""")

env = dict(os.environ, RUST_LOG="warn")
recv = subprocess.Popen([f"{bin_dir}/weir-receiver", "run", "--config", f"{work}/r.toml"],
                        stdout=subprocess.PIPE, env=env, bufsize=0)
time.sleep(0.5)
send = subprocess.Popen([f"{bin_dir}/weir-sender", "run", "--config", f"{work}/s.toml"], env=env)

second_cache = {}
def ts_ns(ts):
    # "YYYY-MM-DDTHH:MM:SS.nnnnnnnnnZ"
    sec = second_cache.get(ts[:19])
    if sec is None:
        sec = calendar.timegm(time.strptime(ts[:19], "%Y-%m-%dT%H:%M:%S"))
        second_cache[ts[:19]] = sec
    return sec * 1_000_000_000 + int(ts[20:29])

lat = []
start = time.monotonic()
try:
    for line in recv.stdout:
        now = time.time_ns()
        el = time.monotonic() - start
        if el > seconds + warmup:
            break
        if el < warmup:
            continue
        lat.append((now - ts_ns(json.loads(line)["ts"])) / 1e6)
finally:
    send.terminate(); recv.terminate()
    send.wait(); recv.wait()
lat.sort()
def p(q):
    return lat[min(len(lat) - 1, int(q * len(lat)))]
print(f"lines={len(lat)} p50={p(0.50):.2f}ms p90={p(0.90):.2f}ms p99={p(0.99):.2f}ms max={lat[-1]:.2f}ms")
