#!/usr/bin/env python3
"""SSE fan-out (issue 4): N subscribers to one environment's events; a stop and a start
produce log and state events; delivery latency is the receipt time minus the time the
event was written (its `timestamp`/`at`, set by Hearth). Same machine, one clock.

Usage: scripts/bench_fanout.py PATH/TO/hearth [--subscribers 500]
Needs Docker and the hearth/base image.
"""
import http.client
import json
import os
import sys
import threading
import time
from datetime import datetime

sys.path.insert(0, os.path.dirname(__file__))
from benchlib import Node, remove_bench_containers, request  # noqa: E402


def ms(text):
    return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp() * 1000


def subscriber(port, token, env_id, after, out, ready):
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
    c.request("GET", f"/v1/environments/{env_id}/events", headers={"authorization": f"Bearer {token}"})
    r = c.getresponse()
    ready.release()
    event = None
    while True:
        line = r.fp.readline()
        if not line:
            return
        line = line.decode().rstrip("\n")
        if line.startswith("event:"):
            event = line[6:].strip()
        elif line.startswith("data:") and event in ("log", "state"):
            now = time.time() * 1000
            data = json.loads(line[5:])
            at = ms(data.get("timestamp") or data.get("at"))
            if at >= after[0]:
                out.append(now - at)
            if event == "state" and data["state"] == "running" and at >= after[0]:
                return


def main():
    binary = sys.argv[1]
    n = int(sys.argv[sys.argv.index("--subscribers") + 1]) if "--subscribers" in sys.argv else 500
    node = Node(binary)
    port, proc = node.port, node.proc
    try:
        token, _ = node.user("fan@example.com", "pro")
        _, e = request(port, "POST", "/v1/environments", token, {"name": "fan", "memoryMb": 256})
        env_id = e["id"]
        request(port, "GET", f"/v1/environments/{env_id}/wait?state=running&timeoutSeconds=120", token)
        latencies, after, ready = [], [float("inf")], threading.Semaphore(0)
        threads = [threading.Thread(target=subscriber, args=(port, token, env_id, after, latencies, ready), daemon=True) for _ in range(n)]
        for t in threads:
            t.start()
        for _ in range(n):
            ready.acquire()
        time.sleep(2)
        after[0] = time.time() * 1000
        request(port, "POST", f"/v1/environments/{env_id}/stop", token)
        request(port, "GET", f"/v1/environments/{env_id}/wait?state=stopped&timeoutSeconds=120", token)
        request(port, "POST", f"/v1/environments/{env_id}/start", token)
        for t in threads:
            t.join(120)
        xs = sorted(latencies)
        p = lambda q: xs[min(len(xs) - 1, int(q * len(xs)))]
        rss = next(int(l.split()[1]) for l in open(f"/proc/{proc.pid}/status") if l.startswith("VmRSS:"))
        print("| measure | figure |")
        print("|---|---|")
        print(f"| subscribers | {n} |")
        print(f"| events delivered (log + state, stop then start) | {len(xs)} ({len(xs) / n:.1f} per subscriber) |")
        print(f"| delivery latency p50 / p99 / max | {p(0.5):.0f} / {p(0.99):.0f} / {xs[-1]:.0f} ms |")
        print(f"| server RSS with {n} streams open | {rss / 1024:.1f} MiB |")
        request(port, "DELETE", f"/v1/environments/{env_id}", token)
        time.sleep(2)
    finally:
        node.stop()
        remove_bench_containers()


if __name__ == "__main__":
    main()
