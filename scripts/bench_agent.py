#!/usr/bin/env python3
"""Benchmark of the `hearth agent` QEMU backend, against the same QEMU command by hand.

Usage: scripts/bench_agent.py PATH/TO/hearth [--runs N] [--vms N] [--skip-memory] [--accel auto|kvm|tcg]

Starts a `hearth serve` (VM_PROVIDER=agent) and one `hearth agent` joined to it, then measures:

1. Through Hearth: from `POST /v1/environments` (1 vCPU, 512 MB, 3 GB) to the first
   `POST /v1/environments/{id}/exec` of `true` answering exitCode 0. The environment is read
   every 50 ms and exec is tried only once it says `running` (so what is timed is the
   provision saga, the boot, Hearth's own SSH wait and one exec round trip).
2. By hand: the agent's own `qemu-system-x86_64` argv (read from /proc/PID/cmdline while the
   environment of 1 runs) with a fresh qcow2 overlay and config drive (made as qemu.rs makes
   them, before the clock starts), another SSH port and files in a temp dir; timed from
   launching QEMU to the first `ssh ... dev@127.0.0.1 true` that succeeds.
3. The agent's resident memory with --vms small environments (1 vCPU, 256 MB, 1 GB) running,
   and the QEMU processes' total for context.

Needs root (like the agent: it confines QEMU with -runas and iptables), qemu-system-x86_64,
qemu-img, mkfs.ext4 and the OpenSSH client, and the VM image in /var/lib/hearth/vm-image
(or $HEARTH_VM_IMAGE_DIR). Only loopback addresses are used. Progress goes to stderr; the
Markdown table to stdout.
"""
import argparse
import http.client
import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from benchlib import Node, free_port, request  # noqa: E402

IMAGE_DIR = os.environ.get("HEARTH_VM_IMAGE_DIR", "/var/lib/hearth/vm-image")
QEMU = "qemu-system-x86_64"
SSH_OPTS = ["-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null",
            "-o", "BatchMode=yes", "-o", "LogLevel=ERROR", "-o", "ConnectTimeout=2"]
BOOT_TIMEOUT = 600  # seconds for one environment or one hand-run VM to answer
ANSI = re.compile(r"\x1b\[[0-9;]*m")


class BenchError(Exception):
    pass


