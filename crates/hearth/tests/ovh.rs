//! OVH Public Cloud through `hearth serve`, against the fake OVH API of `common/ovh.rs`
//! (the real one cannot be reached from here). The fake checks every request's signature
//! with OVH's formula and plays each instance with a container of the base image, so SSH,
//! exec, stop (shelve) and start (unshelve) run end to end through the OVH path.

mod common;
/// Only this binary needs the fake, so only it compiles it.
#[path = "common/ovh.rs"]
mod fake_ovh;

use common::*;
use fake_ovh::FakeOvh;
use reqwest::StatusCode;
use serde_json::{Value, json};
use std::time::Duration;

const UP: Duration = Duration::from_secs(120);

/// Adds the fake's project and region as an `ovh` host, listing instances every 300 ms.
async fn add_host(server: &Server, fake: &FakeOvh) -> Value {
    add_host_with(server, fake, "ovh-gra9", json!({"pollMs": 300})).await
}

/// Adds the fake's project and region as `ovh` host `name` with these options besides the
/// project.
async fn add_host_with(server: &Server, fake: &FakeOvh, name: &str, mut options: Value) -> Value {
    options["projectId"] = json!(fake.project);
    let r = server
        .call(
            "POST",
            "/v1/admin/hosts",
            Some(&server.admin_token),
            Some(json!({
                "name": name,
                "kind": "ovh",
                "endpoint": fake.base,
                "region": fake.region,
                "options": options,
                "ovhCredentials": {
                    "applicationKey": fake.application_key,
                    "applicationSecret": fake.application_secret,
                    "consumerKey": fake.consumer_key,
                },
            })),
        )
        .await;
    assert_eq!(r.status, StatusCode::CREATED, "{:?}", r.body);
    r.body
}

async fn create(server: &Server, token: &str, name: &str) -> String {
    let r = server
        .call(
            "POST",
            "/v1/environments",
            Some(token),
            Some(json!({"name": name, "provider": "ovh", "vcpus": 2, "memoryMb": 4096, "diskGb": 50})),
        )
        .await;
    assert_eq!(r.status, StatusCode::ACCEPTED, "{:?}", r.body);
    r.body["id"].as_str().unwrap().to_string()
}

async fn exec(server: &Server, token: &str, id: &str, code: &str) -> Value {
    let r = server
        .call(
            "POST",
            &format!("/v1/environments/{id}/exec"),
            Some(token),
            Some(json!({"code": code})),
        )
        .await;
    assert_eq!(r.status, StatusCode::OK, "{:?}", r.body);
    r.body
}

/// Calls the fake saw from `from` on, by method and path.
fn tally(fake: &FakeOvh, from: usize) -> Vec<(String, usize)> {
    let mut counts = std::collections::BTreeMap::new();
    for (method, path, _) in fake.calls().into_iter().skip(from) {
        *counts.entry(format!("{method} {path}")).or_insert(0) += 1;
    }
    counts.into_iter().collect()
}

