#!/usr/bin/env python3
"""Benchmarks of BENCHMARKS.md, each against the raw tool in the same run.

Usage: scripts/bench.py PATH/TO/hearth [--rounds N] [--fleet N]

Needs a running Docker engine and the hearth/base image (`make bench` sets both up).
Prints a markdown table. Only loopback addresses are used.
"""
import http.client
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from benchlib import INSTANCE, Node, remove_bench_containers, request  # noqa: E402

IMAGE = "hearth/base:latest"
SSH_OPTS = ["-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null",
            "-o", "BatchMode=yes", "-o", "LogLevel=ERROR", "-o", "ConnectTimeout=2"]


class Hearth(Node):
    """A node with the personal-VM calls this benchmark makes."""

    def request(self, method, path, token=None, body=None, conn=None):
        return request(self.port, method, path, token, body, conn)

    def user(self, email, tier="unlimited"):
        return super().user(email, tier)[0]

    def wait(self, token, status, timeout=180):
        deadline = time.time() + timeout
        while time.time() < deadline:
            code, body = self.request("GET", "/v1/me/vm", token)
            if (status == "gone" and code == 404) or (code == 200 and body["status"] == status):
                return
            if code == 200 and body["status"] == "error":
                raise RuntimeError(body)
            time.sleep(0.1)
        raise RuntimeError(f"not {status} after {timeout}s")


def hearth_provision_to_exec(h, n):
    token = h.user(f"bench{n}-{time.time_ns()}@example.com")
    conn = http.client.HTTPConnection("127.0.0.1", h.port, timeout=120)
    t0 = time.perf_counter()
    status, body = h.request("POST", "/v1/me/vm", token, {"vcpus": 1, "memoryMb": 512, "diskGb": 5}, conn)
    assert status == 202, body
    while True:
        status, body = h.request("POST", "/v1/me/vm/exec", token, {"code": "true"}, conn)
        if status == 200 and body["exitCode"] == 0:
            break
        time.sleep(0.01)
    return time.perf_counter() - t0, token, conn


def raw_docker_to_ssh(key, pub):
    t0 = time.perf_counter()
    cid = subprocess.check_output(["docker", "run", "-d", "--init", "-e", f"HEARTH_AUTHORIZED_KEYS={pub}",
                                   "-p", "127.0.0.1::22", "--label", f"hearth.instance={INSTANCE}", IMAGE], text=True).strip()
    port = subprocess.check_output(["docker", "port", cid, "22/tcp"], text=True).split("\n")[0].rsplit(":", 1)[1]
    while subprocess.run(["ssh", *SSH_OPTS, "-i", key, "-p", port, "dev@127.0.0.1", "true"],
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL).returncode != 0:
        time.sleep(0.01)
    elapsed = time.perf_counter() - t0
    return elapsed, cid, port


def ms(xs):
    return f"{statistics.median(xs) * 1000:.0f} ms (min {min(xs) * 1000:.0f}, max {max(xs) * 1000:.0f}, n={len(xs)})"


def main():
    binary = sys.argv[1]
    rounds = int(sys.argv[sys.argv.index("--rounds") + 1]) if "--rounds" in sys.argv else 5
    fleet = int(sys.argv[sys.argv.index("--fleet") + 1]) if "--fleet" in sys.argv else 20
    keydir = tempfile.mkdtemp()
    key = keydir + "/id"
    subprocess.check_call(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", key])
    pub = open(key + ".pub").read().strip()

    h = Hearth(binary)
    rows = []
    try:
        time.sleep(1)
        idle_rss = h.rss_kb()

        raw, hearth = [], []
        for i in range(rounds):
            t, cid, port = raw_docker_to_ssh(key, pub)
            raw.append(t)
            subprocess.run(["docker", "rm", "-f", cid], stdout=subprocess.DEVNULL)
            t, token, conn = hearth_provision_to_exec(h, i)
            hearth.append(t)
            h.request("DELETE", "/v1/me/vm", token)
            h.wait(token, "gone")
        rows.append(("provision to first exec: Hearth (POST /v1/me/vm, then exec until it answers)", ms(hearth)))
        rows.append(("same, raw: `docker run` + `ssh true` polled by hand", ms(raw)))
        rows.append(("ratio Hearth / raw (medians)", f"{statistics.median(hearth) / statistics.median(raw):.2f}"))

        # Exec round trip: Hearth's kept SSH connection vs a fresh ssh process each time.
        t, token, conn = hearth_provision_to_exec(h, 99)
        hearth_rtt = []
        for _ in range(50):
            t0 = time.perf_counter()
            status, body = h.request("POST", "/v1/me/vm/exec", token, {"code": "true"}, conn)
            assert status == 200 and body["exitCode"] == 0, body
            hearth_rtt.append(time.perf_counter() - t0)
        _, body = h.request("GET", "/v1/me/vm", token)
        port = str(body["sshPort"])
        t, cid, raw_port = raw_docker_to_ssh(key, pub)
        fresh = []
        for _ in range(20):
            t0 = time.perf_counter()
            subprocess.run(["ssh", *SSH_OPTS, "-i", key, "-p", raw_port, "dev@127.0.0.1", "true"], check=True)
            fresh.append(time.perf_counter() - t0)
        subprocess.run(["docker", "rm", "-f", cid], stdout=subprocess.DEVNULL)
        rows.append(("exec round trip: Hearth HTTP + kept SSH connection", ms(hearth_rtt)))
        rows.append(("exec round trip: fresh `ssh host true`", ms(fresh)))
        rows.append(("ratio Hearth / fresh ssh (medians)", f"{statistics.median(hearth_rtt) / statistics.median(fresh):.3f}"))
        h.request("DELETE", "/v1/me/vm", token)
        h.wait(token, "gone")

        # Resident memory with a fleet of running environments.
        tokens = []
        for i in range(fleet):
            tok = h.user(f"fleet{i}-{time.time_ns()}@example.com")
            status, _ = h.request("POST", "/v1/me/vm", tok, {"vcpus": 1, "memoryMb": 256, "diskGb": 1})
            assert status == 202
            tokens.append(tok)
        for tok in tokens:
            h.wait(tok, "running")
            h.request("POST", "/v1/me/vm/exec", tok, {"code": "true"})
        fleet_rss = h.rss_kb()
        rows.append(("server RSS, idle", f"{idle_rss / 1024:.1f} MiB"))
        rows.append((f"server RSS, {fleet} running environments (each exec'd once)", f"{fleet_rss / 1024:.1f} MiB"))
        for tok in tokens:
            h.request("DELETE", "/v1/me/vm", tok)
        for tok in tokens:
            h.wait(tok, "gone")
    finally:
        h.stop()
        remove_bench_containers()
        shutil.rmtree(keydir, ignore_errors=True)

    print("| measure | figure |")
    print("|---|---|")
    for k, v in rows:
        print(f"| {k} | {v} |")


if __name__ == "__main__":
    main()
