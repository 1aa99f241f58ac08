#!/usr/bin/env python3
"""Tunnels (issue 17): the same guest reached straight and through the API, in one run.

- HTTP: sequential GETs of a small file from `python3 -m http.server` in the guest, straight
  to the guest's address and through the port proxy (`/v1/environments/{id}/ports/8000/`);
  the proxy's added latency is the difference of the medians. Twice: the server speaking
  HTTP/1.0 (a new connection per request, as `http.server` does by default) and HTTP/1.1
  (connections kept, as most servers do; `KEPT`).
- A file up and down: scp straight to the guest's published SSH port, scp through
  `hearth ssh-config`'s ProxyCommand (`hearth ssh --stdio`, the tunnel WebSocket), and
  `hearth cp` (the files API: HTTP to the server, SFTP from it to the guest).

Usage: scripts/bench_tunnels.py PATH/TO/hearth [--requests 500] [--megabytes 200]
Needs Docker and the hearth/base image.
"""
import http.client
import os
import shlex
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(__file__))
from benchlib import Node, remove_bench_containers, request  # noqa: E402

# `http.server`'s handler speaking HTTP/1.1, each answer in one write: with the headers and
# the body written apart, Nagle's algorithm and the client's delayed ACK hold every answer
# 40 ms, straight or not.
KEPT = ("import http.server as h\n"
        "class H(h.SimpleHTTPRequestHandler):\n"
        "    protocol_version = 'HTTP/1.1'\n"
        "    wbufsize = 65536\n"
        "h.ThreadingHTTPServer(('0.0.0.0', 8001), H).serve_forever()\n")
SSH_OPTS = ["-o", "BatchMode=yes", "-o", "IdentitiesOnly=yes", "-o", "LogLevel=ERROR"]


def arg(name, default):
    return int(sys.argv[sys.argv.index(name) + 1]) if name in sys.argv else default


def gets(host, port, path, n, headers):
    """`n` sequential GETs on one kept connection where the server keeps it; seconds each."""
    times = []
    conn = http.client.HTTPConnection(host, port, timeout=30)
    for _ in range(n):
        t0 = time.perf_counter()
        try:
            conn.request("GET", path, headers=headers)
            r = conn.getresponse()
        except (http.client.HTTPException, OSError):
            conn.close()
            conn = http.client.HTTPConnection(host, port, timeout=30)
            conn.request("GET", path, headers=headers)
            r = conn.getresponse()
        body = r.read()
        assert r.status == 200 and body == b"hello\n", (r.status, body)
        times.append(time.perf_counter() - t0)
        if r.getheader("connection", "").lower() == "close" or r.version == 10:
            conn.close()
            conn = http.client.HTTPConnection(host, port, timeout=30)
    return times


def timed(cmd, env=None):
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, env=env)
    return time.perf_counter() - t0


