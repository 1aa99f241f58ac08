#!/usr/bin/env python3
"""API latency under load (issue 3): create, list and get with 10,000 environments in the
database (100 users with 100 each), 50 concurrent clients (wrk), on SQLite and PostgreSQL.

Usage: scripts/bench_api.py PATH/TO/hearth [--seed 10000] [--seconds 10] [--backend sqlite|postgres]
       [--only list,admin]  (measures whose names contain one of these)

Then the admin's pages (issue 16) with the same data, and the server's resident memory
after seeding and after the load.

The server runs with HEARTH_WORKERS=0 (an API-only node), so environments stay `requested`
and no containers are made: this measures the API and the database, not Docker.
Needs wrk and, for PostgreSQL, the server `scripts/services.sh postgres` starts.
"""
import concurrent.futures
import http.client
import json
import os
import re
import resource
import shutil
import socket
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from benchlib import free_port, request  # noqa: E402

PG_ADMIN = "postgres://hearth:hearth@127.0.0.1:5432/hearth"


def fresh_pg_url(name):
    subprocess.run(["runuser", "-u", "postgres", "--", "psql", "-qc", f"DROP DATABASE IF EXISTS {name}"], check=True)
    subprocess.run(["runuser", "-u", "postgres", "--", "psql", "-qc", f"CREATE DATABASE {name} OWNER hearth"], check=True)
    return PG_ADMIN.rsplit("/", 1)[0] + "/" + name


def wrk(url, token, seconds, script=None):
    cmd = ["wrk", "-t2", "-c50", f"-d{seconds}s", "--latency", "-H", f"Authorization: Bearer {token}"]
    if script:
        cmd += ["-s", script]
    out = subprocess.run(cmd + [url], capture_output=True, text=True, check=True).stdout
    def pct(p):
        m = re.search(rf"^\s+{p}%\s+([\d.]+)(us|ms|s)", out, re.M)
        v, unit = float(m.group(1)), m.group(2)
        return v / 1000 if unit == "us" else v * 1000 if unit == "s" else v
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    return pct(50), pct(99), rps, int(non2xx.group(1)) if non2xx else 0


def open_streams(port, tokens, n, limit=120):
    """Up to `n` list streams (`/v1/environments/events`), the users' in turn, each read up
    to its first event so the server holds it open; as many as open within `limit` seconds."""
    streams = []
    deadline = time.monotonic() + limit
    for i in range(n):
        if time.monotonic() > deadline:
            break
        sock = socket.create_connection(("127.0.0.1", port), timeout=30)
        sock.sendall((f"GET /v1/environments/events HTTP/1.1\r\nHost: bench\r\n"
                      f"Authorization: Bearer {tokens[i % len(tokens)]}\r\nAccept: text/event-stream\r\n\r\n").encode())
        got = b""
        while b"event:" not in got:
            chunk = sock.recv(4096)
            assert chunk, f"stream {i} closed: {got!r}"
            got += chunk
        assert got.startswith(b"HTTP/1.1 200"), got[:200]
        streams.append(sock)
    return streams


def cpu_seconds(pid):
    fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def rss_detail(pid):
    """Resident memory, and how much of it is the process's own (anonymous) and how much is
    mapped from files (the binary's code and data, shared with every other process)."""
    kib = {}
    for line in open(f"/proc/{pid}/status"):
        key = line.split(":")[0]
        if key in ("VmRSS", "RssAnon", "RssFile", "RssShmem"):
            kib[key] = int(line.split()[1])
    return (f"{kib['VmRSS'] / 1024:.0f} MiB ({kib['RssAnon'] / 1024:.0f} MiB its own, "
            f"{kib['RssFile'] / 1024:.0f} MiB mapped from the binary and libraries)")


def rss_mib(pid):
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


