//! Warm pools through the real `hearth serve`: on the real Docker engine (claims hand each
//! environment only its own keys, its hostname and variables; a kill -9 mid-claim loses
//! and leaks nothing), and on simulated hosts (50 concurrent creates against a pool of 5).

mod common;

use common::*;
use reqwest::StatusCode;
use serde_json::{Value, json};
use std::collections::{BTreeSet, HashSet};
use std::time::{Duration, Instant};

async fn first_host(server: &Server) -> String {
    let hosts = server
        .call("GET", "/v1/admin/hosts", Some(&server.admin_token), None)
        .await
        .body;
    hosts["items"][0]["id"].as_str().unwrap().to_string()
}

/// Containers of this site's installation (labelled with its `HEARTH_INSTANCE`), by the
/// environment id on their label.
fn site_vms(site: &Site) -> Vec<String> {
    let instance = site.instance.as_deref().unwrap();
    let out = std::process::Command::new("docker")
        .args([
            "ps",
            "-a",
            "--filter",
            &format!("label=hearth.instance={instance}"),
            "--format",
            "{{.Label \"hearth.environment\"}}",
        ])
        .output()
        .expect("docker ps");
    assert!(out.status.success(), "{out:?}");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(str::to_string)
        .collect()
}

#[tokio::test]
async fn a_warm_pool_on_docker() {
    let site = Site::new(Db::Sqlite).await;
    let server = site.start().await;
    let host = first_host(&server).await;
    let shape = json!({"vcpus": 1, "memoryMb": 512, "diskGb": 2});
    server.set_pool(&host, shape.clone(), 3).await;
    server.wait_pool(3, Duration::from_secs(120)).await;

    let token = server.user("warm@example.com", "pro").await;
    let uid = server.user_id("warm@example.com").await;
    let quota = json!({"maxEnvironments": 20, "maxConcurrentEnvironments": 20, "maxVcpus": 40, "maxMemoryMb": 40960, "maxDiskGb": 400});
    let r = server
        .patch(
            &format!("/v1/admin/users/{uid}"),
            &server.admin_token,
            json!({ "quota": quota }),
        )
        .await;
    assert_eq!(r.status, StatusCode::OK, "{:?}", r.body);
    let keys = tempfile::tempdir().unwrap();
    let user_key = keys.path().join("id_ed25519");
    let made = std::process::Command::new("ssh-keygen")
        .args(["-q", "-t", "ed25519", "-N", "", "-C", "warm-user", "-f"])
        .arg(&user_key)
        .output()
        .unwrap();
    assert!(made.status.success(), "{made:?}");
    let user_public = std::fs::read_to_string(user_key.with_extension("pub")).unwrap();

    // What the pool holds now: ids, and each VM's pool key (to prove it stops working).
    let master = hearth_guest::MasterKey::parse(
        &std::fs::read_to_string(site.data_dir().join("master.key")).unwrap(),
    )
    .unwrap();
    let store = site.store().await;
    let pooled = store.pooled_on_host(&host).await.unwrap();
    assert_eq!(pooled.len(), 3);
    let warm_ids: HashSet<String> = pooled.iter().map(|v| v.id.clone()).collect();

    // Ten creates in a row, without waiting: the first three take the warm VMs (a refill
    // needs a container and sshd, far longer than the next request).
    let mut ids = Vec::new();
    for i in 0..10 {
        let mut body = shape.clone();
        body["name"] = json!(format!("warm-{i}"));
        body["sshPublicKey"] = json!(user_public.trim());
        body["environmentVars"] = json!({ "GREETING": format!("hello-{i}") });
        let r = server
            .call("POST", "/v1/environments", Some(&token), Some(body))
            .await;
        assert_eq!(r.status, StatusCode::ACCEPTED, "{:?}", r.body);
        ids.push(r.body["id"].as_str().unwrap().to_string());
    }
    let from_pool: Vec<bool> = ids.iter().map(|id| warm_ids.contains(id)).collect();
    assert_eq!(
        from_pool,
        [
            true, true, true, false, false, false, false, false, false, false
        ],
        "the first three came from the pool"
    );
    for id in &ids {
        server
            .wait_env(&token, id, "running", Duration::from_secs(240))
            .await;
    }
    for (i, id) in ids.iter().enumerate() {
        let env = server
            .call("GET", &format!("/v1/environments/{id}"), Some(&token), None)
            .await
            .body;
        let row = store.environment(id).await.unwrap();
        let out = exec_ok(
            &server,
            &token,
            id,
            "cat ~/.ssh/authorized_keys; echo --; hostname; printenv GREETING",
        )
        .await;
        let (authorized, rest) = out.split_once("--\n").unwrap();
        let lines: BTreeSet<&str> = authorized.lines().filter(|l| !l.is_empty()).collect();
        let expected: BTreeSet<&str> = row
            .ssh_public_key
            .lines()
            .filter(|l| !l.is_empty())
            .collect();
        assert_eq!(lines, expected, "environment {i} holds only its own keys");
        assert!(
            lines.iter().any(|l| l.starts_with(user_public.trim())),
            "{lines:?}"
        );
        for vm in &pooled {
            assert!(
                !authorized.contains(vm.ssh_public_key.trim()),
                "a pool key stayed in {i}"
            );
        }
        let slug = env["slug"].as_str().unwrap().replace('_', "-");
        assert_eq!(
            rest,
            format!("{slug}\nhello-{i}\n"),
            "hostname and variables of {i}"
        );
        // The user's own key works with real OpenSSH.
        let port = env["sshPort"].as_i64().unwrap();
        assert_eq!(openssh(&user_key, port, "hostname").await, Ok(slug.clone()));
    }
    // The pool key of each claimed VM no longer opens it.
    for vm in &pooled {
        let env = server
            .call(
                "GET",
                &format!("/v1/environments/{}", vm.id),
                Some(&token),
                None,
            )
            .await
            .body;
        let key = write_key(
            keys.path(),
            &format!("pool-{}", vm.id),
            &master.open(&vm.ssh_private_key_enc).unwrap(),
        );
        let refused = openssh(&key, env["sshPort"].as_i64().unwrap(), "true").await;
        assert!(
            matches!(&refused, Err(e) if e.contains("Permission denied")),
            "the pool key still works: {refused:?}"
        );
    }
    // The log says where each came from.
    let log = server
        .call(
            "GET",
            &format!("/v1/environments/{}/logs", ids[0]),
            Some(&token),
            None,
        )
        .await
        .body;
    assert!(
        log.to_string().contains("took a warm VM from the pool"),
        "{log}"
    );

    // The pool refilled; then a claim whose job no worker has run yet (the create goes to
    // an API-only node), a kill -9 of that node, and a node with workers taking over: its
    // `adopt` logs in with the pool key itself, as any node but the filler would.
    server.wait_pool(3, Duration::from_secs(120)).await;
    server.kill();
    let mut site = site;
    site.extra_env.push(("HEARTH_WORKERS".into(), "0".into()));
    let api = site.start().await;
    let mut body = shape.clone();
    body["name"] = json!("killed");
    let r = api
        .call("POST", "/v1/environments", Some(&token), Some(body))
        .await;
    assert_eq!(r.status, StatusCode::ACCEPTED, "{:?}", r.body);
    let killed = r.body["id"].as_str().unwrap().to_string();
    api.kill();
    assert!(
        store
            .pooled_vm(&killed)
            .await
            .unwrap()
            .is_some_and(|v| v.state == "claimed"),
        "the create claimed a warm VM before the kill"
    );
    site.extra_env.retain(|(k, _)| k != "HEARTH_WORKERS");
    let server = site.start().await;
    server
        .wait_env(&token, &killed, "running", Duration::from_secs(240))
        .await;
    let out = exec_ok(&server, &token, &killed, "hostname").await;
    let slug = store
        .environment(&killed)
        .await
        .unwrap()
        .slug
        .replace('_', "-");
    assert_eq!(out.trim(), slug);
    server.wait_pool(3, Duration::from_secs(120)).await;
    // No duplicates, nothing leaked: every container is a live environment's or a pooled
    // VM's, each once, and the host's counters match what holds room.
    let pooled_now = store.pooled_on_host(&host).await.unwrap();
    assert_eq!(pooled_now.len(), 3, "{pooled_now:?}");
    assert!(pooled_now.iter().all(|v| v.state == "ready"));
    let mut expected: Vec<String> = ids.clone();
    expected.push(killed.clone());
    expected.extend(pooled_now.iter().map(|v| v.id.clone()));
    expected.sort();
    let mut vms = site_vms(&site);
    vms.sort();
    assert_eq!(
        vms, expected,
        "exactly the environments' and the pool's VMs exist"
    );
    assert_eq!(store.resum_hosts().await.unwrap(), Vec::<String>::new());

    // An engine restart stops warm VMs (no restart policy): a claim starts the one it takes.
    for vm in &pooled_now {
        let out = std::process::Command::new("docker")
            .args(["stop", "-t", "0", &format!("hearth-{}", vm.id)])
            .output()
            .unwrap();
        assert!(out.status.success(), "{out:?}");
    }
    let mut body = shape.clone();
    body["name"] = json!("after a restart");
    let r = server
        .call("POST", "/v1/environments", Some(&token), Some(body))
        .await;
    assert_eq!(r.status, StatusCode::ACCEPTED, "{:?}", r.body);
    let restarted = r.body["id"].as_str().unwrap().to_string();
    assert!(
        pooled_now.iter().any(|v| v.id == restarted),
        "a stopped warm VM was claimed"
    );
    server
        .wait_env(&token, &restarted, "running", Duration::from_secs(120))
        .await;
    assert_eq!(
        exec_ok(&server, &token, &restarted, "echo up").await,
        "up\n"
    );
    ids.push(restarted);

    // Emptying the pool drains its VMs; destroying the environments removes the rest.
    server.set_pool(&host, shape.clone(), 0).await;
    for id in ids.iter().chain([&killed]) {
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
    server.wait_pool(0, Duration::from_secs(120)).await;
    let started = Instant::now();
    while !site_vms(&site).is_empty() {
        assert!(
            started.elapsed() < Duration::from_secs(120),
            "{:?}",
            site_vms(&site)
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(store.pooled_on_host(&host).await.unwrap().is_empty());
    for id in ids.iter().chain([&killed]) {
        server
            .wait_env(&token, id, "destroyed", Duration::from_secs(120))
            .await;
    }
    let h = store.host(&host).await.unwrap();
    assert_eq!((h.used_vcpus, h.used_environments), (0, 0));
}

/// 50 concurrent creates against a pool of 5, on an API-only node so the pool cannot
/// refill meanwhile: exactly 5 take warm VMs, the rest are placed as usual, and the quota
/// (30) holds for both kinds alike.
async fn fifty_creates_against_a_pool_of_five(db: Db) {
    let mut site = Site::new(db).await.with_env("VM_PROVIDER", "sim");
    let server = site.start().await;
    let r = server
        .call(
            "POST",
            "/v1/admin/hosts",
            Some(&server.admin_token),
            Some(json!({"name": "sim-warm", "kind": "sim", "maxVcpus": 1000, "maxMemoryMb": 1000000, "maxEnvironments": 1000})),
        )
        .await;
    assert_eq!(r.status, StatusCode::CREATED, "{:?}", r.body);
    let host = r.body["id"].as_str().unwrap().to_string();
    let shape = json!({"vcpus": 1, "memoryMb": 256, "diskGb": 1});
    server.set_pool(&host, shape.clone(), 5).await;
    server.wait_pool(5, Duration::from_secs(60)).await;
    let token = server.user("fifty@example.com", "pro").await;
    let uid = server.user_id("fifty@example.com").await;
    let quota = json!({"maxEnvironments": 30, "maxConcurrentEnvironments": 30, "maxVcpus": 1000, "maxMemoryMb": 1000000, "maxDiskGb": 1000});
    let r = server
        .patch(
            &format!("/v1/admin/users/{uid}"),
            &server.admin_token,
            json!({ "quota": quota }),
        )
        .await;
    assert_eq!(r.status, StatusCode::OK, "{:?}", r.body);
    let store = site.store().await;
    let warm: HashSet<String> = store
        .pooled_on_host(&host)
        .await
        .unwrap()
        .into_iter()
        .map(|v| v.id)
        .collect();
    assert_eq!(warm.len(), 5);
    server.kill();

    site.extra_env.push(("HEARTH_WORKERS".into(), "0".into()));
    let api = site.start().await;
    let mut tasks = Vec::new();
    for i in 0..50 {
        let (http, base, token) = (api.http.clone(), api.base.clone(), token.clone());
        let mut body = shape.clone();
        body["name"] = json!(format!("c{i}"));
        tasks.push(tokio::spawn(async move {
            let r = http
                .post(format!("{base}/v1/environments"))
                .bearer_auth(token)
                .json(&body)
                .send()
                .await
                .unwrap();
            let status = r.status();
            (status, r.json::<Value>().await.unwrap())
        }));
    }
    let mut created = Vec::new();
    let mut refused = 0;
    for t in tasks {
        let (status, body) = t.await.unwrap();
        match status {
            StatusCode::ACCEPTED => created.push(body["id"].as_str().unwrap().to_string()),
            StatusCode::TOO_MANY_REQUESTS | StatusCode::FORBIDDEN => {
                assert!(body.to_string().contains("quota"), "{body}");
                refused += 1;
            }
            other => panic!("{other}: {body}"),
        }
    }
    assert_eq!((created.len(), refused), (30, 20), "the quota holds");
    let claimed: Vec<&String> = created.iter().filter(|id| warm.contains(*id)).collect();
    assert_eq!(
        claimed.len(),
        5,
        "exactly the pool's five were claimed, each once"
    );
    assert_eq!(created.iter().collect::<HashSet<_>>().len(), 30);
    let rows = store.pooled_on_host(&host).await.unwrap();
    assert_eq!(rows.len(), 5);
    assert!(rows.iter().all(|v| v.state == "claimed"), "{rows:?}");
    assert_eq!(store.resum_hosts().await.unwrap(), Vec::<String>::new());
    api.kill();

    // Workers again: every environment comes up, the pool refills to 5.
    site.extra_env.retain(|(k, _)| k != "HEARTH_WORKERS");
    let server = site.start().await;
    for id in &created {
        server
            .wait_env(&token, id, "running", Duration::from_secs(60))
            .await;
    }
    server.wait_pool(5, Duration::from_secs(60)).await;
    let h = store.host(&host).await.unwrap();
    assert_eq!(
        h.used_environments, 35,
        "30 environments and 5 warm VMs hold room"
    );
    assert_eq!(store.resum_hosts().await.unwrap(), Vec::<String>::new());
}

#[tokio::test]
async fn fifty_creates_against_a_pool_of_five_sqlite() {
    fifty_creates_against_a_pool_of_five(Db::Sqlite).await;
}

#[tokio::test]
async fn fifty_creates_against_a_pool_of_five_postgres() {
    fifty_creates_against_a_pool_of_five(Db::Postgres).await;
}
