//! Redis as the bus: wake-ups across nodes, and a Redis that goes away mid-run and comes
//! back (nothing lost, no restart). Two `hearth serve` on one PostgreSQL; one serves the
//! API only, the other runs every job and polls the database only every 20 s, so quick
//! progress there comes from Redis.

mod common;

use common::*;
use serde_json::json;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const MASTER_KEY: &str = "000102030405060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1f";

fn redis(port: u16) -> Child {
    let child = Command::new("redis-server")
        .args([
            "--port",
            &port.to_string(),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
        ])
        .stdout(Stdio::null())
        .spawn()
        .expect("redis-server (apt-get install redis-server; `make test` does)");
    for _ in 0..100 {
        if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    child
}

async fn create_and_wait(api: &Server, token: &str, name: &str) -> (String, Duration) {
    let started = Instant::now();
    let r = api
        .call(
            "POST",
            "/v1/environments",
            Some(token),
            Some(json!({"name": name, "memoryMb": 256})),
        )
        .await;
    let id = r.body["id"].as_str().unwrap().to_string();
    api.wait_env(token, &id, "running", Duration::from_secs(120))
        .await;
    (id, started.elapsed())
}

#[tokio::test]
async fn redis_wakes_other_nodes_and_its_loss_loses_nothing() {
    let port = free_port();
    let mut redis_server = redis(port);
    let url = format!("redis://127.0.0.1:{port}/");
    let site = Site::new(Db::Postgres)
        .await
        .with_env("HEARTH_MASTER_KEY", MASTER_KEY)
        .with_env("REDIS_URL", &url)
        .with_env("HEARTH_JOB_POLL_MS", "20000");
    let worker = site.start().await;
    let api_site = site.node().with_env("HEARTH_WORKERS", "0");
    let api = api_site.start().await;
    let ready = api.call("GET", "/readyz", None, None).await;
    assert_eq!(ready.body["redis"], "ok", "{:?}", ready.body);
    let token = api.user("bus@example.com", "pro").await;

    let (first, with_redis) = create_and_wait(&api, &token, "with redis").await;
    // The seed's log tail is in Redis too.
    let out = Command::new("redis-cli")
        .args([
            "-p",
            &port.to_string(),
            "LRANGE",
            &format!("provision-logs:{first}"),
            "0",
            "-1",
        ])
        .output()
        .unwrap();
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("provisioning complete"),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );

    redis_server.kill().unwrap();
    redis_server.wait().unwrap();
    let ready = api.call("GET", "/readyz", None, None).await;
    assert_eq!(
        ready.status,
        reqwest::StatusCode::OK,
        "Redis is optional: {:?}",
        ready.body
    );
    assert!(
        ready.body["redis"]
            .as_str()
            .unwrap()
            .contains("unreachable")
    );
    let (second, without_redis) = create_and_wait(&api, &token, "redis down").await;

    let mut redis_server = redis(port);
    // Give the nodes a moment to resubscribe (they retry every second).
    for _ in 0..100 {
        if api.call("GET", "/readyz", None, None).await.body["redis"] == "ok"
            && site.log().matches("listening on Redis").count() >= 2
        {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let (third, back) = create_and_wait(&api, &token, "redis back").await;
    eprintln!(
        "create to running: with Redis {with_redis:?}, Redis down {without_redis:?}, Redis back {back:?}"
    );

    let store = site.store().await;
    for id in [&first, &second, &third] {
        let jobs = store.jobs_for_environment(id).await.unwrap();
        assert!(
            jobs.iter()
                .all(|j| j.state == hearth_store::JobState::Succeeded),
            "{jobs:?}"
        );
        assert_eq!(containers_of(id).len(), 1);
        api.call(
            "DELETE",
            &format!("/v1/environments/{id}"),
            Some(&token),
            None,
        )
        .await;
    }
    for id in [&first, &second, &third] {
        api.wait_env(&token, id, "destroyed", Duration::from_secs(120))
            .await;
        assert!(containers_of(id).is_empty());
    }
    drop(worker);
    redis_server.kill().unwrap();
    let _ = redis_server.wait();
}
