//! Hosts in the foundation, end to end with real Docker engines: installations that share
//! an engine, a node that must bring the installation's master key, and two separate
//! engines driven by two nodes.

mod common;

use common::engine::Engine;
use common::*;
use reqwest::StatusCode;
use serde_json::{Value, json};
use std::time::{Duration, Instant};

const UP: Duration = Duration::from_secs(120);

/// Removes every container of an installation when dropped (tests without HEARTH_INSTANCE
/// cannot count on `make`'s clean-up).
struct Sweep(String);

impl Drop for Sweep {
    fn drop(&mut self) {
        let out = std::process::Command::new("docker")
            .args([
                "ps",
                "-aq",
                "--filter",
                &format!("label=hearth.installation={}", self.0),
            ])
            .output()
            .unwrap();
        let ids: Vec<String> = String::from_utf8_lossy(&out.stdout)
            .lines()
            .map(str::to_string)
            .collect();
        if !ids.is_empty() {
            let _ = std::process::Command::new("docker")
                .args(["rm", "-f"])
                .args(&ids)
                .output();
        }
        for network in networks(&format!("label=hearth.installation={}", self.0)) {
            let _ = std::process::Command::new("docker")
                .args(["network", "rm", &network])
                .output();
        }
    }
}

#[tokio::test]
async fn two_installations_with_default_settings_share_an_engine() {
    let sites = [
        Site::new(Db::Sqlite)
            .await
            .default_settings()
            .with_env("HEARTH_REAPER_INTERVAL_MS", "300"),
        Site::new(Db::Sqlite)
            .await
            .default_settings()
            .with_env("HEARTH_REAPER_INTERVAL_MS", "300"),
    ];
    let mut servers = Vec::new();
    let mut sweeps = Vec::new();
    let mut envs = Vec::new();
    for site in &sites {
        let server = site.start().await;
        let installation = site.store().await.installation().await.unwrap().id;
        sweeps.push(Sweep(installation));
        let token = server.user("same@example.com", "pro").await;
        for name in ["one", "two"] {
            let id = server
                .create(&token, json!({"name": name, "memoryMb": 256}))
                .await;
            envs.push((servers.len(), token.clone(), id));
        }
        servers.push(server);
    }
    for (s, token, id) in &envs {
        servers[*s].wait_env(token, id, "running", UP).await;
    }
    let ids: Vec<String> = envs.iter().map(|(_, _, id)| id.clone()).collect();
    let installations: Vec<String> = sweeps.iter().map(|s| s.0.clone()).collect();
    assert_ne!(
        installations[0], installations[1],
        "each installation has its own identity"
    );
    // Three reaper intervals and then some: both reconcilers have looked at the engine.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    for (s, token, id) in &envs {
        let env = servers[*s]
            .call("GET", &format!("/v1/environments/{id}"), Some(token), None)
            .await
            .body;
        assert_eq!(env["state"], "running", "{id} was disturbed: {env:?}");
        assert_eq!(
            docker_inspect(&format!("hearth-{id}"), "{{.State.Running}}"),
            "true",
            "{id} was stopped or removed"
        );
        let r = servers[*s]
            .call(
                "POST",
                &format!("/v1/environments/{id}/exec"),
                Some(token),
                Some(json!({"code": "echo alive"})),
            )
            .await;
        assert_eq!(r.body["stdout"], "alive\n", "{:?}", r.body);
    }
    for (i, site) in sites.iter().enumerate() {
        assert!(
            !site.log().contains("belongs to no live environment"),
            "installation {i} removed another's VM"
        );
        let audit = servers[i]
            .call(
                "GET",
                "/v1/admin/audit?action=orphan_removed",
                Some(&servers[i].admin_token),
                None,
            )
            .await;
        assert_eq!(audit.body["items"].as_array().unwrap().len(), 0);
    }
    // Each container carries its own installation's id.
    for (s, _, id) in &envs {
        assert_eq!(
            docker_inspect(
                &format!("hearth-{id}"),
                "{{index .Config.Labels \"hearth.installation\"}}"
            ),
            installations[*s]
        );
    }
    for (s, token, id) in &envs {
        servers[*s]
            .call(
                "DELETE",
                &format!("/v1/environments/{id}"),
                Some(token),
                None,
            )
            .await;
    }
    for (s, token, id) in &envs {
        servers[*s].wait_env(token, id, "destroyed", UP).await;
    }
    assert!(ids.iter().all(|id| containers_of(id).is_empty()));
}

