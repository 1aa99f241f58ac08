//! The real `hearth serve` on simulated hosts: a kill -9 at every step of every job, a
//! fleet of 1,000 hosts filled under 200 concurrent creates, placement by region and GPU.

mod common;

use common::*;
use reqwest::StatusCode;
use serde_json::{Value, json};
use std::collections::HashMap;
use std::time::{Duration, Instant};

const UP: Duration = Duration::from_secs(60);

fn sim_site(site: Site) -> Site {
    site.with_env("VM_PROVIDER", "sim")
        .with_env("HEARTH_PROVISION_CONCURRENCY", "64")
        .with_env("HEARTH_CONTROL_CONCURRENCY", "64")
}

async fn add_sim_host(server: &Server, name: &str, extra: Value) -> String {
    let mut body = json!({"name": name, "kind": "sim", "maxVcpus": 64, "maxMemoryMb": 65536});
    for (k, v) in extra.as_object().unwrap() {
        body[k] = v.clone();
    }
    let r = server
        .call(
            "POST",
            "/v1/admin/hosts",
            Some(&server.admin_token),
            Some(body),
        )
        .await;
    assert_eq!(r.status, StatusCode::CREATED, "{:?}", r.body);
    r.body["id"].as_str().unwrap().to_string()
}

/// A user with room for a fleet.
async fn big_user(server: &Server, email: &str) -> String {
    let token = server.user(email, "unlimited").await;
    let id = server.user_id(email).await;
    let quota = json!({"maxEnvironments": 100000, "maxConcurrentEnvironments": 100000, "maxVcpus": 1000000, "maxMemoryMb": 10000000, "maxDiskGb": 1000000});
    let r = server
        .patch(
            &format!("/v1/admin/users/{id}"),
            &server.admin_token,
            json!({"quota": quota}),
        )
        .await;
    assert_eq!(r.status, StatusCode::OK, "{:?}", r.body);
    token
}

/// Every step, before it acts and after it acted, as the simulated host names them.
const POINTS: &[(&str, &[&str])] = &[
    (
        "provision",
        &[
            "begin",
            "create_vm",
            "wait_running",
            "adopt",
            "wait_ssh",
            "init_script",
            "finish",
        ],
    ),
    (
        "start",
        &["begin", "start_vm", "wait_running", "wait_ssh", "finish"],
    ),
    ("stop", &["begin", "stop_vm", "finish"]),
    ("destroy", &["begin", "destroy_vm", "finish"]),
];

fn target(plan: &str) -> &'static str {
    match plan {
        "provision" | "start" => "running",
        "stop" => "stopped",
        _ => "destroyed",
    }
}

