//! The personal VM end to end on the real Docker engine, on SQLite and on PostgreSQL.

mod common;

use common::*;
use reqwest::StatusCode;
use serde_json::json;
use std::time::Duration;

const UP: Duration = Duration::from_secs(120);

async fn lifecycle(db: Db) {
    let site = Site::new(db).await;
    let server = site.start().await;
    let token = server.user("life@example.com", "free").await;

    let r = server
        .call(
            "POST",
            "/v1/me/vm",
            Some(&token),
            Some(json!({"vcpus": 1, "memoryMb": 1024, "diskGb": 5})),
        )
        .await;
    assert_eq!(r.status, StatusCode::ACCEPTED, "{:?}", r.body);
    let env_id = r.body["environmentId"].as_str().unwrap().to_string();
    let vm = server.wait_vm(&token, "running", UP).await;
    assert_eq!(vm["sshUser"], "dev");
    assert!(vm["sshPort"].as_i64().unwrap() > 0);

    // The container has the requested limits and Hearth's labels.
    let name = format!("hearth-{env_id}");
    assert_eq!(
        docker_inspect(&name, "{{.HostConfig.Memory}}"),
        (1024i64 * 1024 * 1024).to_string()
    );
    assert_eq!(
        docker_inspect(&name, "{{index .Config.Labels \"hearth.managed\"}}"),
        "true"
    );
    assert_eq!(containers_of(&env_id).len(), 1);

    let r = server
        .call(
            "POST",
            "/v1/me/vm/exec",
            Some(&token),
            Some(json!({"code": "echo hello; echo oops >&2; exit 3"})),
        )
        .await;
    assert_eq!(r.status, StatusCode::OK, "{:?}", r.body);
    assert_eq!(r.body["stdout"], "hello\n");
    assert_eq!(r.body["stderr"], "oops\n");
    assert_eq!(r.body["exitCode"], 3);
    assert!(r.body["durationMs"].as_i64().is_some());

    // Hostile text in a command reaches the guest shell as the user wrote it.
    let r = server
        .call(
            "POST",
            "/v1/me/vm/exec",
            Some(&token),
            Some(json!({"code": "printf '%s' '$(id); `id` \"q\"'", "workingDir": "/tmp"})),
        )
        .await;
    assert_eq!(r.body["stdout"], "$(id); `id` \"q\"", "{:?}", r.body);
    let r = server
        .call(
            "POST",
            "/v1/me/vm/exec",
            Some(&token),
            Some(json!({"code": "pwd", "workingDir": "/home/dev"})),
        )
        .await;
    assert_eq!(r.body["stdout"], "/home/dev\n");
    // A command that outlives its timeout is cut off and reported.
    let r = server
        .call(
            "POST",
            "/v1/me/vm/exec",
            Some(&token),
            Some(json!({"code": "sleep 30", "timeoutSeconds": 1})),
        )
        .await;
    assert_eq!(r.body["timedOut"], true, "{:?}", r.body);
    // A command that leaves a process in the background holding its output ends when it
    // does (with a short grace for its last output), not at its time limit.
    let r = server
        .call(
            "POST",
            "/v1/me/vm/exec",
            Some(&token),
            Some(json!({"code": "echo started; sleep 30 &", "timeoutSeconds": 25})),
        )
        .await;
    assert_eq!(
        (&r.body["exitCode"], &r.body["timedOut"], &r.body["stdout"]),
        (&json!(0), &json!(false), &json!("started\n")),
        "{:?}",
        r.body
    );

    let store = site.store().await;
    let executions = store.executions_for_environment(&env_id).await.unwrap();
    assert_eq!(executions.len(), 5);
    assert_eq!(
        (executions[0].exit_code, executions[0].stdout.as_str()),
        (Some(3), "hello\n")
    );
    assert_eq!(executions[3].status, "timeout");

    let logs = server
        .call("GET", "/v1/me/vm/logs", Some(&token), None)
        .await;
    let messages: Vec<String> = logs.body["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| l["message"].as_str().unwrap().to_string())
        .collect();
    assert!(
        messages.iter().any(|m| m.contains("provisioning complete")),
        "{messages:?}"
    );

    // Stop: the container stops; exec is refused with a reason and queues a start.
    let r = server
        .call("POST", "/v1/me/vm/stop", Some(&token), None)
        .await;
    assert_eq!(r.status, StatusCode::ACCEPTED);
    server.wait_vm(&token, "stopped", UP).await;
    assert_eq!(docker_inspect(&name, "{{.State.Running}}"), "false");
    let r = server
        .call(
            "POST",
            "/v1/me/vm/exec",
            Some(&token),
            Some(json!({"code": "true"})),
        )
        .await;
    assert_eq!(r.status, StatusCode::CONFLICT);
    assert_eq!(r.body["error"]["code"], "invalid_state");
    assert!(
        r.body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("stopped")
    );
    server.wait_vm(&token, "running", UP).await;

    // An explicit stop and start cycle works the same way.
    server
        .call("POST", "/v1/me/vm/stop", Some(&token), None)
        .await;
    server.wait_vm(&token, "stopped", UP).await;
    let r = server
        .call("POST", "/v1/me/vm/start", Some(&token), None)
        .await;
    assert_eq!(r.status, StatusCode::ACCEPTED);
    server.wait_vm(&token, "running", UP).await;
    assert_eq!(docker_inspect(&name, "{{.State.Running}}"), "true");
    let r = server
        .call(
            "POST",
            "/v1/me/vm/exec",
            Some(&token),
            Some(json!({"code": "echo again"})),
        )
        .await;
    assert_eq!(r.body["stdout"], "again\n", "{:?}", r.body);

    // Admin view counts it.
    let admin = server
        .call("GET", "/v1/admin/vms", Some(&server.admin_token), None)
        .await;
    assert_eq!(admin.body["stats"]["running"], 1);
    assert_eq!(admin.body["stats"]["memoryMbRunning"], 1024);

    let r = server.call("DELETE", "/v1/me/vm", Some(&token), None).await;
    assert_eq!(r.status, StatusCode::ACCEPTED);
    server.wait_vm(&token, "gone", UP).await;
    assert!(containers_of(&env_id).is_empty(), "container left behind");
    let env = store.environment(&env_id).await.unwrap();
    assert_eq!(env.state.as_str(), "destroyed");
    let audit = store.audit_for_environment(&env_id).await.unwrap();
    let transitions: Vec<_> = audit.iter().filter_map(|a| a.new_state.clone()).collect();
    assert_eq!(transitions.first().map(String::as_str), Some("requested"));
    assert_eq!(transitions.last().map(String::as_str), Some("destroyed"));
    // The audit's previous state is really the previous one (a bug of the original).
    for a in audit.iter().filter(|a| a.previous_state.is_some()) {
        assert_ne!(a.previous_state, a.new_state, "{a:?}");
    }

    // A destroyed VM can be replaced by a new one.
    let r = server
        .call(
            "POST",
            "/v1/me/vm",
            Some(&token),
            Some(json!({"vcpus": 1, "memoryMb": 512, "diskGb": 5})),
        )
        .await;
    assert_eq!(r.status, StatusCode::ACCEPTED);
    assert_ne!(r.body["environmentId"].as_str().unwrap(), env_id);
    server.wait_vm(&token, "running", UP).await;
    server.call("DELETE", "/v1/me/vm", Some(&token), None).await;
    server.wait_vm(&token, "gone", UP).await;
}

#[tokio::test]
async fn lifecycle_sqlite() {
    lifecycle(Db::Sqlite).await;
}

#[tokio::test]
async fn lifecycle_postgres() {
    lifecycle(Db::Postgres).await;
}

async fn concurrent_provision(db: Db) {
    let site = Site::new(db).await;
    let server = site.start().await;
    let token = server.user("twice@example.com", "free").await;
    let calls = (0..8).map(|_| {
        server.call(
            "POST",
            "/v1/me/vm",
            Some(&token),
            Some(json!({"memoryMb": 512})),
        )
    });
    let results = futures::future::join_all(calls).await;
    let created = results
        .iter()
        .filter(|r| r.status == StatusCode::ACCEPTED)
        .count();
    let existing = results
        .iter()
        .filter(|r| r.status == StatusCode::OK)
        .count();
    assert_eq!(
        (created, existing),
        (1, 7),
        "{:?}",
        results
            .iter()
            .map(|r| (r.status, r.body.clone()))
            .collect::<Vec<_>>()
    );
    let ids: std::collections::HashSet<_> = results
        .iter()
        .map(|r| r.body["environmentId"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(ids.len(), 1);
    let env_id = ids.into_iter().next().unwrap();
    server.wait_vm(&token, "running", UP).await;
    assert_eq!(containers_of(&env_id).len(), 1);
    assert_eq!(
        site.store()
            .await
            .count("SELECT COUNT(*) AS n FROM environments")
            .await
            .unwrap(),
        1
    );
    server.call("DELETE", "/v1/me/vm", Some(&token), None).await;
    server.wait_vm(&token, "gone", UP).await;
    assert!(containers_of(&env_id).is_empty());
}

#[tokio::test]
async fn concurrent_provision_sqlite() {
    concurrent_provision(Db::Sqlite).await;
}

#[tokio::test]
async fn concurrent_provision_postgres() {
    concurrent_provision(Db::Postgres).await;
}
