//! Snapshots and forks through the real `hearth serve` and the real Docker engine: a file
//! written in an environment is in one made from its snapshot and in a fork, which each
//! have an identity of their own; the tier's count holds and deleting frees it.

mod common;

use common::*;
use reqwest::StatusCode;
use serde_json::{Value, json};
use std::time::Duration;

const UP: Duration = Duration::from_secs(120);

async fn take(server: &Server, token: &str, env: &str, name: &str) -> (StatusCode, Value) {
    let r = server
        .call(
            "POST",
            &format!("/v1/environments/{env}/snapshots"),
            Some(token),
            Some(json!({ "name": name })),
        )
        .await;
    (r.status, r.body)
}

/// What the guest says of itself: its files, hostname, host key and authorized keys.
async fn identity(server: &Server, token: &str, id: &str) -> (String, String, String) {
    let out = exec_ok(
        server,
        token,
        id,
        "hostname; cut -d' ' -f2 /etc/ssh/ssh_host_ed25519_key.pub; cat ~/.ssh/authorized_keys",
    )
    .await;
    let mut lines = out.lines();
    let hostname = lines.next().unwrap().to_string();
    let host_key = lines.next().unwrap().to_string();
    let keys: Vec<&str> = lines.collect();
    (hostname, host_key, keys.join("\n"))
}

/// Every snapshot image in the engine, tagged or not, by the snapshot id on its label.
fn snapshot_images() -> Vec<String> {
    let out = std::process::Command::new("docker")
        .args([
            "images",
            "-a",
            "--filter",
            "label=hearth.snapshot",
            "--format",
            "{{.Label \"hearth.snapshot\"}}",
        ])
        .output()
        .unwrap();
    let mut ids: Vec<String> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(str::to_string)
        .collect();
    ids.sort();
    ids.dedup();
    ids
}

