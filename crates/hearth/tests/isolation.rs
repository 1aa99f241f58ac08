//! Tenants on one Docker host: VMs of different users cannot reach each other or the host,
//! a fork bomb stops at the pids limit, the capability set has no NET_RAW yet sudo works,
//! and gVisor runs a VM when the host asks for it.

mod common;

use common::*;
use reqwest::StatusCode;
use serde_json::{Value, json};
use std::time::Duration;

const UP: Duration = Duration::from_secs(120);

async fn exec(server: &Server, token: &str, id: &str, code: &str) -> Value {
    let r = server
        .call(
            "POST",
            &format!("/v1/environments/{id}/exec"),
            Some(token),
            Some(json!({"code": code, "timeoutSeconds": 60})),
        )
        .await;
    assert_eq!(r.status, StatusCode::OK, "{code}: {:?}", r.body);
    r.body
}

async fn stdout(server: &Server, token: &str, id: &str, code: &str) -> String {
    exec(server, token, id, code).await["stdout"]
        .as_str()
        .unwrap()
        .trim()
        .to_string()
}

async fn running_env(server: &Server, token: &str, name: &str) -> String {
    let r = server
        .call(
            "POST",
            "/v1/environments",
            Some(token),
            Some(json!({"name": name, "memoryMb": 512})),
        )
        .await;
    assert_eq!(r.status, StatusCode::ACCEPTED, "{:?}", r.body);
    let id = r.body["id"].as_str().unwrap().to_string();
    server.wait_env(token, &id, "running", UP).await;
    id
}

/// `open` when a TCP connection from the VM to `ip:port` succeeds within 3 s.
async fn reach(server: &Server, token: &str, id: &str, ip: &str, port: u16) -> String {
    let code = format!(
        "if timeout 3 bash -c 'exec 3<>/dev/tcp/{ip}/{port}' 2>/dev/null; then echo open; else echo closed; fi"
    );
    stdout(server, token, id, &code).await
}

/// The host's forwarding rules and addresses, for a failure's message.
fn firewall() -> String {
    let mut out = String::new();
    for args in [
        &["iptables", "-S", "FORWARD"][..],
        &["iptables", "-S", "DOCKER-USER"],
        &["iptables", "-S", "DOCKER-ISOLATION-STAGE-1"],
        &["iptables", "-S", "DOCKER-ISOLATION-STAGE-2"],
        &["ip", "-4", "-brief", "addr"],
    ] {
        let o = std::process::Command::new(args[0])
            .args(&args[1..])
            .output()
            .unwrap();
        out.push_str(&String::from_utf8_lossy(&o.stdout));
    }
    out
}

async fn host_id(server: &Server) -> String {
    let hosts = server
        .call("GET", "/v1/admin/hosts", Some(&server.admin_token), None)
        .await;
    hosts.body["items"][0]["id"].as_str().unwrap().to_string()
}

async fn set_host_options(server: &Server, options: Value) {
    let id = host_id(server).await;
    let r = server
        .patch(
            &format!("/v1/admin/hosts/{id}"),
            &server.admin_token,
            json!({ "options": options }),
        )
        .await;
    assert_eq!(r.status, StatusCode::OK, "{:?}", r.body);
}

