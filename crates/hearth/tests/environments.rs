//! Environments under quota: atomic quotas, the reaper, recovery, the reconciler, and
//! hostile strings, on SQLite and PostgreSQL.

mod common;

use common::*;
use reqwest::StatusCode;
use serde_json::{Value, json};
use std::time::Duration;

const UP: Duration = Duration::from_secs(120);

async fn set_quota(server: &Server, email: &str, quota: Value) {
    let id = server.user_id(email).await;
    let r = server
        .patch(
            &format!("/v1/admin/users/{id}"),
            &server.admin_token,
            json!({ "quota": quota }),
        )
        .await;
    assert_eq!(r.status, StatusCode::OK, "{:?}", r.body);
}

async fn concurrent_creates_respect_quota(db: Db) {
    // No workers: the environments stay `requested`, which holds quota like any active state.
    let site = Site::new(db).await.with_env("HEARTH_WORKERS", "0");
    let server = site.start().await;
    let token = server.user("many@example.com", "free").await;
    set_quota(&server, "many@example.com", json!({"maxEnvironments": 5, "maxConcurrentEnvironments": 5, "maxVcpus": 50, "maxMemoryMb": 51200, "maxDiskGb": 500})).await;
    let body = json!({"name": "load", "vcpus": 1, "memoryMb": 256, "diskGb": 1});
    let calls =
        (0..50).map(|_| server.call("POST", "/v1/environments", Some(&token), Some(body.clone())));
    let results = futures::future::join_all(calls).await;
    let ok = results
        .iter()
        .filter(|r| r.status == StatusCode::ACCEPTED)
        .count();
    let over = results
        .iter()
        .filter(|r| r.status == StatusCode::TOO_MANY_REQUESTS)
        .count();
    assert_eq!(
        (ok, over),
        (5, 45),
        "{:?}",
        results.iter().map(|r| r.status).collect::<Vec<_>>()
    );
    let refused = results
        .iter()
        .find(|r| r.status == StatusCode::TOO_MANY_REQUESTS)
        .unwrap();
    assert_eq!(refused.body["error"]["code"], "quota_exceeded");
    assert!(
        refused.body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("maxEnvironments is 5; 5 in use"),
        "{:?}",
        refused.body
    );
    let me = server.call("GET", "/v1/me", Some(&token), None).await;
    assert_eq!(me.body["usage"]["environments"], 5);
    assert_eq!(me.body["usage"]["concurrentEnvironments"], 5);
    assert_eq!(me.body["usage"]["vcpus"], 5);
    let list = server
        .call("GET", "/v1/environments", Some(&token), None)
        .await;
    assert_eq!(list.body["items"].as_array().unwrap().len(), 5);
    assert_eq!(
        site.store()
            .await
            .count("SELECT COUNT(*) AS n FROM jobs")
            .await
            .unwrap(),
        5
    );
    // Slugs: env_ + 8 characters of [a-z0-9].
    let created = results
        .iter()
        .find(|r| r.status == StatusCode::ACCEPTED)
        .unwrap();
    let slug = created.body["slug"].as_str().unwrap();
    assert!(
        slug.len() == 12
            && slug.starts_with("env_")
            && slug[4..]
                .chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit())
    );
    assert!(
        created.body.get("accessToken").is_none(),
        "no token that nothing checks"
    );
    // Lookup by slug, and the wait endpoint times out with 408 while nothing runs.
    let by_slug = server
        .call(
            "GET",
            &format!("/v1/environments/{slug}"),
            Some(&token),
            None,
        )
        .await;
    assert_eq!(by_slug.body["id"], created.body["id"]);
    let waited = server
        .call(
            "GET",
            &format!("/v1/environments/{slug}/wait?state=running&timeoutSeconds=1"),
            Some(&token),
            None,
        )
        .await;
    assert_eq!(waited.status, StatusCode::REQUEST_TIMEOUT);
    // Duration is capped by the quota (free tier: 24 hours).
    set_quota(&server, "many@example.com", json!({})).await;
    let r = server
        .call(
            "POST",
            "/v1/environments",
            Some(&token),
            Some(json!({"name": "long", "durationHours": 25})),
        )
        .await;
    assert_eq!(r.status, StatusCode::TOO_MANY_REQUESTS);
    assert!(
        r.body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("maxDurationHours")
    );
}

#[tokio::test]
async fn concurrent_creates_respect_quota_sqlite() {
    concurrent_creates_respect_quota(Db::Sqlite).await;
}

#[tokio::test]
async fn concurrent_creates_respect_quota_postgres() {
    concurrent_creates_respect_quota(Db::Postgres).await;
}

