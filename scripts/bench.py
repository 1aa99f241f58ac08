#!/usr/bin/env python3
"""Benchmarks of BENCHMARKS.md, each against the raw tool in the same run.

Usage: scripts/bench.py PATH/TO/hearth [--rounds N] [--fleet N]

Needs a running Docker engine and the hearth/base image (`make bench` sets both up).
Prints a markdown table. Only loopback addresses are used.
"""
import http.client
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time

IMAGE = "hearth/base:latest"
SSH_OPTS = ["-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null",
            "-o", "BatchMode=yes", "-o", "LogLevel=ERROR", "-o", "ConnectTimeout=2"]


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


class Hearth:
    def __init__(self, binary):
        self.dir = tempfile.mkdtemp(prefix="hearth-bench-")
        self.port = free_port()
        env = dict(os.environ, HEARTH_DATA_DIR=self.dir + "/data", HEARTH_LISTEN=f"127.0.0.1:{self.port}",
                   HEARTH_INSTANCE="bench", RUST_LOG="warn")
        self.log = open(self.dir + "/server.log", "w")
        self.proc = subprocess.Popen([binary, "serve"], env=env, stdout=self.log, stderr=self.log)
        deadline = time.time() + 60
        while time.time() < deadline:
            try:
                self.request("GET", "/healthz")
                break
            except OSError:
                time.sleep(0.05)
        self.admin = open(self.dir + "/data/admin.token").read().strip()
        self.conn = None

    def request(self, method, path, token=None, body=None, conn=None):
        c = conn or http.client.HTTPConnection("127.0.0.1", self.port, timeout=120)
        headers = {"content-type": "application/json"}
        if token:
            headers["authorization"] = f"Bearer {token}"
        c.request(method, path, body=json.dumps(body) if body is not None else None, headers=headers)
        r = c.getresponse()
        data = r.read()
        if conn is None:
            c.close()
        return r.status, (json.loads(data) if data else None)

    def user(self, email, tier="unlimited"):
        status, body = self.request("POST", "/v1/admin/users", self.admin, {"email": email, "tier": tier})
        assert status == 201, body
        return body["token"]

    def rss_kb(self):
        for line in open(f"/proc/{self.proc.pid}/status"):
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
        return 0

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

    def stop(self):
        self.proc.terminate()
        self.proc.wait(30)
        shutil.rmtree(self.dir, ignore_errors=True)


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
                                   "-p", "127.0.0.1::22", "--label", "hearth.instance=bench", IMAGE], text=True).strip()
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
        ids = subprocess.run(["docker", "ps", "-aq", "--filter", "label=hearth.instance=bench"],
                             capture_output=True, text=True).stdout.split()
        if ids:
            subprocess.run(["docker", "rm", "-f", *ids], stdout=subprocess.DEVNULL)
        shutil.rmtree(keydir, ignore_errors=True)

    print("| measure | figure |")
    print("|---|---|")
    for k, v in rows:
        print(f"| {k} | {v} |")


if __name__ == "__main__":
    main()
