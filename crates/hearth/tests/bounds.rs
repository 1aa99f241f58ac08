//! What one user can consume is bounded: server memory under an 800 MB output stream,
//! half-open connections, provisioning workers, control requests, page sizes; and what
//! Hearth keeps on disk is private and sealed.

mod common;

use common::*;
use reqwest::StatusCode;
use serde_json::json;
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const UP: Duration = Duration::from_secs(120);
const MIB: u64 = 1024 * 1024;

/// Resident memory of a process, in bytes.
fn rss(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let kb: u64 = status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        .unwrap();
    kb * 1024
}

/// This test process may hold as many descriptors as its hard limit allows.
fn raise_descriptor_limit() -> u64 {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit and setrlimit only read and write the struct passed to them.
    unsafe {
        libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit);
        limit.rlim_cur = limit.rlim_max;
        libc::setrlimit(libc::RLIMIT_NOFILE, &limit);
    }
    limit.rlim_cur
}

async fn running_env(server: &Server, token: &str, body: serde_json::Value) -> String {
    let r = server
        .call("POST", "/v1/environments", Some(token), Some(body))
        .await;
    assert_eq!(r.status, StatusCode::ACCEPTED, "{:?}", r.body);
    let id = r.body["id"].as_str().unwrap().to_string();
    server.wait_env(token, &id, "running", UP).await;
    id
}

#[tokio::test]
async fn memory_stays_bounded_under_an_800_mb_stream() {
    let site = Site::new(Db::Sqlite).await;
    let server = site.start().await;
    let token = server.user("stream@example.com", "pro").await;
    let id = running_env(&server, &token, json!({"name": "stream", "memoryMb": 512})).await;
    let warm = server
        .call(
            "POST",
            &format!("/v1/environments/{id}/exec"),
            Some(&token),
            Some(json!({"code": "head -c 1000000 /dev/zero | tr '\\0' a"})),
        )
        .await;
    assert_eq!(warm.status, StatusCode::OK);
    let pid = server.child.id();
    let baseline = rss(pid);

    let mut resp = server
        .http
        .post(format!("{}/v1/environments/{id}/exec/stream", server.base))
        .bearer_auth(&token)
        .json(&json!({"code": "head -c 800000000 /dev/zero | tr '\\0' a", "timeoutSeconds": 600}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    resp.chunk().await.unwrap().expect("output starts");
    // A client that stops reading: the guest goes on producing, the server must not.
    let mut peak = 0;
    for _ in 0..20 {
        tokio::time::sleep(Duration::from_millis(500)).await;
        peak = peak.max(rss(pid));
    }
    // Then one that reads as fast as it can, for a while.
    let mut received = 0u64;
    let reading = Instant::now();
    while reading.elapsed() < Duration::from_secs(10) {
        match tokio::time::timeout(Duration::from_secs(5), resp.chunk()).await {
            Ok(Ok(Some(bytes))) => received += bytes.len() as u64,
            _ => break,
        }
        peak = peak.max(rss(pid));
    }
    drop(resp);
    assert!(received > 10 * MIB, "the stream stalled: {received} bytes");
    let growth = peak.saturating_sub(baseline);
    println!(
        "server RSS {} MiB before, {} MiB at most while streaming ({} MiB received)",
        baseline / MIB,
        peak / MIB,
        received / MIB
    );
    assert!(
        growth < 64 * MIB,
        "the server grew by {} MiB while streaming",
        growth / MIB
    );
    server.destroy(&token, &id, UP).await;
}

/// Opens `n` connections that send a request line and one header, and no more.
async fn half_open(base: &str, n: usize) -> Vec<tokio::net::TcpStream> {
    let addr = base.trim_start_matches("http://").to_string();
    let mut held = Vec::with_capacity(n);
    for _ in 0..n {
        let mut conn = tokio::net::TcpStream::connect(&addr).await.unwrap();
        conn.write_all(b"GET /healthz HTTP/1.1\r\nHost: hearth\r\n")
            .await
            .unwrap();
        held.push(conn);
    }
    held
}

/// How many of `conns` the server has closed (their read ends at once), all looked at
/// together.
async fn closed(conns: &mut [tokio::net::TcpStream]) -> usize {
    let reads = conns.iter_mut().map(|conn| async move {
        let mut buf = [0u8; 256];
        matches!(
            tokio::time::timeout(Duration::from_millis(200), conn.read(&mut buf)).await,
            Ok(Ok(0)) | Ok(Err(_))
        )
    });
    futures::future::join_all(reads)
        .await
        .into_iter()
        .filter(|c| *c)
        .count()
}

#[tokio::test]
async fn healthz_answers_while_10000_half_open_connections_are_held() {
    assert!(
        raise_descriptor_limit() > 10_500,
        "this test needs more than 10,500 open files"
    );
    let site = Site::new(Db::Sqlite)
        .await
        .with_env("HEARTH_WORKERS", "0")
        .with_env("HEARTH_HEADER_TIMEOUT_SECONDS", "5");
    let server = site.start().await;
    let mut held = half_open(&server.base, 10_000).await;
    // The server still answers, on a new connection, with a real request.
    let r = server
        .http
        .get(format!("{}/healthz", server.base))
        .timeout(Duration::from_secs(10))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    let me = server
        .call("GET", "/v1/me", Some(&server.admin_token), None)
        .await;
    assert_eq!(me.status, StatusCode::OK);
    // Bounded in time: the server closes every one of them once the header timeout passes.
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        tokio::time::sleep(Duration::from_secs(1)).await;
        let gone = closed(&mut held).await;
        if gone == held.len() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{gone} of {} half-open connections closed",
            held.len()
        );
    }
    assert!(
        !site.log().contains("Too many open files"),
        "the server ran out of descriptors"
    );

    // Bounded in count: over the limit, a connection is closed at once.
    let site = Site::new(Db::Sqlite)
        .await
        .with_env("HEARTH_WORKERS", "0")
        .with_env("HEARTH_MAX_CONNECTIONS", "100");
    let server = site.start().await;
    let mut held = half_open(&server.base, 150).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let gone = closed(&mut held).await;
    // 100 at most stay open (one of them may be this test's own keep-alive client's).
    assert!(
        (50..=51).contains(&gone),
        "{} of 150 stayed open; the limit is 100",
        150 - gone
    );
}