#[tokio::test]
async fn a_node_without_the_installations_key_refuses_to_start() {
    let site = Site::new(Db::Postgres).await;
    let first = site.start().await;
    let key = std::fs::read_to_string(site.data_dir().join("master.key")).unwrap();
    let token = first.user("keys@example.com", "pro").await;

    // No key at all: it must not make one of its own.
    let keyless = site.node();
    let (code, log) = keyless.start_refused();
    assert_ne!(code, 0);
    assert!(
        log.contains("no master key")
            && log.contains("master.key")
            && log.contains("HEARTH_MASTER_KEY"),
        "{log}"
    );
    assert!(
        !keyless.data_dir().join("master.key").exists(),
        "it made a key of its own"
    );
    // A wrong key: refused too, naming the fix.
    let wrong = site.node().with_env("HEARTH_MASTER_KEY", &"ab".repeat(32));
    let (code, log) = wrong.start_refused();
    assert_ne!(code, 0);
    assert!(
        log.contains("is not the key of installation") && log.contains("copy master.key"),
        "{log}"
    );

    // Given the key, it serves and runs jobs (the first node is gone).
    first.kill();
    let node = site.node().with_env("HEARTH_MASTER_KEY", key.trim());
    let second = node.start().await;
    let id = second
        .create(&token, json!({"name": "keyed", "memoryMb": 256}))
        .await;
    second.wait_env(&token, &id, "running", UP).await;
    let r = second
        .call(
            "POST",
            &format!("/v1/environments/{id}/exec"),
            Some(&token),
            Some(json!({"code": "echo sealed"})),
        )
        .await;
    assert_eq!(r.body["stdout"], "sealed\n", "{:?}", r.body);
    second.destroy(&token, &id, UP).await;
}

async fn host_health(server: &Server, id: &str) -> Value {
    server
        .call(
            "GET",
            &format!("/v1/admin/hosts/{id}"),
            Some(&server.admin_token),
            None,
        )
        .await
        .body
}

/// Engine 2 publishes its guests' ports on its own loopback address. Both engines share
/// this machine's ephemeral port range, so while engine 2 is down the main engine may hand
/// one of its ports to another container; on 127.0.0.1 that port would then answer for an
/// engine 2 guest (the pinned host key refuses it, as it should), on its own address it
/// cannot, as on two real machines.
const ENGINE_2_ADDRESS: &str = "127.0.0.2";

