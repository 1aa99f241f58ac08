//! Bad input gets a clear 4xx and writes nothing; an unreachable Docker gives a clear error.

mod common;

use common::*;
use reqwest::StatusCode;
use serde_json::json;
use std::time::Duration;

async fn refused_without_writes(db: Db) {
    let site = Site::new(db).await;
    let server = site.start().await;
    let token = server.user("bad@example.com", "free").await;
    let before = site.counts().await;

    let bad_sizes = [
        json!({"vcpus": 0}),
        json!({"vcpus": 1000}),
        json!({"memoryMb": -1}),
        json!({"diskGb": 0}),
        json!({"vcpus": "two"}),
        json!({"vcpus": 1.5}),
        json!({"vcpus": 99999999999999999999.0}),
        json!({"vcpus": 1, "color": "red"}),
        json!([1, 2]),
    ];
    for body in bad_sizes {
        let r = server
            .call("POST", "/v1/me/vm", Some(&token), Some(body.clone()))
            .await;
        assert_eq!(r.status, StatusCode::BAD_REQUEST, "{body} -> {:?}", r.body);
        assert_eq!(r.body["error"]["code"], "invalid_input");
        assert!(!r.body["error"]["message"].as_str().unwrap().is_empty());
    }
    let r = server
        .call("POST", "/v1/me/vm", Some(&token), Some(json!({"vcpus": 0})))
        .await;
    assert!(
        r.body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("vcpus"),
        "{:?}",
        r.body
    );
    // Over the tier's quota: 429 naming the limit.
    let r = server
        .call("POST", "/v1/me/vm", Some(&token), Some(json!({"vcpus": 8})))
        .await;
    assert_eq!(r.status, StatusCode::TOO_MANY_REQUESTS, "{:?}", r.body);
    assert!(
        r.body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("maxVcpus")
    );

    for raw in [
        b"{".to_vec(),
        b"not json".to_vec(),
        vec![b' '; 0]
            .into_iter()
            .chain(b"{\"vcpus\":".iter().copied())
            .collect(),
        {
            let mut big = b"{\"code\":\"".to_vec();
            big.extend(std::iter::repeat_n(b'a', 700 * 1024));
            big.extend(b"\"}");
            big
        },
    ] {
        let r = server.raw("/v1/me/vm", &token, raw).await;
        assert_eq!(r.status, StatusCode::BAD_REQUEST, "{:?}", r.body);
    }

    let bad_execs = [
        json!({"code": ""}),
        json!({"code": "   "}),
        json!({"code": "a\u{0000}b"}),
        json!({"code": "true", "timeoutSeconds": 0}),
        json!({"code": "true", "timeoutSeconds": 99999}),
        json!({"code": "true", "workingDir": "relative/path"}),
        json!({"code": "true", "shell": "/bin/sh"}),
        json!({"code": 5}),
        json!({"code": "x".repeat(300 * 1024)}),
    ];
    for body in bad_execs {
        let r = server
            .call("POST", "/v1/me/vm/exec", Some(&token), Some(body.clone()))
            .await;
        assert_eq!(
            r.status,
            StatusCode::BAD_REQUEST,
            "{} -> {:?}",
            &body.to_string()[..body.to_string().len().min(80)],
            r.body
        );
    }

    // No VM yet: 404 for everything that needs one.
    for (m, p) in [
        ("GET", "/v1/me/vm"),
        ("POST", "/v1/me/vm/start"),
        ("POST", "/v1/me/vm/stop"),
        ("DELETE", "/v1/me/vm"),
        ("GET", "/v1/me/vm/logs"),
    ] {
        let r = server.call(m, p, Some(&token), None).await;
        assert_eq!(r.status, StatusCode::NOT_FOUND, "{m} {p}");
    }
    let r = server
        .call(
            "POST",
            "/v1/me/vm/exec",
            Some(&token),
            Some(json!({"code": "true"})),
        )
        .await;
    assert_eq!(r.status, StatusCode::NOT_FOUND);

    // Authentication and roles.
    for t in [None, Some("hearth_0000"), Some("")] {
        let r = server.call("GET", "/v1/me", t, None).await;
        assert_eq!(r.status, StatusCode::UNAUTHORIZED, "{t:?}");
        assert_eq!(r.body["error"]["code"], "unauthenticated");
        let r = server.call("POST", "/v1/me/vm", t, Some(json!({}))).await;
        assert_eq!(r.status, StatusCode::UNAUTHORIZED);
    }
    let r = server
        .call("GET", "/v1/admin/vms", Some(&token), None)
        .await;
    assert_eq!(r.status, StatusCode::FORBIDDEN);
    let r = server
        .call(
            "POST",
            "/v1/admin/users",
            Some(&token),
            Some(json!({"email": "x@example.com"})),
        )
        .await;
    assert_eq!(r.status, StatusCode::FORBIDDEN);
    for body in [
        json!({"email": "no-at-sign"}),
        json!({"email": "a@b\n"}),
        json!({"email": "a@b", "role": "root"}),
        json!({"email": "a@b", "tier": "gold"}),
        json!({}),
    ] {
        let r = server
            .call(
                "POST",
                "/v1/admin/users",
                Some(&server.admin_token),
                Some(body.clone()),
            )
            .await;
        assert_eq!(r.status, StatusCode::BAD_REQUEST, "{body}");
    }
    let r = server
        .call(
            "POST",
            "/v1/admin/users",
            Some(&server.admin_token),
            Some(json!({"email": "bad@example.com"})),
        )
        .await;
    assert_eq!(r.status, StatusCode::CONFLICT);

    assert_eq!(
        site.counts().await,
        before,
        "a refused request wrote to the database"
    );

    // The spec documents every route we serve.
    let spec = server.call("GET", "/openapi.json", None, None).await;
    for path in [
        "/v1/me",
        "/v1/me/vm",
        "/v1/me/vm/exec",
        "/v1/me/vm/start",
        "/v1/me/vm/stop",
        "/v1/me/vm/logs",
        "/v1/flavors",
        "/v1/admin/users",
        "/v1/admin/users/{id}",
        "/v1/admin/vms",
        "/healthz",
        "/readyz",
        "/v1/environments",
        "/v1/environments/{id}",
        "/v1/environments/{id}/wait",
        "/v1/environments/{id}/start",
        "/v1/environments/{id}/stop",
        "/v1/environments/{id}/exec",
        "/v1/environments/{id}/executions",
        "/v1/environments/{id}/audit",
        "/v1/environments/{id}/logs",
        "/v1/environments/{id}/activity",
        "/v1/environments/{id}/keepalive",
        "/v1/admin/environments",
        "/v1/admin/environments/{id}",
        "/v1/admin/jobs",
        "/v1/admin/jobs/{id}/retry",
        "/v1/admin/hosts",
        "/v1/admin/hosts/{id}/drain",
        "/v1/admin/hosts/{id}/ready",
        "/v1/admin/audit",
    ] {
        assert!(
            spec.body["paths"].get(path).is_some(),
            "{path} missing from openapi.json"
        );
    }
    let me = server.call("GET", "/v1/me", Some(&token), None).await;
    assert_eq!(me.body["quota"]["maxVcpus"], 2);
    assert_eq!(me.body["user"]["tier"], "free");
}

