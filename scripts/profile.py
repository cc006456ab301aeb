#!/usr/bin/env python3
"""Where a gateway's CPU goes, by stage, under one load.

Starts a gateway (PRISM_BINARY, default target/release/prism) with
scripts/gateway-cpu/default.toml, runs `prism bench` against NAMESPACE with
OP at CONCURRENCY, and samples the gateway alone with `perf record` (999 Hz)
over SECONDS of the measured part. Prints the share of the gateway's
samples by stage, the gateway's CPU µs per operation, and so each stage's
µs per operation; the top symbols of each stage with --symbols.

With --bare, the bare tonic server of examples/bare_kv.rs is started and
profiled instead of the gateway, for a stage-by-stage comparison.

usage: scripts/profile.py NAMESPACE OP CONCURRENCY [SECONDS] [--symbols] [--bare]
"""

import collections
import os
import re
import shutil
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
own_cost = __import__("own-cost")

# First match wins: a symbol's stage from its name.
STAGES = [
    ("kernel: TCP over loopback, epoll, futex, scheduling", lambda s, k: k),
    ("PostgreSQL client (sqlx)", lambda s, k: re.search(r"^(<)?sqlx", s)),
    ("Redis client (redis, deadpool, combine)", lambda s, k: re.search(r"^(<)?(redis|deadpool|combine)", s)),
    ("SQLite (rusqlite, libsqlite3)", lambda s, k: "rusqlite" in s or s.startswith("sqlite3")),
    ("gRPC: tonic and protobuf (prost)", lambda s, k: re.search(r"tonic|prost|prism::proto::", s)),
    ("HTTP/2: h2, hyper, tower, http", lambda s, k: re.search(r"\b(h2|hyper|hyper_util|tower|http|http_body)::", s)),
    ("logging and metrics (tracing, metrics)", lambda s, k: re.search(r"\b(tracing|tracing_core|tracing_subscriber|metrics|metrics_util|metrics_exporter_prometheus)::", s)),
    ("Prism: request core, sessions, pools, backends", lambda s, k: re.search(r"\bprism(_actors)?::", s)),
    ("tokio runtime: tasks, wake-ups, timers, I/O driver", lambda s, k: re.search(r"\b(tokio|mio)::", s)),
    ("allocation and copies (malloc, free, memcpy)", lambda s, k: re.search(r"malloc|free|memcpy|memmove|memset|_int_|cfree|realloc|alloc::", s)),
]


def stage(sym, kernel):
    for name, test in STAGES:
        if test(sym, kernel):
            return name
    return "other (std, hashing, libc, unresolved)"


def main():
    args = [a for a in sys.argv[1:] if not a.startswith("--")]
    show_symbols = "--symbols" in sys.argv
    if len(args) < 3:
        sys.exit(__doc__)
    ns, op, conc = args[0], args[1], int(args[2])
    secs = int(args[3]) if len(args) > 3 else 10
    work = tempfile.mkdtemp(prefix="prism-profile-")
    shutil.copy(os.path.join(own_cost.ROOT, "scripts/gateway-cpu/default.toml"), work)
    bare = "--bare" in sys.argv
    addr = own_cost.BARE_ADDR if bare else own_cost.GW
    if bare:
        gw = subprocess.Popen([own_cost.BARE, addr], stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
    else:
        gw = subprocess.Popen([own_cost.PRISM, "serve", "--settings", work],
                              stdout=open(os.path.join(work, "gateway.log"), "w"),
                              stderr=subprocess.STDOUT)
    data = os.path.join(work, "perf.data")
    try:
        own_cost.wait_port(addr, "the server")
        own_cost.bench(addr, ns, op, conc, 2)
        bench = subprocess.Popen(
            [own_cost.BENCH, "bench", "--addr", addr, "--namespace", ns, "--op", op,
             "--concurrency", str(conc), "--keys", "1000", "--duration", f"{secs + 2}s",
             "--warmup", "1s", "--json"],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for line in bench.stderr:
            if "warmup over, measuring" in line:
                break
        a = own_cost.cpu_ticks(gw.pid)
        subprocess.run(["perf", "record", "-F", "999", "-p", str(gw.pid), "-o", data,
                        "--", "sleep", str(secs)], capture_output=True, check=True)
        b = own_cost.cpu_ticks(gw.pid)
        out = bench.communicate()[0]
        report = __import__("json").loads(out)
        ops_per_sec = report["throughput"]
    finally:
        gw.terminate()
        gw.wait()
    cpu_per_op = (b - a) / own_cost.HZ * 1e6 / max(ops_per_sec * secs, 1)
    text = subprocess.run(["perf", "report", "-i", data, "--stdio", "--no-children",
                           "--sort", "sym", "--percent-limit", "0"],
                          capture_output=True, text=True).stdout
    totals = collections.Counter()
    symbols = collections.defaultdict(collections.Counter)
    for line in text.splitlines():
        m = re.match(r"\s+([\d.]+)%\s+\[([k.])\]\s+(.*)", line)
        if not m:
            continue
        pct, kind, sym = float(m.group(1)), m.group(2), m.group(3).strip()
        st = stage(sym, kind == "k")
        totals[st] += pct
        symbols[st][sym] += pct
    shutil.rmtree(work, ignore_errors=True)
    total = sum(totals.values()) or 1
    print(f"{'bare tonic server' if bare else 'gateway'}: {ns} {op} at concurrency {conc}: {ops_per_sec:.0f} ops/s, gateway CPU {cpu_per_op:.1f} µs/op "
          f"({os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f})")
    print("| stage | share of gateway CPU | µs per op |")
    print("|---|---|---|")
    for st, pct in totals.most_common():
        print(f"| {st} | {pct / total * 100:.1f} % | {pct / total * cpu_per_op:.1f} |")
    if show_symbols:
        for st, _ in totals.most_common():
            print(f"\n{st}:")
            for sym, pct in symbols[st].most_common(8):
                print(f"  {pct / total * 100:5.1f} %  {sym[:140]}")


if __name__ == "__main__":
    main()