#[tokio::test]
async fn a_third_users_environment_runs_while_two_others_run_long_init_scripts() {
    let site = Site::new(Db::Sqlite).await;
    let server = site.start().await;
    let mut slow = Vec::new();
    for user in ["slow1@example.com", "slow2@example.com"] {
        let token = server.user(user, "pro").await;
        let r = server
            .call(
                "POST",
                "/v1/environments",
                Some(&token),
                Some(json!({"name": "slow", "memoryMb": 256, "initScript": "sleep 300"})),
            )
            .await;
        assert_eq!(r.status, StatusCode::ACCEPTED, "{:?}", r.body);
        slow.push((token, r.body["id"].as_str().unwrap().to_string()));
    }
    // Both init scripts are running (the default is two provision workers).
    for (token, id) in &slow {
        let deadline = Instant::now() + UP;
        while !server.env_log(token, id).await.contains("init script") {
            assert!(
                Instant::now() < deadline,
                "the init script of {id} never started: {}",
                server.env_log(token, id).await
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
    let third = server.user("third@example.com", "pro").await;
    let id = running_env(&server, &third, json!({"name": "quick", "memoryMb": 256})).await;
    for (token, slow_id) in &slow {
        let env = server
            .call(
                "GET",
                &format!("/v1/environments/{slow_id}"),
                Some(token),
                None,
            )
            .await
            .body;
        assert_eq!(
            env["state"], "provisioning",
            "the init script should still be running: {env}"
        );
    }
    // A delete does not wait for an init script either.
    server
        .call(
            "DELETE",
            &format!("/v1/environments/{id}"),
            Some(&third),
            None,
        )
        .await;
    for (token, slow_id) in &slow {
        server
            .call(
                "DELETE",
                &format!("/v1/environments/{slow_id}"),
                Some(token),
                None,
            )
            .await;
    }
    server.wait_env(&third, &id, "destroyed", UP).await;
    for (token, slow_id) in &slow {
        server.wait_env(token, slow_id, "destroyed", UP).await;
        assert!(containers_of(slow_id).is_empty());
    }
}

#[tokio::test]
async fn four_thousand_start_stop_requests_leave_one_pending_job() {
    let site = Site::new(Db::Sqlite).await.with_env("VM_PROVIDER", "sim");
    let server = site.start().await;
    let r = server
        .call("POST", "/v1/admin/hosts", Some(&server.admin_token), Some(json!({"name": "sim", "kind": "sim", "maxVcpus": 64, "maxMemoryMb": 65536, "options": {"latencyMs": 20}})))
        .await;
    assert_eq!(r.status, StatusCode::CREATED, "{:?}", r.body);
    let token = server.user("flood@example.com", "pro").await;
    let id = running_env(&server, &token, json!({"name": "flood", "memoryMb": 256})).await;
    let mut accepted = 0;
    for round in 0..40 {
        let paths: Vec<String> = (0..100)
            .map(|i| {
                format!(
                    "/v1/environments/{id}/{}",
                    if (round * 100 + i) % 2 == 0 {
                        "stop"
                    } else {
                        "start"
                    }
                )
            })
            .collect();
        let calls = paths
            .iter()
            .map(|path| server.call("POST", path, Some(&token), None));
        for r in futures::future::join_all(calls).await {
            assert!(
                r.status == StatusCode::ACCEPTED || r.status == StatusCode::CONFLICT,
                "{:?}",
                r.body
            );
            accepted += usize::from(r.status == StatusCode::ACCEPTED);
        }
    }
    assert!(accepted > 1000, "only {accepted} requests were accepted");
    let store = site.store().await;
    let pending = store
        .count(&format!(
            "SELECT COUNT(*) AS n FROM jobs WHERE environment_id = '{id}' AND state = 'queued'"
        ))
        .await
        .unwrap();
    assert!(
        pending <= 1,
        "{pending} control jobs wait for one environment"
    );
    server.destroy(&token, &id, Duration::from_secs(30)).await;
    let jobs = store.jobs_for_environment(&id).await.unwrap();
    assert!(
        jobs.len() < 100,
        "{} jobs ran for {accepted} requests",
        jobs.len()
    );
}

#[tokio::test]
async fn execution_pages_stay_under_a_megabyte() {
    let site = Site::new(Db::Sqlite).await;
    let server = site.start().await;
    let token = server.user("pages@example.com", "pro").await;
    let id = running_env(&server, &token, json!({"name": "pages", "memoryMb": 256})).await;
    // Long commands in a long working directory, with big output: what a list could carry.
    let command = format!(
        ": '{}'; head -c 200000 /dev/zero | tr '\\0' x",
        "\u{1}".repeat(5_000)
    );
    let dir = format!("/tmp/{}", "d".repeat(200));
    for _ in 0..200 {
        let r = server
            .call(
                "POST",
                &format!("/v1/environments/{id}/exec"),
                Some(&token),
                Some(json!({"code": command, "workingDir": dir})),
            )
            .await;
        assert_eq!(r.status, StatusCode::OK, "{:?}", r.body);
    }
    let mut cursor = String::new();
    let mut seen = 0;
    loop {
        let resp = server
            .http
            .get(format!(
                "{}/v1/environments/{id}/executions?limit=1000&cursor={cursor}",
                server.base
            ))
            .bearer_auth(&token)
            .send()
            .await
            .unwrap();
        let bytes = resp.bytes().await.unwrap();
        assert!(
            bytes.len() <= 1024 * 1024 + 1024,
            "a page of {} bytes",
            bytes.len()
        );
        let page: serde_json::Value = serde_json::from_slice(&bytes).unwrap();
        let items = page["items"].as_array().unwrap();
        assert!(
            items.iter().all(|e| e.get("stdout").is_none()),
            "a list carried output"
        );
        seen += items.len();
        match page["nextCursor"].as_str() {
            Some(next) => cursor = next.to_string(),
            None => break,
        }
    }
    assert_eq!(seen, 200, "paging lost or repeated executions");
    server.destroy(&token, &id, UP).await;
}

#[tokio::test]
async fn a_command_between_128_and_256_kib_runs() {
    let site = Site::new(Db::Sqlite).await;
    let server = site.start().await;
    let token = server.user("long@example.com", "pro").await;
    let id = running_env(&server, &token, json!({"name": "long", "memoryMb": 256})).await;
    // 60,000 characters of 3 bytes each: 180,000 bytes, over what an argument may hold.
    let command = format!("x='{}'; printf %s \"$x\" | wc -c", "€".repeat(60_000));
    let r = server
        .call(
            "POST",
            &format!("/v1/environments/{id}/exec"),
            Some(&token),
            Some(json!({"code": command})),
        )
        .await;
    assert_eq!(r.status, StatusCode::OK, "{:?}", r.body);
    assert_eq!(
        (r.body["exitCode"].as_i64(), r.body["stdout"].as_str()),
        (Some(0), Some("180000\n")),
        "{:?}",
        r.body["stderr"]
    );
    server.destroy(&token, &id, UP).await;
}

async fn private_and_sealed(db: Db) {
    use std::os::unix::fs::PermissionsExt;
    let site = Site::new(db).await.with_env("HEARTH_WORKERS", "0");
    let server = site.start().await;
    let token = server.user("secret@example.com", "pro").await;
    let secret = "sk-live-7f3a9c0d1e2b4a68";
    let r = server
        .call(
            "POST",
            "/v1/environments",
            Some(&token),
            Some(json!({"name": "sealed", "environmentVars": {"API_KEY": secret}})),
        )
        .await;
    assert_eq!(r.status, StatusCode::ACCEPTED, "{:?}", r.body);
    let id = r.body["id"].as_str().unwrap().to_string();
    let mode = |p: &std::path::Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    let data = site.data_dir();
    assert_eq!(mode(&data), 0o700);
    // Every file Hearth made: the data directory's and, on SQLite, the database's.
    let made = || {
        let mut files: Vec<std::path::PathBuf> = std::fs::read_dir(&data)
            .unwrap()
            .map(|e| e.unwrap().path())
            .filter(|p| p.is_file())
            .collect();
        files.extend(
            std::fs::read_dir(site.dir.path())
                .unwrap()
                .map(|e| e.unwrap().path())
                .filter(|p| p.to_string_lossy().contains("hearth.db")),
        );
        files
    };
    for path in made() {
        assert_eq!(mode(&path), 0o600, "{}", path.display());
    }
    assert!(
        made().len() >= 2 + usize::from(db == Db::Sqlite),
        "expected master.key, admin.token and the database: {:?}",
        made()
    );
    // The value is in no byte of the database, only its seal.
    let store = site.store().await;
    let raw = store.count(&format!("SELECT COUNT(*) AS n FROM environments WHERE id = '{id}' AND environment_vars LIKE '%{secret}%'")).await.unwrap();
    assert_eq!(raw, 0, "the variable is stored in plain text");
    if db == Db::Sqlite {
        drop(server);
        for path in made() {
            let bytes = std::fs::read(&path).unwrap();
            assert!(
                !bytes.windows(secret.len()).any(|w| w == secret.as_bytes()),
                "{} holds the secret",
                path.display()
            );
        }
    }
    // Hearth itself still reads it back.
    let env = store.environment(&id).await.unwrap();
    assert_eq!(
        env.environment_vars.get("API_KEY").map(String::as_str),
        Some(secret)
    );
}

#[tokio::test]
async fn data_is_private_and_variables_sealed_sqlite() {
    private_and_sealed(Db::Sqlite).await;
}

#[tokio::test]
async fn data_is_private_and_variables_sealed_postgres() {
    private_and_sealed(Db::Postgres).await;
}
