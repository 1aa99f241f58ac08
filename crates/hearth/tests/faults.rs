//! Reliability under faults and ordinary load: the reconciler beside busy environments,
//! a Docker engine that goes away for 45 s, PostgreSQL cut off.

mod common;

use common::engine::Engine;
use common::*;
use reqwest::StatusCode;
use serde_json::json;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

const UP: Duration = Duration::from_secs(120);

async fn wait_state(server: &Server, token: &str, id: &str, state: &str) {
    let r = server
        .call(
            "GET",
            &format!("/v1/environments/{id}/wait?state={state}&timeoutSeconds=60"),
            Some(token),
            None,
        )
        .await;
    assert_eq!(
        r.status,
        StatusCode::OK,
        "{id} never became {state}: {:?}",
        r.body
    );
}

/// Environments that cycle stop/start and destroy/create while the reconciler runs every
/// 100 ms: nothing happens behind Hearth's back, so any action of the reconciler is false.
/// Then, as a control, one VM is removed behind Hearth's back (`remove`): the reconciler
/// must notice that one, and only that one.
async fn churn<F: Fn(&str)>(site: Site, cycles: usize, body: serde_json::Value, remove: F) {
    let server = Arc::new(site.start().await);
    let token = server.user("churn@example.com", "unlimited").await;
    let id = server.user_id("churn@example.com").await;
    let quota = json!({"maxEnvironments": 100, "maxConcurrentEnvironments": 100, "maxVcpus": 1000, "maxMemoryMb": 1000000});
    server
        .patch(
            &format!("/v1/admin/users/{id}"),
            &server.admin_token,
            json!({"quota": quota}),
        )
        .await;
    let done = Arc::new(AtomicUsize::new(0));
    let mut tasks = Vec::new();
    for i in 0..6 {
        let (server, token, done, body) =
            (server.clone(), token.clone(), done.clone(), body.clone());
        tasks.push(tokio::spawn(async move {
            let mut id = server.create(&token, body.clone()).await;
            wait_state(&server, &token, &id, "running").await;
            while done.load(Ordering::SeqCst) < cycles {
                if i % 2 == 0 {
                    server
                        .call(
                            "POST",
                            &format!("/v1/environments/{id}/stop"),
                            Some(&token),
                            None,
                        )
                        .await;
                    wait_state(&server, &token, &id, "stopped").await;
                    server
                        .call(
                            "POST",
                            &format!("/v1/environments/{id}/start"),
                            Some(&token),
                            None,
                        )
                        .await;
                    wait_state(&server, &token, &id, "running").await;
                } else {
                    server
                        .call(
                            "DELETE",
                            &format!("/v1/environments/{id}"),
                            Some(&token),
                            None,
                        )
                        .await;
                    wait_state(&server, &token, &id, "destroyed").await;
                    id = server.create(&token, body.clone()).await;
                    wait_state(&server, &token, &id, "running").await;
                }
                done.fetch_add(1, Ordering::SeqCst);
            }
            server
                .call(
                    "DELETE",
                    &format!("/v1/environments/{id}"),
                    Some(&token),
                    None,
                )
                .await;
            wait_state(&server, &token, &id, "destroyed").await;
        }));
    }
    let started = Instant::now();
    for t in tasks {
        t.await.unwrap();
    }
    let n = done.load(Ordering::SeqCst);
    eprintln!("{n} cycles in {:?}", started.elapsed());
    let audit = server
        .call(
            "GET",
            "/v1/admin/audit?actor=system:reconciler&limit=1000",
            Some(&server.admin_token),
            None,
        )
        .await;
    let actions = audit.body["items"].as_array().unwrap();
    assert!(
        actions.is_empty(),
        "false actions by the reconciler in {n} cycles: {actions:?}"
    );
    let orphans = server
        .call(
            "GET",
            "/v1/admin/audit?action=orphan_removed",
            Some(&server.admin_token),
            None,
        )
        .await;
    assert!(orphans.body["items"].as_array().unwrap().is_empty());

    let control = server.create(&token, body.clone()).await;
    wait_state(&server, &token, &control, "running").await;
    remove(&control);
    let env = server
        .wait_env(&token, &control, "error", Duration::from_secs(30))
        .await;
    assert!(
        env["stateMessage"].as_str().unwrap().contains("vanished"),
        "{env:?}"
    );
    let audit = server
        .call(
            "GET",
            "/v1/admin/audit?actor=system:reconciler&limit=1000",
            Some(&server.admin_token),
            None,
        )
        .await;
    let actions = audit.body["items"].as_array().unwrap();
    assert!(
        actions
            .iter()
            .all(|a| a["environmentId"] == control.as_str()),
        "{actions:?}"
    );
    server
        .call(
            "DELETE",
            &format!("/v1/environments/{control}"),
            Some(&token),
            None,
        )
        .await;
    wait_state(&server, &token, &control, "destroyed").await;
}

