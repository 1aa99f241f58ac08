//! Files into and out of a real Docker guest through the API (SFTP behind it): a 200 MiB
//! file both ways with `hearth cp`, the server's memory bounded meanwhile, listings, the
//! tier's upload limit, paths outside the home directory and through links, removal.

mod common;

use common::*;
use reqwest::StatusCode;
use serde_json::{Value, json};
use sha2::{Digest, Sha256};
use std::io::Write;
use std::process::Command;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const UP: Duration = Duration::from_secs(180);

fn sha256_file(path: &std::path::Path) -> String {
    let mut hash = Sha256::new();
    let mut file = std::fs::File::open(path).unwrap();
    std::io::copy(&mut file, &mut hash).unwrap();
    hash.finalize().iter().map(|b| format!("{b:02x}")).collect()
}

/// The server process's peak resident memory, in KiB.
fn peak_rss_kib(server: &Server) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{}/status", server.child.id())).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap()
}

#[tokio::test]
async fn files_go_in_and_out_streamed_within_bounds() {
    let site = Site::new(Db::Sqlite).await;
    let server = site.start().await;
    let token = server.user("files@example.com", "pro").await;
    let other = server.user("files-other@example.com", "pro").await;
    let id = server
        .create(&token, json!({"name": "files", "memoryMb": 512}))
        .await;
    server.wait_env(&token, &id, "running", UP).await;

    // 200 MiB up and down with the CLI.
    let dir = tempfile::tempdir().unwrap();
    let big = dir.path().join("big.bin");
    {
        let mut f = std::fs::File::create(&big).unwrap();
        let mut block = vec![0u8; 1 << 20];
        for i in 0..200u32 {
            for (j, b) in block.iter_mut().enumerate() {
                *b = ((j as u32).wrapping_mul(2_654_435_761) ^ i.wrapping_mul(40_503)) as u8;
            }
            f.write_all(&block).unwrap();
        }
    }
    let hearth = |args: &[&str]| {
        let out = Command::new(env!("CARGO_BIN_EXE_hearth"))
            .args(args)
            .env("HEARTH_URL", &server.base)
            .env("HEARTH_TOKEN", &token)
            .output()
            .unwrap();
        assert!(out.status.success(), "hearth {args:?}: {out:?}");
    };
    let before = peak_rss_kib(&server);
    hearth(&["cp", big.to_str().unwrap(), &format!("{id}:big.bin")]);
    let in_guest = exec_ok(&server, &token, &id, "sha256sum big.bin").await;
    assert!(in_guest.starts_with(&sha256_file(&big)), "{in_guest}");
    let back = dir.path().join("back.bin");
    hearth(&["cp", &format!("{id}:big.bin"), back.to_str().unwrap()]);
    assert_eq!(sha256_file(&back), sha256_file(&big));
    let after = peak_rss_kib(&server);
    assert!(
        after < before + 100 * 1024,
        "the server's peak memory grew from {before} KiB to {after} KiB moving 200 MiB"
    );

    let files = |path: &str| format!("{}/v1/environments/{id}/files?path={path}", server.base);
    let content = |path: &str| {
        format!(
            "{}/v1/environments/{id}/files/content?path={path}",
            server.base
        )
    };
    // The home directory's listing.
    let listing: Value = server
        .http
        .get(files("."))
        .bearer_auth(&token)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(listing["directory"], true, "{listing}");
    let entry = listing["entries"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["name"] == "big.bin")
        .unwrap_or_else(|| panic!("{listing}"));
    assert_eq!(
        (entry["kind"].as_str(), entry["size"].as_u64()),
        (Some("file"), Some(200 << 20))
    );

    // Outside the home directory, as the dev user may; through a link, followed.
    let hostname = server
        .http
        .get(content("/etc/hostname"))
        .bearer_auth(&token)
        .send()
        .await
        .unwrap();
    assert_eq!(hostname.status(), StatusCode::OK);
    assert_eq!(
        hostname.text().await.unwrap().trim(),
        exec_ok(&server, &token, &id, "cat /etc/hostname")
            .await
            .trim()
    );
    // A size no multiple of a read's, read several reads ahead, and a file whose size the
    // guest does not know ahead (/proc says 0), read to its end.
    let odd_sum = exec_ok(
        &server,
        &token,
        &id,
        "head -c 1000003 /dev/urandom > odd.bin && sha256sum odd.bin",
    )
    .await;
    let odd = server
        .http
        .get(content("odd.bin"))
        .bearer_auth(&token)
        .send()
        .await
        .unwrap()
        .bytes()
        .await
        .unwrap();
    assert_eq!(odd.len(), 1000003);
    let digest = Sha256::digest(&odd);
    let odd_hex: String = digest.iter().map(|b| format!("{b:02x}")).collect();
    assert!(odd_sum.starts_with(&odd_hex), "{odd_sum} against {odd_hex}");
    let version = server
        .http
        .get(content("/proc/version"))
        .bearer_auth(&token)
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert_eq!(
        version.trim(),
        exec_ok(&server, &token, &id, "cat /proc/version")
            .await
            .trim()
    );
    let shadow = server
        .http
        .get(content("/etc/shadow"))
        .bearer_auth(&token)
        .send()
        .await
        .unwrap();
    assert_eq!(shadow.status(), StatusCode::FORBIDDEN);
    exec_ok(
        &server,
        &token,
        &id,
        "ln -s /etc etc-link && mkdir -p full && touch full/x",
    )
    .await;
    let through: Value = server
        .http
        .get(files("etc-link"))
        .bearer_auth(&token)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(through["directory"], true, "{through}");
    assert!(
        through["entries"]
            .as_array()
            .unwrap()
            .iter()
            .any(|e| e["name"] == "hostname"),
        "{through}"
    );

    // A small upload by the API, then what is missing, and someone else's.
    let r = server
        .http
        .put(content("hello.txt"))
        .bearer_auth(&token)
        .body("hello\n")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::CREATED);
    assert_eq!(
        exec_ok(&server, &token, &id, "cat hello.txt").await,
        "hello\n"
    );
    let r = server
        .http
        .get(content("none-such"))
        .bearer_auth(&token)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::NOT_FOUND);
    let r = server
        .http
        .get(content("hello.txt"))
        .bearer_auth(&other)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::NOT_FOUND);

    // Past the tier's limit (pro: 2 GiB), announced: refused before a byte is written.
    let address = server.base.trim_start_matches("http://").to_string();
    let mut raw = tokio::net::TcpStream::connect(&address).await.unwrap();
    raw.write_all(
        format!(
            "PUT /v1/environments/{id}/files/content?path=huge.bin HTTP/1.1\r\nHost: {address}\r\nAuthorization: Bearer {token}\r\nContent-Length: {}\r\n\r\n",
            3u64 << 30
        )
        .as_bytes(),
    )
    .await
    .unwrap();
    let mut answer = vec![0u8; 4096];
    let n = raw.read(&mut answer).await.unwrap();
    let answer = String::from_utf8_lossy(&answer[..n]).to_string();
    assert!(answer.starts_with("HTTP/1.1 413"), "{answer}");
    drop(raw);
    let left = exec_ok(
        &server,
        &token,
        &id,
        "ls -a ~ | grep -c hearth-upload; true",
    )
    .await;
    assert_eq!(left.trim(), "0", "a temporary file was left");
    assert_eq!(
        exec_ok(&server, &token, &id, "test -e huge.bin || echo absent").await,
        "absent\n"
    );

    // Over an existing file: replaced whole, and its mode kept (a key stays private).
    exec_ok(
        &server,
        &token,
        &id,
        "printf old > secret.key && chmod 600 secret.key",
    )
    .await;
    let r = server
        .http
        .put(content("secret.key"))
        .bearer_auth(&token)
        .body("new")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::CREATED);
    assert_eq!(
        exec_ok(
            &server,
            &token,
            &id,
            "stat -c %a secret.key; cat secret.key"
        )
        .await,
        "600\nnew"
    );
    // Through a link: the file it points at is written, the link stays.
    exec_ok(&server, &token, &id, "ln -s secret.key key-link").await;
    let r = server
        .http
        .put(content("key-link"))
        .bearer_auth(&token)
        .body("via link")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::CREATED);
    assert_eq!(
        exec_ok(&server, &token, &id, "test -L key-link && cat secret.key").await,
        "via link"
    );
    // A directory is not overwritten; the body is not even read.
    let r = server
        .http
        .put(content("full"))
        .bearer_auth(&token)
        .body("x")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::BAD_REQUEST);

    // An upload cut off by its client leaves nothing behind.
    let endless = futures::stream::unfold(0u32, |i| async move {
        if i == 20 {
            std::future::pending::<()>().await;
        }
        Some((Ok::<_, std::io::Error>(vec![1u8; 1 << 20]), i + 1))
    });
    let cut = server
        .http
        .put(content("cut.bin"))
        .bearer_auth(&token)
        .timeout(Duration::from_secs(3))
        .body(reqwest::Body::wrap_stream(endless))
        .send()
        .await;
    assert!(cut.is_err(), "{cut:?}");
    let started = std::time::Instant::now();
    loop {
        let left = exec_ok(
            &server,
            &token,
            &id,
            "ls -a ~ | grep -c hearth-upload; test -e cut.bin && echo there; true",
        )
        .await;
        if left.trim() == "0" {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "left behind: {left}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    // Removal: a file; a directory that is not empty is refused.
    let r = server
        .http
        .delete(files("big.bin"))
        .bearer_auth(&token)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::NO_CONTENT);
    let r = server
        .http
        .get(files("big.bin"))
        .bearer_auth(&token)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::NOT_FOUND);
    let r = server
        .http
        .delete(files("full"))
        .bearer_auth(&token)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::CONFLICT);

    server.destroy(&token, &id, UP).await;

    // The free tier's limit (100 MiB), found while reading a body of unannounced length.
    let free = server.user("files-free@example.com", "free").await;
    let r = server
        .call(
            "POST",
            "/v1/environments",
            Some(&free),
            Some(json!({"name": "small", "memoryMb": 256})),
        )
        .await;
    assert_eq!(r.status, StatusCode::ACCEPTED, "{:?}", r.body);
    let small = r.body["id"].as_str().unwrap().to_string();
    server.wait_env(&free, &small, "running", UP).await;
    let chunks =
        futures::stream::iter((0..101).map(|_| Ok::<_, std::io::Error>(vec![2u8; 1 << 20])));
    let r = server
        .http
        .put(format!(
            "{}/v1/environments/{small}/files/content?path=big.bin",
            server.base
        ))
        .bearer_auth(&free)
        .body(reqwest::Body::wrap_stream(chunks))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::PAYLOAD_TOO_LARGE);
    assert_eq!(
        exec_ok(
            &server,
            &free,
            &small,
            "ls -a ~ | grep -c hearth-upload; test -e big.bin && echo there; true"
        )
        .await
        .trim(),
        "0"
    );
    server.destroy(&free, &small, UP).await;
}