async fn killed_at_every_step(db: Db) {
    let site = sim_site(Site::new(db).await);
    let server = site.start().await;
    let token = big_user(&server, "kill@example.com").await;
    let points: Vec<(String, String)> = POINTS
        .iter()
        .flat_map(|(plan, steps)| {
            steps
                .iter()
                .flat_map(move |s| [format!("{plan}.{s}"), format!("{plan}.{s}.after")])
                .map(move |p| (plan.to_string(), p))
        })
        .collect();
    // Each point gets a host of its own (its region), and an environment brought to where
    // the point's job starts.
    let mut cases = Vec::new();
    for (i, (plan, point)) in points.iter().enumerate() {
        let region = format!("k{i}");
        let host = add_sim_host(&server, &format!("sim-{region}"), json!({"region": region})).await;
        let env = if plan == "provision" {
            None
        } else {
            let r = server.call("POST", "/v1/environments", Some(&token), Some(json!({"name": point, "region": region, "vcpus": 1, "memoryMb": 256, "initScript": "echo once"}))).await;
            Some(r.body["id"].as_str().unwrap().to_string())
        };
        cases.push((plan.clone(), point.clone(), region, host, env));
    }
    for (plan, _, _, _, env) in &cases {
        if let Some(id) = env {
            server.wait_env(&token, id, "running", UP).await;
            if plan == "start" {
                server
                    .call(
                        "POST",
                        &format!("/v1/environments/{id}/stop"),
                        Some(&token),
                        None,
                    )
                    .await;
            }
        }
    }
    for (plan, _, _, _, env) in &cases {
        if let (Some(id), "start") = (env, plan.as_str()) {
            server.wait_env(&token, id, "stopped", UP).await;
        }
    }
    // Every job hangs at its point.
    for (plan, point, region, host, env) in cases.iter_mut() {
        let r = server
            .patch(
                &format!("/v1/admin/hosts/{host}"),
                &server.admin_token,
                json!({"options": {"faults": {point.clone(): "hang"}}}),
            )
            .await;
        assert_eq!(r.status, StatusCode::OK, "{:?}", r.body);
        match env {
            None => {
                let r = server.call("POST", "/v1/environments", Some(&token), Some(json!({"name": point, "region": region, "vcpus": 1, "memoryMb": 256, "initScript": "echo once"}))).await;
                assert_eq!(r.status, StatusCode::ACCEPTED, "{:?}", r.body);
                *env = Some(r.body["id"].as_str().unwrap().to_string());
            }
            Some(id) => {
                let (method, path) = match plan.as_str() {
                    "destroy" => ("DELETE", format!("/v1/environments/{id}")),
                    other => ("POST", format!("/v1/environments/{id}/{other}")),
                };
                let r = server.call(method, &path, Some(&token), None).await;
                assert_eq!(r.status, StatusCode::ACCEPTED, "{:?}", r.body);
            }
        }
    }
    let started = Instant::now();
    while site.log().matches("simulated host hangs here").count() < cases.len() {
        assert!(
            started.elapsed() < UP,
            "not every job reached its point: {} of {}",
            site.log().matches("simulated host hangs here").count(),
            cases.len()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    server.kill();

    // The hosts recover while the node is dead; a new node finishes every job.
    let store = site.store().await;
    for (_, _, _, host, _) in &cases {
        store
            .update_host(
                host,
                &hearth_store::HostUpdate {
                    capacity: None,
                    options: Some(json!({})),
                },
            )
            .await
            .unwrap();
    }
    let server = site.start().await;
    for (plan, point, _, _, env) in &cases {
        let id = env.as_ref().unwrap();
        let body = server.wait_env(&token, id, target(plan), UP).await;
        let vms = store.sim_vms_of(id).await.unwrap();
        assert_eq!(
            vms.len(),
            1,
            "{point}: exactly one VM was ever made: {vms:?}"
        );
        assert_eq!(vms[0].init_runs, 1, "{point}: the init script ran once");
        let live = vms.iter().filter(|v| v.state != "destroyed").count();
        assert_eq!(live, usize::from(plan != "destroy"), "{point}: {body:?}");
        // The job records its success just after its last write: give it a moment.
        let started = Instant::now();
        let last = loop {
            let last = store.jobs_for_environment(id).await.unwrap().pop().unwrap();
            if last.state == hearth_store::JobState::Succeeded
                || started.elapsed() > Duration::from_secs(10)
            {
                break last;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        assert_eq!(
            (last.state, last.crashes),
            (hearth_store::JobState::Succeeded, 1),
            "{point}: {last:?}"
        );
    }
    assert!(
        store.resum_hosts().await.unwrap().is_empty(),
        "host counters drifted"
    );
}

#[tokio::test]
async fn killed_at_every_step_sqlite() {
    killed_at_every_step(Db::Sqlite).await;
}

#[tokio::test]
async fn killed_at_every_step_postgres() {
    killed_at_every_step(Db::Postgres).await;
}

/// 1,000 simulated hosts of 50 VMs each, full but for 150 places, and 200 creates at once
/// from 10 users: exactly 150 placed, none over capacity, counters equal to the sums.
async fn a_full_fleet_under_concurrent_creates(db: Db) {
    // No workers and no reconciler passes: the fill below has no VMs behind it, which a
    // reconciler would rightly declare vanished.
    let site = sim_site(Site::new(db).await)
        .with_env("HEARTH_WORKERS", "0")
        .with_env("HEARTH_REAPER_INTERVAL_MS", "3600000");
    let server = site.start().await;
    let mut hosts = Vec::new();
    for chunk in (0..1000).collect::<Vec<_>>().chunks(25) {
        let names: Vec<String> = chunk.iter().map(|i| format!("fleet-{i:04}")).collect();
        let adds = names
            .iter()
            .map(|name| add_sim_host(&server, name, json!({"maxEnvironments": 50})));
        hosts.extend(futures::future::join_all(adds).await);
    }
    let filler = big_user(&server, "filler@example.com").await;
    let _ = filler;
    let filler_id = server.user_id("filler@example.com").await;
    // 150 hosts keep one place each; the rest are full.
    let fill: Vec<(String, i64)> = hosts
        .iter()
        .enumerate()
        .map(|(i, h)| (h.clone(), if i < 150 { 49 } else { 50 }))
        .collect();
    let store = site.store().await;
    let started = Instant::now();
    store
        .insert_running_for_tests(&filler_id, &fill)
        .await
        .unwrap();
    eprintln!("filled 49,850 places in {:?}", started.elapsed());
    let filled = store.hosts().await.unwrap();
    assert_eq!(
        filled.iter().map(|h| h.used_environments).sum::<i64>(),
        49_850,
        "the fill is counted"
    );
    assert_eq!(
        filled.iter().filter(|h| h.used_environments == 50).count(),
        850
    );

    let mut tokens = Vec::new();
    for u in 0..10 {
        tokens.push(big_user(&server, &format!("rush{u}@example.com")).await);
    }
    let calls = (0..200).map(|i| {
        server.call(
            "POST",
            "/v1/environments",
            Some(&tokens[i % 10]),
            Some(json!({"name": format!("rush {i}"), "vcpus": 1, "memoryMb": 256, "diskGb": 1})),
        )
    });
    let results = futures::future::join_all(calls).await;
    let mut by_status: HashMap<u16, usize> = HashMap::new();
    for r in &results {
        *by_status.entry(r.status.as_u16()).or_default() += 1;
    }
    assert_eq!(
        (by_status.get(&202), by_status.get(&503)),
        (Some(&150), Some(&50)),
        "{by_status:?}"
    );
    let refused = results
        .iter()
        .find(|r| r.status == StatusCode::SERVICE_UNAVAILABLE)
        .unwrap();
    assert_eq!(refused.body["error"]["code"], "no_capacity");
    assert!(
        !refused.body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("fleet-"),
        "no host names to users: {:?}",
        refused.body
    );

    let all = store.hosts().await.unwrap();
    assert_eq!(all.len(), 1000);
    assert!(
        all.iter()
            .all(|h| h.used_environments <= h.capacity.max_environments),
        "a host is over capacity"
    );
    assert_eq!(all.iter().map(|h| h.used_environments).sum::<i64>(), 50_000);
    assert!(
        store.resum_hosts().await.unwrap().is_empty(),
        "counters differ from the sums"
    );
}

#[tokio::test]
async fn a_full_fleet_under_concurrent_creates_sqlite() {
    a_full_fleet_under_concurrent_creates(Db::Sqlite).await;
}

#[tokio::test]
async fn a_full_fleet_under_concurrent_creates_postgres() {
    a_full_fleet_under_concurrent_creates(Db::Postgres).await;
}

/// Placement by region and GPU through the API, among simulated hosts.
#[tokio::test]
async fn regions_and_gpus_through_the_api() {
    let site = sim_site(Site::new(Db::Sqlite).await);
    let server = site.start().await;
    add_sim_host(&server, "gra-1", json!({"region": "gra"})).await;
    let gpu = add_sim_host(
        &server,
        "sbg-gpu",
        json!({"region": "sbg", "gpuModel": "nvidia-l4", "gpuCount": 1}),
    )
    .await;
    add_sim_host(&server, "plain", json!({})).await;
    let regions = server.call("GET", "/v1/regions", None, None).await.body;
    assert_eq!(
        regions["items"],
        json!([{"id": "gra", "hosts": 1}, {"id": "sbg", "hosts": 1}])
    );
    let token = server.user("placed@example.com", "pro").await;
    let r = server
        .call(
            "POST",
            "/v1/environments",
            Some(&token),
            Some(json!({"name": "in gra", "region": "gra", "memoryMb": 256})),
        )
        .await;
    assert_eq!(
        (r.status, r.body["region"].as_str()),
        (StatusCode::ACCEPTED, Some("gra")),
        "{:?}",
        r.body
    );
    let r = server
        .call(
            "POST",
            "/v1/environments",
            Some(&token),
            Some(json!({"name": "gpu", "gpus": 1, "memoryMb": 256})),
        )
        .await;
    assert_eq!(r.status, StatusCode::ACCEPTED, "{:?}", r.body);
    assert_eq!(
        (r.body["hostId"].as_str(), r.body["gpus"].as_i64()),
        (Some(gpu.as_str()), Some(1))
    );
    let id = r.body["id"].as_str().unwrap().to_string();
    let env = server.wait_env(&token, &id, "running", UP).await;
    assert_eq!(env["gpuModel"], Value::Null);
    // The only GPU is taken: 503; nobody has two, or a region called tyo: 400.
    let r = server
        .call(
            "POST",
            "/v1/environments",
            Some(&token),
            Some(json!({"name": "gpu 2", "gpus": 1})),
        )
        .await;
    assert_eq!(
        (r.status, r.body["error"]["code"].as_str()),
        (StatusCode::SERVICE_UNAVAILABLE, Some("no_capacity")),
        "{:?}",
        r.body
    );
    for body in [
        json!({"name": "x", "gpus": 2}),
        json!({"name": "x", "region": "tyo"}),
        json!({"name": "x", "region": "gra", "gpus": 1}),
    ] {
        let r = server
            .call("POST", "/v1/environments", Some(&token), Some(body.clone()))
            .await;
        assert_eq!(
            (r.status, r.body["error"]["code"].as_str()),
            (StatusCode::BAD_REQUEST, Some("invalid_input")),
            "{body}: {:?}",
            r.body
        );
    }
    // A simulated VM runs no commands, and says so.
    let r = server
        .call(
            "POST",
            &format!("/v1/environments/{id}/exec"),
            Some(&token),
            Some(json!({"code": "true"})),
        )
        .await;
    assert_eq!(r.status, StatusCode::CONFLICT, "{:?}", r.body);
    assert!(
        r.body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("simulated")
    );
}