def log(msg):
    print(f"[bench_agent {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# ---- processes -------------------------------------------------------------------------

def cmdline(pid):
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            raw = f.read()
    except OSError:
        return None
    return [a.decode(errors="replace") for a in raw.split(b"\0")[:-1]] if raw else None


def rss_kb(pid):
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def qemu_pids(marker):
    """Pids of QEMU processes with an argument containing `marker` (a path or name of ours)."""
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        args = cmdline(int(entry))
        if args and os.path.basename(args[0]) == QEMU and any(marker in a for a in args):
            pids.append(int(entry))
    return pids


def kill_pid(pid, marker, grace=5.0):
    """SIGTERM then SIGKILL one process, checked to be ours (`marker` in its argv)."""
    args = cmdline(pid)
    if not args or not any(marker in a for a in args):
        return
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.time() + grace
    while time.time() < deadline:
        if cmdline(pid) is None:
            return
        time.sleep(0.05)
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


# ---- the control plane and the agent ----------------------------------------------------

class Site:
    """A `hearth serve` with VM_PROVIDER=agent and one `hearth agent` joined to it."""

    def __init__(self, binary, accel, vms):
        self.binary = binary
        self.node = None
        self.agent = None
        self.agent_dir = tempfile.mkdtemp(prefix="hearth-bench-agent-")
        self.state_dir = self.agent_dir + "/state"
        self.agent_log_path = self.agent_dir + "/agent.log"
        self.accel_arg = accel
        self.max_vms = max(50, vms + 2)

    def start(self):
        log("starting hearth serve (VM_PROVIDER=agent)")
        self.node = Node(self.binary, {"VM_PROVIDER": "agent", "HEARTH_SSH_WAIT_SECONDS": str(BOOT_TIMEOUT)})
        self.admin = self.node.admin_token()
        status, body = self.call("POST", "/v1/admin/hosts/join-tokens", self.admin, {"name": "bench-vm"})
        if status != 201:
            raise BenchError(f"join token: {status} {body}")
        listen = f"127.0.0.1:{free_port()}"
        log(f"starting hearth agent (state {self.state_dir}, listen {listen}, accel {self.accel_arg})")
        self.agent_log = open(self.agent_log_path, "w")
        self.agent = subprocess.Popen(
            [self.binary, "agent", "--state-dir", self.state_dir, "--image-dir", IMAGE_DIR,
             "--listen", listen, "--advertise", listen, "--guest-address", "127.0.0.1",
             "--control-plane", f"http://127.0.0.1:{self.node.port}", "--join-token", body["token"],
             "--accel", self.accel_arg, "--max-vms", str(self.max_vms), "--max-vcpus", str(self.max_vms),
             "--max-memory-mb", "60000"],
            env=dict(os.environ, RUST_LOG="info", NO_COLOR="1"),
            stdin=subprocess.DEVNULL, stdout=self.agent_log, stderr=self.agent_log)
        deadline = time.time() + 120  # an `auto` accelerator boots a KVM probe first (up to 10 s)
        while time.time() < deadline:
            if self.agent.poll() is not None:
                raise BenchError(f"hearth agent exited with {self.agent.returncode}:\n{self.agent_text()}")
            _, hosts = self.call("GET", "/v1/admin/hosts", self.admin)
            host = next((h for h in (hosts or {}).get("items", []) if h.get("name") == "bench-vm"), None)
            if host and host.get("health") == "healthy":
                log(f"agent joined and healthy: host {host['id']}")
                return
            time.sleep(0.2)
        raise BenchError(f"the agent's host never became healthy; agent log:\n{self.agent_text()}")

    def call(self, method, path, token=None, body=None, conn=None):
        return request(self.node.port, method, path, token, body, conn)

    def agent_text(self):
        try:
            return ANSI.sub("", open(self.agent_log_path).read())
        except OSError:
            return ""

    def accelerator(self):
        """What the agent uses, from its log line, and where the decision came from."""
        found = re.findall(r'opened the VM records.*?accel="?(\w+)', self.agent_text())
        accel = found[-1] if found else "unknown"
        kernel = json.load(open(os.path.join(IMAGE_DIR, "manifest.json")))["kernelVersion"]
        remembered = os.path.join(self.state_dir, f"accel-{kernel}")
        if os.path.exists(remembered):
            source = f"`--accel auto`: the agent's KVM probe decided, state file `accel-{kernel}` = {open(remembered).read().strip()}"
        else:
            source = f"`--accel {self.accel_arg}`"
        return accel, source

    def user(self, email, quota=None):
        token, user_id = self.node.user(email, "unlimited", self.admin)
        if quota:
            status, body = self.call("PATCH", f"/v1/admin/users/{user_id}", self.admin, {"quota": quota})
            if status != 200:
                raise BenchError(f"raise the quota of {email}: {status} {body}")
        return token

    def create(self, token, name, memory_mb, disk_gb, conn=None):
        status, body = self.call("POST", "/v1/environments", token,
                                 {"name": name, "vcpus": 1, "memoryMb": memory_mb, "diskGb": disk_gb}, conn)
        if status != 202:
            raise BenchError(f"create {name}: {status} {body}")
        return body["id"]

    def env(self, token, env_id, conn=None):
        status, body = self.call("GET", f"/v1/environments/{env_id}", token, None, conn)
        if status != 200:
            raise BenchError(f"GET environment {env_id}: {status} {body}")
        if body["state"] == "error":
            raise BenchError(f"environment {env_id} failed: {body.get('stateMessage')}\nagent log tail:\n{self.agent_text()[-3000:]}")
        return body

    def wait(self, token, env_id, state, timeout=BOOT_TIMEOUT):
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.env(token, env_id)["state"] == state:
                return
            time.sleep(0.2)
        raise BenchError(f"environment {env_id} not {state} after {timeout} s")

    def destroy(self, token, env_id):
        status, body = self.call("DELETE", f"/v1/environments/{env_id}", token)
        if status != 202:
            raise BenchError(f"destroy {env_id}: {status} {body}")

    def vm_qemus(self):
        """The QEMU processes of this agent's VMs (their files are under its state dir)."""
        return qemu_pids(self.state_dir + "/")

    def stop(self):
        # The agent first (so it launches nothing more), then its VMs: they outlive their
        # agent by design, so the QEMUs still running are killed here.
        if self.agent and self.agent.poll() is None:
            self.agent.terminate()
            try:
                self.agent.wait(30)
            except subprocess.TimeoutExpired:
                self.agent.kill()
                self.agent.wait()
        for pid in self.vm_qemus():
            log(f"killing leftover QEMU {pid} of the agent")
            kill_pid(pid, self.state_dir + "/")
        if self.node:
            self.node.stop()
        shutil.rmtree(self.agent_dir, ignore_errors=True)


# ---- 1. through Hearth ------------------------------------------------------------------

def through_hearth(site, token, n):
    """Seconds from the create request to the first exec answering 0, and to `running`;
    also the environment's id and its QEMU argv (read while it runs)."""
    conn = http.client.HTTPConnection("127.0.0.1", site.node.port, timeout=120)
    t0 = time.perf_counter()
    env_id = site.create(token, f"bench-{n}", 512, 3, conn)
    running_at = None
    deadline = t0 + BOOT_TIMEOUT
    while True:
        if time.perf_counter() > deadline:
            raise BenchError(f"environment {env_id}: no successful exec after {BOOT_TIMEOUT} s")
        if running_at is None:
            if site.env(token, env_id, conn)["state"] != "running":
                time.sleep(0.05)
                continue
            running_at = time.perf_counter()
        status, body = site.call("POST", f"/v1/environments/{env_id}/exec", token, {"code": "true", "timeoutSeconds": 60}, conn)
        if status == 200 and body.get("exitCode") == 0:
            break
        time.sleep(0.05)
    elapsed = time.perf_counter() - t0
    conn.close()
    name = f"hearth-{env_id}"
    pids = [p for p in qemu_pids(name) if f"{name},process={name}" in cmdline(p)]
    if len(pids) != 1:
        raise BenchError(f"expected one QEMU process for {name}, found {pids}")
    argv = cmdline(pids[0])
    return elapsed, running_at - t0, env_id, argv


# ---- 2. by hand -------------------------------------------------------------------------

def arg_after(argv, flag):
    return argv[argv.index(flag) + 1]


def by_hand(agent_argv, env_id, state_dir, virtual_size, key, pub, n):
    """The agent's QEMU argv, rewritten to a fresh VM in a temp dir; seconds from launching
    QEMU to the first `ssh true`, and seconds it took to make the disks beforehand."""
    vm_name = f"hearth-{env_id}"
    vm_dir = os.path.join(state_dir, "vms", vm_name)
    hand_name = f"bench-hand-{os.getpid()}-{n}"
    work = tempfile.mkdtemp(prefix="hearth-bench-hand-")
    pid = None
    try:
        # The disks, as QemuHost::create makes them.
        t_prep = time.perf_counter()
        base = os.path.realpath(os.path.join(IMAGE_DIR, "rootfs.ext4"))
        subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-F", "raw", "-b", base,
                        os.path.join(work, "disk.qcow2"), str(virtual_size)], check=True)
        os.makedirs(os.path.join(work, "config"))
        with open(os.path.join(work, "config", "authorized_keys"), "w") as f:
            f.write(pub.strip() + "\n")
        with open(os.path.join(work, "config", "hostname"), "w") as f:
            f.write(hand_name + "\n")
        subprocess.run(["mkfs.ext4", "-q", "-F", "-L", "hearth-config", "-d", os.path.join(work, "config"),
                        os.path.join(work, "config.ext4"), "4M"], check=True, stdout=subprocess.DEVNULL)
        prep = time.perf_counter() - t_prep

        # The agent's argv: its VM's files become ours, another name and another SSH port.
        argv = []
        for a in agent_argv:
            a = a.replace(vm_dir + "/", work + "/")
            a = a.replace(f"{vm_name},process={vm_name}", f"{hand_name},process={hand_name}")
            argv.append(a)
        if any(state_dir in a or vm_name in a for a in argv):
            raise BenchError(f"the rewritten QEMU command still names the agent's VM: {argv}")
        netdev = argv.index("-netdev") + 1
        if not re.search(r"hostfwd=tcp:127\.0\.0\.1:\d+-:22", argv[netdev]):
            raise BenchError(f"unexpected -netdev in the agent's command: {argv[netdev]}")
        pidfile = arg_after(argv, "-pidfile")

        for attempt in range(5):
            port = free_port()
            argv[netdev] = re.sub(r"hostfwd=tcp:127\.0\.0\.1:\d+-:22", f"hostfwd=tcp:127.0.0.1:{port}-:22", argv[netdev])
            try:
                os.remove(os.path.join(work, "qmp.sock"))
            except FileNotFoundError:
                pass
            t0 = time.perf_counter()
            out = subprocess.run(argv, capture_output=True, text=True)  # -daemonize: returns once QEMU runs
            if out.returncode == 0:
                break
            if "hostfwd" in out.stderr and attempt < 4:
                continue
            raise BenchError(f"{QEMU} by hand failed ({out.returncode}): {out.stderr.strip()}\nargv: {argv}")
        pid = int(open(pidfile).read().strip())
        deadline = t0 + BOOT_TIMEOUT
        attempts = 0
        while True:
            attempts += 1
            ok = subprocess.run(["ssh", *SSH_OPTS, "-i", key, "-p", str(port), "dev@127.0.0.1", "true"],
                                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL).returncode == 0
            if ok:
                break
            if cmdline(pid) is None:
                console = open(os.path.join(work, "console.log"), errors="replace").read()[-3000:]
                raise BenchError(f"the hand-run QEMU exited before SSH answered; console tail:\n{console}")
            if time.perf_counter() > deadline:
                raise BenchError(f"the hand-run VM did not answer SSH on {port} after {BOOT_TIMEOUT} s")
            time.sleep(0.01)
        elapsed = time.perf_counter() - t0
        log(f"  {attempts} ssh attempts")
        return elapsed, prep, argv
    finally:
        if pid is not None:
            kill_pid(pid, hand_name)
        for p in qemu_pids(work + "/"):  # a QEMU that daemonized but whose pidfile we missed
            kill_pid(p, work + "/")
        shutil.rmtree(work, ignore_errors=True)


