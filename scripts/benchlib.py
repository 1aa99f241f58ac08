"""Shared pieces of the benchmark scripts: start a `hearth serve`, call its API, clean up.
Everything stays on 127.0.0.1."""
import http.client
import json
import os
import shutil
import socket
import subprocess
import tempfile
import time

INSTANCE = "bench"  # hearth.instance label of every container a benchmark makes


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def request(port, method, path, token=None, body=None, conn=None):
    c = conn or http.client.HTTPConnection("127.0.0.1", port, timeout=120)
    headers = {"content-type": "application/json"}
    if token:
        headers["authorization"] = f"Bearer {token}"
    c.request(method, path, body=json.dumps(body) if body is not None else None, headers=headers)
    r = c.getresponse()
    data = r.read()
    if conn is None:
        c.close()
    return r.status, (json.loads(data) if data else None)


class Node:
    """One `hearth serve` with its own data directory (removed on stop)."""

    def __init__(self, binary, extra_env=None, data_dir=None):
        self.work = tempfile.mkdtemp(prefix="hearth-bench-")
        self.data_dir = data_dir or self.work + "/data"
        self.port = free_port()
        env = dict(os.environ, HEARTH_DATA_DIR=self.data_dir, HEARTH_LISTEN=f"127.0.0.1:{self.port}",
                   HEARTH_INSTANCE=INSTANCE, RUST_LOG="warn", **(extra_env or {}))
        self.log = open(self.work + "/server.log", "w")
        self.proc = subprocess.Popen([binary, "serve"], env=env, stdout=self.log, stderr=self.log)
        for _ in range(600):
            try:
                request(self.port, "GET", "/healthz")
                return
            except OSError:
                time.sleep(0.05)
        raise RuntimeError(f"hearth serve did not start; see {self.work}/server.log")

    def admin_token(self):
        return open(self.data_dir + "/admin.token").read().strip()

    def user(self, email, tier="unlimited", admin=None):
        status, body = request(self.port, "POST", "/v1/admin/users", admin or self.admin_token(), {"email": email, "tier": tier})
        assert status == 201, body
        return body["token"], body["user"]["id"]

    def rss_kb(self):
        for line in open(f"/proc/{self.proc.pid}/status"):
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
        return 0

    def stop(self):
        self.proc.terminate()
        self.proc.wait(30)
        shutil.rmtree(self.work, ignore_errors=True)


def remove_bench_containers():
    ids = subprocess.run(["docker", "ps", "-aq", "--filter", f"label=hearth.instance={INSTANCE}"],
                         capture_output=True, text=True).stdout.split()
    if ids:
        subprocess.run(["docker", "rm", "-f", *ids], stdout=subprocess.DEVNULL)
