#!/usr/bin/env bash
# Installs and starts what Hearth and its tests need on a Debian 12 machine, idempotently:
#   scripts/services.sh docker      Docker engine (dockerd) and mmdebstrap
#   scripts/services.sh postgres    PostgreSQL 15 on 127.0.0.1 with a `hearth` role (tests)
#   scripts/services.sh redis       redis-server installed (tests start their own)
#   scripts/services.sh fuzz        schemathesis (pinned) from PyPI
#   scripts/services.sh qemu        QEMU, qemu-img and busybox for VM hosts (hearth agent)
#   scripts/services.sh ui          Node.js and npm (building the web UI), Chromium (its tests)
#   scripts/services.sh mail        swaks, aiosmtpd, dkimpy and dnsmasq (commands by mail tests)
#   scripts/services.sh git         git and OpenSSH's sshd, not started (the repositories tests)
# Prints the variables to export on its last lines.
set -euo pipefail

need_root() {
  if [ "$(id -u)" != 0 ]; then echo "scripts/services.sh: run as root (it installs packages and starts services)" >&2; exit 1; fi
}

apt_install() {
  local missing=()
  # Installed means dpkg says so: a package removed but not purged is still known to
  # `dpkg -s`, without its files.
  for p in "$@"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q '^install ok installed$' || missing+=("$p")
  done
  [ ${#missing[@]} -eq 0 ] && return 0
  echo "installing: ${missing[*]}" >&2
  if [ ! -f /var/lib/apt/periodic/hearth-updated ]; then
    apt-get update -qq
    mkdir -p /var/lib/apt/periodic && touch /var/lib/apt/periodic/hearth-updated
  fi
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
}

# gVisor as the engine's runtime "runsc". Debian's runsc (2022-12) misreads kernels from
# 6.x as "the root network namespace" and refuses to start with its own network stack, so
# it runs with --network=host: the VM keeps its own network namespace (and bridge), and its
# socket calls go to the host kernel instead of gVisor's netstack. Merged into an existing
# daemon.json; a running dockerd reloads it on SIGHUP.
register_runsc() {
  python3 - <<'PY'
import json, os
path = "/etc/docker/daemon.json"
conf = json.load(open(path)) if os.path.exists(path) and os.path.getsize(path) > 0 else {}
want = {"path": "/usr/bin/runsc", "runtimeArgs": ["--network=host"]}
if conf.get("runtimes", {}).get("runsc") != want:
    conf.setdefault("runtimes", {})["runsc"] = want
    os.makedirs("/etc/docker", exist_ok=True)
    json.dump(conf, open(path, "w"), indent=2)
PY
}

start_docker() {
  # iproute2 and openssl: the tests start a second engine on a bridge of its own, with TLS.
  # runsc: gVisor, an optional runtime for untrusted code. iptables: the guest firewall.
  apt_install docker.io mmdebstrap openssh-client rsync iproute2 openssl runsc iptables
  register_runsc
  if /usr/bin/docker info 2>/dev/null | grep -q 'Runtimes:.*runsc'; then
    :
  elif /usr/bin/docker info >/dev/null 2>&1; then
    kill -HUP "$(pidof dockerd)"
    for _ in $(seq 1 20); do /usr/bin/docker info 2>/dev/null | grep -q 'Runtimes:.*runsc' && break; sleep 0.25; done
  fi
  if ! /usr/bin/docker info >/dev/null 2>&1; then
    echo "starting dockerd" >&2
    nohup /usr/sbin/dockerd >/var/log/hearth-dockerd.log 2>&1 &
    for _ in $(seq 1 60); do /usr/bin/docker info >/dev/null 2>&1 && break; sleep 0.5; done
    /usr/bin/docker info >/dev/null 2>&1 || { echo "dockerd did not start; see /var/log/hearth-dockerd.log" >&2; exit 1; }
  fi
}

start_postgres() {
  apt_install postgresql
  local ver
  ver=$(ls /etc/postgresql | sort -n | tail -1)
  if ! pg_lsclusters -h | grep -q "^$ver main .* online"; then
    echo "starting PostgreSQL $ver" >&2
    # A server that was not shut down cleanly fsyncs its whole data directory first,
    # which can outlast pg_ctl's default 60 s wait.
    pg_ctlcluster "$ver" main start -- -t 600
  fi
  for _ in $(seq 1 30); do runuser -u postgres -- psql -qAtc 'select 1' >/dev/null 2>&1 && break; sleep 0.5; done
  runuser -u postgres -- psql -qAtc "SELECT 1 FROM pg_roles WHERE rolname='hearth'" | grep -q 1 ||
    runuser -u postgres -- psql -qc "CREATE ROLE hearth LOGIN SUPERUSER PASSWORD 'hearth'"
  runuser -u postgres -- psql -qAtc "SELECT 1 FROM pg_database WHERE datname='hearth'" | grep -q 1 ||
    runuser -u postgres -- psql -qc "CREATE DATABASE hearth OWNER hearth"
  drop_orphaned_test_databases
  echo "HEARTH_TEST_POSTGRES_URL=postgres://hearth:hearth@127.0.0.1:5432/hearth"
}

# Test databases are named hearth_t_<pid>_<uuid> by the test process that made them
# (crates/hearth-store/src/testdb.rs, which drops them the same way as tests start); those
# whose process is gone, and older unnamed ones, are dropped here so a run never begins on
# the last one's leftovers.
drop_orphaned_test_databases() {
  local db pid dropped=0
  while read -r db; do
    [ -n "$db" ] || continue
    pid=${db#hearth_t_}
    pid=${pid%%_*}
    if [[ $pid =~ ^[0-9]+$ && ${#pid} -lt 12 && -d /proc/$pid ]]; then continue; fi
    runuser -u postgres -- psql -qc "DROP DATABASE IF EXISTS \"$db\" WITH (FORCE)" >/dev/null && dropped=$((dropped + 1))
  done < <(runuser -u postgres -- psql -qAtc "SELECT datname FROM pg_database WHERE datname LIKE 'hearth\_t\_%'")
  [ "$dropped" = 0 ] || echo "dropped $dropped test databases left by finished test processes" >&2
}

# Tests start their own redis-server on a free port; this only installs it.
install_redis() {
  apt_install redis-server
}

# Schemathesis, pinned, from PyPI (`make fuzz`).
SCHEMATHESIS=4.32.5
install_fuzzer() {
  if [ "$(python3 -c 'import schemathesis; print(schemathesis.__version__)' 2>/dev/null)" != "$SCHEMATHESIS" ]; then
    echo "installing schemathesis $SCHEMATHESIS" >&2
    python3 -m pip install --quiet --disable-pip-version-check "schemathesis==$SCHEMATHESIS" >&2
  fi
}

# QEMU for VM hosts. Debian 12's qemu-system-x86 needs its own qemu-utils: a machine that
# has a newer one (from backports) would lose it to a plain install, so both are pinned to
# the version qemu-system-x86 comes in, in one command. busybox-static: the VM initramfs.
# lz4, xz-utils, zstd: unpacking the kernel for Firecracker (an ELF vmlinux).
install_qemu() {
  if ! command -v qemu-system-x86_64 >/dev/null || ! command -v qemu-img >/dev/null || [ ! -x /bin/busybox ] \
    || ! command -v lz4 >/dev/null || ! command -v zstd >/dev/null || ! command -v xz >/dev/null; then
    if [ ! -f /var/lib/apt/periodic/hearth-updated ]; then
      apt-get update -qq
      mkdir -p /var/lib/apt/periodic && touch /var/lib/apt/periodic/hearth-updated
    fi
    local v
    v=$(apt-cache policy qemu-system-x86 | awk '/Candidate:/ {print $2}')
    echo "installing qemu-system-x86 and qemu-utils $v, busybox-static, lz4, xz-utils, zstd" >&2
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --allow-downgrades \
      "qemu-system-x86=$v" "qemu-utils=$v" busybox-static e2fsprogs mmdebstrap lz4 xz-utils zstd >/dev/null
  fi
}

# Node.js 18 or newer with npm builds the web UI; Debian's chromium runs its browser tests.
# A newer Node already installed (nodesource) is kept.
install_ui_tools() {
  if ! command -v node >/dev/null || ! command -v npm >/dev/null; then
    apt_install nodejs npm
  fi
  apt_install chromium
}

# Real mail tools for the tests of commands by mail: swaks sends, aiosmtpd (Python) is the
# relay replies go to, dkimpy signs, dnsmasq serves the DKIM keys on loopback.
install_mail_tools() {
  apt_install swaks python3-aiosmtpd python3-dkim dnsmasq-base
}

# git, and OpenSSH's sshd for the repositories test's SSH git host, which starts its own in
# a network namespace. The package's own service is kept from starting (a policy-rc.d that
# refuses, unless the machine has one): nothing of it listens on this machine.
install_git_host() {
  if ! dpkg -s openssh-server >/dev/null 2>&1; then
    local policy=/usr/sbin/policy-rc.d made=""
    if [ ! -e "$policy" ]; then
      printf '#!/bin/sh\nexit 101\n' > "$policy" && chmod 755 "$policy" && made=1
    fi
    apt_install openssh-server
    if [ -n "$made" ]; then rm -f "$policy"; fi
  fi
  apt_install git
}

need_root
for what in "$@"; do
  case "$what" in
    docker) start_docker ;;
    postgres) start_postgres ;;
    redis) install_redis ;;
    fuzz) install_fuzzer ;;
    qemu) install_qemu ;;
    ui) install_ui_tools ;;
    mail) install_mail_tools ;;
    git) install_git_host ;;
    *) echo "scripts/services.sh: unknown service $what (docker, postgres, redis, fuzz, qemu, ui, mail, git)" >&2; exit 2 ;;
  esac
done
