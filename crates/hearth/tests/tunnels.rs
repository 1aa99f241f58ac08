//! Reaching into an environment through the API only: OpenSSH, scp and rsync through
//! `hearth ssh-config`'s `ProxyCommand`, `hearth port-forward`, and the HTTP port proxy
//! (with a WebSocket), and preview hosts (with the browser sign-in, in headless Chromium too),
//! against a real Docker guest. No guest port is published: the proxy goes to the guest's
//! own address on this machine's bridge where a service listens there, else through sshd.

mod common;

use common::*;
use futures::{SinkExt, StreamExt};
use reqwest::StatusCode;
use serde_json::{Value, json};
use sha2::{Digest, Sha256};
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;

const UP: Duration = Duration::from_secs(180);
const KNOWN_HOSTS_HEADER: &str = "# written by `hearth ssh-config`; rewritten each time\n";

/// Opens the tunnel WebSocket to `port` with `headers`; the socket, or the refusal's status.
async fn tunnel(
    server: &Server,
    id: &str,
    port: u16,
    headers: &[(&'static str, String)],
) -> Result<
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>,
    StatusCode,
> {
    let url = format!(
        "{}/v1/environments/{id}/tunnel/{port}",
        server.base.replacen("http", "ws", 1)
    );
    let mut request = url.into_client_request().unwrap();
    for (name, value) in headers {
        request.headers_mut().insert(*name, value.parse().unwrap());
    }
    match tokio_tungstenite::connect_async(request).await {
        Ok((ws, _)) => Ok(ws),
        Err(tokio_tungstenite::tungstenite::Error::Http(resp)) => Err(resp.status()),
        Err(other) => panic!("tunnel: {other}"),
    }
}

/// The CLI with only `XDG_CONFIG_HOME` (where `hearth login` keeps the server and token):
/// as an SSH client's `ProxyCommand` runs it from an editor, without HEARTH_* variables.
fn hearth(config_home: &Path) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_hearth"));
    c.env_remove("HEARTH_URL")
        .env_remove("HEARTH_TOKEN")
        .env("HEARTH_DATA_DIR", config_home.join("no-server-here"))
        .env("XDG_CONFIG_HOME", config_home);
    c
}

fn ok(out: &Output) -> String {
    assert!(
        out.status.success(),
        "exit {:?}\nstdout: {}\nstderr: {}",
        out.status.code(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).to_string()
}

/// OpenSSH with the generated config and the user's own key, never asking anything.
fn ssh_args(config: &Path, key: &Path) -> Vec<String> {
    [
        "-F",
        &config.display().to_string(),
        "-i",
        &key.display().to_string(),
        "-o",
        "BatchMode=yes",
        "-o",
        "IdentitiesOnly=yes",
        "-o",
        "LogLevel=ERROR",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()
}

fn sha256_file(path: &Path) -> String {
    hex(&Sha256::digest(std::fs::read(path).unwrap()))
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[tokio::test]
async fn ssh_scp_rsync_port_forward_and_the_port_proxy_go_through_the_api() {
    let site = Site::new(Db::Sqlite).await;
    let server = site.start().await;
    let token = server.user("tunnels@example.com", "pro").await;
    let other = server.user("tunnels-other@example.com", "pro").await;
    let dir = tempfile::tempdir().unwrap();
    let key = dir.path().join("id_ed25519");
    let made = Command::new("ssh-keygen")
        .args(["-q", "-t", "ed25519", "-N", "", "-C", "tunnels", "-f"])
        .arg(&key)
        .output()
        .unwrap();
    assert!(made.status.success(), "{made:?}");
    let public = std::fs::read_to_string(key.with_extension("pub")).unwrap();

    let id = server
        .create(
            &token,
            json!({"name": "tunnels", "sshPublicKey": public.trim(), "memoryMb": 512}),
        )
        .await;
    let env = server.wait_env(&token, &id, "running", UP).await;
    let slug = env["slug"].as_str().unwrap().to_string();
    let host_key = env["sshHostKey"]
        .as_str()
        .expect("a pinned host key")
        .to_string();

    // `hearth login` keeps the server and token (owner-only); a wrong token is refused and
    // nothing is kept.
    let config_home = dir.path().join("config");
    let login = |token: &str| {
        let mut child = hearth(&config_home)
            .args(["login", "--url", &server.base])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        use std::io::Write;
        writeln!(child.stdin.take().unwrap(), "{token}").unwrap();
        child.wait_with_output().unwrap()
    };
    let refused = login("hearth_not-a-token");
    assert_eq!(refused.status.code(), Some(3), "{refused:?}");
    assert!(!config_home.join("hearth/login.json").exists());
    ok(&login(&token));
    let mode = std::fs::metadata(config_home.join("hearth/login.json")).unwrap();
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(mode.permissions().mode() & 0o777, 0o600);

    // The config names the environment and pins its host key.
    let config_text = ok(&hearth(&config_home).arg("ssh-config").output().unwrap());
    assert!(
        config_text.contains(&format!("Host hearth-{slug}\n")),
        "{config_text}"
    );
    assert!(
        config_text.contains(&format!("ssh --stdio {id}\n")),
        "{config_text}"
    );
    let known_hosts = config_home.join("hearth/known_hosts");
    let written = std::fs::read_to_string(&known_hosts).unwrap();
    assert!(written.starts_with(KNOWN_HOSTS_HEADER), "{written}");
    assert!(
        written.ends_with(&format!("\nhearth-{id} {host_key}\n")),
        "{written}"
    );
    // A known_hosts it did not write is never overwritten.
    let foreign = dir.path().join("foreign_known_hosts");
    std::fs::write(&foreign, "example.com ssh-ed25519 AAAA\n").unwrap();
    let refused = hearth(&config_home)
        .arg("ssh-config")
        .arg("--known-hosts")
        .arg(&foreign)
        .output()
        .unwrap();
    assert_eq!(refused.status.code(), Some(2), "{refused:?}");
    assert_eq!(
        std::fs::read_to_string(&foreign).unwrap(),
        "example.com ssh-ed25519 AAAA\n"
    );
    let config = dir.path().join("ssh_config");
    std::fs::write(&config, &config_text).unwrap();
    let ssh = |args: &[&str]| {
        Command::new("ssh")
            .args(ssh_args(&config, &key))
            .args(args)
            .env_remove("HEARTH_URL")
            .env_remove("HEARTH_TOKEN")
            .env("XDG_CONFIG_HOME", &config_home)
            .output()
            .unwrap()
    };
    let host = format!("hearth-{slug}");
    let out = ok(&ssh(&[&host, "hostname; whoami"]));
    assert_eq!(out, format!("{}\ndev\n", slug.replace('_', "-")));

    // scp both ways, 3 MB.
    let payload = dir.path().join("payload.bin");
    let bytes: Vec<u8> = (0..3_000_000u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    std::fs::write(&payload, &bytes).unwrap();
    let scp = |from: &str, to: &str| {
        Command::new("scp")
            .args(ssh_args(&config, &key))
            .args(["-q", from, to])
            .env_remove("HEARTH_URL")
            .env_remove("HEARTH_TOKEN")
            .env("XDG_CONFIG_HOME", &config_home)
            .output()
            .unwrap()
    };
    ok(&scp(
        &payload.display().to_string(),
        &format!("{host}:payload.bin"),
    ));
    let back = dir.path().join("back.bin");
    ok(&scp(
        &format!("{host}:payload.bin"),
        &back.display().to_string(),
    ));
    assert_eq!(sha256_file(&back), sha256_file(&payload));
    let in_guest = exec_ok(&server, &token, &id, "sha256sum payload.bin").await;
    assert!(in_guest.starts_with(&sha256_file(&payload)), "{in_guest}");

    // rsync of a directory, through the same ProxyCommand.
    let tree = dir.path().join("tree");
    std::fs::create_dir_all(tree.join("sub")).unwrap();
    std::fs::write(tree.join("a.txt"), "alpha\n").unwrap();
    std::fs::write(tree.join("sub/b.txt"), "beta\n").unwrap();
    let rsh = format!("ssh {}", ssh_args(&config, &key).join(" "));
    let synced = Command::new("rsync")
        .args(["-a", "-e", &rsh])
        .arg(format!("{}/", tree.display()))
        .arg(format!("{host}:tree/"))
        .env_remove("HEARTH_URL")
        .env_remove("HEARTH_TOKEN")
        .env("XDG_CONFIG_HOME", &config_home)
        .output()
        .unwrap();
    ok(&synced);
    assert_eq!(
        exec_ok(&server, &token, &id, "cat tree/a.txt tree/sub/b.txt").await,
        "alpha\nbeta\n"
    );

    // The pin holds: another key recorded for this environment fails the connection.
    std::fs::write(
        &known_hosts,
        format!("{KNOWN_HOSTS_HEADER}hearth-{id} ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIJdD7y3aLq454yWBdwLWbieU1ebz9/cu7/QEXn9OIeZJ\n"),
    )
    .unwrap();
    let spoofed = ssh(&[&host, "true"]);
    assert!(!spoofed.status.success());
    assert!(
        String::from_utf8_lossy(&spoofed.stderr).contains("REMOTE HOST IDENTIFICATION HAS CHANGED")
            || String::from_utf8_lossy(&spoofed.stderr).contains("Host key verification failed"),
        "{spoofed:?}"
    );
    ok(&hearth(&config_home).arg("ssh-config").output().unwrap());

    // Services in the guest: two on its loopback only, one on every address.
    exec_ok(
        &server,
        &token,
        &id,
        &format!(
            "cat > echo.py <<'PY'\n{}PY\nmkdir -p site && echo hello-proxy > site/hello.txt\n\
             setsid nohup python3 -m http.server 8000 --bind 127.0.0.1 --directory site > http.log 2>&1 < /dev/null &\n\
             setsid nohup python3 echo.py 8001 > echo.log 2>&1 < /dev/null &\n\
             setsid nohup python3 echo.py 8002 0.0.0.0 > echo-all.log 2>&1 < /dev/null &\n",
            include_str!("tunnels/echo.py")
        ),
    )
    .await;
    let proxy =
        |port: u16, path: &str| format!("{}/v1/environments/{id}/ports/{port}{path}", server.base);
    for (port, path) in [(8001, "/headers"), (8000, "/hello.txt"), (8002, "/peer")] {
        until_ok(|| server.http.get(proxy(port, path)).bearer_auth(&token)).await;
    }
    // A service on every address of this machine's container is reached straight at the
    // container's address (from the host's end of its bridge); one on the guest's loopback
    // only refuses that, and is reached through the guest's sshd.
    let peer = |port: u16| {
        let request = server.http.get(proxy(port, "/peer")).bearer_auth(&token);
        async move {
            let r = request.send().await.unwrap();
            assert_eq!(r.status(), StatusCode::OK);
            r.json::<Value>().await.unwrap()["host"]
                .as_str()
                .unwrap()
                .to_string()
        }
    };
    let direct = peer(8002).await;
    assert_ne!(direct, "127.0.0.1", "not through sshd");
    let gateway = exec_ok(&server, &token, &id, "ip route show default").await;
    assert!(
        gateway.contains(&format!("via {direct} ")),
        "from the host's end of the bridge: {direct} vs {gateway}"
    );
    assert_eq!(peer(8001).await, "127.0.0.1", "through sshd");

    // `python3 -m http.server`, by its owner.
    let r = server
        .http
        .get(proxy(8000, "/hello.txt"))
        .bearer_auth(&token)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    assert!(
        r.headers()["content-security-policy"]
            .to_str()
            .unwrap()
            .starts_with("sandbox"),
        "{:?}",
        r.headers()
    );
    assert_eq!(r.text().await.unwrap(), "hello-proxy\n");
    let listing = server
        .http
        .get(proxy(8000, "/"))
        .bearer_auth(&token)
        .send()
        .await
        .unwrap();
    assert_eq!(listing.status(), StatusCode::OK);
    let listing = listing.text().await.unwrap();
    assert!(listing.contains("hello.txt"), "{listing}");
    // Refused to another user (as if it did not exist) and to no one.
    let r = server
        .http
        .get(proxy(8000, "/hello.txt"))
        .bearer_auth(&other)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::NOT_FOUND);
    let r = server
        .http
        .get(proxy(8000, "/hello.txt"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
    // Shared with a token: whoever holds it gets that port, with nothing else.
    let r = server
        .call(
            "POST",
            &format!("/v1/environments/{id}/shares"),
            Some(&token),
            Some(json!({"port": 8000, "expiresInHours": 2})),
        )
        .await;
    assert_eq!(r.status, StatusCode::CREATED, "{:?}", r.body);
    let (share_id, share_url) = (
        r.body["id"].as_str().unwrap().to_string(),
        r.body["url"].as_str().unwrap().to_string(),
    );
    assert!(share_url.starts_with("/v1/shared/"), "{share_url}");
    let by_token = format!("{}{share_url}hello.txt", server.base);
    let r = server.http.get(&by_token).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(r.text().await.unwrap(), "hello-proxy\n");
    let listed = server
        .call(
            "GET",
            &format!("/v1/environments/{id}/shares"),
            Some(&token),
            None,
        )
        .await
        .body;
    assert_eq!(listed["items"][0]["id"], share_id.as_str(), "{listed}");
    assert!(listed["items"][0]["token"].is_null(), "{listed}");
    let theirs = server
        .call(
            "DELETE",
            &format!("/v1/environments/{id}/shares/{share_id}"),
            Some(&other),
            None,
        )
        .await;
    assert_eq!(theirs.status, StatusCode::NOT_FOUND);
    let ended = server
        .call(
            "DELETE",
            &format!("/v1/environments/{id}/shares/{share_id}"),
            Some(&token),
            None,
        )
        .await;
    assert_eq!(ended.status, StatusCode::NO_CONTENT);
    let r = server.http.get(&by_token).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
    // Shared with everyone: the owner's URL then needs no credentials, for that port only.
    let r = server
        .call(
            "POST",
            &format!("/v1/environments/{id}/shares"),
            Some(&token),
            Some(json!({"port": 8000, "public": true})),
        )
        .await;
    assert_eq!(r.status, StatusCode::CREATED, "{:?}", r.body);
    assert!(r.body["token"].is_null());
    let public_id = r.body["id"].as_str().unwrap().to_string();
    let r = server
        .http
        .get(proxy(8000, "/hello.txt"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    let r = server
        .http
        .get(proxy(8001, "/headers"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
    let r = server
        .http
        .get(proxy(8000, "/hello.txt"))
        .bearer_auth("hearth_wrong")
        .send()
        .await
        .unwrap();
    assert_eq!(
        r.status(),
        StatusCode::UNAUTHORIZED,
        "credentials given must hold"
    );
    // An app's own sign-in (another scheme than Bearer) is not Hearth's to judge.
    let r = server
        .http
        .get(proxy(8000, "/hello.txt"))
        .basic_auth("app-user", Some("app-password"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    server
        .call(
            "DELETE",
            &format!("/v1/environments/{id}/shares/{public_id}"),
            Some(&token),
            None,
        )
        .await;
    let r = server
        .http
        .get(proxy(8000, "/hello.txt"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::UNAUTHORIZED);

    // Nothing listens: 503 with the reason.
    let r = server
        .http
        .get(proxy(8999, "/"))
        .bearer_auth(&token)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::SERVICE_UNAVAILABLE);
    let body: Value = r.json().await.unwrap();
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("port 8999"),
        "{body}"
    );

    // Hearth's credentials never reach the guest; the guest's own cookies do.
    let headers: Value = server
        .http
        .get(proxy(8001, "/headers"))
        .bearer_auth(&token)
        .header("cookie", "hearth_session=not-for-the-guest; app=kept")
        .header("x-csrf-token", "not-for-the-guest")
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert!(headers.get("authorization").is_none(), "{headers}");
    assert!(headers.get("x-csrf-token").is_none(), "{headers}");
    assert_eq!(headers["cookie"], "app=kept", "{headers}");
    assert_eq!(headers["host"], "localhost:8001", "{headers}");
    assert_eq!(
        headers["x-forwarded-prefix"],
        format!("/v1/environments/{id}/ports/8001")
    );

    // The guest cannot set or clear Hearth's cookies in a browser; its own pass.
    let r = server
        .http
        .get(proxy(8001, "/cookies"))
        .bearer_auth(&token)
        .send()
        .await
        .unwrap();
    let set: Vec<&str> = r
        .headers()
        .get_all("set-cookie")
        .iter()
        .map(|v| v.to_str().unwrap())
        .collect();
    assert_eq!(set, ["app=1; Path=/"]);
    assert!(r.headers().get("clear-site-data").is_none());

    // A body streamed to the guest arrives whole.
    let answer: Value = server
        .http
        .post(proxy(8001, "/sha256"))
        .bearer_auth(&token)
        .body(bytes.clone())
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(answer["bytes"], bytes.len());
    assert_eq!(answer["sha256"], hex(&Sha256::digest(&bytes)));

    // A WebSocket through the proxy.
    let ws_url = proxy(8001, "/ws").replacen("http", "ws", 1);
    let mut request = ws_url.into_client_request().unwrap();
    request
        .headers_mut()
        .insert("authorization", format!("Bearer {token}").parse().unwrap());
    let (mut ws, _) = tokio_tungstenite::connect_async(request).await.unwrap();
    for text in ["one", "two"] {
        ws.send(Message::Text(text.into())).await.unwrap();
        let echoed = ws.next().await.unwrap().unwrap();
        assert_eq!(echoed, Message::Text(text.into()));
    }
    let big = vec![7u8; 100_000];
    ws.send(Message::Binary(big.clone().into())).await.unwrap();
    assert_eq!(
        ws.next().await.unwrap().unwrap(),
        Message::Binary(big.into())
    );
    ws.close(None).await.unwrap();
    drop(ws);

    // The tunnel itself: bytes both ways, and each side's end passed on (an HTTP/1.0
    // answer ends with the guest closing its side).
    let bearer = [("authorization", format!("Bearer {token}"))];
    let mut raw = tunnel(&server, &id, 8001, &bearer).await.unwrap();
    raw.send(Message::Binary(
        b"GET /headers HTTP/1.0\r\nHost: x\r\n\r\n".to_vec().into(),
    ))
    .await
    .unwrap();
    raw.send(Message::Text(r#"{"type":"eof"}"#.into()))
        .await
        .unwrap();
    let (mut received, mut saw_eof) = (Vec::new(), false);
    while let Some(msg) = raw.next().await {
        match msg.unwrap() {
            Message::Binary(b) => received.extend_from_slice(&b),
            Message::Text(t) => saw_eof |= t.as_str() == r#"{"type":"eof"}"#,
            Message::Close(_) => break,
            _ => {}
        }
    }
    assert!(
        String::from_utf8_lossy(&received).starts_with("HTTP/1.1 200 OK"),
        "{received:?}"
    );
    assert!(saw_eof, "the guest's end of output was not passed on");
    // The browser's session alone is refused: a page of another site could use it.
    let session = [("cookie", "hearth_session=anything".to_string())];
    assert_eq!(
        tunnel(&server, &id, 8001, &session).await.err(),
        Some(StatusCode::UNAUTHORIZED)
    );
    // 64 open at once per user; the 65th is refused, and a closed one frees its place.
    let mut open = Vec::new();
    let _ = raw.close(None).await;
    drop(raw);
    let started = Instant::now();
    while open.len() < 64 {
        match tunnel(&server, &id, 8001, &bearer).await {
            Ok(ws) => open.push(ws),
            // The tunnel above gives its place back once the server saw it close.
            Err(StatusCode::TOO_MANY_REQUESTS) if started.elapsed() < Duration::from_secs(5) => {
                tokio::time::sleep(Duration::from_millis(50)).await
            }
            Err(status) => panic!("tunnel {} of 64: {status}", open.len() + 1),
        }
    }
    assert_eq!(
        tunnel(&server, &id, 8001, &bearer).await.err(),
        Some(StatusCode::TOO_MANY_REQUESTS)
    );
    open.pop().unwrap().close(None).await.unwrap();
    let started = Instant::now();
    while tunnel(&server, &id, 8001, &bearer).await.is_err() {
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "a closed tunnel kept its place"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    drop(open);

    // `hearth port-forward` to a TCP service that is not HTTP: the guest's sshd.
    let local = free_port();
    let mut forward = hearth(&config_home)
        .args(["port-forward", &id, &format!("{local}:22")])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let started = Instant::now();
    while std::net::TcpStream::connect(("127.0.0.1", local)).is_err() {
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "port-forward never listened"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let hosts_line = dir.path().join("forward_known_hosts");
    std::fs::write(&hosts_line, format!("[127.0.0.1]:{local} {host_key}\n")).unwrap();
    let out = Command::new("ssh")
        .args(["-i", &key.display().to_string(), "-p", &local.to_string()])
        .args([
            "-o",
            "BatchMode=yes",
            "-o",
            "IdentitiesOnly=yes",
            "-o",
            "StrictHostKeyChecking=yes",
        ])
        .arg("-o")
        .arg(format!("UserKnownHostsFile={}", hosts_line.display()))
        .args(["dev@127.0.0.1", "cat tree/a.txt"])
        .output()
        .unwrap();
    assert_eq!(ok(&out), "alpha\n");
    // And an HTTP service, by plain TCP on the local side.
    let forwarded_http = free_port();
    let mut forward_http = hearth(&config_home)
        .args(["port-forward", &id, &format!("{forwarded_http}:8000")])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let started = Instant::now();
    let body = loop {
        if let Ok(r) = reqwest::get(format!("http://127.0.0.1:{forwarded_http}/hello.txt")).await {
            break r.text().await.unwrap();
        }
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "port-forward never listened"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(body, "hello-proxy\n");
    let _ = forward.kill();
    let _ = forward_http.kill();
    let _ = forward.wait();
    let _ = forward_http.wait();

    // Another user's tunnel is refused as if the environment did not exist.
    let theirs = [("authorization", format!("Bearer {other}"))];
    assert_eq!(
        tunnel(&server, &id, 22, &theirs).await.err(),
        Some(StatusCode::NOT_FOUND)
    );

    // The tunnels counted as activity.
    let activity = server
        .call(
            "GET",
            &format!("/v1/environments/{id}/activity"),
            Some(&token),
            None,
        )
        .await
        .body;
    assert_eq!(activity["lastActivitySource"], "tunnel", "{activity}");

    server.destroy(&token, &id, UP).await;
}

/// The value of cookie `name` set by `response`, if any.
fn set_cookie(response: &reqwest::Response, name: &str) -> Option<String> {
    response
        .headers()
        .get_all("set-cookie")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .filter_map(|v| v.split(';').next()?.split_once('='))
        .find(|(n, _)| *n == name)
        .map(|(_, v)| v.to_string())
}

fn location(response: &reqwest::Response) -> String {
    assert_eq!(response.status(), StatusCode::SEE_OTHER, "{response:?}");
    response.headers()["location"].to_str().unwrap().to_string()
}

const PASSWORD: &str = "a long enough password";

/// A user's browser session cookie (an admin's invitation link, a password, a sign-in).
async fn session_of(server: &Server, email: &str) -> String {
    let user_id = server.user_id(email).await;
    let link = server
        .call(
            "POST",
            &format!("/v1/admin/users/{user_id}/password-link"),
            Some(&server.admin_token),
            Some(json!({"purpose": "invite"})),
        )
        .await;
    let password = PASSWORD;
    let set = server
        .call(
            "POST",
            "/v1/auth/password",
            None,
            Some(json!({"token": link.body["token"], "password": password})),
        )
        .await;
    assert!(set.status.is_success(), "{set:?}");
    let r = server
        .http
        .post(format!("{}/v1/auth/sign-in", server.base))
        .json(&json!({"email": email, "password": password}))
        .send()
        .await
        .unwrap();
    set_cookie(&r, "hearth_session").expect("a session cookie")
}

#[tokio::test]
async fn a_preview_host_serves_a_port_at_its_own_origin_to_its_owner() {
    // Previews on Hearth's own site are refused: a guest's page could set Hearth's cookies.
    let (code, said) = Site::new(Db::Sqlite)
        .await
        .with_env("HEARTH_PREVIEW_DOMAIN", "preview.example.com")
        .with_env("HEARTH_PUBLIC_URL", "https://hearth.example.com")
        .start_refused();
    assert!(
        code != 0 && said.contains("different sites"),
        "{code}: {said}"
    );

    let port = free_port();
    let site = Site::new(Db::Sqlite)
        .await
        .with_env("HEARTH_PREVIEW_DOMAIN", "preview.test")
        .with_env("HEARTH_PUBLIC_URL", &format!("http://127.0.0.1:{port}"));
    let server = site.start_on(port).await;
    let token = server.user("previews@example.com", "pro").await;
    let other = server.user("previews-other@example.com", "pro").await;
    let session = session_of(&server, "previews@example.com").await;
    let others_session = session_of(&server, "previews-other@example.com").await;
    let id = server
        .create(&token, json!({"name": "previews", "memoryMb": 512}))
        .await;
    let env = server.wait_env(&token, &id, "running", UP).await;
    let slug = env["slug"].as_str().unwrap().replace('_', "-");
    exec_ok(
        &server,
        &token,
        &id,
        &format!(
            "cat > echo.py <<'PY'\n{}PY\nsetsid nohup python3 echo.py 8001 > echo.log 2>&1 < /dev/null &\n",
            include_str!("tunnels/echo.py")
        ),
    )
    .await;

    // Preview hosts resolve to the server, as a wildcard DNS entry would make them.
    let host = format!("8001-{slug}.preview.test");
    let other_port_host = format!("8002-{slug}.preview.test");
    let addr: std::net::SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let browser = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .resolve(&host, addr)
        .resolve(&other_port_host, addr)
        .resolve("www.preview.test", addr)
        .build()
        .unwrap();
    let preview = |path: &str| format!("http://{host}:{port}{path}");
    until_ok(|| browser.get(preview("/peer")).bearer_auth(&token)).await;

    // With a bearer token: the app at `/` of its own origin, not sandboxed, and the
    // guest learns the host it was reached at, never Hearth's credentials.
    let page = browser
        .get(preview("/"))
        .bearer_auth(&token)
        .send()
        .await
        .unwrap();
    assert_eq!(page.status(), StatusCode::OK);
    assert!(page.headers().get("content-security-policy").is_none());
    assert!(page.text().await.unwrap().contains("src=\"/app.js\""));
    let script = browser
        .get(preview("/app.js"))
        .bearer_auth(&token)
        .send()
        .await
        .unwrap();
    assert_eq!(script.status(), StatusCode::OK);
    let headers: Value = browser
        .get(preview("/headers"))
        .bearer_auth(&token)
        .header("cookie", "hearth_preview=not-for-the-guest; app=kept")
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert!(headers.get("authorization").is_none(), "{headers}");
    assert_eq!(headers["cookie"], "app=kept", "{headers}");
    assert_eq!(headers["x-forwarded-host"], format!("{host}:{port}"));
    assert_eq!(headers["host"], "localhost:8001");
    // Requests one after another reuse kept connections to the guest (each is a channel
    // that sshd connects from a port of its own). One may start a second connection when
    // it comes before the last answer's connection is back in the pool.
    let mut peers = std::collections::BTreeSet::new();
    for _ in 0..10 {
        let peer: Value = browser
            .get(preview("/peer"))
            .bearer_auth(&token)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        peers.insert(peer["port"].as_u64().unwrap());
    }
    assert!(peers.len() <= 3, "10 requests, connections from {peers:?}");
    // Another user's token gets nothing, as if the environment did not exist.
    let r = browser
        .get(preview("/peer"))
        .bearer_auth(&other)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::NOT_FOUND);

    // A browser: sent to sign in at Hearth's origin, back with a code, then a cookie for
    // this host only.
    let html = [("accept", "text/html")];
    let r = browser
        .get(preview("/headers?x=1"))
        .header(html[0].0, html[0].1)
        .send()
        .await
        .unwrap();
    let sign_in = location(&r);
    assert!(
        sign_in.starts_with(&format!(
            "http://127.0.0.1:{port}/v1/previews/sign-in?host="
        )),
        "{sign_in}"
    );
    let r = browser.get(preview("/headers")).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::UNAUTHORIZED, "a script is not sent");
    let r = browser.get(&sign_in).send().await.unwrap();
    assert!(
        location(&r).starts_with("/?error="),
        "no session: sign in first"
    );
    let r = browser
        .get(&sign_in)
        .header("cookie", format!("hearth_session={others_session}"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::NOT_FOUND, "not their environment");
    let r = browser
        .get(&sign_in)
        .header("cookie", format!("hearth_session={session}"))
        .send()
        .await
        .unwrap();
    let callback = location(&r);
    assert!(
        callback.starts_with(&format!("http://{host}:{port}/__hearth/preview?code=")),
        "{callback}"
    );
    let r = browser.get(&callback).send().await.unwrap();
    assert_eq!(location(&r), "/headers?x=1");
    let cookie = set_cookie(&r, "hearth_preview").expect("a preview cookie");
    let raw = r.headers()["set-cookie"].to_str().unwrap();
    assert!(raw.contains("HttpOnly") && !raw.contains("Domain"), "{raw}");
    // The code is for this host only.
    let elsewhere = callback.replace(&host, &other_port_host);
    let r = browser.get(&elsewhere).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
    let with_cookie = |path: &str| {
        browser
            .get(preview(path))
            .header("cookie", format!("hearth_preview={cookie}"))
    };
    let headers: Value = with_cookie("/headers?x=1")
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert!(headers.get("cookie").is_none(), "{headers}");
    // Another preview's page cannot use it (same-site, not same-origin)...
    let r = browser
        .post(preview("/sha256"))
        .header("cookie", format!("hearth_preview={cookie}"))
        .header("sec-fetch-site", "same-site")
        .header("sec-fetch-mode", "cors")
        .body("x")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::FORBIDDEN);
    // ...while the preview's own pages can.
    let r = browser
        .post(preview("/sha256"))
        .header("cookie", format!("hearth_preview={cookie}"))
        .header("sec-fetch-site", "same-origin")
        .body("x")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    // The cookie is no use at another port's host.
    let r = browser
        .get(format!("http://{other_port_host}:{port}/"))
        .header("cookie", format!("hearth_preview={cookie}"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::UNAUTHORIZED);

    // A host under the preview domain that is no preview never reaches Hearth's API.
    let r = browser
        .get(format!("http://www.preview.test:{port}/v1/me"))
        .bearer_auth(&token)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::NOT_FOUND);
    assert!(r.text().await.unwrap().contains("not a preview"));

    // Shared with everyone: no credentials needed at the preview host.
    let r = server
        .call(
            "POST",
            &format!("/v1/environments/{id}/shares"),
            Some(&token),
            Some(json!({"port": 8001, "public": true})),
        )
        .await;
    assert_eq!(r.status, StatusCode::CREATED, "{:?}", r.body);
    let r = browser.get(preview("/peer")).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    // The app's own `Basic` sign-in reaches it; a Bearer in any case is Hearth's.
    let headers: Value = browser
        .get(preview("/headers"))
        .basic_auth("app-user", Some("app-password"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(
        headers["authorization"], "Basic YXBwLXVzZXI6YXBwLXBhc3N3b3Jk",
        "{headers}"
    );
    let headers: Value = browser
        .get(preview("/headers"))
        .header("authorization", format!("bearer {token}"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert!(headers.get("authorization").is_none(), "{headers}");
    let shares = server
        .call(
            "GET",
            &format!("/v1/environments/{id}/shares"),
            Some(&token),
            None,
        )
        .await
        .body;
    let share_id = shares["items"][0]["id"].as_str().unwrap().to_string();
    server
        .call(
            "DELETE",
            &format!("/v1/environments/{id}/shares/{share_id}"),
            Some(&token),
            None,
        )
        .await;

    // A real browser goes the same way, and the guest's page works at its own origin.
    let ui = Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/../../ui"));
    assert!(
        ui.join("node_modules/playwright-core").is_dir(),
        "the UI's test tools are not installed: run `make ui` (make test does)"
    );
    let screenshots = Path::new(env!("CARGO_TARGET_TMPDIR")).join("ui-screenshots");
    std::fs::create_dir_all(&screenshots).unwrap();
    let out = tokio::process::Command::new("node")
        .arg("test/preview.mjs")
        .current_dir(ui)
        .env("HEARTH_URL", &server.base)
        .env("PREVIEW_URL", preview("/"))
        .env("EMAIL", "previews@example.com")
        .env("PASSWORD", PASSWORD)
        .env("SCREENSHOTS", &screenshots)
        .output()
        .await
        .unwrap();
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success() && said.contains("preview: done"),
        "the browser's preview failed:\n{said}\nserver log:\n{}",
        site.log()
    );

    // Signing out of Hearth ends the preview's cookie too.
    let csrf = server
        .http
        .get(format!("{}/v1/auth/session", server.base))
        .header("cookie", format!("hearth_session={session}"))
        .send()
        .await
        .unwrap()
        .json::<Value>()
        .await
        .unwrap()["csrfToken"]
        .as_str()
        .unwrap()
        .to_string();
    let r = server
        .http
        .post(format!("{}/v1/auth/sign-out", server.base))
        .header("cookie", format!("hearth_session={session}"))
        .header("x-csrf-token", csrf)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::NO_CONTENT);
    let r = with_cookie("/peer").send().await.unwrap();
    assert_eq!(r.status(), StatusCode::UNAUTHORIZED);

    server.destroy(&token, &id, UP).await;
}

/// Sends `request` until the guest's service behind it answers 200, for at most 30 s.
async fn until_ok(request: impl Fn() -> reqwest::RequestBuilder) {
    let started = Instant::now();
    loop {
        let r = request().send().await.unwrap();
        if r.status() == StatusCode::OK {
            return;
        }
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "the guest's service never answered: {} {}",
            r.status(),
            r.text().await.unwrap()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}
