//! Hosts of kind `agent`: two `hearth agent` processes with the `qemu` backend join one
//! installation and run real VMs (software emulation here); credentials and join tokens
//! are enforced; a killed agent is noticed, and its VMs are adopted when it comes back.

mod common;

use common::*;
use reqwest::StatusCode;
use serde_json::{Value, json};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const UP: Duration = Duration::from_secs(240);

fn image_dir() -> PathBuf {
    PathBuf::from(
        std::env::var("HEARTH_VM_IMAGE_DIR").unwrap_or_else(|_| "/var/lib/hearth/vm-image".into()),
    )
}

fn kernel_version() -> String {
    let manifest: Value = serde_json::from_str(
        &std::fs::read_to_string(image_dir().join("manifest.json"))
            .expect("the VM image (make test builds it)"),
    )
    .unwrap();
    manifest["kernelVersion"].as_str().unwrap().to_string()
}

struct Agent {
    child: Option<Child>,
    dir: tempfile::TempDir,
    listen: String,
    /// Off but in the test of base snapshots: a base VM's build is one more TCG guest
    /// competing for the two cores with the VMs the other tests wait for.
    base_snapshots: bool,
}

impl Drop for Agent {
    /// Ends the agent and, since its QEMUs outlive it by design, every QEMU whose files are
    /// in its directory: a failed test leaves no VM running.
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        let mine = self.dir.path().display().to_string();
        for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
            let Ok(cmdline) = std::fs::read(entry.path().join("cmdline")) else {
                continue;
            };
            if String::from_utf8_lossy(&cmdline).contains(&mine)
                && let Ok(pid) = entry.file_name().to_string_lossy().parse::<i32>()
            {
                let _ = Command::new("kill").args(["-9", &pid.to_string()]).status();
            }
        }
    }
}

impl Agent {
    fn spawn(&mut self, server: &Server, token: Option<&str>) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.path().join("agent.log"))
            .unwrap();
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_hearth"));
        cmd.arg("agent")
            .arg("--state-dir")
            .arg(self.dir.path().join("state"))
            .arg("--image-dir")
            .arg(image_dir())
            .args([
                "--listen",
                &self.listen,
                "--guest-address",
                "127.0.0.1",
                "--accel",
                "tcg",
                "--max-vms",
                "4",
                "--max-vcpus",
                "8",
                "--max-memory-mb",
                "4096",
                "--base-snapshots",
                if self.base_snapshots { "on" } else { "off" },
            ])
            .args(["--control-plane", &server.base])
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log);
        if let Some(t) = token {
            cmd.args(["--join-token", t]);
        }
        self.child = Some(cmd.spawn().unwrap());
    }

    fn start(server: &Server, token: &str) -> Agent {
        Agent::start_with(server, token, false)
    }

    fn start_with(server: &Server, token: &str, base_snapshots: bool) -> Agent {
        let mut agent = Agent {
            child: None,
            dir: tempfile::tempdir().unwrap(),
            listen: format!("127.0.0.1:{}", free_port()),
            base_snapshots,
        };
        agent.spawn(server, Some(token));
        agent
    }

    fn kill(&mut self) {
        let mut c = self.child.take().unwrap();
        c.kill().unwrap();
        c.wait().unwrap();
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("agent.log")).unwrap_or_default()
    }

    /// A client that trusts this agent's authority only.
    fn client(&self) -> reqwest::Client {
        let ca = std::fs::read(self.dir.path().join("state/tls/ca.pem")).unwrap();
        reqwest::Client::builder()
            .tls_built_in_root_certs(false)
            .add_root_certificate(reqwest::Certificate::from_pem(&ca).unwrap())
            .build()
            .unwrap()
    }

    async fn status(&self, credential: Option<&str>) -> StatusCode {
        let mut r = self
            .client()
            .get(format!("https://{}/v1/status", self.listen));
        if let Some(c) = credential {
            r = r.bearer_auth(c);
        }
        r.send().await.unwrap().status()
    }
}

async fn join_token(server: &Server, name: &str) -> String {
    let r = server
        .call(
            "POST",
            "/v1/admin/hosts/join-tokens",
            Some(&server.admin_token),
            Some(json!({"name": name})),
        )
        .await;
    assert_eq!(r.status, StatusCode::CREATED, "{:?}", r.body);
    r.body["token"].as_str().unwrap().to_string()
}

async fn host(server: &Server, name: &str) -> Option<Value> {
    let hosts = server
        .call("GET", "/v1/admin/hosts", Some(&server.admin_token), None)
        .await
        .body;
    hosts["items"]
        .as_array()
        .unwrap()
        .iter()
        .find(|h| h["name"] == name)
        .cloned()
}

