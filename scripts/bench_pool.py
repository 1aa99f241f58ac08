#!/usr/bin/env python3
"""Request to first exec from a warm pool on Docker, against a cold create and the raw
tools in the same run (BENCHMARKS.md, "Warm pools").

  python3 scripts/bench_pool.py $CARGO_TARGET_DIR/release/hearth [--warm 60] [--cold 10] [--pool 3]

Each sample: POST /v1/environments, then POST .../exec `true` polled every 2 ms until it
answers 200 with exit 0; the clock runs from before the POST to that answer. A warm sample
waits first until the pool is full again, so each one finds a ready VM; a cold sample asks
for a size no pool keeps. Raw: `docker run` of the same image + `ssh true` polled (a cold
start by hand), and `ssh true` into a container already running (the floor for a warm
one: a fresh SSH connection). Needs the hearth/base image (`make bench` builds it).
"""
import argparse
import http.client
import os
import statistics
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from benchlib import Node, remove_bench_containers, request  # noqa: E402
from bench import SSH_OPTS, raw_docker_to_ssh  # noqa: E402

WARM = {"vcpus": 1, "memoryMb": 512, "diskGb": 2}
COLD = {"vcpus": 1, "memoryMb": 640, "diskGb": 2}


def pct(xs, p):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(p / 100 * (len(xs) - 1))))]


def show(xs):
    return (f"p50 {statistics.median(xs) * 1000:.1f} ms, p99 {pct(xs, 99) * 1000:.1f} ms "
            f"(min {min(xs) * 1000:.1f}, max {max(xs) * 1000:.1f}, n={len(xs)})")


def wait_pool(node, admin, ready, timeout=120):
    deadline = time.time() + timeout
    while time.time() < deadline:
        _, body = request(node.port, "GET", "/v1/admin/pools", admin)
        pool = body["items"][0]
        if pool["ready"] == ready and pool["filling"] == 0 and pool["draining"] == 0:
            return
        time.sleep(0.05)
    raise RuntimeError(f"the pool did not reach {ready} ready: {pool}")


def create_to_exec(node, token, shape, n):
    conn = http.client.HTTPConnection("127.0.0.1", node.port, timeout=120)
    body = dict(shape, name=f"bench-{n}")
    t0 = time.perf_counter()
    status, env = request(node.port, "POST", "/v1/environments", token, body, conn)
    assert status == 202, env
    path = f"/v1/environments/{env['id']}/exec"
    while True:
        status, out = request(node.port, "POST", path, token, {"code": "true"}, conn)
        if status == 200 and out["exitCode"] == 0:
            break
        time.sleep(0.002)
    took = time.perf_counter() - t0
    request(node.port, "DELETE", f"/v1/environments/{env['id']}", token, None, conn)
    conn.close()
    return took


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("binary")
    ap.add_argument("--warm", type=int, default=60)
    ap.add_argument("--cold", type=int, default=10)
    ap.add_argument("--pool", type=int, default=3)
    args = ap.parse_args()
    keydir = tempfile.mkdtemp()
    key = keydir + "/id"
    subprocess.check_call(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", key])
    pub = open(key + ".pub").read().strip()
    remove_bench_containers()
    node = Node(args.binary)
    try:
        admin = node.admin_token()
        token, user_id = node.user("pool-bench@example.com")
        _, hosts = request(node.port, "GET", "/v1/admin/hosts", admin)
        host = hosts["items"][0]["id"]
        status, body = request(node.port, "PUT", f"/v1/admin/hosts/{host}/pools", admin, dict(WARM, size=args.pool))
        assert status == 200, body
        warm, cold, raw_cold, raw_warm = [], [], [], []
        for i in range(args.warm):
            wait_pool(node, admin, args.pool)
            warm.append(create_to_exec(node, token, WARM, i))
        for i in range(args.cold):
            cold.append(create_to_exec(node, token, COLD, 1000 + i))
            t, cid, port = raw_docker_to_ssh(key, pub)
            raw_cold.append(t)
            for _ in range(3):
                t0 = time.perf_counter()
                subprocess.run(["ssh", *SSH_OPTS, "-i", key, "-p", port, "dev@127.0.0.1", "true"], check=True)
                raw_warm.append(time.perf_counter() - t0)
            subprocess.run(["docker", "rm", "-f", cid], stdout=subprocess.DEVNULL)
        print("| measure | figure |")
        print("|---|---|")
        print(f"| request to first exec, warm pool (pool of {args.pool}) | {show(warm)} |")
        print(f"| request to first exec, cold create | {show(cold)} |")
        print(f"| raw cold: `docker run` + `ssh true` polled | {show(raw_cold)} |")
        print(f"| raw warm floor: `ssh true` into a running container | {show(raw_warm)} |")
        print(f"| ratio warm / cold (p50) | {statistics.median(warm) / statistics.median(cold):.3f} |")
        print(f"| ratio warm / raw warm floor (p50) | {statistics.median(warm) / statistics.median(raw_warm):.2f} |")
        print(f"| ratio cold / raw cold (p50) | {statistics.median(cold) / statistics.median(raw_cold):.2f} |")
        request(node.port, "PUT", f"/v1/admin/hosts/{host}/pools", admin, dict(WARM, size=0))
        wait_pool(node, admin, 0)
    finally:
        node.stop()
        remove_bench_containers()


if __name__ == "__main__":
    main()