#[tokio::test]
async fn the_reconciler_takes_no_false_action_in_a_thousand_cycles() {
    let site = Site::new(Db::Sqlite)
        .await
        .with_env("VM_PROVIDER", "sim")
        .with_env("HEARTH_REAPER_INTERVAL_MS", "100")
        .with_env("HEARTH_PROVISION_CONCURRENCY", "8");
    let server = site.start().await;
    let r = server.call("POST", "/v1/admin/hosts", Some(&server.admin_token), Some(json!({
        "name": "busy", "kind": "sim", "maxVcpus": 1000, "maxMemoryMb": 1000000, "options": {"latencyMs": 3}
    }))).await;
    assert_eq!(r.status, StatusCode::CREATED, "{:?}", r.body);
    server.kill();
    let store = site.store().await;
    let remove = |id: &str| {
        let (store, id) = (store.clone(), id.to_string());
        let handle = tokio::runtime::Handle::current();
        std::thread::spawn(move || {
            handle.block_on(async {
                let vm = store.sim_vms_of(&id).await.unwrap().pop().unwrap();
                store.sim_set_state(&vm.vm_id, "destroyed").await.unwrap();
            })
        })
        .join()
        .unwrap();
    };
    churn(
        site,
        1000,
        json!({"name": "churn", "vcpus": 1, "memoryMb": 256}),
        remove,
    )
    .await;
}