# ---- 3. memory --------------------------------------------------------------------------

def memory(site, vms):
    quota = {"maxEnvironments": max(50, vms), "maxConcurrentEnvironments": max(20, vms),
             "maxVcpus": max(64, vms), "maxMemoryMb": max(131072, 256 * vms), "maxDiskGb": max(2000, vms)}
    token = site.user(f"fleet-{time.time_ns()}@example.com", quota)
    log(f"creating {vms} environments (1 vCPU, 256 MB, 1 GB)")
    t0 = time.perf_counter()
    ids = [site.create(token, f"fleet-{i}", 256, 1) for i in range(vms)]
    try:
        pending = set(ids)
        deadline = time.time() + BOOT_TIMEOUT + 60 * vms
        while pending:
            if time.time() > deadline:
                raise BenchError(f"{len(pending)} of {vms} environments not running in time")
            for env_id in list(pending):
                if site.env(token, env_id)["state"] == "running":
                    pending.discard(env_id)
                    log(f"{vms - len(pending)}/{vms} running ({len(site.vm_qemus())} QEMU processes)")
            time.sleep(0.5)
        all_running = time.perf_counter() - t0
        pids = site.vm_qemus()
        if len(pids) != vms:
            raise BenchError(f"{vms} environments running but {len(pids)} QEMU processes")
        time.sleep(2)  # let the last health checks and SSH probes settle
        agent_rss = rss_kb(site.agent.pid)
        qemu_rss = sum(rss_kb(p) for p in pids)
        server_rss = site.node.rss_kb()
    finally:
        log(f"destroying the {vms} environments")
        for env_id in ids:
            try:
                site.destroy(token, env_id)
            except Exception as e:  # noqa: BLE001 — carry on destroying the others
                log(f"destroy {env_id}: {e}")
    for env_id in ids:
        site.wait(token, env_id, "destroyed")
    left = site.vm_qemus()
    if left:
        raise BenchError(f"QEMU processes outlived their environments: {left}")
    log("all destroyed, no QEMU process left")
    return agent_rss, qemu_rss, server_rss, all_running


