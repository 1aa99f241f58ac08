#!/usr/bin/env python3
"""Page loads of the web UI with many environments (BENCHMARKS.md): a `hearth serve` on
simulated hosts, one admin user who owns a running personal VM and --environments
environments, and `ui/test/bench.mjs` timing each page in headless Chromium.

  python3 scripts/bench_ui.py $CARGO_TARGET_DIR/release/hearth [--environments 1000]

The release binary must have the UI built in (`make ui`, then `cargo build --release`).
"""
import argparse
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from benchlib import Node, request  # noqa: E402

UI = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "ui")


def main():
    p = argparse.ArgumentParser()
    p.add_argument("binary")
    p.add_argument("--environments", type=int, default=1000)
    a = p.parse_args()
    node = Node(a.binary, {"VM_PROVIDER": "sim"})
    try:
        admin = node.admin_token()
        status, body = request(node.port, "POST", "/v1/admin/hosts", admin,
                               {"name": "sim", "kind": "sim", "maxVcpus": 100000, "maxMemoryMb": 100000000,
                                "maxEnvironments": 100000})
        assert status == 201, body
        _, me = request(node.port, "GET", "/v1/me", admin)
        uid = me["user"]["id"]
        quota = {"maxEnvironments": a.environments + 10, "maxConcurrentEnvironments": a.environments + 10,
                 "maxVcpus": 100000, "maxMemoryMb": 10000000, "maxDiskGb": 1000000}
        status, body = request(node.port, "PATCH", f"/v1/admin/users/{uid}", admin, {"quota": quota})
        assert status == 200, body
        status, body = request(node.port, "POST", "/v1/me/vm", admin, {"vcpus": 1, "memoryMb": 1024, "diskGb": 10})
        assert status in (200, 201, 202), body

        def create(i):
            s, b = request(node.port, "POST", "/v1/environments", admin, {"name": f"bench-{i:04}", "memoryMb": 512})
            assert s == 202, b
        started = time.time()
        with ThreadPoolExecutor(8) as pool:
            list(pool.map(create, range(a.environments)))
        print(f"made {a.environments} environments in {time.time() - started:.1f} s", file=sys.stderr)
        status, link = request(node.port, "POST", f"/v1/admin/users/{uid}/password-link", admin, {"purpose": "invite"})
        assert status == 201, link
        password = "a benchmark password"
        status, body = request(node.port, "POST", "/v1/auth/password", None, {"token": link["token"], "password": password})
        assert status == 200, body
        env = dict(os.environ, HEARTH_URL=f"http://127.0.0.1:{node.port}", EMAIL=me["user"]["email"], PASSWORD=password)
        out = subprocess.run(["node", "test/bench.mjs"], cwd=UI, env=env, capture_output=True, text=True)
        if out.returncode != 0:
            sys.exit(f"bench_ui: the browser failed:\n{out.stdout}{out.stderr}")
        print(f"{a.environments} environments (simulated hosts), release build, headless Chromium:\n")
        print(out.stdout.strip())
    finally:
        node.stop()


if __name__ == "__main__":
    main()
