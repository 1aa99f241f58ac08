//! kill -9 the server while it provisions; a new server finishes the job, with one container.

mod common;

use common::*;
use reqwest::StatusCode;
use serde_json::json;
use std::time::{Duration, Instant};

async fn killed_mid_provision(db: Db) {
    let site = Site::new(db).await;
    let server = site.start().await;
    let token = server.user("crash@example.com", "free").await;
    let r = server
        .call(
            "POST",
            "/v1/me/vm",
            Some(&token),
            Some(json!({"memoryMb": 512})),
        )
        .await;
    assert_eq!(r.status, StatusCode::ACCEPTED);
    let env_id = r.body["environmentId"].as_str().unwrap().to_string();

    // Wait until a worker is inside the provision job, then kill the process.
    let started = Instant::now();
    loop {
        let vm = server.call("GET", "/v1/me/vm", Some(&token), None).await;
        if vm.body["status"] == "provisioning" {
            break;
        }
        assert_eq!(
            vm.body["status"], "requested",
            "provisioning finished before it could be interrupted"
        );
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "never saw provisioning"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    server.kill();
    let store = site.store().await;
    let job = store.jobs_for_environment(&env_id).await.unwrap().remove(0);
    assert_eq!(
        job.state,
        hearth_store::JobState::Running,
        "the job was mid-run when the process died"
    );

    let server = site.start().await;
    let vm = server
        .wait_vm(&token, "running", Duration::from_secs(120))
        .await;
    assert_eq!(vm["environmentId"], env_id.as_str());
    assert_eq!(
        containers_of(&env_id).len(),
        1,
        "exactly one container after the restart"
    );
    let r = server
        .call(
            "POST",
            "/v1/me/vm/exec",
            Some(&token),
            Some(json!({"code": "echo alive"})),
        )
        .await;
    assert_eq!(r.body["stdout"], "alive\n", "{:?}", r.body);
    let job = store.jobs_for_environment(&env_id).await.unwrap().remove(0);
    // The dead worker's claim counts as a crash, not as one of the job's attempts.
    assert_eq!(
        (job.state, job.attempts, job.crashes),
        (hearth_store::JobState::Succeeded, 1, 1)
    );

    server.call("DELETE", "/v1/me/vm", Some(&token), None).await;
    server
        .wait_vm(&token, "gone", Duration::from_secs(120))
        .await;
    assert!(containers_of(&env_id).is_empty());
}

#[tokio::test]
async fn killed_mid_provision_sqlite() {
    killed_mid_provision(Db::Sqlite).await;
}

#[tokio::test]
async fn killed_mid_provision_postgres() {
    killed_mid_provision(Db::Postgres).await;
}

/// A node killed while the init script runs: the script goes on in the guest, runs once,
/// and the node that resumes the job finds its end instead of starting it again.
#[tokio::test]
async fn killed_during_the_init_script() {
    let site = Site::new(Db::Sqlite).await;
    let server = site.start().await;
    let token = server.user("init@example.com", "pro").await;
    let script = "echo ran >> /home/dev/runs; sleep 3; echo finished";
    let r = server
        .call(
            "POST",
            "/v1/environments",
            Some(&token),
            Some(json!({"name": "init", "memoryMb": 256, "initScript": script})),
        )
        .await;
    assert_eq!(r.status, StatusCode::ACCEPTED, "{:?}", r.body);
    let id = r.body["id"].as_str().unwrap().to_string();
    let started = Instant::now();
    loop {
        let logs = server
            .call(
                "GET",
                &format!("/v1/environments/{id}/logs"),
                Some(&token),
                None,
            )
            .await
            .body;
        if logs.to_string().contains("running the init script") {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "the init script never started: {logs}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    server.kill();
    let server = site.start().await;
    let env = server
        .wait_env(&token, &id, "running", Duration::from_secs(120))
        .await;
    assert_eq!(env["state"], "running");
    let r = server
        .call(
            "POST",
            &format!("/v1/environments/{id}/exec"),
            Some(&token),
            Some(json!({"code": "cat /home/dev/runs"})),
        )
        .await;
    assert_eq!(
        r.body["stdout"], "ran\n",
        "the init script ran once: {:?}",
        r.body
    );
    let logs = server
        .call(
            "GET",
            &format!("/v1/environments/{id}/logs"),
            Some(&token),
            None,
        )
        .await
        .body;
    assert!(
        logs.to_string().contains("init script finished: finished"),
        "{logs}"
    );
    let job = site
        .store()
        .await
        .jobs_for_environment(&id)
        .await
        .unwrap()
        .remove(0);
    assert_eq!(
        (job.state, job.crashes),
        (hearth_store::JobState::Succeeded, 1)
    );
    server.destroy(&token, &id, Duration::from_secs(120)).await;
    assert!(containers_of(&id).is_empty());
}

/// A VM removed behind Hearth's back while provisioning waits for SSH: the job notices it
/// is gone (it looks every 2 s) and retries, instead of waiting out the SSH budget.
#[tokio::test]
async fn a_vm_removed_while_waiting_for_ssh_is_noticed() {
    // An image whose VMs never answer SSH: the base image with sleep as its entrypoint.
    let image = "hearth-test/no-ssh:latest";
    let made = std::process::Command::new("docker")
        .args([
            "create",
            "--name",
            "hearth-test-no-ssh-source",
            "hearth/base:latest",
        ])
        .output()
        .unwrap();
    assert!(
        made.status.success() || String::from_utf8_lossy(&made.stderr).contains("already in use"),
        "{made:?}"
    );
    let committed = std::process::Command::new("docker")
        .args([
            "commit",
            "--change",
            "ENTRYPOINT [\"sleep\", \"infinity\"]",
            "hearth-test-no-ssh-source",
            image,
        ])
        .status()
        .unwrap();
    let _ = std::process::Command::new("docker")
        .args(["rm", "-f", "hearth-test-no-ssh-source"])
        .output();
    assert!(committed.success(), "docker commit failed");

    let site = Site::new(Db::Sqlite)
        .await
        .with_env("HEARTH_IMAGE", image)
        .with_env("HEARTH_SSH_WAIT_SECONDS", "600");
    let server = site.start().await;
    let token = server.user("gone@example.com", "free").await;
    let r = server
        .call(
            "POST",
            "/v1/environments",
            Some(&token),
            Some(json!({"name": "gone", "memoryMb": 512})),
        )
        .await;
    assert_eq!(r.status, StatusCode::ACCEPTED, "{:?}", r.body);
    let id = r.body["id"].as_str().unwrap().to_string();
    let store = site.store().await;
    // Wait until the job waits for SSH, then remove the container.
    let started = Instant::now();
    while !server
        .call(
            "GET",
            &format!("/v1/environments/{id}/logs"),
            Some(&token),
            None,
        )
        .await
        .body
        .to_string()
        .contains("waiting for SSH to answer")
    {
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "never waited for SSH"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(containers_of(&id).len(), 1);
    let removed = std::process::Command::new("docker")
        .args(["rm", "-f", &format!("hearth-{id}")])
        .status()
        .unwrap();
    assert!(removed.success());
    // The attempt ends with the VM's absence, not with the 600 s SSH budget.
    let job = loop {
        let job = store.jobs_for_environment(&id).await.unwrap().remove(0);
        if job.last_error.is_some() {
            break job;
        }
        assert!(
            started.elapsed() < Duration::from_secs(120),
            "the removal went unnoticed: {job:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert!(
        job.last_error
            .as_deref()
            .unwrap()
            .contains("no longer exists"),
        "{job:?}"
    );
    // A delete does not wait for the next attempt's 600 s either: the provision gives way.
    server.destroy(&token, &id, Duration::from_secs(120)).await;
    assert!(containers_of(&id).is_empty());
    let logs = server
        .call(
            "GET",
            &format!("/v1/environments/{id}/logs"),
            Some(&token),
            None,
        )
        .await
        .body
        .to_string();
    assert!(
        logs.contains("a destroy was requested; the provision stops here"),
        "{logs}"
    );
}