#[tokio::test]
async fn vms_of_different_users_cannot_reach_each_other_or_the_host() {
    let site = Site::new(Db::Sqlite).await;
    let server = site.start().await;
    let alice = server.user("alice@example.com", "pro").await;
    let bob = server.user("bob@example.com", "pro").await;
    let (a, b) = tokio::join!(
        running_env(&server, &alice, "a"),
        running_env(&server, &bob, "b")
    );
    let a_ip = stdout(&server, &alice, &a, "hostname -I").await;
    let b_ip = stdout(&server, &bob, &b, "hostname -I").await;
    assert_ne!(a_ip, b_ip);
    // Each VM sits alone on a network of its own: its address is the second of its block.
    let a_addr: std::net::Ipv4Addr = a_ip.parse().unwrap_or_else(|_| panic!("{a_ip:?}"));
    let gateway = std::net::Ipv4Addr::from(u32::from(a_addr) - 1).to_string();

    // The probe works: a VM reaches its own sshd by its address.
    assert_eq!(reach(&server, &alice, &a, &a_ip, 22).await, "open");
    // It does not reach another user's VM.
    for (token, from, to) in [(&alice, &a, &b_ip), (&bob, &b, &a_ip)] {
        let seen = reach(&server, token, from, to, 22).await;
        assert_eq!(
            seen,
            "closed",
            "{from} reached {to}:22; the host's rules:\n{}",
            firewall()
        );
    }

    // A service listening on every address of the host: this machine reaches it at the
    // VM's gateway address, the VM does not.
    let listener = tokio::net::TcpListener::bind("0.0.0.0:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move {
        while let Ok((conn, _)) = listener.accept().await {
            drop(conn);
        }
    });
    tokio::net::TcpStream::connect((gateway.as_str(), port))
        .await
        .expect("the host reaches its own service");
    assert_eq!(reach(&server, &alice, &a, &gateway, port).await, "closed");

    // Capabilities: no NET_RAW (13) or MKNOD (27); SETUID (7) stays, and sudo works.
    let bounding = stdout(
        &server,
        &alice,
        &a,
        "awk '/^CapBnd/ {print $2}' /proc/self/status",
    )
    .await;
    let caps = u64::from_str_radix(&bounding, 16).unwrap_or_else(|_| panic!("{bounding:?}"));
    assert_eq!(caps & (1 << 13), 0, "NET_RAW is kept: {bounding}");
    assert_eq!(caps & (1 << 27), 0, "MKNOD is kept: {bounding}");
    assert_ne!(caps & (1 << 7), 0, "SETUID is gone: {bounding}");
    assert_eq!(stdout(&server, &alice, &a, "sudo -n id -u").await, "0");

    // Disk: limited where the storage driver can, and said so where it cannot.
    let storage = docker_inspect(&format!("hearth-{a}"), "{{json .HostConfig.StorageOpt}}");
    let limited = storage.contains("\"size\"");
    assert!(
        limited || site.log().contains("cannot limit a VM's disk"),
        "neither a disk limit nor a word about it: {storage}"
    );

    for (token, id) in [(&alice, &a), (&bob, &b)] {
        server
            .call(
                "DELETE",
                &format!("/v1/environments/{id}"),
                Some(token),
                None,
            )
            .await;
    }
    for (token, id) in [(&alice, &a), (&bob, &b)] {
        server.wait_env(token, id, "destroyed", UP).await;
        let networks = std::process::Command::new("docker")
            .args([
                "network",
                "ls",
                "-q",
                "--filter",
                &format!("name=hearth-{id}"),
            ])
            .output()
            .unwrap();
        assert!(
            networks.stdout.is_empty(),
            "the network of {id} outlived it"
        );
    }
}

#[tokio::test]
async fn a_fork_bomb_stops_at_the_pids_limit() {
    let site = Site::new(Db::Sqlite).await;
    let server = site.start().await;
    set_host_options(&server, json!({"pidsLimit": 200})).await;
    let token = server.user("bomb@example.com", "pro").await;
    let id = running_env(&server, &token, "bomb").await;
    let max = stdout(
        &server,
        &token,
        &id,
        "cat /sys/fs/cgroup/pids.max 2>/dev/null || cat /sys/fs/cgroup/pids/pids.max",
    )
    .await;
    assert_eq!(max, "200");
    // The bomb runs for 8 s in a process group of its own, which is then killed whole
    // (with builtins only: nothing can fork while it runs).
    let bomb = "sleep 8 & timer=$!; set -m; (b() { b | b & }; b) >/dev/null 2>&1 & group=$!; set +m; \
                wait $timer; kill -9 -- -$group; sleep 2; cat /sys/fs/cgroup/pids.events 2>/dev/null || cat /sys/fs/cgroup/pids/pids.events";
    let events = stdout(&server, &token, &id, bomb).await;
    let refused: u64 = events
        .split_whitespace()
        .nth(1)
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("{events:?}"));
    assert!(refused > 0, "the bomb never met the limit: {events}");
    // The VM and Hearth carry on.
    assert_eq!(stdout(&server, &token, &id, "echo alive").await, "alive");
    assert_eq!(
        server.call("GET", "/healthz", None, None).await.status,
        StatusCode::OK
    );
    server.destroy(&token, &id, UP).await;
}

