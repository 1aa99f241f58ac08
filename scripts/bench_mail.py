#!/usr/bin/python3
"""Commands by mail: how long from a message sent to Hearth's SMTP listener to its answer
arriving at the relay, against the raw tool (the same smtplib send straight to that relay)
in the same run; then how many commands a minute one node answers.

Usage: /usr/bin/python3 scripts/bench_mail.py PATH/TO/hearth [--rounds N] [--burst N]

Debian's python3 (it has python3-aiosmtpd: `scripts/services.sh mail`). Simulated hosts, so
no Docker is needed; the command is `list`, which reads the database and answers.
"""
import argparse
import os
import smtplib
import statistics
import sys
import threading
import time

from aiosmtpd.controller import Controller

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from benchlib import Node, free_port, request  # noqa: E402

AGENT = "agent@hearth.bench"


class Sink:
    """The relay: notes when each message arrives, by the Message-ID it answers."""

    def __init__(self):
        self.arrived = {}
        self.lock = threading.Condition()

    async def handle_DATA(self, server, session, envelope):
        text = envelope.original_content.decode(errors="replace")
        key = None
        for line in text.splitlines():
            low = line.lower()
            if low.startswith("in-reply-to:") or low.startswith("x-bench-id:"):
                key = line.split(":", 1)[1].strip().strip("<>")
                break
        with self.lock:
            self.arrived[key] = time.perf_counter()
            self.lock.notify_all()
        return "250 kept"

    def wait(self, key, timeout=60):
        deadline = time.time() + timeout
        with self.lock:
            while key not in self.arrived:
                left = deadline - time.time()
                if left <= 0:
                    raise RuntimeError(f"no answer to {key} in {timeout} s")
                self.lock.wait(left)
            return self.arrived[key]


def message(sender, to, subject, message_id, extra=""):
    return (f"From: {sender}\r\nTo: {to}\r\nSubject: {subject}\r\nMessage-ID: <{message_id}>\r\n{extra}"
            f"\r\nplease\r\n").encode()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("binary")
    ap.add_argument("--rounds", type=int, default=30)
    ap.add_argument("--burst", type=int, default=200)
    args = ap.parse_args()

    sink = Sink()
    relay_port = free_port()
    controller = Controller(sink, hostname="127.0.0.1", port=relay_port)
    controller.start()
    smtp_port = free_port()
    node = Node(args.binary, {
        "VM_PROVIDER": "sim",
        "HEARTH_LOCAL_DOCKER_HOST": "0",
        "HEARTH_MAIL_ADDRESS": AGENT,
        "HEARTH_MAIL_RELAY": f"smtp://127.0.0.1:{relay_port}",
        "HEARTH_SMTP_LISTEN": f"127.0.0.1:{smtp_port}",
        "HEARTH_MAIL_PER_HOUR": "100000",
    })
    try:
        token, _ = node.user("bench@example.com", "pro")
        status, body = request(node.port, "POST", "/v1/me/mail-address", token)
        assert status == 201, body
        secret = body["address"]
        for _ in range(100):
            try:
                smtplib.SMTP("127.0.0.1", smtp_port, timeout=5).quit()
                break
            except OSError:
                time.sleep(0.05)

        through, raw = [], []
        with smtplib.SMTP("127.0.0.1", smtp_port, timeout=30) as to_hearth, \
                smtplib.SMTP("127.0.0.1", relay_port, timeout=30) as to_relay:
            for i in range(args.rounds):
                mid = f"round-{i}-{time.time_ns()}@example.com"
                t0 = time.perf_counter()
                to_hearth.sendmail("bench@example.com", [secret], message("bench@example.com", secret, "list", mid))
                through.append(sink.wait(mid) - t0)
                rid = f"raw-{i}-{time.time_ns()}"
                t0 = time.perf_counter()
                to_relay.sendmail(AGENT, ["bench@example.com"],
                                  message(AGENT, "bench@example.com", "Re: list", rid, f"X-Bench-Id: {rid}\r\n"))
                raw.append(sink.wait(rid) - t0)

            ids = [f"burst-{i}-{time.time_ns()}@example.com" for i in range(args.burst)]
            t0 = time.perf_counter()
            for mid in ids:
                to_hearth.sendmail("bench@example.com", [secret], message("bench@example.com", secret, "list", mid))
            accepted = time.perf_counter() - t0
            last = max(sink.wait(mid, timeout=600) for mid in ids)
            burst = last - t0

        med = statistics.median
        print("| measure | figure |")
        print("|---|---|")
        print(f"| `list` by mail: sent to the listener to the answer at the relay | {med(through) * 1000:.0f} ms median "
              f"({min(through) * 1000:.0f}-{max(through) * 1000:.0f}, n={args.rounds}) |")
        print(f"| raw: the same smtplib send straight to the relay, to its arrival | {med(raw) * 1000:.1f} ms median |")
        print(f"| **ratio** | **{med(through) / med(raw):.0f}** (two SMTP hops, a database write, a job, a reply built) |")
        print(f"| {args.burst} commands sent back to back: taken by the listener | {accepted:.2f} s "
              f"({args.burst / accepted:.0f}/s) |")
        print(f"| the same {args.burst}: all answered | {burst:.2f} s ({args.burst / burst * 60:.0f} a minute, "
              f"4 mail workers) |")
        print(f"| server RSS after | {node.rss_kb() / 1024:.1f} MiB |")
    finally:
        node.stop()
        controller.stop()


if __name__ == "__main__":
    main()