#[tokio::test]
async fn the_reconciler_leaves_busy_docker_environments_alone() {
    let site = Site::new(Db::Postgres)
        .await
        .with_env("HEARTH_REAPER_INTERVAL_MS", "100");
    let remove = |id: &str| {
        let out = std::process::Command::new("docker")
            .args(["rm", "-f", &format!("hearth-{id}")])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    churn(
        site,
        36,
        json!({"name": "churn", "vcpus": 1, "memoryMb": 256}),
        remove,
    )
    .await;
}

/// A 45 s outage of a Docker engine during a provision and during a stop: both jobs wait for
/// it (no `error`, no attempt spent), usage counts what exists throughout, and both finish
/// when the engine is back. The engine is a second one the test starts, not the shared one.
#[tokio::test]
async fn a_docker_outage_is_ridden_out() {
    let mut engine = Engine::start(43, false);
    engine.load_image("hearth/base:latest");
    let site = Site::new(Db::Sqlite)
        .await
        .with_env("HEARTH_HOST_CHECK_INTERVAL_MS", "500")
        .with_env("HEARTH_HOST_UNHEALTHY_AFTER_MS", "5000");
    let server = site.start().await;
    let r = server.call("POST", "/v1/admin/hosts", Some(&server.admin_token), Some(json!({
        "name": "outage", "kind": "docker", "endpoint": engine.socket, "region": "out", "maxVcpus": 32, "maxMemoryMb": 32768,
        "options": engine.options(),
    }))).await;
    assert_eq!(r.status, StatusCode::CREATED, "{:?}", r.body);
    let token = server.user("outage@example.com", "pro").await;
    let stopping = server
        .create(
            &token,
            json!({"name": "to stop", "memoryMb": 256, "region": "out"}),
        )
        .await;
    wait_state(&server, &token, &stopping, "running").await;

    engine.stop();
    let outage = Instant::now();
    let provisioning = server
        .create(
            &token,
            json!({"name": "to make", "memoryMb": 256, "region": "out"}),
        )
        .await;
    server
        .call(
            "POST",
            &format!("/v1/environments/{stopping}/stop"),
            Some(&token),
            None,
        )
        .await;
    wait_state(&server, &token, &stopping, "stopping").await;
    while outage.elapsed() < Duration::from_secs(45) {
        for (id, want) in [(&provisioning, "provisioning"), (&stopping, "stopping")] {
            let env = server
                .call("GET", &format!("/v1/environments/{id}"), Some(&token), None)
                .await
                .body;
            assert!(
                env["state"] == want || (want == "provisioning" && env["state"] == "requested"),
                "{id} gave up during the outage: {env:?}"
            );
        }
        let me = server.call("GET", "/v1/me", Some(&token), None).await.body;
        assert_eq!(
            me["usage"]["concurrentEnvironments"], 2,
            "both still count: {me:?}"
        );
        tokio::time::sleep(Duration::from_secs(3)).await;
    }
    let jobs = site
        .store()
        .await
        .list_jobs(None, None, 1000)
        .await
        .unwrap()
        .0;
    assert!(
        jobs.iter()
            .filter(|j| j.state == hearth_store::JobState::Queued)
            .all(|j| j.attempts == 0),
        "attempts spent: {jobs:?}"
    );
    assert!(
        site.log().contains("waiting up to 300 s for the host"),
        "the log says what it waits for"
    );
    engine.restart();
    wait_state(&server, &token, &provisioning, "running").await;
    wait_state(&server, &token, &stopping, "stopped").await;
    assert!(engine.running(&provisioning) && !engine.running(&stopping));
    let r = server
        .call(
            "POST",
            &format!("/v1/environments/{provisioning}/exec"),
            Some(&token),
            Some(json!({"code": "echo made"})),
        )
        .await;
    assert_eq!(r.body["stdout"], "made\n", "{:?}", r.body);
    for id in [&provisioning, &stopping] {
        server
            .call(
                "DELETE",
                &format!("/v1/environments/{id}"),
                Some(&token),
                None,
            )
            .await;
    }
    for id in [&provisioning, &stopping] {
        server.wait_env(&token, id, "destroyed", UP).await;
        assert!(engine.containers_of(id).is_empty());
    }
}

/// A TCP proxy in front of PostgreSQL that the test can cut: every connection dropped,
/// new ones refused.
struct Proxy {
    port: u16,
    tasks: Arc<std::sync::Mutex<Vec<tokio::task::JoinHandle<()>>>>,
}

impl Proxy {
    async fn start(target: &str) -> Proxy {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let tasks: Arc<std::sync::Mutex<Vec<tokio::task::JoinHandle<()>>>> = Default::default();
        let target = target.to_string();
        let inner = tasks.clone();
        let accept = tokio::spawn(async move {
            loop {
                let Ok((mut client, _)) = listener.accept().await else {
                    return;
                };
                let target = target.clone();
                let conn = tokio::spawn(async move {
                    if let Ok(mut upstream) = tokio::net::TcpStream::connect(&target).await {
                        let _ = tokio::io::copy_bidirectional(&mut client, &mut upstream).await;
                    }
                });
                inner.lock().unwrap().push(conn);
            }
        });
        tasks.lock().unwrap().push(accept);
        Proxy { port, tasks }
    }

    fn cut(&self) {
        for t in self.tasks.lock().unwrap().drain(..) {
            t.abort();
        }
    }
}

#[tokio::test]
async fn postgres_unreachable_fails_fast_and_says_so() {
    let url = hearth_store::testdb::fresh_postgres_url().await;
    let proxy = Proxy::start("127.0.0.1:5432").await;
    let proxied = url.replacen("127.0.0.1:5432", &format!("127.0.0.1:{}", proxy.port), 1);
    assert_ne!(proxied, url, "the test database must be on 127.0.0.1:5432");
    let mut site = Site::new(Db::Sqlite).await;
    site.database_url = proxied;
    let server = site.start().await;
    let token = server.user("pg@example.com", "free").await;
    assert_eq!(
        server.call("GET", "/readyz", None, None).await.status,
        StatusCode::OK
    );

    proxy.cut();
    let started = Instant::now();
    let ready = server.call("GET", "/readyz", None, None).await;
    let readiness = started.elapsed();
    assert_eq!(
        ready.status,
        StatusCode::SERVICE_UNAVAILABLE,
        "{:?}",
        ready.body
    );
    let started = Instant::now();
    let r = server
        .call("GET", "/v1/environments", Some(&token), None)
        .await;
    let request = started.elapsed();
    assert_eq!(r.status, StatusCode::SERVICE_UNAVAILABLE, "{:?}", r.body);
    assert!(
        r.body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("database"),
        "{:?}",
        r.body
    );
    eprintln!("PostgreSQL cut: /readyz answered in {readiness:?}, a request failed in {request:?}");
    // Stated bounds: readiness within 1 s, requests within 5 s (a little room for a busy machine).
    assert!(
        readiness < Duration::from_millis(1800),
        "/readyz took {readiness:?}"
    );
    assert!(
        request < Duration::from_millis(6500),
        "the request took {request:?}"
    );
}
