#!/usr/bin/env python3
"""Request to first exec from a warm pool on Docker, against a cold create and the raw
tools in the same run; then snapshot and fork times for a disk holding `--snapshot-gb` GB
(BENCHMARKS.md, "Instant environments").

  python3 scripts/bench_instant.py $CARGO_TARGET_DIR/release/hearth [--warm 60] [--cold 10] [--pool 3] [--snapshot-gb 1]

Each sample: POST /v1/environments, then POST .../exec `true` polled every 2 ms until it
answers 200 with exit 0; the clock runs from before the POST to that answer. A warm sample
waits first until the pool is full again, so each one finds a ready VM; a cold sample asks
for a size no pool keeps. Raw: `docker run` of the same image + `ssh true` polled (a cold
start by hand), and `ssh true` into a container already running (the floor for a warm
one: a fresh SSH connection). Snapshots: an environment whose disk holds N GB of random
bytes; POST .../snapshots timed to its answer (the snapshot is ready then), a fork timed
from the request to its first exec, against `docker commit` of a container holding the same
by hand. Needs the hearth/base image (`make bench` builds it).
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


def wait_exec(node, token, env_id, conn):
    while True:
        status, out = request(node.port, "POST", f"/v1/environments/{env_id}/exec", token, {"code": "true"}, conn)
        if status == 200 and out["exitCode"] == 0:
            return
        time.sleep(0.005)


def snapshot_rows(node, token, key, pub, gb):
    conn = http.client.HTTPConnection("127.0.0.1", node.port, timeout=1200)
    fill = f"head -c {gb * 1000}M /dev/urandom > ~/disk-fill && sync"
    status, env = request(node.port, "POST", "/v1/environments", token, dict(COLD, name="snap-src", diskGb=gb + 4), conn)
    assert status == 202, env
    wait_exec(node, token, env["id"], conn)
    status, out = request(node.port, "POST", f"/v1/environments/{env['id']}/exec", token, {"code": fill, "timeoutSeconds": 600}, conn)
    assert status == 200 and out["exitCode"] == 0, out
    t0 = time.perf_counter()
    status, snap = request(node.port, "POST", f"/v1/environments/{env['id']}/snapshots", token, {"name": "bench"}, conn)
    took_snapshot = time.perf_counter() - t0
    assert status == 201, snap
    t0 = time.perf_counter()
    status, fork = request(node.port, "POST", f"/v1/environments/{env['id']}/fork", token, {"name": "bench-fork"}, conn)
    assert status == 202, fork
    wait_exec(node, token, fork["id"], conn)
    took_fork = time.perf_counter() - t0
    # By hand: a container with the same bytes, committed.
    cid = subprocess.check_output(["docker", "run", "-d", "--init", "-e", f"HEARTH_AUTHORIZED_KEYS={pub}",
                                   "--label", "hearth.instance=bench", "hearth/base:latest"], text=True).strip()
    subprocess.run(["docker", "exec", cid, "sh", "-c", f"head -c {gb * 1000}M /dev/urandom > /root/disk-fill && sync"], check=True)
    t0 = time.perf_counter()
    subprocess.run(["docker", "commit", "--pause", cid, "hearth-bench-commit:raw"], check=True, stdout=subprocess.DEVNULL)
    raw_commit = time.perf_counter() - t0
    subprocess.run(["docker", "rm", "-f", cid], stdout=subprocess.DEVNULL)
    subprocess.run(["docker", "rmi", "hearth-bench-commit:raw"], stdout=subprocess.DEVNULL)
    print(f"| snapshot of a disk holding {gb} GB (POST .../snapshots to its answer, {snap['sizeBytes'] / 1e9:.2f} GB kept) | {took_snapshot * 1000:.0f} ms |")
    print(f"| raw: `docker commit --pause` of a container holding the same | {raw_commit * 1000:.0f} ms |")
    print(f"| ratio Hearth / raw (snapshot) | {took_snapshot / raw_commit:.2f} |")
    print(f"| fork of it, request to first exec (a snapshot, then a create from it) | {took_fork * 1000:.0f} ms |")
    conn.close()
    for env_id in (env["id"], fork["id"]):
        request(node.port, "DELETE", f"/v1/environments/{env_id}", token)
    _, snaps = request(node.port, "GET", "/v1/snapshots", token)
    for s in snaps["items"]:
        request(node.port, "DELETE", f"/v1/snapshots/{s['id']}", token)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("binary")
    ap.add_argument("--warm", type=int, default=60)
    ap.add_argument("--cold", type=int, default=10)
    ap.add_argument("--pool", type=int, default=3)
    ap.add_argument("--snapshot-gb", type=int, default=1)
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
        snapshot_rows(node, token, key, pub, args.snapshot_gb)
    finally:
        node.stop()
        remove_bench_containers()


if __name__ == "__main__":
    main()
