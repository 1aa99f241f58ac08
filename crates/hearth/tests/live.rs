//! Live features: events over SSE across nodes, streaming exec, the terminal, and a node
//! killed mid-provision while another takes over (PostgreSQL, two `hearth serve`).

mod common;

use common::*;
use futures::{SinkExt, StreamExt};
use reqwest::StatusCode;
use serde_json::{Value, json};
use std::time::{Duration, Instant};
use tokio_tungstenite::tungstenite::Message;

const UP: Duration = Duration::from_secs(120);
const MASTER_KEY: &str = "000102030405060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1f";

/// Reads server-sent events from `resp` until `stop` says so or `timeout` passes.
/// Returns (event, id, data) in order, and the index of the network chunk each arrived in.
async fn read_sse(
    mut resp: reqwest::Response,
    timeout: Duration,
    stop: impl Fn(&str, &Value) -> bool,
) -> Vec<(String, String, Value, usize)> {
    let mut out = Vec::new();
    let mut buf = String::new();
    let deadline = Instant::now() + timeout;
    let mut chunk_no = 0;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let chunk = tokio::time::timeout(left, resp.chunk())
            .await
            .expect("SSE timed out")
            .unwrap();
        let Some(chunk) = chunk else { return out };
        chunk_no += 1;
        buf.push_str(&String::from_utf8_lossy(&chunk));
        while let Some(end) = buf.find("\n\n") {
            let block: String = buf.drain(..end + 2).collect();
            let (mut event, mut id, mut data) = (String::new(), String::new(), String::new());
            for line in block.lines() {
                if let Some(v) = line.strip_prefix("event:") {
                    event = v.trim().to_string()
                }
                if let Some(v) = line.strip_prefix("id:") {
                    id = v.trim().to_string()
                }
                if let Some(v) = line.strip_prefix("data:") {
                    data.push_str(v.trim_start())
                }
            }
            if event.is_empty() {
                continue; // keep-alive comment
            }
            let value: Value = serde_json::from_str(&data).unwrap_or(Value::String(data));
            let done = stop(&event, &value);
            out.push((event, id, value, chunk_no));
            if done {
                return out;
            }
        }
    }
}

fn sse(server: &Server, path: &str, token: &str, last_id: Option<&str>) -> reqwest::RequestBuilder {
    let mut req = server
        .http
        .get(format!("{}{path}", server.base))
        .bearer_auth(token);
    if let Some(id) = last_id {
        req = req.header("Last-Event-ID", id);
    }
    req
}

