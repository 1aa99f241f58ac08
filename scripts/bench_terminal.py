#!/usr/bin/env python3
"""Terminal keystroke-to-echo (issue 4): one byte typed into Hearth's terminal WebSocket
until the guest's PTY echoes it back, against `ssh -tt` straight to the same guest (with
the user's own key) in the same run.

Usage: scripts/bench_terminal.py PATH/TO/hearth [--keys 200]
Needs Docker, the hearth/base image and `pip install websockets`.
"""
import asyncio
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

import websockets

sys.path.insert(0, os.path.dirname(__file__))
from benchlib import Node, remove_bench_containers, request  # noqa: E402

SSH_OPTS = ["-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null", "-o", "BatchMode=yes", "-o", "LogLevel=ERROR"]


async def hearth_echo(port, token, env_id, keys):
    url = f"ws://127.0.0.1:{port}/v1/environments/{env_id}/terminal?cols=80&rows=24"
    times = []
    async with websockets.connect(url, additional_headers={"Authorization": f"Bearer {token}"}) as ws:
        await ws.send(b"stty -icanon; cat\n")
        await asyncio.sleep(1.0)
        while True:  # drain the prompt
            try:
                await asyncio.wait_for(ws.recv(), 0.3)
            except asyncio.TimeoutError:
                break
        for i in range(keys):
            ch = bytes([97 + i % 26])
            t0 = time.perf_counter()
            await ws.send(ch)
            got = b""
            while ch not in got:
                got += await ws.recv()
            times.append(time.perf_counter() - t0)
    return times


def ssh_echo(key, port, keys):
    import pty
    import select
    pid, fd = pty.fork()
    if pid == 0:
        os.execvp("ssh", ["ssh", "-tt", *SSH_OPTS, "-i", key, "-p", str(port), "dev@127.0.0.1", "stty -icanon; cat"])
    time.sleep(2.0)
    while select.select([fd], [], [], 0.3)[0]:
        os.read(fd, 4096)
    times = []
    for i in range(keys):
        ch = bytes([97 + i % 26])
        t0 = time.perf_counter()
        os.write(fd, ch)
        got = b""
        while ch not in got:
            got += os.read(fd, 4096)
        times.append(time.perf_counter() - t0)
    os.kill(pid, 9)
    os.waitpid(pid, 0)
    return times


def main():
    binary = sys.argv[1]
    keys = int(sys.argv[sys.argv.index("--keys") + 1]) if "--keys" in sys.argv else 200
    work = tempfile.mkdtemp(prefix="hearth-bench-term-")
    key = work + "/id"
    subprocess.check_call(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", key])
    node = Node(binary)
    port = node.port
    try:
        token, _ = node.user("term@example.com", "pro")
        pub = open(key + ".pub").read().strip()
        _, e = request(port, "POST", "/v1/environments", token, {"name": "term", "memoryMb": 256, "sshPublicKey": pub})
        _, e = request(port, "GET", f"/v1/environments/{e['id']}/wait?state=running&timeoutSeconds=120", token)
        hearth = asyncio.run(hearth_echo(port, token, e["id"], keys))
        raw = ssh_echo(key, e["sshPort"], keys)
        med = lambda xs: statistics.median(xs) * 1000
        p99 = lambda xs: sorted(xs)[int(0.99 * len(xs))] * 1000
        print("| keystroke to echo | median | p99 | n |")
        print("|---|---|---|---|")
        print(f"| Hearth terminal WebSocket | {med(hearth):.2f} ms | {p99(hearth):.2f} ms | {len(hearth)} |")
        print(f"| `ssh -tt` to the same guest | {med(raw):.2f} ms | {p99(raw):.2f} ms | {len(raw)} |")
        print(f"| ratio (medians) | {med(hearth) / med(raw):.2f} | | |")
        request(port, "DELETE", f"/v1/environments/{e['id']}", token)
        time.sleep(2)
    finally:
        node.stop()
        remove_bench_containers()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
