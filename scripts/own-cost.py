#!/usr/bin/env python3
"""Prism's own cost per request, against the floors it adds to, in one run.

Starts a gateway (PRISM_BINARY, default target/release/prism; the load
generator is always PRISM_BENCH_BINARY, default the same) with
scripts/gateway-cpu/default.toml (namespaces pg, redis, mem and lite: the
local PostgreSQL and Redis, memory, and SQLite in a temporary directory;
gRPC on 127.0.0.1:18980) and the bare tonic KeyValue
server of examples/bare_kv.rs (BARE_BINARY, default
target/release/examples/bare_kv, on 127.0.0.1:18990; OWN_COST_PORT=N
moves the gateway to N and N + 1 and the bare servers to N + 10 to
N + 12), then alternates, for
ROUNDS rounds of SECONDS each measurement:

- `prism bench` Get at concurrency 1 against the bare server and against
  the gateway's mem, redis and pg namespaces (mean latency = 1 / ops/s);
- the same against the bare server in front of Redis (127.0.0.1:18991) and
  of PostgreSQL (127.0.0.1:18992), each reached through its own Rust
  client, one statement per Get (examples/bare_kv.rs with a database URL);
- the databases' own clients at concurrency 1: redis-benchmark GET and
  pgbench running the SELECT of a Prism Get on the same table and row;
- Get at concurrency 64 against the bare server and the mem namespace;
- the gateway process's own CPU per operation (utime + stime from
  /proc/<pid>/stat over the measured interval) for Get and Put at
  concurrency 16 on every namespace, and the bare server's in front of
  Redis and PostgreSQL.

Prism's own cost beyond the hop = latency through Prism - bare hop latency
- the database client's latency; and beyond a bare server using the
database's client = latency through Prism - latency through that bare
server (and the same for the gateway's CPU per Get). Prints medians over the rounds, the
load average, and every raw figure.

usage: scripts/own-cost.py [ROUNDS] [SECONDS]
"""

import json
import os
import re
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PRISM = os.environ.get("PRISM_BINARY", os.path.join(ROOT, "target/release/prism"))
# The load generator: `prism bench` of this tree, whichever gateway runs.
BENCH = os.environ.get("PRISM_BENCH_BINARY", os.path.join(ROOT, "target/release/prism"))
BARE = os.environ.get("BARE_BINARY", os.path.join(ROOT, "target/release/examples/bare_kv"))
# OWN_COST_PORT moves every port (the gateway's gRPC, its HTTP one above
# it, the bare servers 10 to 12 above it), so two runs can share a machine.
PORT = int(os.environ.get("OWN_COST_PORT", "18980"))
GW, BARE_ADDR = f"127.0.0.1:{PORT}", f"127.0.0.1:{PORT + 10}"
BARE_DB = {"redis": (f"127.0.0.1:{PORT + 11}", "redis://127.0.0.1:6379"),
           "pg": (f"127.0.0.1:{PORT + 12}", "postgres://postgres@127.0.0.1:5432/test")}
# The gateway's PostgreSQL table and Redis key prefix, dropped afterwards.
TABLE, PREFIX = f"prism_oc{PORT}_kv", f"prism-oc{PORT}"
HZ = os.sysconf("SC_CLK_TCK")


def wait_port(addr, what):
    host, port = addr.split(":")
    for _ in range(200):
        try:
            socket.create_connection((host, int(port)), timeout=0.2).close()
            return
        except OSError:
            time.sleep(0.05)
    sys.exit(f"{what} did not listen on {addr}")


def cpu_ticks(pid):
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])