def run(binary, backend, seed, seconds, only):
    work = tempfile.mkdtemp(prefix="hearth-bench-api-")
    port = free_port()
    env = dict(os.environ, HEARTH_DATA_DIR=work + "/data", HEARTH_LISTEN=f"127.0.0.1:{port}", HEARTH_WORKERS="0",
               HEARTH_INSTANCE="bench", HEARTH_HOST_MAX_ENVIRONMENTS="100000000", HEARTH_HOST_MAX_VCPUS="100000000",
               HEARTH_HOST_MAX_MEMORY_MB="100000000000", HEARTH_REAPER_INTERVAL_MS="600000", RUST_LOG="warn")
    if backend == "postgres":
        env["DATABASE_URL"] = fresh_pg_url("hearth_bench")
    log = open(work + "/server.log", "w")
    proc = subprocess.Popen([binary, "serve"], env=env, stdout=log, stderr=log)
    try:
        for _ in range(600):
            try:
                request(port, "GET", "/healthz")
                break
            except OSError:
                time.sleep(0.05)
        time.sleep(3)
        yield ("server memory at start (empty database, nothing running)", rss_detail(proc.pid))
        # Idle: jemalloc's background thread gives back what start-up freed after its
        # decay time (see `malloc_conf` in crates/hearth/src/main.rs).
        time.sleep(27)
        yield ("server memory idle (30 s after start)", rss_detail(proc.pid))
        if only == ["memory"]:
            return
        admin = open(work + "/data/admin.token").read().strip()
        users = 100
        tokens = []
        for u in range(users):
            status, body = request(port, "POST", "/v1/admin/users", admin, {"email": f"load{u}@example.com", "tier": "unlimited"})
            token, uid = body["token"], body["user"]["id"]
            status, body = request(port, "PATCH", f"/v1/admin/users/{uid}", admin, {"quota": {
                "maxEnvironments": 100_000, "maxConcurrentEnvironments": 100_000, "maxVcpus": 100_000,
                "maxMemoryMb": 10_000_000, "maxDiskGb": 100_000}})
            assert status == 200, body
            tokens.append(token)
        create = {"name": "load", "vcpus": 1, "memoryMb": 256, "diskGb": 1}

        def seed_user(token):
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
            ids = []
            for _ in range(seed // users):
                s, b = request(port, "POST", "/v1/environments", token, create, conn)
                assert s == 202, b
                ids.append(b["id"])
            return ids
        t0 = time.perf_counter()
        with concurrent.futures.ThreadPoolExecutor(16) as pool:
            per_user = list(pool.map(seed_user, tokens))
        ids = [i for chunk in per_user for i in chunk]
        seed_rate = len(ids) / (time.perf_counter() - t0)
        if backend == "postgres":
            # What autovacuum would do after the bulk insert, done now rather than during the
            # first measure (it ran there, and took a share of the cores from it).
            subprocess.run(["runuser", "-u", "postgres", "--", "psql", "-qd", "hearth_bench", "-c", "VACUUM ANALYZE"],
                           check=True)
        token = tokens[0]
        lua = work + "/create.lua"
        with open(lua, "w") as f:
            # Each request is a create by one of the 100 users, in turn.
            f.write("tokens = {%s}\ni = 0\n" % ", ".join(f'"{t}"' for t in tokens))
            f.write('body = \'%s\'\n' % json.dumps(create))
            f.write('request = function()\n  i = i %% #tokens + 1\n'
                    '  return wrk.format("POST", "/v1/environments", {["Content-Type"] = "application/json", '
                    '["Authorization"] = "Bearer " .. tokens[i]}, body)\nend\n')
        base = f"http://127.0.0.1:{port}"
        yield (f"seed {len(ids)} creates, 16 clients", f"{seed_rate:.0f} req/s")
        yield ("server memory after seeding", f"{rss_mib(proc.pid):.0f} MiB")
        # A personal VM for a few users, so the admin's VM page lists something.
        for t in tokens[:10]:
            s, b = request(port, "POST", "/v1/me/vm", t, None)
            assert s in (200, 202), b
        measures = [("list (a user's first page of 100)", f"{base}/v1/environments", token, None),
                    ("get by id", f"{base}/v1/environments/{per_user[0][len(per_user[0]) // 2]}", token, None),
                    ("admin: environments, first page of 100", f"{base}/v1/admin/environments", admin, None),
                    ("admin: environments in state error (none match)",
                     f"{base}/v1/admin/environments?state=error", admin, None),
                    ("admin: personal VMs and their counts", f"{base}/v1/admin/vms", admin, None),
                    ("admin: hosts", f"{base}/v1/admin/hosts", admin, None),
                    ("admin: capacity chart, 24 hours", f"{base}/v1/admin/capacity", admin, None),
                    ("admin: queued jobs, first page of 100", f"{base}/v1/admin/jobs?state=queued", admin, None),
                    ("admin: audit, first page of 100", f"{base}/v1/admin/audit", admin, None),
                    ("admin: audit of one environment",
                     f"{base}/v1/admin/audit?environmentId={per_user[0][0]}", admin, None),
                    ("admin: users", f"{base}/v1/admin/users", admin, None),
                    ("create (100 users in turn)", f"{base}/v1/environments", token, lua)]
        for name, url, who, script in measures:
            if only and not any(o in name for o in only):
                continue
            p50, p99, rps, bad = wrk(url, who, seconds, script)
            yield (name, f"p50 {p50:.1f} ms, p99 {p99:.1f} ms, {rps:.0f} req/s" + (f", {bad} non-2xx" if bad else ""))
        yield ("server memory after the load", f"{rss_mib(proc.pid):.0f} MiB")
        t0 = time.perf_counter()
        streams = open_streams(port, tokens, 1000)
        opened = time.perf_counter() - t0
        time.sleep(10)
        cpu = cpu_seconds(proc.pid)
        time.sleep(10)
        idle_cpu = (cpu_seconds(proc.pid) - cpu) / 10
        yield (f"{len(streams)} open event streams (one user's list each, 100 users)",
               f"opened in {opened:.1f} s; server memory {rss_mib(proc.pid):.0f} MiB, "
               f"CPU {idle_cpu * 100:.0f}% of a core while nothing changes")
        for sock in streams:
            sock.close()
    finally:
        proc.terminate()
        proc.wait(30)
        shutil.rmtree(work, ignore_errors=True)


def main():
    # 1,000 streams on each side: this process and the server (which inherits it).
    resource.setrlimit(resource.RLIMIT_NOFILE, (8192, 8192))
    binary = sys.argv[1]
    seed = int(sys.argv[sys.argv.index("--seed") + 1]) if "--seed" in sys.argv else 10_000
    seconds = int(sys.argv[sys.argv.index("--seconds") + 1]) if "--seconds" in sys.argv else 10
    backends = [sys.argv[sys.argv.index("--backend") + 1]] if "--backend" in sys.argv else ["sqlite", "postgres"]
    only = sys.argv[sys.argv.index("--only") + 1].split(",") if "--only" in sys.argv else []
    print("| backend | measure (50 connections, wrk -t2) | figure |")
    print("|---|---|---|")
    for backend in backends:
        for name, fig in run(binary, backend, seed, seconds, only):
            print(f"| {backend} | {name} | {fig} |", flush=True)


if __name__ == "__main__":
    main()