def main():
    binary = os.path.abspath(sys.argv[1])
    n, megabytes = arg("--requests", 500), arg("--megabytes", 200)
    work = tempfile.mkdtemp(prefix="hearth-bench-tunnels-")
    key = work + "/id"
    subprocess.check_call(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", key])
    payload = work + "/payload"
    with open(payload, "wb") as f:
        f.write(os.urandom(megabytes << 20))
    node = Node(binary)
    port = node.port
    try:
        token, _ = node.user("tunnels@example.com", "pro")
        pub = open(key + ".pub").read().strip()
        _, e = request(port, "POST", "/v1/environments", token, {"name": "tunnels", "memoryMb": 1024, "diskGb": 5, "sshPublicKey": pub})
        _, e = request(port, "GET", f"/v1/environments/{e['id']}/wait?state=running&timeoutSeconds=120", token)
        env_id, guest_ip = e["id"], e["ipAddress"]
        code = ("mkdir -p site && echo hello > site/hello.txt && cd site && "
                "(setsid nohup python3 -m http.server 8000 > ../http.log 2>&1 < /dev/null &) && "
                "(setsid nohup python3 -m http.server 8002 --bind 127.0.0.1 > ../http-lo.log 2>&1 < /dev/null &) && "
                f"(setsid nohup python3 -c {shlex.quote(KEPT)} > ../http11.log 2>&1 < /dev/null &) && sleep 1")
        status, out = request(port, "POST", f"/v1/environments/{env_id}/exec", token, {"code": code})
        assert status == 200 and out["exitCode"] == 0, out

        for guest_port in (8000, 8001):
            for _ in range(100):
                try:
                    socket.create_connection((guest_ip, guest_port), timeout=1).close()
                    break
                except OSError:
                    time.sleep(0.1)
            else:
                _, log = request(port, "POST", f"/v1/environments/{env_id}/exec", token, {"code": "cat *.log"})
                raise SystemExit(f"nothing listens on {guest_ip}:{guest_port}: {log}")
        auth = {"authorization": f"Bearer {token}"}
        latency = []
        # The proxy connects straight to the container's address where the service listens
        # on it (8000, 8001); one on the guest's loopback only (8002, the same server as
        # 8000) is reached through the guest's sshd, and set against 8000 straight.
        for guest_port, straight_port, label in [
                (8000, 8000, "HTTP/1.0, a connection per request"),
                (8001, 8001, "HTTP/1.1, kept connections"),
                (8002, 8000, "HTTP/1.0 on the guest's loopback only (through sshd)")]:
            via = f"/v1/environments/{env_id}/ports/{guest_port}/hello.txt"
            for _ in range(100):  # until it listens (8002 cannot be seen from here)
                c = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
                c.request("GET", via, headers=auth)
                status = c.getresponse().status
                c.close()
                if status == 200:
                    break
                time.sleep(0.1)
            gets(guest_ip, straight_port, "/hello.txt", 20, {})  # warm both
            gets("127.0.0.1", port, via, 20, auth)
            straight = gets(guest_ip, straight_port, "/hello.txt", n, {})
            proxied = gets("127.0.0.1", port, via, n, auth)
            latency.append((label, straight_port, straight, proxied))

        # The ProxyCommand finds the server and token where `hearth login` keeps them.
        config_home = work + "/config"
        env = dict(os.environ, XDG_CONFIG_HOME=config_home)
        env.pop("HEARTH_URL", None)
        env.pop("HEARTH_TOKEN", None)
        subprocess.run([binary, "login", "--url", f"http://127.0.0.1:{port}"], input=token.encode(), env=env, check=True,
                       stderr=subprocess.DEVNULL)
        config = subprocess.run([binary, "ssh-config"], env=env, check=True, capture_output=True).stdout
        with open(work + "/ssh_config", "wb") as f:
            f.write(config)
        host = f"hearth-{e['slug']}"
        via = ["-F", work + "/ssh_config", "-i", key, *SSH_OPTS]
        direct = ["-i", key, *SSH_OPTS, "-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null",
                  "-P", str(e["sshPort"])]
        rows = []
        for label, opts, remote in [("straight to the guest's SSH port", direct, "dev@127.0.0.1"),
                                    ("through the API (ProxyCommand)", via, host)]:
            up = timed(["scp", "-q", *opts, payload, f"{remote}:payload"], env)
            down = timed(["scp", "-q", *opts, f"{remote}:payload", work + "/back"], env)
            assert open(work + "/back", "rb").read() == open(payload, "rb").read()
            rows.append((label, megabytes / up, megabytes / down))
        up = timed([binary, "cp", payload, f"{env_id}:payload"], env)
        down = timed([binary, "cp", f"{env_id}:payload", work + "/back"], env)
        assert open(work + "/back", "rb").read() == open(payload, "rb").read()
        rows.append(("`hearth cp` (the files API)", megabytes / up, megabytes / down))

        med = lambda xs: statistics.median(xs) * 1000
        p99 = lambda xs: sorted(xs)[int(0.99 * len(xs))] * 1000
        print(f"| GET of 6 bytes from `python3 -m http.server`, {n} in a row | median | p99 |")
        print("|---|---|---|")
        for label, guest_port, straight, proxied in latency:
            print(f"| {label}: straight to the guest ({guest_ip}:{guest_port}) | {med(straight):.2f} ms | {p99(straight):.2f} ms |")
            print(f"| {label}: through the port proxy | {med(proxied):.2f} ms | {p99(proxied):.2f} ms |")
            print(f"| {label}: added by the proxy (medians) | {med(proxied) - med(straight):.2f} ms | |")
        print()
        print(f"| {megabytes} MiB | up | down |")
        print("|---|---|---|")
        for label, up, down in rows:
            print(f"| {label} | {up:.0f} MiB/s | {down:.0f} MiB/s |")
        for label, up, down in rows[1:]:
            print(f"| ratio: {label} / scp straight | {up / rows[0][1]:.2f} | {down / rows[0][2]:.2f} |")
        request(port, "DELETE", f"/v1/environments/{env_id}", token)
        time.sleep(2)
    finally:
        node.stop()
        remove_bench_containers()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
