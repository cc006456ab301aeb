#!/usr/bin/env bash
# One gateway's own CPU per operation: starts GATEWAY (a `prism` binary)
# with SETTINGS_DIR (whose default.toml must serve gRPC on 127.0.0.1:18980),
# warms it up with one second of `prism bench`, then runs `prism bench`
# (PRISM_BENCH_BINARY, default target/release/prism) for SECONDS and reads
# the gateway's utime + stime from /proc/<pid>/stat over the measured part
# of that run: from the bench's "warmup over, measuring" line (after its
# keys are populated and its warmup ran) to its end.
#
# usage: scripts/gateway-cpu.sh GATEWAY SETTINGS_DIR NAMESPACE OP CONCURRENCY SECONDS
# prints: ops/s, p50/p99 ms, the gateway's CPU µs per operation, its RSS, errors
set -u
gw=$1; dir=$2; ns=$3; op=$4; conc=$5; secs=$6
BENCH=${PRISM_BENCH_BINARY:-target/release/prism}
$gw serve --settings "$dir" > "$dir/gateway.log" 2>&1 &
pid=$!
for i in $(seq 1 100); do (echo > /dev/tcp/127.0.0.1/18980) 2>/dev/null && break; sleep 0.1; done
sleep 0.5
hz=$(getconf CLK_TCK)
# warm up: populate keys and warm pools
$BENCH bench --addr 127.0.0.1:18980 --namespace $ns --op $op --concurrency $conc --duration 1s --warmup 1s --json > /dev/null 2>&1
rm -f "$dir/cpu.a"
out=$($BENCH bench --addr 127.0.0.1:18980 --namespace $ns --op $op --concurrency $conc --keys 1000 \
  --duration ${secs}s --warmup 1s --json 2> >(while read -r line; do
    case "$line" in *"warmup over, measuring"*) awk '{print $14+$15}' /proc/$pid/stat > "$dir/cpu.a" ;; esac
  done))
b=$(awk '{print $14+$15}' /proc/$pid/stat)
a=$(cat "$dir/cpu.a")
rss=$(awk '/VmRSS/{print $2}' /proc/$pid/status)
kill $pid; wait $pid 2>/dev/null
python3 -c "
import json,sys
r=json.loads('''$out''')
ops=r['ops']; cpu=($b-$a)/$hz
print(f\"{r['throughput']:.0f} ops/s  p50 {r['latency_ms']['p50']:.2f}  p99 {r['latency_ms']['p99']:.2f}  gateway CPU {cpu*1e6/max(ops,1):.1f} us/op  rss {int('$rss')//1024} MiB  errors {sum(r['errors'].values())}\")
"
