#!/usr/bin/env python3
"""End-to-end creates per second on simulated hosts (no VMs, zero latency): from the
request to `running`, through the whole provision saga, on SQLite and PostgreSQL.

  python3 scripts/bench_sim.py $CARGO_TARGET_DIR/release/hearth [--creates 2000] [--clients 16]
      [--hosts 20] [--concurrency 2,16] [--postgres postgres://hearth:hearth@127.0.0.1:5432/hearth]

For each backend it first measures creates accepted per second by an API-only node (no
workers: the request path alone), then, on a fresh database, the same creates with
workers, timed until every environment is running. The ratio says what the saga costs on
top of accepting the request.
"""
import argparse
import re
import subprocess
import threading
import time

from benchlib import Node, request


def fresh_postgres(admin_url):
    """One database for the benchmark, emptied on each use (a name per run would leave one
    behind every time)."""
    name = "hearth_bench_sim"
    for sql in (f"DROP DATABASE IF EXISTS {name} WITH (FORCE)", f"CREATE DATABASE {name}"):
        subprocess.run(["psql", admin_url, "-qc", sql], check=True, stdout=subprocess.DEVNULL)
    return admin_url.rsplit("/", 1)[0] + "/" + name


def setup(node, hosts):
    admin = node.admin_token()
    for i in range(hosts):
        status, body = request(node.port, "POST", "/v1/admin/hosts", admin,
                               {"name": f"sim-{i:03}", "kind": "sim", "maxVcpus": 100000, "maxMemoryMb": 100000000,
                                "maxEnvironments": 100000})
        assert status == 201, body
    token, user_id = node.user("bench@example.com")
    quota = {"maxEnvironments": 10000000, "maxConcurrentEnvironments": 10000000, "maxVcpus": 10000000,
             "maxMemoryMb": 10000000, "maxDiskGb": 10000000}
    status, body = request(node.port, "PATCH", f"/v1/admin/users/{user_id}", admin, {"quota": quota})
    assert status == 200, body
    return token


def fire(node, token, creates, clients):
    """Sends `creates` creates from `clients` threads; returns the seconds it took."""
    import http.client
    per = creates // clients
    errors = []

    def client():
        conn = http.client.HTTPConnection("127.0.0.1", node.port, timeout=120)
        for _ in range(per):
            status, body = request(node.port, "POST", "/v1/environments", token,
                                   {"name": "bench", "vcpus": 1, "memoryMb": 256, "diskGb": 1}, conn=conn)
            if status != 202:
                errors.append((status, body))
        conn.close()

    threads = [threading.Thread(target=client) for _ in range(clients)]
    started = time.time()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors[:3]
    return time.time() - started, per * clients


def running(node):
    """How many environments are running, from /metrics (one GROUP BY, cheap to poll)."""
    import http.client
    c = http.client.HTTPConnection("127.0.0.1", node.port, timeout=30)
    c.request("GET", "/metrics")
    text = c.getresponse().read().decode()
    c.close()
    m = re.search(r'hearth_environments\{state="running"\} (\d+)', text)
    return int(m.group(1)) if m else 0


def run(binary, label, database_url, args, concurrency):
    env = {"VM_PROVIDER": "sim", "DATABASE_URL": database_url(), "HEARTH_WORKERS": "0", "HEARTH_METRICS_PUBLIC": "1",
           "HEARTH_REAPER_INTERVAL_MS": "3600000"}
    node = Node(binary, env)
    try:
        token = setup(node, args.hosts)
        took, n = fire(node, token, args.creates, args.clients)
        accepted = n / took
    finally:
        node.stop()
    env = {"VM_PROVIDER": "sim", "DATABASE_URL": database_url(), "HEARTH_METRICS_PUBLIC": "1",
           "HEARTH_PROVISION_CONCURRENCY": str(concurrency),
           "HEARTH_REAPER_INTERVAL_MS": "3600000", "HEARTH_JOB_POLL_MS": "200"}
    node = Node(binary, env)
    try:
        token = setup(node, args.hosts)
        started = time.time()
        _, n = fire(node, token, args.creates, args.clients)
        while running(node) < n:
            if time.time() - started > 600:
                raise RuntimeError(f"only {running(node)} of {n} running after 600 s")
            time.sleep(0.05)
        took = time.time() - started
        e2e = n / took
        rss = node.rss_kb() / 1024
    finally:
        node.stop()
    print(f"| {label} | {concurrency} | {n} | {accepted:.0f} | {e2e:.0f} | {e2e / accepted:.2f} | {rss:.1f} MiB |", flush=True)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("binary")
    p.add_argument("--creates", type=int, default=2000)
    p.add_argument("--clients", type=int, default=16)
    p.add_argument("--hosts", type=int, default=20)
    p.add_argument("--concurrency", default="2,16", help="provision workers to try, comma-separated")
    p.add_argument("--postgres", default="postgres://hearth:hearth@127.0.0.1:5432/hearth")
    args = p.parse_args()
    print("| backend | provision workers | creates | accepted/s (API only) | request to running /s | ratio | server RSS |")
    print("|---|---|---|---|---|---|---|")
    import tempfile
    for concurrency in [int(c) for c in args.concurrency.split(",")]:
        run(args.binary, "SQLite", lambda: f"sqlite://{tempfile.mkdtemp(prefix='hearth-bench-db-')}/h.db?mode=rwc", args, concurrency)
        if args.postgres:
            run(args.binary, "PostgreSQL", lambda: fresh_postgres(args.postgres), args, concurrency)


if __name__ == "__main__":
    main()