async fn reaper_stops_idle_and_destroys_expired(db: Db) {
    let site = Site::new(db).await;
    let server = site.start().await;
    let token = server.user("idle@example.com", "free").await;
    set_quota(&server, "idle@example.com", json!({"maxEnvironments": 2, "maxConcurrentEnvironments": 2, "maxVcpus": 2, "maxMemoryMb": 1024})).await;
    let mk = |name: &str| json!({"name": name, "vcpus": 1, "memoryMb": 256, "diskGb": 1});
    let a = server
        .call(
            "POST",
            "/v1/environments",
            Some(&token),
            Some(mk("idle one")),
        )
        .await
        .body["id"]
        .as_str()
        .unwrap()
        .to_string();
    let b = server
        .call(
            "POST",
            "/v1/environments",
            Some(&token),
            Some(mk("short-lived")),
        )
        .await
        .body["id"]
        .as_str()
        .unwrap()
        .to_string();
    server.wait_env(&token, &a, "running", UP).await;
    server.wait_env(&token, &b, "running", UP).await;

    // Why is it alive? Started, free tier: stops after 60 idle minutes.
    let act = server
        .call(
            "GET",
            &format!("/v1/environments/{a}/activity"),
            Some(&token),
            None,
        )
        .await
        .body;
    assert_eq!(
        (
            act["lastActivitySource"].as_str(),
            act["autoStopMinutes"].as_i64()
        ),
        (Some("start"), Some(60)),
        "{act:?}"
    );
    assert!(act["nextAutoStopAt"].is_string());
    server
        .call(
            "POST",
            &format!("/v1/environments/{a}/exec"),
            Some(&token),
            Some(json!({"code": "true"})),
        )
        .await;
    let act = server
        .call(
            "GET",
            &format!("/v1/environments/{a}/activity"),
            Some(&token),
            None,
        )
        .await
        .body;
    assert_eq!(act["lastActivitySource"], "exec");
    let act = server
        .call(
            "POST",
            &format!("/v1/environments/{a}/keepalive"),
            Some(&token),
            None,
        )
        .await
        .body;
    assert_eq!(act["lastActivitySource"], "keepalive");

    // Two hours of idleness (written into the database, not slept) and an expiry in the past.
    let store = site.store().await;
    let two_hours_ago = now_ms() - 2 * 3_600_000;
    store
        .exec_sql_for_tests(
            "UPDATE environments SET last_activity_at = $1 WHERE id = $2",
            two_hours_ago,
            &a,
        )
        .await
        .unwrap();
    store
        .exec_sql_for_tests(
            "UPDATE environments SET expires_at = $1 WHERE id = $2",
            now_ms() - 1000,
            &b,
        )
        .await
        .unwrap();
    server.wait_env(&token, &a, "stopped", UP).await;
    server.wait_env(&token, &b, "destroyed", UP).await;
    assert!(containers_of(&b).is_empty());
    assert_eq!(
        docker_inspect(&format!("hearth-{a}"), "{{.State.Running}}"),
        "false"
    );

    let audit = server
        .call(
            "GET",
            &format!("/v1/environments/{a}/audit"),
            Some(&token),
            None,
        )
        .await
        .body;
    let stopped = audit["items"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["newState"] == "stopped")
        .expect("a stop in the audit");
    assert_eq!(stopped["actor"], "system:reaper");
    assert_eq!(stopped["previousState"], "stopping");
    let audit = server
        .call(
            "GET",
            &format!("/v1/admin/audit?actor=system:reaper&environmentId={b}"),
            Some(&server.admin_token),
            None,
        )
        .await
        .body;
    assert!(
        audit["items"]
            .as_array()
            .unwrap()
            .iter()
            .any(|e| e["newState"] == "destroyed"),
        "{audit:?}"
    );
    // A user sees only their own audit; the admin filter works on actor.
    let r = server
        .call("GET", "/v1/admin/audit", Some(&token), None)
        .await;
    assert_eq!(r.status, StatusCode::FORBIDDEN);

    server.destroy(&token, &a, UP).await;
    assert!(containers_of(&a).is_empty());
}

#[tokio::test]
async fn reaper_stops_idle_and_destroys_expired_sqlite() {
    reaper_stops_idle_and_destroys_expired(Db::Sqlite).await;
}

#[tokio::test]
async fn reaper_stops_idle_and_destroys_expired_postgres() {
    reaper_stops_idle_and_destroys_expired(Db::Postgres).await;
}