async fn wait_health(server: &Server, name: &str, want: &str, agent: &Agent) -> Value {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if let Some(h) = host(server, name).await
            && h["health"] == want
        {
            return h;
        }
        assert!(
            Instant::now() < deadline,
            "host {name} never became {want}; agent log:\n{}",
            agent.log()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Waits for `id` to run; if it ends in `error` or takes longer than `UP`, fails with the
/// agent's log (what the control plane's answer cannot say).
async fn wait_running_or_log(server: &Server, token: &str, id: &str, agent: &Agent) {
    let started = Instant::now();
    loop {
        let env = server
            .call("GET", &format!("/v1/environments/{id}"), Some(token), None)
            .await
            .body;
        if env["state"] == "running" {
            return;
        }
        if env["state"] == "error" || started.elapsed() > UP {
            panic!(
                "the environment did not run: {env}\nits log:\n{}\nagent log:\n{}",
                server.env_log(token, id).await,
                agent.log()
            );
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// QEMU processes of an environment's VM.
fn qemu_of(environment_id: &str) -> usize {
    let name = format!("hearth-{environment_id}");
    std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter(|e| {
            std::fs::read(e.path().join("cmdline")).is_ok_and(|c| {
                String::from_utf8_lossy(&c)
                    .split('\0')
                    .any(|a| a == format!("{name},process={name}"))
            })
        })
        .count()
}

/// The credential the control plane holds for `host_id`, unsealed with the site's key.
async fn credential(site: &Site, host_id: &str) -> String {
    let store = site.store().await;
    let sealed: String = store
        .count_text(&format!(
            "SELECT credential_sealed AS v FROM hosts WHERE id = '{host_id}'"
        ))
        .await;
    let key = hearth_guest::MasterKey::parse(
        &std::fs::read_to_string(site.data_dir().join("master.key")).unwrap(),
    )
    .unwrap();
    key.open(&sealed).unwrap()
}

fn agent_site(site: Site) -> Site {
    site.with_env("VM_PROVIDER", "agent")
        .with_env("HEARTH_HOST_CHECK_INTERVAL_MS", "500")
        .with_env("HEARTH_HOST_UNHEALTHY_AFTER_MS", "3000")
        .with_env("HEARTH_SSH_WAIT_SECONDS", "180")
}

#[tokio::test]
async fn two_agents_run_real_vms_and_only_their_control_plane_may_call_them() {
    let site = agent_site(Site::new(Db::Sqlite).await);
    let server = site.start().await;
    let (ta, tb) = (
        join_token(&server, "vm-a").await,
        join_token(&server, "vm-b").await,
    );
    let a = Agent::start(&server, &ta);
    let b = Agent::start(&server, &tb);
    let host_a = wait_health(&server, "vm-a", "healthy", &a).await;
    let host_b = wait_health(&server, "vm-b", "healthy", &b).await;
    assert_eq!(
        (host_a["kind"].as_str(), host_a["maxEnvironments"].as_i64()),
        (Some("agent"), Some(4))
    );

    // A used token, an unknown one and an expired one are refused.
    let join = |token: &str| {
        json!({"token": token, "endpoint": "https://127.0.0.1:1", "certificate": "-----BEGIN CERTIFICATE-----\nx\n-----END CERTIFICATE-----\n",
        "guestAddress": "127.0.0.1", "capacity": {"maxVms": 1, "maxVcpus": 1, "maxMemoryMb": 512, "maxDiskGb": 1}, "version": "test"})
    };
    let expired = join_token(&server, "vm-late").await;
    site.store()
        .await
        .execute_for_tests("UPDATE join_tokens SET expires_at = 0 WHERE host_name = 'vm-late'")
        .await;
    for token in [ta.as_str(), "hearth_join_nonsense", expired.as_str()] {
        let r = server
            .call("POST", "/v1/agents/join", None, Some(join(token)))
            .await;
        assert_eq!(r.status, StatusCode::UNAUTHORIZED, "{token}: {:?}", r.body);
    }
    // The agents answer their own credential only.
    let (cred_a, cred_b) = (
        credential(&site, host_a["id"].as_str().unwrap()).await,
        credential(&site, host_b["id"].as_str().unwrap()).await,
    );
    assert_eq!(a.status(Some(&cred_a)).await, StatusCode::OK);
    assert_eq!(a.status(None).await, StatusCode::UNAUTHORIZED);
    assert_eq!(a.status(Some(&cred_b)).await, StatusCode::UNAUTHORIZED);
    assert_eq!(b.status(Some(&cred_a)).await, StatusCode::UNAUTHORIZED);

    let token = server.user("vms@example.com", "pro").await;
    let mut ids = Vec::new();
    for name in ["one", "two"] {
        let r = server
            .call(
                "POST",
                "/v1/environments",
                Some(&token),
                Some(json!({"name": name, "memoryMb": 512, "vcpus": 1, "diskGb": 3})),
            )
            .await;
        assert_eq!(r.status, StatusCode::ACCEPTED, "{:?}", r.body);
        ids.push(r.body["id"].as_str().unwrap().to_string());
    }
    let mut hosts = Vec::new();
    for id in &ids {
        let env = server.wait_env(&token, id, "running", UP).await;
        hosts.push(env["hostId"].as_str().unwrap().to_string());
    }
    assert_ne!(hosts[0], hosts[1], "the two environments share a host");
    // The admin API and CLI show what each agent reports: version, accelerator, VMs.
    for name in ["vm-a", "vm-b"] {
        let started = std::time::Instant::now();
        let report = loop {
            let report = host(&server, name).await.unwrap()["report"].clone();
            if report["vms"] == 1 {
                break report;
            }
            assert!(
                started.elapsed() < Duration::from_secs(30),
                "{name} never reported its VM: {report}"
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        };
        assert_eq!(report["version"], env!("CARGO_PKG_VERSION"));
        assert_eq!(report["accel"], "tcg", "{report}");
        assert_eq!(report["capacity"]["maxVms"], 4, "{report}");
    }
    let listed = std::process::Command::new(env!("CARGO_BIN_EXE_hearth"))
        .args(["admin", "hosts", "list"])
        .env("HEARTH_URL", &server.base)
        .env("HEARTH_TOKEN", &server.admin_token)
        .output()
        .unwrap();
    let listed = String::from_utf8_lossy(&listed.stdout).to_string();
    let line = listed
        .lines()
        .find(|l| l.contains("vm-a"))
        .unwrap_or_else(|| panic!("{listed}"));
    assert!(
        line.contains(&format!("version {}", env!("CARGO_PKG_VERSION")))
            && line.contains("vms 1 (running 1)"),
        "{line}"
    );
    let (one, two) = (&ids[0], &ids[1]);
    assert_eq!(
        exec_trimmed(&server, &token, one, "uname -r").await,
        kernel_version()
    );
    assert_eq!(
        exec_trimmed(&server, &token, one, "df -BG --output=size / | tail -1").await,
        "3G"
    );

    // Isolation: the probe reaches the VM's own sshd; through its gateway (this host) it
    // reaches neither an agent's API, nor the other VM's SSH port, nor the control plane.
    let reach = |port: u16, ip: &str| {
        format!(
            "if timeout 3 bash -c 'exec 3<>/dev/tcp/{ip}/{port}' 2>/dev/null; then echo open; else echo closed; fi"
        )
    };
    assert_eq!(
        exec_trimmed(&server, &token, one, &reach(22, "10.0.2.15")).await,
        "open"
    );
    let two_port = server
        .call(
            "GET",
            &format!("/v1/environments/{two}"),
            Some(&token),
            None,
        )
        .await
        .body["sshPort"]
        .as_u64()
        .unwrap() as u16;
    let api_port = |agent: &Agent| {
        agent
            .listen
            .rsplit(':')
            .next()
            .unwrap()
            .parse::<u16>()
            .unwrap()
    };
    let cp_port: u16 = server.base.rsplit(':').next().unwrap().parse().unwrap();
    for port in [api_port(&a), api_port(&b), two_port, cp_port] {
        assert!(
            std::net::TcpStream::connect(("127.0.0.1", port)).is_ok(),
            "nothing listens on {port}"
        );
        assert_eq!(
            exec_trimmed(&server, &token, one, &reach(port, "10.0.2.2")).await,
            "closed",
            "a VM reached port {port} of its host"
        );
    }

    // A file written just before the stop is there after it: the guest's page cache (ext4
    // writes back after up to 30 s) reaches its disk before the power-off.
    assert_eq!(
        exec_trimmed(
            &server,
            &token,
            one,
            "echo kept > ~/last-words && echo written"
        )
        .await,
        "written"
    );
    server
        .call(
            "POST",
            &format!("/v1/environments/{one}/stop"),
            Some(&token),
            None,
        )
        .await;
    server.wait_env(&token, one, "stopped", UP).await;
    assert_eq!(qemu_of(one), 0);
    server
        .call(
            "POST",
            &format!("/v1/environments/{one}/start"),
            Some(&token),
            None,
        )
        .await;
    server.wait_env(&token, one, "running", UP).await;
    assert_eq!(
        exec_trimmed(&server, &token, one, "cat ~/last-words").await,
        "kept"
    );

    for id in &ids {
        server
            .call(
                "DELETE",
                &format!("/v1/environments/{id}"),
                Some(&token),
                None,
            )
            .await;
    }
    for id in &ids {
        server.wait_env(&token, id, "destroyed", UP).await;
        assert_eq!(qemu_of(id), 0, "a QEMU outlived {id}");
        for agent in [&a, &b] {
            assert!(
                !agent
                    .dir
                    .path()
                    .join("state/vms")
                    .join(format!("hearth-{id}"))
                    .exists(),
                "a disk outlived {id}"
            );
        }
    }
}

#[tokio::test]
async fn a_killed_agent_is_noticed_and_its_vm_adopted() {
    let site = agent_site(Site::new(Db::Sqlite).await);
    let server = site.start().await;
    let t = join_token(&server, "vm-k").await;
    let mut agent = Agent::start(&server, &t);
    wait_health(&server, "vm-k", "healthy", &agent).await;
    let token = server.user("adopt@example.com", "pro").await;
    let r = server
        .call(
            "POST",
            "/v1/environments",
            Some(&token),
            Some(json!({"name": "adopted", "memoryMb": 512, "vcpus": 1, "diskGb": 2})),
        )
        .await;
    let id = r.body["id"].as_str().unwrap().to_string();
    wait_running_or_log(&server, &token, &id, &agent).await;
    let boot_id = exec_trimmed(&server, &token, &id, "cat /proc/sys/kernel/random/boot_id").await;

    // kill -9: unhealthy within HEARTH_HOST_UNHEALTHY_AFTER_MS (3 s) plus a check interval.
    agent.kill();
    let killed = Instant::now();
    wait_health(&server, "vm-k", "unhealthy", &agent).await;
    println!(
        "unhealthy {} ms after kill -9",
        killed.elapsed().as_millis()
    );
    // Back: the same VM, never restarted, never doubled.
    agent.spawn(&server, None);
    wait_health(&server, "vm-k", "healthy", &agent).await;
    assert_eq!(qemu_of(&id), 1);
    assert_eq!(
        exec_trimmed(&server, &token, &id, "cat /proc/sys/kernel/random/boot_id").await,
        boot_id,
        "the VM was restarted"
    );
    assert!(
        agent.log().contains("opened the VM records"),
        "{}",
        agent.log()
    );

    // The VM dies while its agent is down: reported, and the environment recovers on start.
    agent.kill();
    let pid: i32 = std::fs::read_to_string(
        agent
            .dir
            .path()
            .join(format!("state/vms/hearth-{id}/qemu.pid")),
    )
    .unwrap()
    .trim()
    .parse()
    .unwrap();
    // SAFETY: kill(2) on the QEMU of this test's VM.
    unsafe { libc::kill(pid, libc::SIGKILL) };
    agent.spawn(&server, None);
    wait_health(&server, "vm-k", "healthy", &agent).await;
    let env = server.wait_env(&token, &id, "stopped", UP).await;
    assert!(env["stateMessage"].to_string().len() > 2, "{env}");
    server
        .call(
            "POST",
            &format!("/v1/environments/{id}/start"),
            Some(&token),
            None,
        )
        .await;
    server.wait_env(&token, &id, "running", UP).await;
    assert_ne!(
        exec_trimmed(&server, &token, &id, "cat /proc/sys/kernel/random/boot_id").await,
        boot_id
    );
    server.destroy(&token, &id, UP).await;
    assert_eq!(qemu_of(&id), 0);
}

/// Through the control plane: the first environment of a size boots while the agent builds
/// that size's base snapshot; the next one restores it (the agent says so), comes up
/// running with its own hostname, machine id and host key, and runs commands; destroying
/// both leaves no QEMU.
#[tokio::test]
async fn the_second_vm_of_a_size_restores_the_base_snapshot() {
    let site = agent_site(Site::new(Db::Sqlite).await);
    let server = site.start().await;
    let t = join_token(&server, "vm-s").await;
    let agent = Agent::start_with(&server, &t, true);
    wait_health(&server, "vm-s", "healthy", &agent).await;
    let token = server.user("restore@example.com", "pro").await;
    let create = |name: &'static str| {
        let (server, token) = (&server, &token);
        async move {
            let r = server
                .call(
                    "POST",
                    "/v1/environments",
                    Some(token),
                    Some(json!({"name": name, "memoryMb": 512, "vcpus": 1, "diskGb": 2})),
                )
                .await;
            assert_eq!(r.status, StatusCode::ACCEPTED, "{:?}", r.body);
            let id = r.body["id"].as_str().unwrap().to_string();
            server.wait_env(token, &id, "running", UP).await;
            id
        }
    };
    let first = create("booted").await;
    let started = Instant::now();
    while !agent.log().contains("base snapshot ready") {
        assert!(
            started.elapsed() < Duration::from_secs(300),
            "no base snapshot: {}",
            agent.log()
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let second = create("restored").await;
    let restored_line = agent
        .log()
        .lines()
        .find(|l| l.contains("VM restored from its base snapshot") && l.contains(&second))
        .map(str::to_string);
    assert!(restored_line.is_some(), "{}", agent.log());
    assert!(
        !agent.log().contains(&format!("vm=hearth-{first} snapshot")),
        "the first VM booted"
    );
    let identity = "hostname; cat /etc/machine-id; sudo -n cat /etc/ssh/ssh_host_ed25519_key.pub";
    let (a, b) = (
        exec_trimmed(&server, &token, &first, identity).await,
        exec_trimmed(&server, &token, &second, identity).await,
    );
    let (a, b): (Vec<&str>, Vec<&str>) = (a.lines().collect(), b.lines().collect());
    let slug = server
        .call(
            "GET",
            &format!("/v1/environments/{second}"),
            Some(&token),
            None,
        )
        .await
        .body["slug"]
        .as_str()
        .unwrap()
        .replace('_', "-");
    assert_eq!(b[0], slug, "the restored VM's hostname");
    for field in 0..3 {
        assert_ne!(a[field], b[field], "line {field} of {a:?} and {b:?}");
    }
    for id in [&first, &second] {
        server.destroy(&token, id, UP).await;
        assert_eq!(qemu_of(id), 0);
    }
}

/// Users' snapshots on an agent host: the VM's disk copied whole and its memory saved while
/// it runs (paused meanwhile, resumed after, and running all along for the control plane).
/// An environment made from it and a fork of the running source, both of the same size,
/// are restored from the saved memory: they have what was written, to the disk (the guest
/// synced first) and to tmpfs (in memory only), and the source's process runs on in them,
/// each with an identity of its own. Deleting the snapshot frees its place at once while the
/// file stays for the VM made from it, and goes with that VM.
#[tokio::test]
async fn snapshots_and_forks_on_an_agent_host() {
    // The reconciler looks often: a snapshot's pause must not read as a stop.
    let site = agent_site(Site::new(Db::Sqlite).await).with_env("HEARTH_REAPER_INTERVAL_MS", "100");
    let server = site.start().await;
    let t = join_token(&server, "vm-snap").await;
    let agent = Agent::start(&server, &t);
    wait_health(&server, "vm-snap", "healthy", &agent).await;
    let token = server.user("vm-snap@example.com", "pro").await;
    let shape = json!({"vcpus": 1, "memoryMb": 512, "diskGb": 2});
    let create = |body: Value| {
        let (server, token, agent) = (&server, &token, &agent);
        async move {
            let r = server
                .call("POST", "/v1/environments", Some(token), Some(body))
                .await;
            assert_eq!(r.status, StatusCode::ACCEPTED, "{:?}", r.body);
            let id = r.body["id"].as_str().unwrap().to_string();
            wait_running_or_log(server, token, &id, agent).await;
            id
        }
    };
    let identity = "hostname; cut -d' ' -f2 /etc/ssh/ssh_host_ed25519_key.pub; cat /etc/machine-id; cat ~/.ssh/authorized_keys";
    let mut body = shape.clone();
    body["name"] = json!("source");
    let a = create(body).await;
    // Written just before: still in the guest's page cache when the snapshot is asked for.
    exec_trimmed(
        &server,
        &token,
        &a,
        "echo kept > ~/made-before; echo in-memory > /dev/shm/note; \
         (setsid sleep 31337 </dev/null >/dev/null 2>&1 &)",
    )
    .await;
    let memory_kept = "cat /dev/shm/note; pgrep -c -f 'sleep 31337'";
    let a_identity = exec_trimmed(&server, &token, &a, identity).await;

    let r = server
        .call(
            "POST",
            &format!("/v1/environments/{a}/snapshots"),
            Some(&token),
            Some(json!({"name": "first"})),
        )
        .await;
    assert_eq!(
        r.status,
        StatusCode::CREATED,
        "{:?}\nagent log:\n{}",
        r.body,
        agent.log()
    );
    assert_eq!(r.body["state"], "ready");
    let memory_bytes = r.body["memoryBytes"].as_i64().unwrap();
    assert!(
        memory_bytes > 0 && r.body["sizeBytes"].as_i64().unwrap() > memory_bytes,
        "{:?}",
        r.body
    );
    let snapshot_id = r.body["id"].as_str().unwrap().to_string();
    assert!(agent.log().contains("snapshot taken"), "{}", agent.log());
    // The source was paused for the copy and runs again.
    assert_eq!(
        exec_trimmed(&server, &token, &a, "cat ~/made-before").await,
        "kept"
    );

    // A smaller disk than the one saved is refused at the request.
    let r = server
        .call(
            "POST",
            "/v1/environments",
            Some(&token),
            Some(json!({"name": "small", "snapshot": "first", "diskGb": 1})),
        )
        .await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST, "{:?}", r.body);
    assert!(r.body.to_string().contains("diskGb 2"), "{:?}", r.body);
    let mut body = shape.clone();
    body["name"] = json!("from snapshot");
    body["snapshot"] = json!("first");
    let b = create(body).await;
    assert_eq!(
        exec_trimmed(&server, &token, &b, "cat ~/made-before").await,
        "kept"
    );
    assert_eq!(
        exec_trimmed(&server, &token, &b, memory_kept).await,
        "in-memory\n1"
    );
    assert!(
        agent.log().contains("VM restored from a snapshot's memory"),
        "{}",
        agent.log()
    );
    let b_identity = exec_trimmed(&server, &token, &b, identity).await;
    for (field, (x, y)) in a_identity.lines().zip(b_identity.lines()).enumerate() {
        assert_ne!(
            x, y,
            "line {field} of the identities:\n{a_identity}\n{b_identity}"
        );
    }

    // A fork of the running source has what it has now.
    exec_trimmed(&server, &token, &a, "echo later > ~/made-later").await;
    let r = server
        .call(
            "POST",
            &format!("/v1/environments/{a}/fork"),
            Some(&token),
            Some(json!({"name": "fork"})),
        )
        .await;
    assert_eq!(r.status, StatusCode::ACCEPTED, "{:?}", r.body);
    let fork = r.body["id"].as_str().unwrap().to_string();
    wait_running_or_log(&server, &token, &fork, &agent).await;
    assert_eq!(
        exec_trimmed(&server, &token, &fork, "cat ~/made-before ~/made-later").await,
        "kept\nlater"
    );
    assert_eq!(
        exec_trimmed(&server, &token, &fork, memory_kept).await,
        "in-memory\n1"
    );

    // Deleted while `b` is made from it: gone from the lists at once, its file kept for
    // `b` (which still runs), and removed with `b`.
    let r = server
        .call("DELETE", "/v1/snapshots/first", Some(&token), None)
        .await;
    assert_eq!(r.status, StatusCode::OK, "{:?}", r.body);
    let listed = server
        .call("GET", "/v1/snapshots", Some(&token), None)
        .await
        .body;
    assert!(!listed.to_string().contains(&snapshot_id), "{listed}");
    let file = agent
        .dir
        .path()
        .join("state/snapshots")
        .join(&snapshot_id)
        .join("disk.qcow2");
    assert!(file.is_file(), "kept while a VM uses it");
    exec_trimmed(&server, &token, &b, "sync").await;
    for id in [&b, &fork, &a] {
        server.destroy(&token, id, UP).await;
        assert_eq!(qemu_of(id), 0);
    }
    assert!(!file.exists(), "removed with the last VM made from it");
}

/// A warm pool on an agent host (real QEMU under TCG): the pool fills; a create takes the
/// warm VM, which then holds only the environment's keys (real OpenSSH: the user's key in,
/// the pool key refused); stopped and started, it boots from its own disk and still does
/// (its config drive's pool key is applied on the VM's first boot only).
#[tokio::test]
async fn a_warm_pool_on_an_agent_host() {
    let site = agent_site(Site::new(Db::Sqlite).await);
    let server = site.start().await;
    let t = join_token(&server, "vm-p").await;
    let agent = Agent::start(&server, &t);
    let host = wait_health(&server, "vm-p", "healthy", &agent).await;
    let host_id = host["id"].as_str().unwrap().to_string();
    let shape = json!({"vcpus": 1, "memoryMb": 512, "diskGb": 2});
    server.set_pool(&host_id, shape.clone(), 1).await;
    server.wait_pool(1, UP).await;
    let store = site.store().await;
    let pooled = store.pooled_on_host(&host_id).await.unwrap();
    assert_eq!(pooled.len(), 1);
    let master = hearth_guest::MasterKey::parse(
        &std::fs::read_to_string(site.data_dir().join("master.key")).unwrap(),
    )
    .unwrap();
    let keys = tempfile::tempdir().unwrap();
    let pool_key = write_key(
        keys.path(),
        "pool",
        &master.open(&pooled[0].ssh_private_key_enc).unwrap(),
    );
    let user_key = keys.path().join("user");
    let made = Command::new("ssh-keygen")
        .args(["-q", "-t", "ed25519", "-N", "", "-C", "warm-user", "-f"])
        .arg(&user_key)
        .output()
        .unwrap();
    assert!(made.status.success(), "{made:?}");
    let user_public = std::fs::read_to_string(user_key.with_extension("pub")).unwrap();

    let token = server.user("warm@example.com", "pro").await;
    let mut body = shape.clone();
    body["name"] = json!("warm");
    body["sshPublicKey"] = json!(user_public.trim());
    let id = server.create(&token, body).await;
    assert_eq!(id, pooled[0].id, "the create took the warm VM");
    wait_running_or_log(&server, &token, &id, &agent).await;
    let env = server.wait_env(&token, &id, "running", UP).await;
    let port = env["sshPort"].as_i64().unwrap();
    let pool_public = pooled[0].ssh_public_key.trim().to_string();
    for round in ["claimed", "restarted"] {
        let authorized = exec_trimmed(&server, &token, &id, "cat ~/.ssh/authorized_keys").await;
        assert!(!authorized.contains(&pool_public), "{round}: {authorized}");
        assert!(
            authorized.contains(user_public.trim()),
            "{round}: {authorized}"
        );
        let port = server
            .call("GET", &format!("/v1/environments/{id}"), Some(&token), None)
            .await
            .body["sshPort"]
            .as_i64()
            .unwrap_or(port);
        assert_eq!(
            openssh(&user_key, port, "echo in").await.as_deref(),
            Ok("in"),
            "{round}"
        );
        let refused = openssh(&pool_key, port, "true").await;
        assert!(
            matches!(&refused, Err(e) if e.contains("Permission denied")),
            "{round}: the pool key still works: {refused:?}"
        );
        if round == "claimed" {
            for (action, state) in [("stop", "stopped"), ("start", "running")] {
                server
                    .call(
                        "POST",
                        &format!("/v1/environments/{id}/{action}"),
                        Some(&token),
                        None,
                    )
                    .await;
                if state == "running" {
                    wait_running_or_log(&server, &token, &id, &agent).await;
                } else {
                    server.wait_env(&token, &id, state, UP).await;
                }
            }
        }
    }
    server.destroy(&token, &id, UP).await;
    assert_eq!(qemu_of(&id), 0);
}

/// A custom image for VMs (`"provider": "agent"`), real QEMU under TCG: built from a
/// Dockerfile on a Docker host, its file system becomes a VM's root file system on the agent
/// host; an environment of it has the package and the file the Dockerfile put there and lets
/// `dev` in. One without what a VM needs is refused with the reason. Deleted while a VM uses
/// it, its file stays on the agent until that VM goes; nothing is left on the builder.
#[tokio::test]
async fn a_custom_image_on_an_agent_host() {
    let site = agent_site(Site::new(Db::Sqlite).await);
    let server = site.start().await;
    let t = join_token(&server, "vm-images").await;
    let agent = Agent::start(&server, &t);
    let agent_host = wait_health(&server, "vm-images", "healthy", &agent).await;
    add_builder(&server, &agent).await;
    let token = server.user("vm-images@example.com", "pro").await;

    let r = server
        .call(
            "POST",
            "/v1/images",
            Some(&token),
            Some(json!({
                "name": "vm-jq", "provider": "agent",
                // The filler makes its file system larger than the smallest disk (1 GB).
                // `ping` keeps raw sockets by a file capability alone (not setuid).
                "dockerfile": "FROM hearth/base:latest\nRUN apt-get update && apt-get install -y --no-install-recommends jq iputils-ping libcap2-bin && rm -rf /var/lib/apt/lists/*\nRUN chmod u-s /usr/bin/ping && setcap cap_net_raw+ep /usr/bin/ping\nRUN echo built > /etc/vm-marker && head -c 700000000 /dev/zero > /filler\n",
            })),
        )
        .await;
    assert_eq!(
        r.status,
        StatusCode::CREATED,
        "{:?}\nagent log:\n{}",
        r.body,
        agent.log()
    );
    assert_eq!(r.body["hostId"], agent_host["id"], "{:?}", r.body);
    assert_eq!(r.body["state"], "ready");
    let min_disk = r.body["minDiskGb"].as_i64().unwrap();
    assert!(min_disk >= 2, "{:?}", r.body);
    let image_id = r.body["id"].as_str().unwrap().to_string();
    let file = agent
        .dir
        .path()
        .join("state/images")
        .join(&image_id)
        .join("rootfs.ext4");
    assert!(file.is_file(), "the agent keeps it");
    let left = Command::new("docker")
        .args(["images", "-q", &format!("hearth-image:{image_id}-vm")])
        .output()
        .unwrap();
    assert!(left.stdout.is_empty(), "the builder keeps nothing");

    // It runs on agent hosts only.
    let r = server
        .call(
            "POST",
            "/v1/environments",
            Some(&token),
            Some(json!({"name": "wrong kind", "baseImage": "vm-jq", "provider": "docker"})),
        )
        .await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST, "{:?}", r.body);
    assert!(
        r.body.to_string().contains("for provider agent"),
        "{:?}",
        r.body
    );
    // A disk smaller than its file system is refused at the request.
    let mut body = json!({"name": "of the image", "baseImage": "vm-jq", "vcpus": 1, "memoryMb": 512, "diskGb": min_disk - 1});
    let r = server
        .call("POST", "/v1/environments", Some(&token), Some(body.clone()))
        .await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST, "{:?}", r.body);
    assert!(
        r.body
            .to_string()
            .contains(&format!("ask for diskGb {min_disk}")),
        "{:?}",
        r.body
    );
    body["diskGb"] = json!(min_disk);
    let id = server.create(&token, body).await;
    wait_running_or_log(&server, &token, &id, &agent).await;
    assert_eq!(
        exec_trimmed(
            &server,
            &token,
            &id,
            "jq -n '1+1'; cat /etc/vm-marker; id -un; test -e /.dockerenv || echo no-dockerenv; \
             ping -c 1 -W 5 127.0.0.1 > /dev/null && echo pinged"
        )
        .await,
        "2\nbuilt\ndev\nno-dockerenv\npinged"
    );

    // What a VM's init needs is checked before any VM boots, and the reason given.
    let r = server
        .call(
            "POST",
            "/v1/images",
            Some(&token),
            Some(json!({
                "name": "vm-no-dev", "provider": "agent",
                "dockerfile": "FROM hearth/base:latest\nRUN userdel -r dev\n",
            })),
        )
        .await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST, "{:?}", r.body);
    assert!(r.body.to_string().contains("no user dev"), "{:?}", r.body);
    let r = server.call("GET", "/v1/images", Some(&token), None).await;
    assert!(!r.body.to_string().contains("vm-no-dev"), "{:?}", r.body);

    // A `docker save` tarball becomes an image for VMs the same way (loaded on the builder).
    let saved = tempfile::tempdir().unwrap();
    let tarball = saved.path().join("base.tar");
    assert!(
        Command::new("docker")
            .args(["save", "-o"])
            .arg(&tarball)
            .arg("hearth/base:latest")
            .status()
            .unwrap()
            .success()
    );
    let r = reqwest::Client::new()
        .post(format!(
            "{}/v1/images/import?name=vm-saved&provider=agent",
            server.base
        ))
        .bearer_auth(&token)
        .header("content-type", "application/x-tar")
        .body(std::fs::read(&tarball).unwrap())
        .send()
        .await
        .unwrap();
    let status = r.status();
    let body: Value = r.json().await.unwrap();
    assert_eq!(
        status,
        StatusCode::CREATED,
        "{body:?}\nagent log:\n{}",
        agent.log()
    );
    assert_eq!(body["hostId"], agent_host["id"], "{body:?}");
    let saved_id = body["id"].as_str().unwrap();
    assert!(
        agent
            .dir
            .path()
            .join("state/images")
            .join(saved_id)
            .join("rootfs.ext4")
            .is_file()
    );
    let uploads: Vec<_> = std::fs::read_dir(site.data_dir().join("imports"))
        .map(|d| d.flatten().map(|e| e.path()).collect())
        .unwrap_or_default();
    assert!(uploads.is_empty(), "uploads left: {uploads:?}");
    let left = Command::new("docker")
        .args(["images", "-q", &format!("hearth-image:{saved_id}-vm")])
        .output()
        .unwrap();
    assert!(left.stdout.is_empty(), "the builder keeps nothing");

    // Deleted while the VM runs: gone from the list, its file kept until the VM goes.
    let r = server
        .call("DELETE", "/v1/images/vm-jq", Some(&token), None)
        .await;
    assert_eq!(r.status, StatusCode::OK, "{:?}", r.body);
    assert!(file.is_file(), "kept while a VM uses it");
    exec_trimmed(&server, &token, &id, "sync").await;
    server.destroy(&token, &id, UP).await;
    assert!(!file.exists(), "removed with the last VM made from it");
}

/// Registers this machine's Docker engine as a host, where images for VMs are built.
async fn add_builder(server: &Server, agent: &Agent) {
    let r = server
        .call(
            "POST",
            "/v1/admin/hosts",
            Some(&server.admin_token),
            Some(json!({
                "name": "builder", "kind": "docker", "endpoint": "unix:///var/run/docker.sock",
                "maxVcpus": 8, "maxMemoryMb": 8192,
            })),
        )
        .await;
    assert_eq!(r.status, StatusCode::CREATED, "{:?}", r.body);
    wait_health(server, "builder", "healthy", agent).await;
}

/// kill -9 of the node while it exports an image's file system for an agent host: once its
/// builder counts as lost, the restarted node's reaper leaves nothing of it: no record, no
/// build and no export container on the Docker host, no file on the node or the agent.
#[tokio::test]
async fn a_node_killed_while_it_makes_an_image_for_vms_leaves_nothing() {
    let site = agent_site(Site::new(Db::Sqlite).await);
    let server = site.start().await;
    let t = join_token(&server, "vm-killed").await;
    let agent = Agent::start(&server, &t);
    wait_health(&server, "vm-killed", "healthy", &agent).await;
    add_builder(&server, &agent).await;
    let token = server.user("vm-killed@example.com", "pro").await;
    let request = {
        let (base, token) = (server.base.clone(), token.clone());
        tokio::spawn(async move {
            reqwest::Client::new()
                .post(format!("{base}/v1/images"))
                .bearer_auth(token)
                .json(&json!({
                    "name": "vm-big", "provider": "agent",
                    "dockerfile": "FROM hearth/base:latest\nRUN head -c 300000000 /dev/urandom > /filler\n",
                }))
                .send()
                .await
        })
    };
    // The export has begun once the node writes the file system to its disk.
    let imports = site.data_dir().join("imports");
    let started = Instant::now();
    let image_id = loop {
        let exporting = std::fs::read_dir(&imports)
            .into_iter()
            .flatten()
            .flatten()
            .find_map(|e| {
                e.file_name()
                    .to_string_lossy()
                    .strip_suffix(".rootfs.tar")
                    .map(str::to_string)
            });
        if let Some(id) = exporting {
            break id;
        }
        assert!(
            started.elapsed() < Duration::from_secs(180),
            "the export never began"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    server.kill();
    let _ = request.await;
    let staged = format!("hearth-image:{image_id}-vm");
    let docker_has = |args: &[&str]| {
        let out = Command::new("docker").args(args).output().unwrap();
        !String::from_utf8_lossy(&out.stdout).trim().is_empty()
    };
    assert!(
        docker_has(&["images", "-q", &staged]),
        "the kill left the build"
    );

    let site = site
        .with_env("HEARTH_IMAGE_BUILDER_LOST_MS", "1000")
        .with_env("HEARTH_REAPER_INTERVAL_MS", "200");
    let server = site.start().await;
    let export_container = format!("name=^hearth-export-hearth-image-{image_id}-vm$");
    let started = Instant::now();
    loop {
        let listed = server.call("GET", "/v1/images", Some(&token), None).await;
        let left = [
            listed.body.to_string().contains(&image_id),
            docker_has(&["images", "-q", &staged]),
            docker_has(&["ps", "-aq", "--filter", &export_container]),
            std::fs::read_dir(&imports)
                .map(|d| d.count() > 0)
                .unwrap_or(false),
            std::fs::read_dir(agent.dir.path().join("state/images"))
                .map(|d| d.count() > 0)
                .unwrap_or(false),
        ];
        if left == [false; 5] {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "left after the builder was lost (record, build, export container, node file, agent file): {left:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}