def rss_mib(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


def bench(addr, ns, op, conc, secs, pid=None):
    """One `prism bench` run (its keys populated, 1 s of warmup, then
    `secs` measured); with `pid`, also that process's CPU ticks over the
    measured part, read when the bench says it starts measuring and when
    it ends."""
    p = subprocess.Popen(
        [BENCH, "bench", "--addr", addr, "--namespace", ns, "--op", op,
         "--concurrency", str(conc), "--keys", "1000", "--duration", f"{secs}s",
         "--warmup", "1s", "--json"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    a = None
    said = []
    for line in p.stderr:
        said.append(line)
        if "warmup over, measuring" in line and pid is not None:
            a = cpu_ticks(pid)
    out = p.stdout.read()
    p.wait()
    if p.returncode != 0:
        sys.exit(f"prism bench failed ({p.returncode}) against {addr} {ns} {op}:\n"
                 + "".join(said[-5:]))
    ticks = cpu_ticks(pid) - a if pid is not None and a is not None else None
    return json.loads(out), ticks


def measured(pid, addr, ns, op, conc, secs):
    """ops/s and the server's CPU µs per op over the measured part of one
    bench run."""
    r, ticks = bench(addr, ns, op, conc, secs, pid)
    errors = sum(r["errors"].values())
    cpu_us = ticks / HZ * 1e6 / max(r["ops"], 1)
    return r["throughput"], cpu_us, errors


def redis_direct(secs):
    subprocess.run(["redis-cli", "-h", "127.0.0.1", "SET", "prism-own-cost", "v" * 100],
                   capture_output=True, check=True)
    n = 5000 * secs
    out = subprocess.run(["redis-benchmark", "-h", "127.0.0.1", "-p", "6379", "-c", "1",
                          "-n", str(n), "-q", "GET", "prism-own-cost"],
                         capture_output=True, text=True, check=True).stdout
    subprocess.run(["redis-cli", "-h", "127.0.0.1", "DEL", "prism-own-cost"], capture_output=True)
    rps = float(re.findall(r"([\d.]+) requests per second", out)[-1])
    return 1e6 / rps


def pg_direct(secs, script):
    out = subprocess.run(["pgbench", "-h", "127.0.0.1", "-U", "postgres", "-n", "-c", "1",
                          "-T", str(secs), "-f", script, "test"],
                         capture_output=True, text=True, check=True).stdout
    return float(re.search(r"latency average = ([\d.]+) ms", out).group(1)) * 1000


def main():
    rounds = int(sys.argv[1]) if len(sys.argv) > 1 else 3
    secs = int(sys.argv[2]) if len(sys.argv) > 2 else 5
    work = tempfile.mkdtemp(prefix="prism-own-cost-")
    with open(os.path.join(ROOT, "scripts/gateway-cpu/default.toml")) as f:
        settings = f.read()
    with open(os.path.join(work, "default.toml"), "w") as f:
        f.write(settings.replace("127.0.0.1:18980", GW)
                .replace("127.0.0.1:18981", f"127.0.0.1:{PORT + 1}")
                .replace('"prism_ab_kv"', f'"{TABLE}"')
                .replace('"prism-ab"', f'"{PREFIX}"')
                .replace("/tmp/prism-gateway-cpu/prism.db", os.path.join(work, "prism.db")))
    gw = subprocess.Popen([PRISM, "serve", "--settings", work],
                          stdout=open(os.path.join(work, "gateway.log"), "w"),
                          stderr=subprocess.STDOUT)
    bare = subprocess.Popen([BARE, BARE_ADDR], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    bare_db = {ns: subprocess.Popen([BARE, addr, url], stdout=subprocess.DEVNULL,
                                    stderr=subprocess.DEVNULL)
               for ns, (addr, url) in BARE_DB.items()}
    raw = {}

    def add(name, value):
        raw.setdefault(name, []).append(value)

    try:
        wait_port(GW, "the gateway")
        wait_port(BARE_ADDR, "the bare server")
        for ns, (addr, _) in BARE_DB.items():
            wait_port(addr, f"the bare server in front of {ns}")
        time.sleep(0.5)
        idle_rss = rss_mib(gw.pid)
        # Keys for every namespace (and a row for pgbench).
        for ns in ["mem", "lite", "redis", "pg"]:
            bench(GW, ns, "get", 4, 1)
        bench(BARE_ADDR, "mem", "get", 4, 1)
        for ns, (addr, _) in BARE_DB.items():
            bench(addr, ns, "get", 4, 1)
        script = os.path.join(work, "get.sql")
        with open(script, "w") as f:
            f.write(f"SELECT value, expires_at FROM public.{TABLE} "
                    "WHERE namespace = 'pg' AND key = 'bench-0000000001' "
                    "AND (expires_at IS NULL OR expires_at > now());\n")
        loads = [os.getloadavg()[0]]
        for r in range(rounds):
            print(f"round {r + 1}/{rounds}", file=sys.stderr)
            c1 = ([("bare", bare.pid, BARE_ADDR)] + [(ns, gw.pid, GW) for ns in ["mem", "redis", "pg"]]
                  + [(f"bare {ns}", bare_db[ns].pid, addr) for ns, (addr, _) in BARE_DB.items()])
            for side, pid, addr in c1 if r % 2 == 0 else reversed(c1):
                ns = {"bare": "mem", "bare redis": "redis", "bare pg": "pg"}.get(side, side)
                ops, cpu, _ = measured(pid, addr, ns, "get", 1, secs)
                if side == "bare":
                    add("c1 bare hop", 1e6 / ops)
                elif side.startswith("bare "):
                    add(f"c1 {side}", 1e6 / ops)
                    add(f"c1 {side} cpu", cpu)
                else:
                    add(f"c1 prism {side}", 1e6 / ops)
                    add(f"c1 gateway cpu {side}", cpu)
            add("c1 redis direct", redis_direct(secs))
            add("c1 pg direct", pg_direct(secs, script))
            # The order alternates between rounds: neither side always runs
            # first on a machine whose speed drifts.
            sides = [("bare", bare.pid, BARE_ADDR), ("prism mem", gw.pid, GW)]
            for side, pid, addr in sides if r % 2 == 0 else reversed(sides):
                ops, cpu, _ = measured(pid, addr, "mem", "get", 64, secs)
                add(f"c64 {side} ops/s", ops)
                add(f"c64 {side} cpu", cpu)
            for ns in ["mem", "lite", "redis", "pg"]:
                for op in ["get", "put"]:
                    ops, cpu, err = measured(gw.pid, GW, ns, op, 16, secs)
                    add(f"c16 {ns} {op} ops/s", ops)
                    add(f"c16 {ns} {op} cpu", cpu)
                    add(f"c16 {ns} {op} errors", err)
                    if ns in BARE_DB:
                        ops, cpu, err = measured(bare_db[ns].pid, BARE_DB[ns][0], ns, op, 16, secs)
                        add(f"c16 bare {ns} {op} ops/s", ops)
                        add(f"c16 bare {ns} {op} cpu", cpu)
            loads.append(os.getloadavg()[0])
        rss_after = rss_mib(gw.pid)
    finally:
        procs = [gw, bare, *bare_db.values()]
        for p in procs:
            p.terminate()
        for p in procs:
            p.wait()
        subprocess.run(["psql", "-h", "127.0.0.1", "-U", "postgres", "-d", "test", "-qc",
                        f"DROP TABLE IF EXISTS public.{TABLE}, public.{TABLE}_schema_version, "
                        "public.prism_bare_kv"],
                       capture_output=True)
        keys = []
        for pattern in [f"{PREFIX}:*", "prism-bare:*"]:
            keys += subprocess.run(["redis-cli", "-h", "127.0.0.1", "--scan", "--pattern", pattern],
                                   capture_output=True, text=True).stdout.split()
        for i in range(0, len(keys), 500):
            subprocess.run(["redis-cli", "-h", "127.0.0.1", "DEL", *keys[i:i + 500]],
                           capture_output=True)
        if gw.returncode not in (0, -15):
            with open(os.path.join(work, "gateway.log")) as f:
                print(f"the gateway exited with {gw.returncode}:\n" + "".join(f.readlines()[-20:]),
                      file=sys.stderr)
        shutil.rmtree(work, ignore_errors=True)

    med = {k: statistics.median(v) for k, v in raw.items()}
    hop = med["c1 bare hop"]
    print(f"{os.cpu_count()} cores, {rounds} rounds of {secs} s, "
          f"load average {min(loads):.1f}-{max(loads):.1f}")
    print("\nconcurrency 1, mean latency µs (median of rounds):")
    print(f"  bare tonic hop           {hop:8.1f}")
    print(f"  prism mem get            {med['c1 prism mem']:8.1f}   own cost beyond the hop {med['c1 prism mem'] - hop:6.1f}")
    for ns, direct in [("redis", "c1 redis direct"), ("pg", "c1 pg direct")]:
        own = med[f"c1 prism {ns}"] - hop - med[direct]
        print(f"  prism {ns:5} get          {med[f'c1 prism {ns}']:8.1f}   direct client {med[direct]:6.1f}   "
              f"own cost beyond hop + direct {own:6.1f}")
    for ns in ["redis", "pg"]:
        through, floor = med[f"c1 prism {ns}"], med[f"c1 bare {ns}"]
        print(f"  bare tonic + {ns:5} client {floor:8.1f}   prism {ns} get beyond it {through - floor:6.1f}   "
              f"CPU µs/op prism {med[f'c1 gateway cpu {ns}']:.1f} vs bare {med[f'c1 bare {ns} cpu']:.1f}")
    print(f"  gateway CPU µs per get at c1: mem {med['c1 gateway cpu mem']:.1f}, "
          f"redis {med['c1 gateway cpu redis']:.1f}, pg {med['c1 gateway cpu pg']:.1f}")
    ratio = statistics.median(
        p / b for p, b in zip(raw["c64 prism mem ops/s"], raw["c64 bare ops/s"]))
    print(f"\nconcurrency 64 get: bare {med['c64 bare ops/s']:.0f} ops/s ({med['c64 bare cpu']:.1f} µs CPU/op), "
          f"prism mem {med['c64 prism mem ops/s']:.0f} ops/s ({med['c64 prism mem cpu']:.1f} µs CPU/op); "
          f"prism/bare median of rounds {ratio:.2f}")
    print("\nconcurrency 16, gateway process only:")
    print("  namespace op    ops/s   CPU µs/op  errors")
    for ns in ["mem", "lite", "redis", "pg"]:
        for op in ["get", "put"]:
            print(f"  {ns:9} {op:4} {med[f'c16 {ns} {op} ops/s']:8.0f}  {med[f'c16 {ns} {op} cpu']:9.1f}  "
                  f"{int(sum(raw[f'c16 {ns} {op} errors']))}")
            if ns in BARE_DB:
                print(f"    bare tonic + {ns} client: {med[f'c16 bare {ns} {op} ops/s']:8.0f}  "
                      f"{med[f'c16 bare {ns} {op} cpu']:9.1f}")
    print(f"\ngateway RSS: {idle_rss:.1f} MiB idle at start, {rss_after:.1f} MiB after the run")
    print("\nraw:", json.dumps({k: [round(x, 1) for x in v] for k, v in raw.items()}))


if __name__ == "__main__":
    main()
