#!/usr/bin/env python3
"""User-space instructions per operation of one server, counted by callgrind.

Runs BINARY under `valgrind --tool=callgrind` with instrumentation off,
populates and warms up with `prism bench`, switches instrumentation on when
the bench says it starts measuring and off when it ends, and prints the
instructions counted divided by the operations done. Instruction counts
repeat from run to run whatever else the machine does, so two builds can be
compared on a loaded machine (kernel time, wake-ups and cache misses are not
counted: wall-clock figures come from own-cost.py and ab.py). `rep movs`
copies count once per element, so large copies weigh more here than in time.

BINARY is a gateway (started with scripts/gateway-cpu/default.toml on
127.0.0.1:18950, its own table, key prefix and SQLite file) or, when its
name contains `bare`, examples/bare_kv (with BARE_URL as its database URL
when set). The load generator is PRISM_BENCH_BINARY (default
target/release/prism).

usage: scripts/callgrind-op.py BINARY NAMESPACE OP CONCURRENCY SECONDS
e.g.   scripts/callgrind-op.py target/release/prism redis get 1 6
       BARE_URL=redis://127.0.0.1:6379 scripts/callgrind-op.py target/release/examples/bare_kv redis get 1 6
"""

import glob
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCH = os.environ.get("PRISM_BENCH_BINARY", os.path.join(ROOT, "target/release/prism"))
PORT = 18950
TABLE, PREFIX = "prism_cg_kv", "prism-cg"


def main():
    if len(sys.argv) != 6:
        sys.exit(__doc__)
    binary, ns, op, conc, secs = sys.argv[1:6]
    work = tempfile.mkdtemp(prefix="prism-callgrind-")
    with open(os.path.join(ROOT, "scripts/gateway-cpu/default.toml")) as f:
        text = f.read()
    with open(os.path.join(work, "default.toml"), "w") as f:
        f.write(text.replace("127.0.0.1:18980", f"127.0.0.1:{PORT}")
                .replace("127.0.0.1:18981", f"127.0.0.1:{PORT + 1}")
                .replace('"prism_ab_kv"', f'"{TABLE}"')
                .replace('"prism-ab"', f'"{PREFIX}"')
                .replace("/tmp/prism-gateway-cpu/prism.db", os.path.join(work, "prism.db")))
    if "bare" in os.path.basename(binary):
        args = [binary, f"127.0.0.1:{PORT}"] + ([os.environ["BARE_URL"]] if os.environ.get("BARE_URL") else [])
    else:
        args = [binary, "serve", "--settings", work]
    out_file = os.path.join(work, "callgrind.out")
    server = subprocess.Popen(["valgrind", "--tool=callgrind", "--instr-atstart=no",
                               f"--callgrind-out-file={out_file}"] + args,
                              stdout=open(os.path.join(work, "server.log"), "w"),
                              stderr=subprocess.STDOUT)
    try:
        for _ in range(600):
            try:
                socket.create_connection(("127.0.0.1", PORT), timeout=0.2).close()
                break
            except OSError:
                time.sleep(0.1)
        else:
            sys.exit("the server did not listen")
        bench = subprocess.Popen(
            [BENCH, "bench", "--addr", f"127.0.0.1:{PORT}", "--namespace", ns, "--op", op,
             "--concurrency", conc, "--keys", "1000", "--duration", f"{secs}s", "--warmup", "1s",
             "--json", "--timeout", "30s"],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for line in bench.stderr:
            if "warmup over, measuring" in line:
                subprocess.run(["callgrind_control", "-i", "on", str(server.pid)], capture_output=True)
        result = json.loads(bench.stdout.read())
        bench.wait()
        subprocess.run(["callgrind_control", "-i", "off", str(server.pid)], capture_output=True)
        subprocess.run(["callgrind_control", "-d", str(server.pid)], capture_output=True)
        time.sleep(1)
    finally:
        server.terminate()
        server.wait()
        subprocess.run(["psql", "-h", "127.0.0.1", "-U", "postgres", "-d", "test", "-qc",
                        f"DROP TABLE IF EXISTS public.{TABLE}, public.{TABLE}_schema_version"],
                       capture_output=True)
        for pattern in [f"{PREFIX}:*", "prism-bare:*"]:
            keys = subprocess.run(["redis-cli", "-h", "127.0.0.1", "--scan", "--pattern", pattern],
                                  capture_output=True, text=True).stdout.split()
            for i in range(0, len(keys), 500):
                subprocess.run(["redis-cli", "-h", "127.0.0.1", "DEL", *keys[i:i + 500]],
                               capture_output=True)
    total = 0
    for path in glob.glob(out_file + "*"):
        with open(path) as f:
            total += sum(int(line.split()[1]) for line in f if line.startswith("totals:"))
    ops = max(result["ops"], 1)
    print(f"{os.path.basename(binary)} {ns} {op} c{conc}: {result['ops']} ops, "
          f"{sum(result['errors'].values())} errors, {total / ops:.0f} instructions per op")
    print(f"callgrind output in {work}", file=sys.stderr)


if __name__ == "__main__":
    main()