#[tokio::test]
async fn events_reach_another_node_in_order() {
    let site = Site::new(Db::Postgres)
        .await
        .with_env("HEARTH_MASTER_KEY", MASTER_KEY);
    let _worker = site.start().await; // runs every job
    let api_site = site.node().with_env("HEARTH_WORKERS", "0");
    let api = api_site.start().await; // serves the API only: every job runs on `worker`
    let token = api.user("watch@example.com", "pro").await;
    let r = api
        .call(
            "POST",
            "/v1/environments",
            Some(&token),
            Some(json!({"name": "watched", "memoryMb": 256})),
        )
        .await;
    let id = r.body["id"].as_str().unwrap().to_string();
    let resp = sse(&api, &format!("/v1/environments/{id}/events"), &token, None)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    // The success line is written just after the state turns running: read until both,
    // in whichever order the stream delivers them.
    use std::sync::atomic::{AtomicBool, Ordering::SeqCst};
    let (running, complete) = (AtomicBool::new(false), AtomicBool::new(false));
    let events = read_sse(resp, UP, |e, v| {
        if e == "state" && v["state"] == "error" {
            return true;
        }
        if e == "state" && v["state"] == "running" {
            running.store(true, SeqCst);
        }
        if e == "log"
            && v["message"]
                .as_str()
                .unwrap_or("")
                .contains("provisioning complete")
        {
            complete.store(true, SeqCst);
        }
        running.load(SeqCst) && complete.load(SeqCst)
    })
    .await;
    let states: Vec<&str> = events
        .iter()
        .filter(|e| e.0 == "state")
        .map(|e| e.2["state"].as_str().unwrap())
        .collect();
    assert_eq!(states.first(), Some(&"requested"), "{states:?}");
    assert_eq!(states.last(), Some(&"running"), "{states:?}");
    let logs: Vec<&str> = events
        .iter()
        .filter(|e| e.0 == "log")
        .map(|e| e.2["message"].as_str().unwrap())
        .collect();
    let pos = |needle: &str| {
        logs.iter()
            .position(|m| m.contains(needle))
            .unwrap_or_else(|| panic!("no {needle:?} in {logs:?}"))
    };
    assert!(
        pos("queued") < pos("picked up by worker")
            && pos("picked up by worker") == pos("placed on host docker@")
    );
    assert!(pos("placed on host docker@") < pos("creating a VM on host"));
    assert!(
        pos("creating a VM on host") < pos("waiting for SSH")
            && pos("waiting for SSH") < pos("provisioning complete")
    );
    // Resume after the first log line: the stream goes on from the second.
    let first_log = events.iter().find(|e| e.0 == "log").unwrap();
    let resp = sse(
        &api,
        &format!("/v1/environments/{id}/events"),
        &token,
        Some(&first_log.1),
    )
    .send()
    .await
    .unwrap();
    let resumed = read_sse(resp, Duration::from_secs(10), |e, _| e == "log").await;
    let second_log = events.iter().filter(|e| e.0 == "log").nth(1).unwrap();
    assert_eq!(
        resumed.last().unwrap().2["message"],
        second_log.2["message"]
    );

    api.call(
        "DELETE",
        &format!("/v1/environments/{id}"),
        Some(&token),
        None,
    )
    .await;
    api.wait_env(&token, &id, "destroyed", UP).await;
    assert!(containers_of(&id).is_empty());
}

