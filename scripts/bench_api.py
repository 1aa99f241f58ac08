#!/usr/bin/env python3
"""API latency under load (issue 3): create, list and get with 10,000 environments in the
database (100 users with 100 each), 50 concurrent clients (wrk), on SQLite and PostgreSQL.

Usage: scripts/bench_api.py PATH/TO/hearth [--seed 10000] [--seconds 10]

The server runs with HEARTH_WORKERS=0 (an API-only node), so environments stay `requested`
and no containers are made: this measures the API and the database, not Docker.
Needs wrk and, for PostgreSQL, the server `scripts/services.sh postgres` starts.
"""
import concurrent.futures
import http.client
import json
import os
import re
import shutil
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


def run(binary, backend, seed, seconds):
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
        rows = [(f"seed {len(ids)} creates, 16 clients", f"{seed_rate:.0f} req/s")]
        for name, url, script in [("list (a user's first page of 100)", f"{base}/v1/environments", None),
                                  ("get by id", f"{base}/v1/environments/{per_user[0][len(per_user[0]) // 2]}", None),
                                  ("create (100 users in turn)", f"{base}/v1/environments", lua)]:
            p50, p99, rps, bad = wrk(url, token, seconds, script)
            rows.append((name, f"p50 {p50:.1f} ms, p99 {p99:.1f} ms, {rps:.0f} req/s" + (f", {bad} non-2xx" if bad else "")))
        return rows
    finally:
        proc.terminate()
        proc.wait(30)
        shutil.rmtree(work, ignore_errors=True)


def main():
    binary = sys.argv[1]
    seed = int(sys.argv[sys.argv.index("--seed") + 1]) if "--seed" in sys.argv else 10_000
    seconds = int(sys.argv[sys.argv.index("--seconds") + 1]) if "--seconds" in sys.argv else 10
    print("| backend | measure (50 connections, wrk -t2) | figure |")
    print("|---|---|---|")
    for backend in ["sqlite", "postgres"]:
        for name, fig in run(binary, backend, seed, seconds):
            print(f"| {backend} | {name} | {fig} |", flush=True)


if __name__ == "__main__":
    main()