/// An hour of clock skew between OVH and us is absorbed by the time delta; the host's
/// capacity is the project's quota; flavors come from OVH with their GPUs; an environment
/// gets the smallest general-purpose flavor that holds its disk, the public IPv4 address
/// (the fake lists an IPv6 one first), the `dev` user with its key, and stops by shelving.
#[tokio::test]
async fn an_environment_lives_on_ovh_from_create_to_destroy() {
    let fake = FakeOvh::start(hearth_provider_image(), 3600).await;
    let site = Site::new(Db::Sqlite).await;
    let server = site.start().await;
    let host = add_host(&server, &fake).await;
    assert_eq!(
        (
            host["kind"].clone(),
            host["maxVcpus"].clone(),
            host["maxMemoryMb"].clone(),
            host["maxEnvironments"].clone()
        ),
        (json!("ovh"), json!(40), json!(163840), json!(20)),
        "the capacity is the project's quota: {host}"
    );
    let flavors = server.call("GET", "/v1/flavors", None, None).await.body;
    let of = |name: &str| {
        flavors["items"]
            .as_array()
            .unwrap()
            .iter()
            .find(|f| f["name"] == name)
            .cloned()
            .unwrap_or_else(|| panic!("no flavor {name} in {flavors}"))
    };
    assert_eq!(of("b2-7")["typeLabel"], "General Purpose");
    assert_eq!(of("b2-7")["memoryMb"], 7168);
    assert_eq!(
        (of("t1-90")["gpus"].clone(), of("t1-90")["gpuModel"].clone()),
        (json!(2), json!("Tesla V100"))
    );
    assert!(
        !flavors.to_string().contains("win-b2-7") && !flavors.to_string().contains("b2-60"),
        "Windows and unavailable flavors are not offered"
    );

    let token = server.user("ovh@example.com", "pro").await;
    let before = fake.calls().len();
    let id = create(&server, &token, "on ovh").await;
    let env = server.wait_env(&token, &id, "running", UP).await;
    let provisioned = tally(&fake, before);
    eprintln!("calls for one provision: {provisioned:?}");
    let instances = fake.instances();
    assert_eq!(instances.len(), 1, "{instances:?}");
    let instance = &instances[0];
    assert!(
        instance["name"]
            .as_str()
            .unwrap()
            .starts_with(&format!("hearth-{id}--")),
        "{instance}"
    );
    let b2_7 = of("b2-7");
    assert_eq!(env["hostName"], "ovh-gra9");
    let address = env["sshHost"].as_str().unwrap();
    assert!(
        address.parse::<std::net::Ipv4Addr>().is_ok(),
        "the IPv4 address, not {address}"
    );
    assert_eq!(env["sshPort"], 22);
    let fake_flavor = instance["flavorId"].as_str().unwrap();
    assert!(
        fake.flavor_name(fake_flavor) == b2_7["name"],
        "2 vCPUs, 4 GB, 50 GB: b2-7, got {fake_flavor}"
    );
    let container = fake
        .container_of(instance["id"].as_str().unwrap())
        .expect("a container plays the instance");
    assert_eq!(docker_inspect(&container, "{{.State.Running}}"), "true");
    let whoami = exec(&server, &token, &id, "whoami; hostname").await;
    assert_eq!(
        whoami["stdout"].as_str().unwrap().lines().next(),
        Some("dev"),
        "{whoami}"
    );

    // Stop shelves (a stopped instance is still billed); start unshelves.
    server
        .call(
            "POST",
            &format!("/v1/environments/{id}/stop"),
            Some(&token),
            None,
        )
        .await;
    server.wait_env(&token, &id, "stopped", UP).await;
    assert_eq!(fake.instances()[0]["status"], "SHELVED_OFFLOADED");
    server
        .call(
            "POST",
            &format!("/v1/environments/{id}/start"),
            Some(&token),
            None,
        )
        .await;
    server.wait_env(&token, &id, "running", UP).await;
    assert_eq!(
        exec(&server, &token, &id, "echo back").await["stdout"],
        "back\n"
    );

    server.destroy(&token, &id, UP).await;
    assert!(fake.instances().is_empty(), "{:?}", fake.instances());
    let resyncs = fake
        .calls()
        .iter()
        .filter(|c| c.1 == "/1.0/auth/time")
        .count();
    assert!(
        resyncs <= 2,
        "the time delta is read once (and again on a signature error), not {resyncs} times"
    );
    assert!(
        !site.log().contains(&fake.application_secret) && !site.log().contains(&fake.consumer_key),
        "credentials reached the log"
    );
    let shown = server
        .call("GET", "/v1/admin/hosts", Some(&server.admin_token), None)
        .await
        .body;
    assert!(
        !shown.to_string().contains(&fake.application_secret),
        "the API showed the secret"
    );
}