/// Two engines, two nodes, one PostgreSQL: environments land on their host's engine
/// whichever node runs the job; exec works from either node; an engine that stops turns
/// its host unhealthy without its VMs being judged; it comes back with them running.
#[tokio::test]
async fn two_engines_two_nodes() {
    let mut engine = Engine::start(41, true);
    engine.load_image("hearth/base:latest");
    let site = Site::new(Db::Postgres)
        .await
        .with_env(
            "HEARTH_MASTER_KEY",
            "000102030405060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1f",
        )
        .with_env("HEARTH_HOST_CHECK_INTERVAL_MS", "200")
        .with_env("HEARTH_HOST_UNHEALTHY_AFTER_MS", "1500")
        // The second engine's containers share the 2 cores with the QEMU tests' guests: its
        // sshd has taken over 30 s to answer in CI. This test is about placement, not speed.
        .with_env("HEARTH_SSH_WAIT_SECONDS", "120");
    let a = site.start().await;
    let admin = a.admin_token.clone();
    let hosts = a
        .call("GET", "/v1/admin/hosts", Some(&admin), None)
        .await
        .body;
    let local = hosts["items"][0]["id"].as_str().unwrap().to_string();

    // A host that does not answer is not added.
    let r = a.call("POST", "/v1/admin/hosts", Some(&admin), Some(json!({
        "name": "nowhere", "kind": "docker", "endpoint": "unix:///nonexistent.sock", "maxVcpus": 8, "maxMemoryMb": 8192,
    }))).await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST, "{:?}", r.body);
    assert!(
        r.body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("nothing was added")
    );
    let r = a.call("POST", "/v1/admin/hosts", Some(&admin), Some(json!({
        "name": "engine-2", "kind": "docker", "endpoint": engine.socket, "region": "two", "maxVcpus": 32, "maxMemoryMb": 32768,
        "options": engine.options(), "guestAddress": ENGINE_2_ADDRESS,
    }))).await;
    assert_eq!(r.status, StatusCode::CREATED, "{:?}", r.body);
    let second = r.body["id"].as_str().unwrap().to_string();
    assert_eq!(r.body["health"], "healthy");
    // One machine is one host: the same engine over TLS is refused while it is registered.
    let tls = engine.tls.as_ref().unwrap();
    let twin = json!({
        "name": "engine-2-tls", "kind": "docker", "endpoint": tls.endpoint, "region": "two", "maxVcpus": 32, "maxMemoryMb": 32768,
        "tlsCa": tls.ca, "tlsCert": tls.cert, "tlsKey": tls.key, "guestAddress": ENGINE_2_ADDRESS,
    });
    let r = a
        .call("POST", "/v1/admin/hosts", Some(&admin), Some(twin.clone()))
        .await;
    assert_eq!(r.status, StatusCode::CONFLICT, "{:?}", r.body);
    assert!(
        r.body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("same host as engine-2"),
        "{:?}",
        r.body
    );
    let regions = a.call("GET", "/v1/regions", None, None).await.body;
    assert_eq!(regions["items"], json!([{"id": "two", "hosts": 1}]));

    // Only node A exists: it runs the job, on engine 2.
    let token = a.user("hosts@example.com", "unlimited").await;
    let on_two = a
        .create(
            &token,
            json!({"name": "on two", "memoryMb": 256, "region": "two"}),
        )
        .await;
    a.wait_env(&token, &on_two, "running", UP).await;
    // Node B joins; A goes: B runs the next jobs, on both engines.
    let b = site.node().start().await;
    a.kill();
    let drained = b
        .call(
            "POST",
            &format!("/v1/admin/hosts/{second}/drain"),
            Some(&admin),
            None,
        )
        .await;
    assert_eq!(drained.body["status"], "draining");
    let on_one = b
        .create(&token, json!({"name": "on one", "memoryMb": 256}))
        .await;
    b.call(
        "POST",
        &format!("/v1/admin/hosts/{second}/ready"),
        Some(&admin),
        None,
    )
    .await;
    let also_two = b
        .create(
            &token,
            json!({"name": "also two", "memoryMb": 256, "region": "two"}),
        )
        .await;
    for id in [&on_one, &also_two] {
        b.wait_env(&token, id, "running", UP).await;
    }
    let host_of = |env: &Value| env["hostId"].as_str().unwrap().to_string();
    for (id, host) in [(&on_two, &second), (&also_two, &second), (&on_one, &local)] {
        let env = b
            .call("GET", &format!("/v1/environments/{id}"), Some(&token), None)
            .await
            .body;
        assert_eq!(&host_of(&env), host, "{env:?}");
        let on_engine_two = !engine.containers_of(id).is_empty();
        let on_shared = !containers_of(id).is_empty();
        assert_eq!(
            (on_engine_two, on_shared),
            (host == &second, host == &local),
            "{id} is on the wrong engine"
        );
    }
    // Exec works from either node (A is back).
    let a = site.start().await;
    for server in [&a, &b] {
        for id in [&on_two, &on_one] {
            let r = server
                .call(
                    "POST",
                    &format!("/v1/environments/{id}/exec"),
                    Some(&token),
                    Some(json!({"code": "hostname"})),
                )
                .await;
            assert_eq!(r.status, StatusCode::OK, "{:?}", r.body);
        }
    }

    // Engine 2 stops: its host is unhealthy within the stated time, nothing is judged.
    engine.stop();
    let stopped = Instant::now();
    loop {
        if host_health(&b, &second).await["health"] == "unhealthy" {
            break;
        }
        assert!(
            stopped.elapsed() < Duration::from_secs(10),
            "engine 2's host never turned unhealthy"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    eprintln!(
        "engine 2 stopped; its host unhealthy after {:?}",
        stopped.elapsed()
    );
    let fresh = b
        .create(
            &token,
            json!({"name": "while two is down", "memoryMb": 256}),
        )
        .await;
    let env = b.wait_env(&token, &fresh, "running", UP).await;
    assert_eq!(
        host_of(&env),
        local,
        "new environments go to the first host"
    );
    let r = b
        .call(
            "POST",
            "/v1/environments",
            Some(&token),
            Some(json!({"name": "wants two", "region": "two"})),
        )
        .await;
    assert_eq!(r.status, StatusCode::SERVICE_UNAVAILABLE, "{:?}", r.body);
    tokio::time::sleep(Duration::from_secs(2)).await; // several reconciler passes
    for id in [&on_two, &also_two] {
        let env = b
            .call("GET", &format!("/v1/environments/{id}"), Some(&token), None)
            .await
            .body;
        assert_eq!(
            env["state"], "running",
            "declared {:?} while its host could not be asked",
            env["stateMessage"]
        );
    }

    // Engine 2 returns: healthy again, its environments still running.
    engine.restart();
    let back = Instant::now();
    while host_health(&b, &second).await["health"] != "healthy" {
        assert!(
            back.elapsed() < Duration::from_secs(10),
            "engine 2's host never turned healthy again"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    for id in [&on_two, &also_two] {
        assert!(engine.running(id), "{id} stopped while its engine was away");
        // The daemon's port proxy died with it (Docker gives it PDEATHSIG) and is restored
        // as the daemon starts again; wait for it rather than assume when it is back.
        let env = b
            .call("GET", &format!("/v1/environments/{id}"), Some(&token), None)
            .await
            .body;
        let port = env["sshPort"].as_u64().expect("an SSH port") as u16;
        assert_eq!(env["sshHost"], ENGINE_2_ADDRESS);
        let waited = Instant::now();
        while std::net::TcpStream::connect((ENGINE_2_ADDRESS, port)).is_err() {
            assert!(
                waited.elapsed() < Duration::from_secs(30),
                "{id}'s SSH port {port} never came back after its engine restarted: {}\n{}",
                String::from_utf8_lossy(&engine.docker(&["port", &format!("hearth-{id}")]).stdout),
                engine
                    .log()
                    .lines()
                    .rev()
                    .take(40)
                    .collect::<Vec<_>>()
                    .join("\n")
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let r = a
            .call(
                "POST",
                &format!("/v1/environments/{id}/exec"),
                Some(&token),
                Some(json!({"code": "echo back"})),
            )
            .await;
        assert_eq!(r.body["stdout"], "back\n", "{:?}", r.body);
    }

    // The same engine over TCP with TLS, as a host replacing the unix socket one.
    for id in [&on_two, &also_two] {
        b.call(
            "DELETE",
            &format!("/v1/environments/{id}"),
            Some(&token),
            None,
        )
        .await;
    }
    for id in [&on_two, &also_two] {
        b.wait_env(&token, id, "destroyed", UP).await;
        assert!(engine.containers_of(id).is_empty());
    }
    let removed = b
        .call(
            "DELETE",
            &format!("/v1/admin/hosts/{second}"),
            Some(&admin),
            None,
        )
        .await;
    assert_eq!(removed.status, StatusCode::OK, "{:?}", removed.body);
    let r = b
        .call("POST", "/v1/admin/hosts", Some(&admin), Some(twin))
        .await;
    assert_eq!(r.status, StatusCode::CREATED, "{:?}", r.body);
    assert_eq!(r.body["tls"], true);
    assert!(
        !r.body.to_string().contains("PRIVATE KEY"),
        "the key never leaves the server"
    );
    let over_tls = b
        .create(
            &token,
            json!({"name": "over tls", "memoryMb": 256, "region": "two"}),
        )
        .await;
    b.wait_env(&token, &over_tls, "running", UP).await;
    assert_eq!(engine.containers_of(&over_tls).len(), 1);
    let r = a
        .call(
            "POST",
            &format!("/v1/environments/{over_tls}/exec"),
            Some(&token),
            Some(json!({"code": "echo tls"})),
        )
        .await;
    assert_eq!(r.body["stdout"], "tls\n", "{:?}", r.body);
    for id in [&over_tls, &on_one, &fresh] {
        b.call(
            "DELETE",
            &format!("/v1/environments/{id}"),
            Some(&token),
            None,
        )
        .await;
    }
    for id in [&over_tls, &on_one, &fresh] {
        b.wait_env(&token, id, "destroyed", UP).await;
    }
    assert!(engine.containers_of(&over_tls).is_empty() && containers_of(&on_one).is_empty());
}

/// Links made for a test, deleted when dropped.
struct Links(Vec<String>);

impl Drop for Links {
    fn drop(&mut self) {
        for link in &self.0 {
            let _ = std::process::Command::new("ip")
                .args(["link", "del", link])
                .output();
        }
    }
}

fn ip(args: &[&str]) {
    let out = std::process::Command::new("ip")
        .args(args)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "ip {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Docker checks a requested subnet only against its own networks. A bridge that another
/// program, or an engine that died, left on the machine with the same /29 takes the VM's
/// traffic: its SSH port never answers (this is how `two_engines_two_nodes` failed on a
/// machine where earlier runs' engines had left their bridges). On an engine of this
/// machine, Hearth skips the blocks the machine already routes.
#[tokio::test]
async fn vm_networks_avoid_ranges_this_machine_routes() {
    let site = Site::new(Db::Sqlite).await;
    let server = site.start().await;
    let admin = server.admin_token.clone();
    let hosts = server
        .call("GET", "/v1/admin/hosts", Some(&admin), None)
        .await
        .body;
    let local = hosts["items"][0]["id"].as_str().unwrap().to_string();
    // A pool of eight /29 blocks; seven of them are routed to other interfaces, up like
    // another program's, or left linkless like a dead engine's bridge.
    let r = server
        .patch(
            &format!("/v1/admin/hosts/{local}"),
            &admin,
            json!({"options": {"subnetPool": "10.215.7.0/26"}}),
        )
        .await;
    assert_eq!(r.status, StatusCode::OK, "{:?}", r.body);
    // A run killed before its clean-up may have left a network in the pool.
    for network in networks("label=hearth.managed=true") {
        if subnet_of(&network).starts_with("10.215.7.") {
            let _ = std::process::Command::new("docker")
                .args(["network", "rm", &network])
                .output();
        }
    }
    let free = 5;
    let mut links = Links(Vec::new());
    for block in (0..8).filter(|b| *b != free) {
        let link = format!("hst7b{block}");
        let _ = std::process::Command::new("ip")
            .args(["link", "del", &link])
            .output();
        if block % 2 == 0 {
            // A veth pair with both ends up: a live link, as another program's would be.
            let peer = format!("hst7p{block}");
            ip(&["link", "add", &link, "type", "veth", "peer", "name", &peer]);
            ip(&["link", "set", &peer, "up"]);
        } else {
            // A bridge without ports: its route is linkdown, and still taken.
            ip(&["link", "add", &link, "type", "bridge"]);
        }
        links.0.push(link.clone());
        ip(&[
            "addr",
            "add",
            &format!("10.215.7.{}/29", block * 8 + 1),
            "dev",
            &link,
        ]);
        ip(&["link", "set", &link, "up"]);
    }

    let token = server.user("routes@example.com", "unlimited").await;
    let r = server
        .call(
            "POST",
            "/v1/environments",
            Some(&token),
            Some(json!({"name": "routed", "memoryMb": 256})),
        )
        .await;
    assert_eq!(r.status, StatusCode::ACCEPTED, "{:?}", r.body);
    let id = r.body["id"].as_str().unwrap().to_string();
    let _sweep = Sweep(site.store().await.installation().await.unwrap().id);
    server.wait_env(&token, &id, "running", UP).await;
    assert_eq!(
        subnet_of(&format!("hearth-{id}")),
        format!("10.215.7.{}/29", free * 8)
    );
    let r = server
        .call(
            "POST",
            &format!("/v1/environments/{id}/exec"),
            Some(&token),
            Some(json!({"code": "echo alive"})),
        )
        .await;
    assert_eq!(r.body["stdout"], "alive\n", "{:?}", r.body);

    // The pool is now full: the next VM fails with what to do, and leaves no network.
    let r = server
        .call(
            "POST",
            "/v1/environments",
            Some(&token),
            Some(json!({"name": "no room", "memoryMb": 256})),
        )
        .await;
    assert_eq!(r.status, StatusCode::ACCEPTED, "{:?}", r.body);
    let full = r.body["id"].as_str().unwrap().to_string();
    let env = server.wait_env(&token, &full, "error", UP).await;
    assert!(
        env["stateMessage"]
            .as_str()
            .unwrap()
            .contains("no free /29 left in its subnet pool 10.215.7.0/26"),
        "{env:?}"
    );
    let no_network = |env: &str| networks(&format!("name=hearth-{env}")).is_empty();
    assert!(no_network(&full), "the refused VM left a network");
    for env in [&id, &full] {
        server
            .call(
                "DELETE",
                &format!("/v1/environments/{env}"),
                Some(&token),
                None,
            )
            .await;
    }
    let deadline = Instant::now() + UP;
    while !no_network(&id) {
        assert!(
            Instant::now() < deadline,
            "the VM's network was not removed"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// The local engine's networks that `filter` (`docker network ls --filter`) selects, by id.
fn networks(filter: &str) -> Vec<String> {
    let out = std::process::Command::new("docker")
        .args(["network", "ls", "-q", "--filter", filter])
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(str::to_string)
        .collect()
}

/// A local network's subnet, as `10.215.7.40/29`.
fn subnet_of(network: &str) -> String {
    let out = std::process::Command::new("docker")
        .args([
            "network",
            "inspect",
            network,
            "--format",
            "{{range .IPAM.Config}}{{.Subnet}}{{end}}",
        ])
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}