#[tokio::test]
async fn gvisor_runs_a_vm_when_the_host_asks_for_it() {
    let site = Site::new(Db::Sqlite)
        .await
        .with_env("HEARTH_HOST_UNHEALTHY_AFTER_MS", "1000");
    let server = site.start().await;
    let host = host_id(&server).await;
    set_host_options(&server, json!({"runtime": "runsc"})).await;
    let token = server.user("untrusted@example.com", "pro").await;
    let id = running_env(&server, &token, "sandboxed").await;
    assert_eq!(
        docker_inspect(&format!("hearth-{id}"), "{{.HostConfig.Runtime}}"),
        "runsc"
    );
    // gVisor's kernel answers, not the host's.
    let kernel = stdout(&server, &token, &id, "dmesg 2>/dev/null | head -1").await;
    assert!(kernel.contains("gVisor"), "{kernel:?}");
    server.destroy(&token, &id, UP).await;
    // A runtime the engine does not know: the host's check fails and says how to fix it.
    let r = server
        .patch(
            &format!("/v1/admin/hosts/{host}"),
            &server.admin_token,
            json!({"options": {"runtime": "no-such-runtime"}}),
        )
        .await;
    assert_eq!(r.status, StatusCode::OK, "{:?}", r.body);
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    loop {
        let h = server
            .call(
                "GET",
                &format!("/v1/admin/hosts/{host}"),
                Some(&server.admin_token),
                None,
            )
            .await
            .body;
        if h["health"] == "unhealthy" {
            assert!(
                h.to_string().contains("no runtime \\\"no-such-runtime\\\""),
                "{h}"
            );
            break;
        }
        assert!(std::time::Instant::now() < deadline, "the host stayed {h}");
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
}

/// The guest's SSH host key is recorded at the first contact and checked afterwards: a
/// VM that comes back from a stop with another host key is refused (the environment ends
/// in `error`, saying so), not logged into.
#[tokio::test]
async fn a_changed_host_key_is_refused() {
    let site = Site::new(Db::Sqlite).await;
    let server = site.start().await;
    let token = server.user("keys@example.com", "pro").await;
    let id = running_env(&server, &token, "pinned").await;
    let container = containers_of(&id).pop().expect("its container");
    let key_in_guest = |container: &str| {
        let out = std::process::Command::new("docker")
            .args([
                "exec",
                "-u",
                "0",
                container,
                "cat",
                "/etc/ssh/ssh_host_ed25519_key.pub",
            ])
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout)
            .split_whitespace()
            .take(2)
            .collect::<Vec<_>>()
            .join(" ")
    };
    let recorded = site
        .store()
        .await
        .environment(&id)
        .await
        .unwrap()
        .ssh_host_key;
    assert_eq!(
        recorded.as_deref(),
        Some(key_in_guest(&container).as_str()),
        "the key recorded is the guest's"
    );

    // Someone gives the VM another host key while it runs; after a stop and start it offers it.
    let replaced = std::process::Command::new("docker")
        .args([
            "exec", "-u", "0", &container, "sh", "-c",
            "rm -f /etc/ssh/ssh_host_ed25519_key /etc/ssh/ssh_host_ed25519_key.pub && ssh-keygen -q -t ed25519 -N '' -f /etc/ssh/ssh_host_ed25519_key",
        ])
        .output()
        .unwrap();
    assert!(replaced.status.success(), "{replaced:?}");
    assert_ne!(Some(key_in_guest(&container)), recorded);
    server
        .call(
            "POST",
            &format!("/v1/environments/{id}/stop"),
            Some(&token),
            None,
        )
        .await;
    server.wait_env(&token, &id, "stopped", UP).await;
    server
        .call(
            "POST",
            &format!("/v1/environments/{id}/start"),
            Some(&token),
            None,
        )
        .await;
    let env = server.wait_env(&token, &id, "error", UP).await;
    let message = env["stateMessage"].as_str().unwrap_or_default();
    assert!(message.contains("offered SSH host key"), "{message}");
    assert_eq!(
        site.store()
            .await
            .environment(&id)
            .await
            .unwrap()
            .ssh_host_key,
        recorded,
        "the recorded key stays"
    );
}
