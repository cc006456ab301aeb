#!/usr/bin/env python3
"""Two gateway builds, A and B, measured against each other in one run.

Starts both gateways (each with scripts/gateway-cpu/default.toml, on ports
of their own, with their own PostgreSQL table, Redis key prefix and SQLite
file, so that this can run beside own-cost.py), then for ROUNDS rounds
runs every LINE against A and B, alternating which goes first, and prints
per line the median ops/s and the median CPU µs per operation of the
gateway process alone (utime + stime from /proc/<pid>/stat over the
measured part of the `prism bench` run), and the load average.

The load generator is PRISM_BENCH_BINARY (default target/release/prism)
for both sides.

usage: scripts/ab.py A_BINARY B_BINARY ROUNDS SECONDS NS:OP:CONCURRENCY...
e.g.   scripts/ab.py /tmp/prism-before target/release/prism 4 4 redis:get:1 redis:get:16
"""

import importlib.util
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
spec = importlib.util.spec_from_file_location("own_cost", os.path.join(ROOT, "scripts/own-cost.py"))
own_cost = importlib.util.module_from_spec(spec)
spec.loader.exec_module(own_cost)

TABLE, PREFIX = "prism_abx_kv", "prism-abx"


def settings(work, side, port):
    text = open(os.path.join(ROOT, "scripts/gateway-cpu/default.toml")).read()
    text = (text.replace("127.0.0.1:18980", f"127.0.0.1:{port}")
            .replace("127.0.0.1:18981", f"127.0.0.1:{port + 1}")
            .replace('"prism_ab_kv"', f'"{TABLE}"')
            .replace('"prism-ab"', f'"{PREFIX}"')
            .replace("/tmp/prism-gateway-cpu/prism.db", os.path.join(work, f"{side}.db")))
    folder = os.path.join(work, side)
    os.makedirs(folder)
    with open(os.path.join(folder, "default.toml"), "w") as f:
        f.write(text)
    return folder


def main():
    if len(sys.argv) < 6:
        sys.exit(__doc__)
    binaries = {"A": sys.argv[1], "B": sys.argv[2]}
    rounds, secs = int(sys.argv[3]), int(sys.argv[4])
    lines = [tuple(line.split(":")) for line in sys.argv[5:]]
    work = tempfile.mkdtemp(prefix="prism-ab-")
    gateways = {}
    try:
        for i, (side, binary) in enumerate(binaries.items()):
            port = 18960 + 2 * i
            folder = settings(work, side, port)
            proc = subprocess.Popen([binary, "serve", "--settings", folder],
                                    stdout=open(os.path.join(work, f"{side}.log"), "w"),
                                    stderr=subprocess.STDOUT)
            gateways[side] = (proc, f"127.0.0.1:{port}")
        for side, (proc, addr) in gateways.items():
            own_cost.wait_port(addr, f"gateway {side}")
        time.sleep(0.5)
        for ns in sorted({ns for ns, _, _ in lines}):
            for proc, addr in gateways.values():
                own_cost.bench(addr, ns, "get", 4, 1)
        raw = {}
        loads = [os.getloadavg()[0]]
        for r in range(rounds):
            print(f"round {r + 1}/{rounds}", file=sys.stderr)
            for ns, op, conc in lines:
                order = ["A", "B"] if r % 2 == 0 else ["B", "A"]
                for side in order:
                    proc, addr = gateways[side]
                    ops, cpu, errors = own_cost.measured(proc.pid, addr, ns, op, int(conc), secs)
                    raw.setdefault((ns, op, conc, side), []).append((ops, cpu, errors))
            loads.append(os.getloadavg()[0])
    finally:
        for proc, _ in gateways.values():
            proc.terminate()
        for proc, _ in gateways.values():
            proc.wait()
        subprocess.run(["psql", "-h", "127.0.0.1", "-U", "postgres", "-d", "test", "-qc",
                        f"DROP TABLE IF EXISTS public.{TABLE}, public.{TABLE}_schema_version"],
                       capture_output=True)
        keys = subprocess.run(["redis-cli", "-h", "127.0.0.1", "--scan", "--pattern", f"{PREFIX}*"],
                              capture_output=True, text=True).stdout.split()
        for i in range(0, len(keys), 500):
            subprocess.run(["redis-cli", "-h", "127.0.0.1", "DEL", *keys[i:i + 500]],
                           capture_output=True)
        shutil.rmtree(work, ignore_errors=True)

    print(f"{os.cpu_count()} cores, {rounds} rounds of {secs} s, "
          f"load average {min(loads):.1f}-{max(loads):.1f}")
    print(f"A = {binaries['A']}\nB = {binaries['B']}")
    print("| namespace, op, concurrency | A: ops/s, gateway CPU µs/op | B: ops/s, gateway CPU µs/op | errors A/B |")
    print("|---|---|---|---|")
    for ns, op, conc in lines:
        cells = []
        errors = []
        for side in "AB":
            runs = raw[(ns, op, conc, side)]
            ops = statistics.median(r[0] for r in runs)
            cpu = statistics.median(r[1] for r in runs)
            cells.append(f"{ops:.0f}, {cpu:.1f}")
            errors.append(str(sum(r[2] for r in runs)))
        print(f"| {ns} {op}, {conc} | {cells[0]} | {cells[1]} | {'/'.join(errors)} |")
    print("raw (ops/s, cpu µs/op, errors):")
    for key, runs in raw.items():
        print(" ", key, [(round(o), round(c, 1), e) for o, c, e in runs])


if __name__ == "__main__":
    main()
