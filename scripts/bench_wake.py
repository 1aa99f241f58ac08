#!/usr/bin/env python3
"""Job wake-up latency across nodes (issue 4): an API-only node writes the job, another
node claims it. Measured from the job row's creation to the worker's "picked up" log line
(both written by Hearth, milliseconds since the epoch), with Redis and with polling only
(the default 1 s poll).

Usage: scripts/bench_wake.py PATH/TO/hearth [--rounds N]
Needs Docker, the hearth/base image, PostgreSQL (scripts/services.sh postgres) and redis-server.
"""
import os
import statistics
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(__file__))
from bench_api import fresh_pg_url  # noqa: E402
from benchlib import Node, free_port, remove_bench_containers, request  # noqa: E402

KEY = "000102030405060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1f"


def run(binary, redis_url, rounds):
    db = fresh_pg_url("hearth_bench_wake")
    extra = {"DATABASE_URL": db, "HEARTH_MASTER_KEY": KEY}
    if redis_url:
        extra["REDIS_URL"] = redis_url
    worker = Node(binary, extra)
    api = Node(binary, dict(extra, HEARTH_WORKERS="0"))
    port = api.port
    token, _ = api.user("wake@example.com", admin=worker.admin_token())
    latencies = []
    try:
        for i in range(rounds):
            time.sleep(1.3)  # let the worker settle into its idle wait
            status, env = request(port, "POST", "/v1/environments", token, {"name": f"wake{i}", "memoryMb": 256})
            assert status == 202, env
            while True:
                _, logs = request(port, "GET", f"/v1/environments/{env['id']}/logs", token)
                picked = [l for l in logs["items"] if "picked up by worker" in l["message"]]
                if picked:
                    break
                time.sleep(0.02)
            created = iso_ms(env["createdAt"])
            latencies.append(iso_ms(picked[0]["timestamp"]) - created)
            request(port, "DELETE", f"/v1/environments/{env['id']}", token)
        return latencies
    finally:
        time.sleep(3)  # destroys finish on the worker
        api.stop()
        worker.stop()
        remove_bench_containers()


def iso_ms(text):
    from datetime import datetime
    return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp() * 1000


def main():
    binary = sys.argv[1]
    rounds = int(sys.argv[sys.argv.index("--rounds") + 1]) if "--rounds" in sys.argv else 10
    port = free_port()
    redis = subprocess.Popen(["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", ""], stdout=subprocess.DEVNULL)
    time.sleep(0.5)
    try:
        with_redis = run(binary, f"redis://127.0.0.1:{port}/", rounds)
        polling = run(binary, None, rounds)
    finally:
        redis.terminate()
    print("| wake-up (job written on node A, claimed on node B) | median | max | n |")
    print("|---|---|---|---|")
    for name, xs in [("with Redis", with_redis), ("polling only (1 s poll)", polling)]:
        print(f"| {name} | {statistics.median(xs):.0f} ms | {max(xs):.0f} ms | {len(xs)} |")


if __name__ == "__main__":
    main()