/// OVH's errors, injected by the fake: a signature refused once (the clock is read again
/// and the call succeeds), 429 and 500 on reads (retried), refused credentials (the
/// environment ends in `error` saying what to check), a conflict on shelve (the stop fails
/// and says so; the instance keeps running), and a 404 for an instance that vanished.
#[tokio::test]
async fn ovh_errors_end_in_the_right_state_with_a_clear_message() {
    let fake = FakeOvh::start(hearth_provider_image(), 0).await;
    let site = Site::new(Db::Sqlite)
        .await
        .with_env("HEARTH_PROVISION_ATTEMPTS", "2")
        .with_env("HEARTH_CONTROL_ATTEMPTS", "1");
    let server = site.start().await;
    add_host(&server, &fake).await;
    let token = server.user("faults@example.com", "pro").await;

    fake.fail_next("POST", "/instance", 403, Some("INVALID_SIGNATURE"), 1);
    fake.fail_next("GET", "/instance", 429, None, 2);
    fake.fail_next("GET", "/instance", 500, None, 1);
    let id = create(&server, &token, "through the weather").await;
    server.wait_env(&token, &id, "running", UP).await;

    fake.fail_next("POST", "/shelve", 409, None, 1);
    server
        .call(
            "POST",
            &format!("/v1/environments/{id}/stop"),
            Some(&token),
            None,
        )
        .await;
    let asked = std::time::Instant::now();
    loop {
        let audit = server
            .call(
                "GET",
                &format!("/v1/environments/{id}/audit"),
                Some(&token),
                None,
            )
            .await
            .body;
        if audit.to_string().contains("conflict") {
            break;
        }
        assert!(
            asked.elapsed() < UP,
            "the failed stop never said why: {audit}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let env = server.wait_env(&token, &id, "running", UP).await;
    assert_eq!(
        env["state"], "running",
        "a refused shelve leaves it running"
    );
    assert_eq!(fake.instances()[0]["status"], "ACTIVE");

    fake.fail_next("POST", "/instance", 403, None, 10);
    let refused = create(&server, &token, "refused").await;
    let env = server.wait_env(&token, &refused, "error", UP).await;
    let message = env["stateMessage"].as_str().unwrap();
    assert!(message.contains("credentials"), "{message}");

    server.destroy(&token, &id, UP).await;
    assert!(fake.instances().is_empty(), "{:?}", fake.instances());
}

/// The seed's way: `VM_PROVIDER=ovh` and the `OVH_*` variables make the OVH project and
/// region the installation's first host, and no local Docker host is registered.
#[tokio::test]
async fn the_seeds_variables_make_the_ovh_project_the_first_host() {
    let fake = FakeOvh::start(hearth_provider_image(), -1800).await;
    let site = Site::new(Db::Sqlite)
        .await
        .with_env("VM_PROVIDER", "ovh")
        .with_env("OVH_ENDPOINT", &fake.base)
        .with_env("OVH_APPLICATION_KEY", &fake.application_key)
        .with_env("OVH_APPLICATION_SECRET", &fake.application_secret)
        .with_env("OVH_CONSUMER_KEY", &fake.consumer_key)
        .with_env("OVH_PROJECT_ID", &fake.project)
        .with_env("OVH_REGION", &fake.region)
        .with_env("HEARTH_OVH_POLL_MS", "300");
    let server = site.start().await;
    let started = std::time::Instant::now();
    loop {
        let hosts = server
            .call("GET", "/v1/admin/hosts", Some(&server.admin_token), None)
            .await
            .body;
        let items = hosts["items"].as_array().unwrap();
        assert_eq!(items.len(), 1, "one host, and no local Docker one: {hosts}");
        assert_eq!(items[0]["kind"], "ovh");
        if items[0]["health"] == "healthy" && items[0]["maxVcpus"] == 40 {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "the OVH host never reported its quota: {hosts}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let token = server.user("seed@example.com", "pro").await;
    let r = server
        .call(
            "POST",
            "/v1/me/vm",
            Some(&token),
            Some(json!({"vcpus": 1, "memoryMb": 1024, "diskGb": 10})),
        )
        .await;
    assert_eq!(r.status, StatusCode::ACCEPTED, "{:?}", r.body);
    let vm = server.wait_vm(&token, "running", UP).await;
    assert_eq!(fake.instances().len(), 1);
    let r = server
        .call(
            "POST",
            "/v1/me/vm/exec",
            Some(&token),
            Some(json!({"code": "id -un"})),
        )
        .await;
    assert_eq!(r.body["stdout"], "dev\n", "{vm} {:?}", r.body);
}

/// The guest image the fake runs instances with.
fn hearth_provider_image() -> &'static str {
    "hearth/base:latest"
}

/// OVH allows about 60 requests a minute per key. Twenty environments provisioning at once
/// with the default polling (`pollMs` 5000) stay within it: status comes from one shared
/// listing per poll, and creates that look for an earlier attempt's instance together
/// share one listing. The figures go to BENCHMARKS.md.
#[tokio::test]
async fn twenty_provisioning_at_once_stay_within_the_rate_limit() {
    let fake = FakeOvh::start(hearth_provider_image(), 0).await;
    let site = Site::new(Db::Sqlite)
        .await
        .with_env("HEARTH_PROVISION_CONCURRENCY", "20");
    let server = site.start().await;
    // The default polling: no pollMs.
    add_host_with(
        &server,
        &fake,
        "ovh-default-polling",
        json!({"flavorTypes": ["ovh.d2"]}),
    )
    .await;
    let token = server.user("twenty@example.com", "unlimited").await;
    let before = fake.calls().len();
    let started = std::time::Instant::now();
    let mut ids = Vec::new();
    for n in 0..20 {
        let r = server
            .call(
                "POST",
                "/v1/environments",
                Some(&token),
                Some(json!({"name": format!("e{n}"), "provider": "ovh", "vcpus": 1, "memoryMb": 1024, "diskGb": 10})),
            )
            .await;
        assert_eq!(r.status, StatusCode::ACCEPTED, "{:?}", r.body);
        ids.push(r.body["id"].as_str().unwrap().to_string());
    }
    for id in &ids {
        server
            .wait_env(&token, id, "running", Duration::from_secs(300))
            .await;
    }
    let took = started.elapsed();
    let calls = fake.calls().len() - before;
    let per_minute = calls as f64 * 60.0 / took.as_secs_f64().max(60.0);
    eprintln!(
        "20 provisions at once: {calls} OVH calls in {:.1} s ({per_minute:.1} per minute counted over at least a minute): {:?}",
        took.as_secs_f64(),
        tally(&fake, before)
    );
    assert!(
        per_minute <= 60.0,
        "{per_minute:.1} calls a minute: over OVH's 60"
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
        server
            .wait_env(&token, id, "destroyed", Duration::from_secs(300))
            .await;
    }
    assert!(fake.instances().is_empty());
}

/// An agent host bought on OVH: the instance's cloud-init fetches `hearth` from the control
/// plane with the join token and runs the agent, which joins; the host then runs a real
/// VM (QEMU). Selling it is refused while it holds the environment (and drains it), then
/// deletes the instance and removes the host.
#[tokio::test]
async fn an_agent_host_bought_on_ovh_joins_runs_a_vm_and_is_sold() {
    let fake = FakeOvh::start(hearth_provider_image(), 0).await;
    let site = Site::new(Db::Sqlite)
        .await
        .with_env("HEARTH_HOST_CHECK_INTERVAL_MS", "500")
        .with_env("HEARTH_SSH_WAIT_SECONDS", "180");
    let server = site.start().await;
    add_host(&server, &fake).await;
    let r = server
        .call(
            "POST",
            "/v1/admin/hosts/bought",
            Some(&server.admin_token),
            Some(json!({"name": "bought-1", "flavor": "b2-15", "region": fake.region, "controlPlane": server.base})),
        )
        .await;
    assert_eq!(r.status, StatusCode::ACCEPTED, "{:?}", r.body);
    let instance = r.body["instanceId"].as_str().unwrap().to_string();
    let started = std::time::Instant::now();
    let host = loop {
        let hosts = server
            .call("GET", "/v1/admin/hosts", Some(&server.admin_token), None)
            .await
            .body;
        if let Some(h) = hosts["items"]
            .as_array()
            .unwrap()
            .iter()
            .find(|h| h["name"] == "bought-1")
            && h["health"] == "healthy"
        {
            break h.clone();
        }
        assert!(
            started.elapsed() < Duration::from_secs(120),
            "the bought host never joined: {hosts}\nagent log:\n{}",
            fake_ovh::agent_log_of(&fake, &instance)
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    };
    assert_eq!(host["kind"], "agent");
    assert_eq!(fake.instances().len(), 1, "the agent host is an instance");

    let token = server.user("buyer@example.com", "pro").await;
    let r = server
        .call(
            "POST",
            "/v1/environments",
            Some(&token),
            Some(json!({"name": "on a bought host", "provider": "agent", "vcpus": 1, "memoryMb": 512, "diskGb": 3})),
        )
        .await;
    assert_eq!(r.status, StatusCode::ACCEPTED, "{:?}", r.body);
    let id = r.body["id"].as_str().unwrap().to_string();
    let started = std::time::Instant::now();
    let env = loop {
        let env = server
            .call("GET", &format!("/v1/environments/{id}"), Some(&token), None)
            .await
            .body;
        if env["state"] == "running" {
            break env;
        }
        assert!(
            started.elapsed() < Duration::from_secs(240) && env["state"] != "error",
            "the VM on the bought host is {}: {}\nagent log:\n{}\nserver log (end):\n{}",
            env["state"],
            env["stateMessage"],
            fake_ovh::agent_log_of(&fake, &instance),
            site.log()
                .lines()
                .rev()
                .take(40)
                .collect::<Vec<_>>()
                .join("\n")
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    };
    assert_eq!(env["hostName"], "bought-1");
    assert_eq!(
        exec(&server, &token, &id, "echo usable").await["stdout"],
        "usable\n"
    );

    assert_eq!(
        fake.instances().len(),
        1,
        "after many reconciler passes the agent host's instance is still there: it is no VM"
    );

    // Selling waits for the host to be empty, draining it meanwhile.
    let r = server
        .call(
            "DELETE",
            "/v1/admin/hosts/bought/bought-1",
            Some(&server.admin_token),
            None,
        )
        .await;
    assert_eq!(r.status, StatusCode::CONFLICT, "{:?}", r.body);
    let hosts = server
        .call("GET", "/v1/admin/hosts", Some(&server.admin_token), None)
        .await
        .body;
    assert!(hosts.to_string().contains("draining"), "{hosts}");
    server.destroy(&token, &id, Duration::from_secs(120)).await;
    // Asynchronously: the fake OVH API answers on this test's runtime meanwhile.
    let sold = tokio::process::Command::new(env!("CARGO_BIN_EXE_hearth"))
        .args([
            "admin",
            "hosts",
            "destroy",
            "bought-1",
            "--wait-minutes",
            "2",
        ])
        .env("HEARTH_URL", &server.base)
        .env("HEARTH_TOKEN", &server.admin_token)
        .output()
        .await
        .unwrap();
    assert!(sold.status.success(), "{sold:?}");
    assert!(
        fake.instances().is_empty(),
        "the instance is deleted: {:?}",
        fake.instances()
    );
    let hosts = server
        .call("GET", "/v1/admin/hosts", Some(&server.admin_token), None)
        .await
        .body;
    assert!(!hosts.to_string().contains("bought-1"), "{hosts}");
}

/// The demand policy against the fake: with the agent hosts short of free vCPUs it buys
/// one host at a time (waiting for each to join) up to the maximum and never past it;
/// a purchase that would pass the budget is refused and audited; hosts it bought are sold
/// once empty for the idle time, down to the minimum.
#[tokio::test]
async fn hosts_by_demand_buy_up_to_the_maximum_within_the_budget_and_sell_when_idle() {
    let fake = FakeOvh::start(hearth_provider_image(), 0).await;
    let site = Site::new(Db::Sqlite)
        .await
        .with_env("HEARTH_HOST_CHECK_INTERVAL_MS", "500");
    let server = site.start().await;
    add_host(&server, &fake).await;
    let admin = Some(server.admin_token.as_str());
    let policy = |free_below: i64, min: i64, max: i64, idle: i64, budget: f64| {
        json!({
            "enabled": true, "via": "ovh-gra9", "flavor": "b2-15", "controlPlane": server.base,
            "freeVcpusBelow": free_below, "minHosts": min, "maxHosts": max,
            "idleSeconds": idle, "maxHourlyCost": budget,
        })
    };
    let r = server
        .call(
            "PUT",
            "/v1/admin/demand-policy",
            admin,
            Some(json!({"enabled": true})),
        )
        .await;
    assert_eq!(
        r.status,
        StatusCode::BAD_REQUEST,
        "an incomplete policy: {:?}",
        r.body
    );
    let set = |body: Value| {
        let server = &server;
        async move {
            let r = server
                .call("PUT", "/v1/admin/demand-policy", admin, Some(body))
                .await;
            assert_eq!(r.status, StatusCode::OK, "{:?}", r.body);
        }
    };
    let audit = || async {
        server
            .call(
                "GET",
                "/v1/admin/audit?actor=system:demand&limit=100",
                admin,
                None,
            )
            .await
            .body
            .to_string()
    };
    let agents = || async {
        let hosts = server
            .call("GET", "/v1/admin/hosts", admin, None)
            .await
            .body;
        hosts["items"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|h| h["kind"] == "agent" && h["health"] == "healthy")
            .count()
    };
    let wait = |what: &'static str| {
        let started = std::time::Instant::now();
        move || {
            assert!(
                started.elapsed() < Duration::from_secs(180),
                "{what} did not happen within 180 s"
            );
        }
    };

    // Always short of vCPUs: two hosts, one after the other, and never a third.
    set(policy(1000, 0, 2, 3600, 10.0)).await;
    let check = wait("two bought hosts joining");
    while agents().await < 2 {
        check();
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    let check = wait("the refusal at the maximum");
    while !audit().await.contains("the maximum is 2") {
        check();
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    tokio::time::sleep(Duration::from_secs(2)).await; // several more passes
    assert_eq!(fake.instances().len(), 2, "never more than the maximum");

    // A third would cost 3 x 0.10 an hour: over a budget of 0.25, refused and audited.
    set(policy(1000, 0, 3, 3600, 0.25)).await;
    let check = wait("the refusal over the budget");
    while !audit().await.contains("over the budget of 0.2500/h") {
        check();
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    assert_eq!(fake.instances().len(), 2, "nothing bought past the budget");

    // Nothing needed any more: the empty hosts go after the idle time, down to the minimum.
    set(policy(0, 1, 3, 1, 10.0)).await;
    let check = wait("selling down to the minimum");
    while fake.instances().len() > 1 {
        check();
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(fake.instances().len(), 1, "never below the minimum");
    set(policy(0, 0, 3, 1, 10.0)).await;
    let check = wait("selling the last");
    while !fake.instances().is_empty() {
        check();
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    // The sale is audited once OVH says the instance is gone.
    let started = std::time::Instant::now();
    let said = loop {
        let said = audit().await;
        if said.matches("\"action\":\"demand_sell\"").count() >= 2 {
            break said;
        }
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "the second sale was never audited: {said}"
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    };
    assert_eq!(
        said.matches("\"action\":\"demand_sell\",\"actor\":\"system:demand\",\"at\"")
            .count(),
        2,
        "two sales, no more: {said}"
    );
    assert_eq!(said.matches("bought demand-").count(), 2, "{said}");
    assert!(
        said.contains("free vCPUs"),
        "each purchase says why: {said}"
    );
}