#[tokio::test]
async fn streaming_exec_and_terminal() {
    let site = Site::new(Db::Sqlite).await;
    let server = site.start().await;
    let token = server.user("live@example.com", "pro").await;
    let r = server
        .call(
            "POST",
            "/v1/environments",
            Some(&token),
            Some(json!({"name": "live", "memoryMb": 256})),
        )
        .await;
    let id = r.body["id"].as_str().unwrap().to_string();
    server.wait_env(&token, &id, "running", UP).await;

    // Output arrives as it is produced: "one" comes in a chunk before the command ends.
    let resp = server
        .http
        .post(format!("{}/v1/environments/{id}/exec/stream", server.base))
        .bearer_auth(&token)
        .json(&json!({"code": "echo one; sleep 2; echo two >&2; exit 4"}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    let events = read_sse(resp, Duration::from_secs(30), |e, _| e == "exit").await;
    let one = events.iter().find(|e| e.0 == "stdout").unwrap();
    assert_eq!(one.2["data"], "one\n");
    let exit = events.last().unwrap();
    assert_eq!(
        (exit.0.as_str(), exit.2["exitCode"].as_i64()),
        ("exit", Some(4))
    );
    assert!(
        one.3 < exit.3,
        "the first line arrived with the exit: not streamed"
    );
    assert!(
        events
            .iter()
            .any(|e| e.0 == "stderr" && e.2["data"] == "two\n")
    );

    // Hanging up kills the remote command.
    let mut resp = server
        .http
        .post(format!("{}/v1/environments/{id}/exec/stream", server.base))
        .bearer_auth(&token)
        .json(&json!({"code": "echo started; exec sleep 301"}))
        .send()
        .await
        .unwrap();
    let first = resp.chunk().await.unwrap().unwrap();
    assert!(String::from_utf8_lossy(&first).contains("started"));
    drop(resp);
    let mut gone = false;
    for _ in 0..50 {
        let r = server
            .call(
                "POST",
                &format!("/v1/environments/{id}/exec"),
                Some(&token),
                Some(json!({"code": "pgrep -f 'sleep 301'"})),
            )
            .await;
        if r.body["exitCode"] == 1 {
            gone = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(gone, "the remote command outlived its stream");

    // Terminal over a WebSocket, authenticated with a ticket as a browser would.
    let ticket = server
        .call(
            "POST",
            &format!("/v1/environments/{id}/terminal/ticket"),
            Some(&token),
            None,
        )
        .await
        .body["ticket"]
        .as_str()
        .unwrap()
        .to_string();
    let url = format!(
        "{}/v1/environments/{id}/terminal?ticket={ticket}&cols=80&rows=24",
        server.base.replace("http://", "ws://")
    );
    let (mut ws, _) = tokio_tungstenite::connect_async(url)
        .await
        .expect("terminal upgrade");
    ws.send(Message::Binary(b"echo $((6*7))\n".to_vec().into()))
        .await
        .unwrap();
    read_until(&mut ws, "42").await;
    ws.send(Message::Text(
        json!({"type": "resize", "cols": 100, "rows": 40})
            .to_string()
            .into(),
    ))
    .await
    .unwrap();
    ws.send(Message::Binary(b"stty size\n".to_vec().into()))
        .await
        .unwrap();
    read_until(&mut ws, "40 100").await;
    ws.send(Message::Binary(b"exit\n".to_vec().into()))
        .await
        .unwrap();
    let act = server
        .call(
            "GET",
            &format!("/v1/environments/{id}/activity"),
            Some(&token),
            None,
        )
        .await
        .body;
    assert_eq!(act["lastActivitySource"], "terminal");
    // A ticket opens one terminal: the same one again is refused.
    let again = format!(
        "{}/v1/environments/{id}/terminal?ticket={ticket}",
        server.base.replace("http://", "ws://")
    );
    match tokio_tungstenite::connect_async(again).await {
        Err(tokio_tungstenite::tungstenite::Error::Http(r)) => assert_eq!(r.status(), 401),
        other => panic!("a used ticket opened a terminal: {other:?}"),
    }
    // A forged ticket is refused the same way whether the environment exists or not.
    for target in [id.as_str(), "01990000-0000-7000-8000-000000000000"] {
        let r = server
            .call(
                "GET",
                &format!("/v1/environments/{target}/terminal?ticket=00"),
                None,
                None,
            )
            .await;
        assert_eq!(r.status, 401, "{target}: {:?}", r.body);
    }
    // A plain GET (no upgrade) with a token opens no shell in the guest.
    let before = shells(&server, &token, &id).await;
    for _ in 0..3 {
        let r = server
            .call(
                "GET",
                &format!("/v1/environments/{id}/terminal"),
                Some(&token),
                None,
            )
            .await;
        assert_eq!(r.status, 400, "{:?}", r.body);
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        shells(&server, &token, &id).await,
        before,
        "a GET without an upgrade left a shell behind"
    );

    server.destroy(&token, &id, UP).await;
}

/// How many bash processes run in the guest (the counting command's own included).
async fn shells(server: &Server, token: &str, id: &str) -> u32 {
    let r = server
        .call(
            "POST",
            &format!("/v1/environments/{id}/exec"),
            Some(token),
            Some(json!({"code": "pgrep -c -x bash || true"})),
        )
        .await;
    let out = r.body["stdout"]
        .as_str()
        .unwrap_or_else(|| panic!("{:?}", r.body));
    out.trim()
        .parse::<u32>()
        .unwrap_or_else(|_| panic!("{out:?}"))
}

async fn read_until<S>(ws: &mut S, needle: &str)
where
    S: futures::Stream<Item = Result<Message, tokio_tungstenite::tungstenite::Error>> + Unpin,
{
    let mut seen = String::new();
    let deadline = Instant::now() + Duration::from_secs(20);
    while !seen.contains(needle) {
        let left = deadline.saturating_duration_since(Instant::now());
        match tokio::time::timeout(left, ws.next()).await {
            Ok(Some(Ok(Message::Binary(b)))) => seen.push_str(&String::from_utf8_lossy(&b)),
            Ok(Some(Ok(_))) => {}
            other => panic!("terminal ended before {needle:?}: {other:?}; saw {seen:?}"),
        }
    }
}

/// Two nodes on one PostgreSQL: the one running a provision is killed; the other finishes it.
#[tokio::test]
async fn a_killed_nodes_provision_finishes_on_another() {
    let site = Site::new(Db::Postgres)
        .await
        .with_env("HEARTH_MASTER_KEY", MASTER_KEY);
    let first = site.start().await;
    let token = first.user("nodes@example.com", "pro").await;
    let r = first
        .call(
            "POST",
            "/v1/environments",
            Some(&token),
            Some(json!({"name": "handover", "memoryMb": 256})),
        )
        .await;
    let id = r.body["id"].as_str().unwrap().to_string();
    let started = Instant::now();
    loop {
        let e = first
            .call("GET", &format!("/v1/environments/{id}"), Some(&token), None)
            .await
            .body;
        if e["state"] == "provisioning" {
            break;
        }
        assert_eq!(e["state"], "requested");
        assert!(started.elapsed() < Duration::from_secs(30));
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // The second node starts only now, so the job can only be the first node's.
    let second = site.start().await;
    first.kill();
    second.wait_env(&token, &id, "running", UP).await;
    assert_eq!(containers_of(&id).len(), 1, "one container, made once");
    let store = site.store().await;
    let job = store.jobs_for_environment(&id).await.unwrap().remove(0);
    // The dead worker's claim counts as a crash, not as one of the job's attempts.
    assert_eq!(
        (job.state, job.attempts, job.crashes),
        (hearth_store::JobState::Succeeded, 1, 1)
    );
    // Metrics are for admins: not without a token, not with a user's.
    assert_eq!(second.call("GET", "/metrics", None, None).await.status, 401);
    assert_eq!(
        second
            .call("GET", "/metrics", Some(&token), None)
            .await
            .status,
        403
    );
    let metrics = second
        .http
        .get(format!("{}/metrics", second.base))
        .bearer_auth(&second.admin_token)
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        metrics.contains("hearth_environments{state=\"running\"} 1"),
        "{metrics}"
    );
    second.destroy(&token, &id, UP).await;
    assert!(containers_of(&id).is_empty());
}

/// SIGTERM: the node stops even with a live event stream open, and a provision it was
/// running is finished first (its job ends `succeeded`, not handed back half done).
#[tokio::test]
async fn sigterm_finishes_the_running_job_and_exits() {
    let site = Site::new(Db::Sqlite).await;
    let mut server = site.start().await;
    let token = server.user("term@example.com", "pro").await;
    let r = server
        .call(
            "POST",
            "/v1/environments",
            Some(&token),
            Some(json!({"name": "graceful", "memoryMb": 256})),
        )
        .await;
    let id = r.body["id"].as_str().unwrap().to_string();
    let stream = sse(
        &server,
        &format!("/v1/environments/{id}/events"),
        &token,
        None,
    )
    .send()
    .await
    .unwrap();
    loop {
        let e = server
            .call("GET", &format!("/v1/environments/{id}"), Some(&token), None)
            .await
            .body;
        if e["state"] != "requested" {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    send_sigterm(server.child.id());
    let status = tokio::task::spawn_blocking(move || {
        let status = server.child.wait().unwrap();
        (server, status)
    });
    let (server, status) = tokio::time::timeout(Duration::from_secs(90), status)
        .await
        .expect("the node did not stop")
        .unwrap();
    assert!(status.success(), "{status:?}");
    drop(stream);
    drop(server);
    let store = site.store().await;
    let job = store.jobs_for_environment(&id).await.unwrap().remove(0);
    assert_eq!(
        (
            job.state,
            store.environment(&id).await.unwrap().state.as_str()
        ),
        (hearth_store::JobState::Succeeded, "running")
    );
    assert!(site.log().contains("stopped"));
    // Clean up with a fresh node.
    let server = site.start().await;
    server.destroy(&token, &id, UP).await;
}

fn send_sigterm(pid: u32) {
    let ok = std::process::Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .status()
        .unwrap();
    assert!(ok.success());
}