#[tokio::test]
async fn refused_without_writes_sqlite() {
    refused_without_writes(Db::Sqlite).await;
}

#[tokio::test]
async fn refused_without_writes_postgres() {
    refused_without_writes(Db::Postgres).await;
}

/// Docker down: the server starts and serves; provisioning ends in `error` with a message
/// that says what to do, after its retries, not a hang; the host turns unhealthy within the
/// stated time and new environments are refused with a clear 503; a destroy cannot be
/// confirmed, so it waits (visibly) instead of claiming success.
#[tokio::test]
async fn docker_unreachable() {
    let site = Site::new(Db::Sqlite)
        .await
        .with_env("DOCKER_HOST", "unix:///nonexistent/docker.sock")
        .with_env("HEARTH_HOST_CHECK_INTERVAL_MS", "200")
        .with_env("HEARTH_HOST_UNHEALTHY_AFTER_MS", "3000")
        .with_env("HEARTH_HOST_OUTAGE_BUDGET_SECONDS", "2");
    let server = site.start().await;
    let token = server.user("nodocker@example.com", "free").await;
    let r = server.call("POST", "/v1/me/vm", Some(&token), None).await;
    assert_eq!(r.status, StatusCode::ACCEPTED, "{:?}", r.body);
    let vm = server
        .wait_vm(&token, "error", Duration::from_secs(60))
        .await;
    let message = vm["stateMessage"].as_str().unwrap();
    assert!(
        message.contains("cannot reach the Docker engine of host docker@")
            && message.contains("start it"),
        "{message}"
    );
    assert!(
        site.log().contains("cannot reach the Docker engine"),
        "the log says Docker is down"
    );

    // Within the stated time the host is unhealthy: reported, and skipped by placement.
    let started = std::time::Instant::now();
    loop {
        let ready = server.call("GET", "/readyz", None, None).await;
        assert_eq!(
            ready.status,
            StatusCode::OK,
            "the database answers: this node is ready {:?}",
            ready.body
        );
        if ready.body["hosts"]["unhealthy"] == 1 {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "the host never turned unhealthy: {:?}",
            ready.body
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let other = server.user("later@example.com", "free").await;
    let r = server
        .call(
            "POST",
            "/v1/environments",
            Some(&other),
            Some(json!({"name": "refused"})),
        )
        .await;
    assert_eq!(
        (r.status, r.body["error"]["code"].as_str()),
        (StatusCode::SERVICE_UNAVAILABLE, Some("no_capacity")),
        "{:?}",
        r.body
    );
    assert!(
        r.body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("1 not answering"),
        "{:?}",
        r.body
    );
    let hosts = server
        .call("GET", "/v1/admin/hosts", Some(&server.admin_token), None)
        .await;
    assert!(
        hosts.body["items"][0]["healthMessage"]
            .as_str()
            .unwrap()
            .contains("cannot reach the Docker engine"),
        "{:?}",
        hosts.body
    );

    // Whatever the failed provision may have left cannot be confirmed gone while Docker is
    // down: it stays counted, and a destroy waits behind the clean-up instead of claiming
    // a success it cannot confirm.
    assert!(
        message.contains("cleaned up once its host answers"),
        "{message}"
    );
    let me = server.call("GET", "/v1/me", Some(&token), None).await;
    assert_eq!(
        me.body["usage"]["concurrentEnvironments"], 1,
        "{:?}",
        me.body
    );
    let r = server.call("DELETE", "/v1/me/vm", Some(&token), None).await;
    assert_eq!(r.status, StatusCode::ACCEPTED);
    tokio::time::sleep(Duration::from_secs(2)).await;
    let vm = server.call("GET", "/v1/me/vm", Some(&token), None).await;
    assert_eq!(
        vm.body["status"], "error",
        "never claims a destroy it cannot confirm"
    );
    let store = site.store().await;
    let jobs = store
        .jobs_for_environment(vm.body["environmentId"].as_str().unwrap())
        .await
        .unwrap();
    assert_eq!(jobs.len(), 2);
    assert!(
        jobs[0]
            .last_error
            .as_deref()
            .unwrap_or("")
            .contains("undoing"),
        "{jobs:?}"
    );
    assert!(
        jobs.iter()
            .all(|j| j.state == hearth_store::JobState::Queued),
        "{jobs:?}"
    );
}