# ---- main -------------------------------------------------------------------------------

def secs(xs):
    return f"{statistics.median(xs):.2f} s median ({min(xs):.2f}–{max(xs):.2f}, n={len(xs)})"


def mib(kb):
    return f"{kb / 1024:.1f} MiB"


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("binary", help="the hearth binary")
    p.add_argument("--runs", type=int, default=3, help="rounds of Hearth then by hand (default 3)")
    p.add_argument("--vms", type=int, default=20, help="environments for the memory figure (default 20)")
    p.add_argument("--skip-memory", action="store_true", help="skip the memory figure")
    p.add_argument("--accel", default="auto", choices=["auto", "kvm", "tcg"], help="passed to `hearth agent` (default auto)")
    a = p.parse_args()
    if a.runs < 1 or a.vms < 1:
        p.error("--runs and --vms must be at least 1")
    if os.geteuid() != 0:
        sys.exit("bench_agent: run as root (the agent confines QEMU with -runas and iptables; /proc of its QEMUs)")
    for tool in [QEMU, "qemu-img", "mkfs.ext4", "ssh", "ssh-keygen"]:
        if not shutil.which(tool):
            sys.exit(f"bench_agent: {tool} is missing (apt-get install qemu-system-x86 qemu-utils e2fsprogs openssh-client)")
    if not os.path.exists(os.path.join(IMAGE_DIR, "manifest.json")):
        sys.exit(f"bench_agent: no VM image in {IMAGE_DIR} (hearth image build --vm)")
    if not os.access(a.binary, os.X_OK):
        sys.exit(f"bench_agent: {a.binary} is not an executable")

    # A SIGTERM (or SIGHUP) unwinds like Ctrl-C, so the cleanup below runs.
    def interrupted(signum, _frame):
        raise KeyboardInterrupt(f"signal {signum}")
    signal.signal(signal.SIGTERM, interrupted)
    signal.signal(signal.SIGHUP, interrupted)

    keydir = tempfile.mkdtemp(prefix="hearth-bench-key-")
    site = Site(os.path.abspath(a.binary), a.accel, a.vms)
    rows = []
    try:
        key = keydir + "/id"
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", key], check=True)
        pub = open(key + ".pub").read().strip()
        site.start()
        accel, accel_source = site.accelerator()
        log(f"accelerator: {accel} ({accel_source})")
        time.sleep(1)
        agent_idle = rss_kb(site.agent.pid)

        hearth, to_running, hand, prep = [], [], [], []
        token = site.user(f"bench-{time.time_ns()}@example.com")
        for i in range(a.runs):
            log(f"run {i + 1}/{a.runs}: through Hearth")
            t, t_run, env_id, argv = through_hearth(site, token, i)
            hearth.append(t)
            to_running.append(t_run)
            log(f"  request to first exec {t:.2f} s (running after {t_run:.2f} s)")
            # The overlay's virtual size is read while the environment runs; it is destroyed
            # before the hand run so the two VMs do not share the cores.
            disk = os.path.join(site.state_dir, "vms", f"hearth-{env_id}", "disk.qcow2")
            size = json.loads(subprocess.check_output(["qemu-img", "info", "-U", "--output=json", disk], text=True))["virtual-size"]
            site.destroy(token, env_id)
            site.wait(token, env_id, "destroyed")
            log(f"run {i + 1}/{a.runs}: by hand (the agent's QEMU command, read while {env_id} ran)")
            t, t_prep, hand_argv = by_hand(argv, env_id, site.state_dir, size, key, pub, i)
            if i == 0:
                log("  the agent's QEMU argv: " + json.dumps(argv))
                log("  the hand-run QEMU argv: " + json.dumps(hand_argv))
            hand.append(t)
            prep.append(t_prep)
            log(f"  QEMU launch to first ssh {t:.2f} s (disks made before, in {t_prep * 1000:.0f} ms)")

        rows.append(("accelerator", f"{accel} ({accel_source})"))
        rows.append(("through Hearth: `POST /v1/environments` (1 vCPU, 512 MB, 3 GB) to the first `exec` of `true` answering 0", secs(hearth)))
        rows.append(("of which request to `running` (saga, QEMU, boot, Hearth's SSH wait)", secs(to_running)))
        rows.append(("by hand: the agent's `qemu-system-x86_64` command, launch to the first `ssh … true` (fresh overlay and config drive made before the clock starts)",
                     f"{secs(hand)}; disks made in {statistics.median(prep) * 1000:.0f} ms"))
        rows.append(("**ratio Hearth / by hand** (medians)", f"**{statistics.median(hearth) / statistics.median(hand):.2f}**"))
        rows.append(("agent RSS, joined, no VM", mib(agent_idle)))

        if not a.skip_memory:
            agent_rss, qemu_rss, server_rss, all_running = memory(site, a.vms)
            rows.append((f"agent RSS, {a.vms} running VMs (1 vCPU, 256 MB, 1 GB each)", mib(agent_rss)))
            rows.append((f"QEMU RSS, sum over the {a.vms} VMs (for context)", f"{mib(qemu_rss)} ({qemu_rss / 1024 / a.vms:.0f} MiB each)"))
            rows.append((f"server RSS with the {a.vms} running", mib(server_rss)))
            rows.append((f"{a.vms} creates to all `running` (default 2 provision workers)", f"{all_running:.1f} s"))
    except BenchError as e:
        log(f"FAILED: {e}")
        if site.node:
            try:
                log("server log tail:\n" + open(site.node.work + "/server.log", errors="replace").read()[-3000:])
            except OSError:
                pass
        log("agent log tail:\n" + site.agent_text()[-3000:])
        sys.exit(1)
    except KeyboardInterrupt as e:
        log(f"interrupted ({e or 'Ctrl-C'})")
        sys.exit(130)
    finally:
        log("cleaning up")
        site.stop()
        shutil.rmtree(keydir, ignore_errors=True)

    print("| measure | figure |")
    print("|---|---|")
    for k, v in rows:
        print(f"| {k} | {v} |")


if __name__ == "__main__":
    main()