/// A failed environment releases its resources, can be retried and destroyed; hostile
/// names and variables are kept verbatim and reach the guest as data.
async fn recovery_and_hostile_strings(db: Db) {
    let site = Site::new(db).await;
    let server = site.start().await;
    let token = server.user("recover@example.com", "pro").await;

    let r = server
        .call("POST", "/v1/environments", Some(&token), Some(json!({"name": "fails", "memoryMb": 256, "initScript": "echo starting; echo broken >&2; exit 7"})))
        .await;
    assert_eq!(r.status, StatusCode::ACCEPTED, "{:?}", r.body);
    let failing = r.body["id"].as_str().unwrap().to_string();
    let env = server.wait_env(&token, &failing, "error", UP).await;
    assert!(
        env["stateMessage"]
            .as_str()
            .unwrap()
            .contains("exited with 7"),
        "{env:?}"
    );
    assert!(
        containers_of(&failing).is_empty(),
        "the half-made VM was removed"
    );
    let me = server.call("GET", "/v1/me", Some(&token), None).await.body;
    assert_eq!(
        me["usage"]["concurrentEnvironments"], 0,
        "a failed environment holds no quota"
    );
    let waited = server
        .call(
            "GET",
            &format!("/v1/environments/{failing}/wait?state=running&timeoutSeconds=5"),
            Some(&token),
            None,
        )
        .await;
    assert_eq!(waited.status, StatusCode::CONFLICT);
    // Retry: start provisions it again (and the script fails again).
    let r = server
        .call(
            "POST",
            &format!("/v1/environments/{failing}/start"),
            Some(&token),
            None,
        )
        .await;
    assert_eq!(r.status, StatusCode::ACCEPTED);
    let store = site.store().await;
    for _ in 0..600 {
        let audit = store.audit_for_environment(&failing).await.unwrap();
        if audit
            .iter()
            .filter(|a| a.new_state.as_deref() == Some("error"))
            .count()
            >= 2
        {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let audit = store.audit_for_environment(&failing).await.unwrap();
    assert_eq!(
        audit
            .iter()
            .filter(|a| a.new_state.as_deref() == Some("provisioning"))
            .count(),
        2,
        "{audit:?}"
    );
    server.destroy(&token, &failing, UP).await;

    let hostile_name = "<script>alert(1)</script>'; DROP TABLE environments;--";
    let hostile_value =
        "$(touch /tmp/pwned) `touch /tmp/pwned2` 'single' \"double\" \\ ; rm -rf / #\nsecond line";
    let r = server
        .call(
            "POST",
            "/v1/environments",
            Some(&token),
            Some(json!({
                "name": hostile_name, "memoryMb": 256,
                "environmentVars": {"HOSTILE": hostile_value, "EMPTY": ""},
            })),
        )
        .await;
    assert_eq!(r.status, StatusCode::ACCEPTED, "{:?}", r.body);
    let id = r.body["id"].as_str().unwrap().to_string();
    let env = server.wait_env(&token, &id, "running", UP).await;
    assert_eq!(env["name"], hostile_name);
    assert_eq!(env["environmentVars"]["HOSTILE"], hostile_value);
    let out = server.call("POST", &format!("/v1/environments/{id}/exec"), Some(&token), Some(json!({"code": "printenv HOSTILE; test ! -e /tmp/pwned && test ! -e /tmp/pwned2 && echo clean"}))).await;
    assert_eq!(
        out.body["stdout"],
        format!("{hostile_value}\nclean\n"),
        "{:?}",
        out.body
    );
    // The container itself got the variable as data too.
    let docker_env = docker_inspect(&format!("hearth-{id}"), "{{json .Config.Env}}");
    let docker_env: Vec<String> = serde_json::from_str(&docker_env).unwrap();
    assert!(docker_env.contains(&format!("HOSTILE={hostile_value}")));

    let history = server
        .call(
            "GET",
            &format!("/v1/environments/{id}/executions?limit=1"),
            Some(&token),
            None,
        )
        .await
        .body;
    assert_eq!(history["items"][0]["status"], "completed");
    assert!(history["nextCursor"].is_null());
    for bad in [
        json!({"name": "x", "environmentVars": {"A-B": "1"}}),
        json!({"name": "x", "environmentVars": {"HEARTH_AUTHORIZED_KEYS": "ssh-ed25519 AAAA"}}),
        json!({"name": "x", "sshPublicKey": "command=\"rm -rf /\" ssh-ed25519 AAAA"}),
        json!({"name": "x", "region": "GRA9"}),
        json!({"name": "x", "provider": "ovh"}),
        json!({"name": ""}),
        json!({"name": "x\u{0007}"}),
        json!({"name": "x", "durationHours": 0}),
        json!({"name": "x", "baseImage": "ubuntu:latest"}),
        json!({"name": "x", "repositoryUrl": "https://user:secret@example.com/r.git"}),
        json!({"name": "x", "repositoryUrl": "file:///etc"}),
        json!({"name": "x", "repositoryUrl": "ext::sh -c touch% /tmp/pwned"}),
        json!({"name": "x", "repositoryUrl": "--upload-pack=touch /tmp/pwned"}),
        json!({"name": "x", "repositoryUrl": "https://example.com/r.git", "repositoryRef": "--orphan"}),
        json!({"name": "x", "repositoryRef": "main"}),
        json!({"name": "x", "repositoryUrl": "https://example.com/r.git", "gitCredential": "none-such"}),
    ] {
        let r = server
            .call("POST", "/v1/environments", Some(&token), Some(bad.clone()))
            .await;
        assert_eq!(r.status, StatusCode::BAD_REQUEST, "{bad} -> {:?}", r.body);
    }
    server.destroy(&token, &id, UP).await;
    assert!(containers_of(&id).is_empty());
}

#[tokio::test]
async fn recovery_and_hostile_strings_sqlite() {
    recovery_and_hostile_strings(Db::Sqlite).await;
}

#[tokio::test]
async fn recovery_and_hostile_strings_postgres() {
    recovery_and_hostile_strings(Db::Postgres).await;
}

/// The reconciler: a transition stuck with no job is rolled back; a labelled container
/// that belongs to no environment is removed.
#[tokio::test]
async fn reconciler_rolls_back_and_removes_orphans() {
    let site = Site::new(Db::Sqlite)
        .await
        .with_env("HEARTH_TRANSITION_DEADLINE_SECONDS", "1")
        .with_env("HEARTH_WORKERS", "0");
    let server = site.start().await;
    let token = server.user("stuck@example.com", "pro").await;
    let r = server
        .call(
            "POST",
            "/v1/environments",
            Some(&token),
            Some(json!({"name": "stuck"})),
        )
        .await;
    let id = r.body["id"].as_str().unwrap().to_string();
    // Its job vanished (say, deleted by hand): nothing will move it on.
    let store = site.store().await;
    store
        .exec_sql_for_tests(
            "DELETE FROM jobs WHERE environment_id = $2 AND $1 = $1",
            0,
            &id,
        )
        .await
        .unwrap();
    let env = server
        .wait_env(&token, &id, "error", Duration::from_secs(30))
        .await;
    assert!(
        env["stateMessage"]
            .as_str()
            .unwrap()
            .contains("stuck in requested"),
        "{env:?}"
    );
    let audit = store.audit_for_environment(&id).await.unwrap();
    assert_eq!(audit.last().unwrap().actor, "system:reconciler");

    // A labelled container of this installation with no environment is removed; one of
    // another installation, named and labelled the same way, is not.
    let installation = store.installation().await.unwrap().id;
    let name = site.instance.clone().unwrap();
    let orphan_env = format!("{name}-orphan");
    let foreign_env = format!("{name}-foreign");
    for (env, owner) in [
        (orphan_env.as_str(), installation.as_str()),
        (foreign_env.as_str(), "another-installation"),
    ] {
        let out = std::process::Command::new("docker")
            .args([
                "run",
                "-d",
                "--label",
                "hearth.managed=true",
                "--label",
                &format!("hearth.instance={name}"),
                "--label",
                &format!("hearth.installation={owner}"),
                "--label",
                &format!("hearth.environment={env}"),
                "--name",
                &format!("hearth-{env}"),
                "hearth/base:latest",
                "sleep",
                "600",
            ])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    for _ in 0..100 {
        if containers_of(&orphan_env).is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let left: Vec<String> = containers_of(&orphan_env);
    let foreign: Vec<String> = containers_of(&foreign_env);
    let _ = std::process::Command::new("docker")
        .args(["rm", "-f"])
        .args(&left)
        .args(&foreign)
        .output();
    assert!(left.is_empty(), "orphan container was not removed");
    assert_eq!(
        foreign.len(),
        1,
        "another installation's container was touched"
    );
    let audit = server
        .call(
            "GET",
            &format!("/v1/admin/audit?action=orphan_removed&environmentId={orphan_env}"),
            Some(&server.admin_token),
            None,
        )
        .await;
    assert_eq!(
        audit.body["items"].as_array().unwrap().len(),
        1,
        "{:?}",
        audit.body
    );
}