#[tokio::test]
async fn snapshots_and_forks_on_docker() {
    let site = Site::new(Db::Sqlite)
        .await
        .with_env("HEARTH_REAPER_INTERVAL_MS", "500");
    let server = site.start().await;
    let token = server.user("snap@example.com", "free").await;
    let uid = server.user_id("snap@example.com").await;
    let quota = json!({"maxEnvironments": 6, "maxConcurrentEnvironments": 6, "maxVcpus": 12, "maxMemoryMb": 8192, "maxDiskGb": 60});
    let r = server
        .patch(
            &format!("/v1/admin/users/{uid}"),
            &server.admin_token,
            json!({ "quota": quota }),
        )
        .await;
    assert_eq!(r.status, StatusCode::OK, "{:?}", r.body);
    let shape = json!({"vcpus": 1, "memoryMb": 512, "diskGb": 2});
    let mut body = shape.clone();
    body["name"] = json!("source");
    body["environmentVars"] = json!({"SECRET": "s3cr3t-value"});
    let a = server.create(&token, body).await;
    server.wait_env(&token, &a, "running", UP).await;
    exec_ok(&server, &token, &a, "echo kept > ~/made-before").await;
    let (a_name, a_host_key, a_keys) = identity(&server, &token, &a).await;

    // A snapshot: ready when the call answers, sized, listed.
    let (status, first) = take(&server, &token, &a, "first").await;
    assert_eq!(status, StatusCode::CREATED, "{first}");
    assert_eq!(first["state"], "ready");
    assert!(first["sizeBytes"].as_i64().unwrap() > 0, "{first}");
    let listed = server
        .call("GET", "/v1/snapshots", Some(&token), None)
        .await
        .body;
    assert_eq!(listed["items"].as_array().unwrap().len(), 1, "{listed}");
    // The image keeps nothing of the source's variables.
    let image = format!("hearth-snapshot:{}", first["id"].as_str().unwrap());
    let env_of_image = docker_inspect(&image, "{{json .Config.Env}}");
    assert!(!env_of_image.contains("s3cr3t"), "{env_of_image}");
    // Bad input changes nothing: a taken name, someone else's environment, no snapshot.
    let (status, body) = take(&server, &token, &a, "first").await;
    assert_eq!(status, StatusCode::CONFLICT, "{body}");
    let other = server.user("other@example.com", "free").await;
    let (status, _) = take(&server, &other, &a, "theirs").await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    let r = server
        .call(
            "POST",
            "/v1/environments",
            Some(&token),
            Some(json!({"name": "x", "snapshot": "nope"})),
        )
        .await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST, "{:?}", r.body);

    // A new environment from it has the file, and an identity of its own.
    let mut body = shape.clone();
    body["name"] = json!("from snapshot");
    body["snapshot"] = json!("first");
    let b = server.create(&token, body).await;
    let b_view = server.wait_env(&token, &b, "running", UP).await;
    assert_eq!(
        exec_ok(&server, &token, &b, "cat ~/made-before").await,
        "kept\n"
    );
    let (b_name, b_host_key, b_keys) = identity(&server, &token, &b).await;
    assert_eq!(b_name, b_view["slug"].as_str().unwrap().replace('_', "-"));
    assert_ne!(b_name, a_name);
    assert_ne!(b_host_key, a_host_key, "a new host key");
    assert_ne!(b_keys, a_keys, "its own authorized keys");
    assert!(
        !b_keys.contains(a_keys.lines().next().unwrap()),
        "none of the source's keys"
    );
    assert_eq!(
        exec_ok(&server, &token, &b, "printenv SECRET || echo unset").await,
        "unset\n"
    );

    // A fork of the running source has what it has now.
    exec_ok(&server, &token, &a, "echo later > ~/made-later").await;
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
    assert_eq!(
        (r.body["vcpus"].as_i64(), r.body["memoryMb"].as_i64()),
        (Some(1), Some(512)),
        "the source's size"
    );
    server.wait_env(&token, &fork, "running", UP).await;
    assert_eq!(
        exec_ok(&server, &token, &fork, "cat ~/made-before ~/made-later").await,
        "kept\nlater\n"
    );

    // The free tier keeps two snapshots (the fork made the second); deleting one frees it.
    let (status, body) = take(&server, &token, &a, "third").await;
    assert_eq!(status, StatusCode::TOO_MANY_REQUESTS, "{body}");
    assert!(body.to_string().contains("maxSnapshots"), "{body}");
    let r = server
        .call("DELETE", "/v1/snapshots/first", Some(&token), None)
        .await;
    assert_eq!(r.status, StatusCode::OK, "{:?}", r.body);
    let gone = std::process::Command::new("docker")
        .args(["image", "inspect", &image])
        .output()
        .unwrap();
    assert!(!gone.status.success(), "the image is removed");
    let (status, third) = take(&server, &token, &a, "third").await;
    assert_eq!(status, StatusCode::CREATED, "{third}");
    // The environment made from the deleted snapshot runs on.
    assert_eq!(
        exec_ok(&server, &token, &b, "cat ~/made-before").await,
        "kept\n"
    );

    // Clean up: environments, then every snapshot (their images go).
    for id in [&a, &b, &fork] {
        let r = server
            .call(
                "DELETE",
                &format!("/v1/environments/{id}"),
                Some(&token),
                None,
            )
            .await;
        assert_eq!(r.status, StatusCode::ACCEPTED, "{:?}", r.body);
    }
    let listed = server
        .call("GET", "/v1/snapshots", Some(&token), None)
        .await
        .body;
    let mut taken: Vec<String> = vec![first["id"].as_str().unwrap().to_string()];
    taken.extend(
        listed["items"]
            .as_array()
            .unwrap()
            .iter()
            .map(|s| s["id"].as_str().unwrap().to_string()),
    );
    for s in listed["items"].as_array().unwrap() {
        let r = server
            .call(
                "DELETE",
                &format!("/v1/snapshots/{}", s["id"].as_str().unwrap()),
                Some(&token),
                None,
            )
            .await;
        assert_eq!(r.status, StatusCode::OK, "{:?}", r.body);
    }
    let listed = server
        .call("GET", "/v1/snapshots", Some(&token), None)
        .await
        .body;
    assert_eq!(listed["items"], json!([]));
    for id in [&a, &b, &fork] {
        server.wait_env(&token, id, "destroyed", UP).await;
    }
    // Images a VM still used when their snapshot was deleted were only untagged; with the
    // VMs gone, the reaper removes them.
    let ours = |ids: Vec<String>| -> Vec<String> {
        ids.into_iter().filter(|id| taken.contains(id)).collect()
    };
    let started = std::time::Instant::now();
    while !ours(snapshot_images()).is_empty() {
        assert!(
            started.elapsed() < UP,
            "snapshot images left: {:?}",
            ours(snapshot_images())
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// Whether the engine has the snapshot's image.
fn image_exists(snapshot_id: &str) -> bool {
    std::process::Command::new("docker")
        .args([
            "image",
            "inspect",
            &format!("hearth-snapshot:{snapshot_id}"),
        ])
        .output()
        .unwrap()
        .status
        .success()
}

#[tokio::test]
async fn a_snapshot_cut_short_by_a_kill_is_kept_or_dropped_whole() {
    let site = Site::new(Db::Sqlite)
        .await
        .with_env("HEARTH_REAPER_INTERVAL_MS", "300")
        .with_env("HEARTH_SNAPSHOT_TAKER_LOST_MS", "500");
    let server = site.start().await;
    let token = server.user("cut@example.com", "pro").await;
    let env = server
        .create(
            &token,
            json!({"name": "big", "vcpus": 1, "memoryMb": 512, "diskGb": 4}),
        )
        .await;
    server.wait_env(&token, &env, "running", UP).await;
    // Enough on the disk that the commit takes a while.
    exec_ok(
        &server,
        &token,
        &env,
        "head -c 400000000 /dev/urandom > ~/big && sync",
    )
    .await;
    let (http, base) = (server.http.clone(), server.base.clone());
    let (t, e) = (token.clone(), env.clone());
    let taking = tokio::spawn(async move {
        http.post(format!("{base}/v1/environments/{e}/snapshots"))
            .bearer_auth(t)
            .json(&json!({"name": "cut"}))
            .send()
            .await
    });
    let store = site.store().await;
    let uid = server.user_id("cut@example.com").await;
    let id = loop {
        if let Some(s) = store.snapshots_of(&uid).await.unwrap().first() {
            break s.id.clone();
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    tokio::time::sleep(Duration::from_millis(150)).await;
    server.kill();
    let _ = taking.await;
    let row = store.snapshot(&id).await.unwrap();
    assert_eq!(row.state, "taking", "killed mid-take");

    // Another life: the snapshot ends whole (recorded, with its image) or not at all.
    let server = site.start().await;
    let started = std::time::Instant::now();
    let kept = loop {
        let row = store.snapshot(&id).await;
        match (&row, image_exists(&id)) {
            (Ok(s), true) if s.state == "ready" => break true,
            (Err(hearth_store::StoreError::NotFound), false) => {
                // Gone for good only if the engine is not still committing it: look again
                // after the reaper's next passes.
                tokio::time::sleep(Duration::from_secs(2)).await;
                if !image_exists(&id) && store.snapshot(&id).await.is_err() {
                    break false;
                }
            }
            _ => {}
        }
        assert!(
            started.elapsed() < Duration::from_secs(90),
            "not settled: {row:?}, image {}",
            image_exists(&id)
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let listed = server
        .call("GET", "/v1/snapshots", Some(&token), None)
        .await
        .body;
    assert_eq!(
        listed["items"].as_array().unwrap().len(),
        usize::from(kept),
        "{listed}"
    );
    if kept {
        let r = server
            .call("DELETE", &format!("/v1/snapshots/{id}"), Some(&token), None)
            .await;
        assert_eq!(r.status, StatusCode::OK, "{:?}", r.body);
        assert!(!image_exists(&id));
    }
    let r = server
        .call(
            "DELETE",
            &format!("/v1/environments/{env}"),
            Some(&token),
            None,
        )
        .await;
    assert_eq!(r.status, StatusCode::ACCEPTED, "{:?}", r.body);
    server.wait_env(&token, &env, "destroyed", UP).await;
}
