//! Commands by mail, end to end, with real mail software on both sides: `swaks` (Debian)
//! and Python's `smtplib` send to Hearth's SMTP listener, `curl` posts SendGrid-shaped forms
//! to the webhook, dkimpy signs, `dnsmasq` serves the DKIM keys, and an `aiosmtpd` relay
//! receives the replies, which are read with mail-parser.

mod common;

use common::{Db, Server, Site, free_port};
use reqwest::StatusCode;
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};
use tokio::process::Command;

const AGENT: &str = "agent@hearth.test";
const SECRET: &str = "webhook-secret-0123456789";
const PYTHON: &str = "/usr/bin/python3";

fn helper(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/mail")
        .join(name)
}

/// The relay replies go to: an aiosmtpd server keeping each message as a file.
struct Sink {
    child: tokio::process::Child,
    dir: tempfile::TempDir,
    port: u16,
}

impl Sink {
    async fn start() -> Sink {
        Sink::start_on(free_port()).await
    }

    async fn start_on(port: u16) -> Sink {
        let dir = tempfile::tempdir().unwrap();
        let child = Command::new(PYTHON)
            .arg(helper("smtp_sink.py"))
            .arg(port.to_string())
            .arg(dir.path())
            .kill_on_drop(true)
            .stdout(std::process::Stdio::null())
            .spawn()
            .expect("aiosmtpd (scripts/services.sh mail installs it)");
        wait_port(port).await;
        Sink { child, dir, port }
    }

    fn messages(&self) -> Vec<Vec<u8>> {
        let mut names: Vec<_> = std::fs::read_dir(self.dir.path())
            .unwrap()
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|x| x == "eml"))
            .collect();
        names.sort();
        names.iter().map(|p| std::fs::read(p).unwrap()).collect()
    }

    /// Waits for the `n`th reply and returns it.
    async fn reply(&self, n: usize, site: &Site) -> Reply {
        let started = Instant::now();
        loop {
            let all = self.messages();
            if all.len() >= n {
                assert_eq!(all.len(), n, "more replies than expected");
                return Reply::parse(&all[n - 1]);
            }
            assert!(
                started.elapsed() < Duration::from_secs(180),
                "reply {n} never came; log:\n{}",
                tail(&site.log())
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

impl Drop for Sink {
    fn drop(&mut self) {
        let _ = self.child.start_kill();
    }
}

fn tail(log: &str) -> String {
    log.lines()
        .rev()
        .take(40)
        .collect::<Vec<_>>()
        .into_iter()
        .rev()
        .collect::<Vec<_>>()
        .join("\n")
}

async fn wait_port(port: u16) {
    let started = Instant::now();
    while tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .is_err()
    {
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "nothing listens on {port}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A reply as received by the relay.
#[derive(Debug)]
struct Reply {
    rcpt_to: String,
    subject: String,
    in_reply_to: String,
    auto_submitted: String,
    text: String,
    html: String,
}

impl Reply {
    fn parse(raw: &[u8]) -> Reply {
        let m = mail_parser::MessageParser::default()
            .parse(raw)
            .expect("a message");
        let header = |name: &str| m.header_raw(name).unwrap_or("").trim().to_string();
        Reply {
            rcpt_to: header("X-Sink-Rcpt-To"),
            subject: m.subject().unwrap_or("").to_string(),
            in_reply_to: header("In-Reply-To"),
            auto_submitted: header("Auto-Submitted"),
            text: m
                .body_text(0)
                .map(|t| t.replace("\r\n", "\n"))
                .unwrap_or_default(),
            html: m.body_html(0).map(|t| t.to_string()).unwrap_or_default(),
        }
    }
}

/// dnsmasq on loopback, answering the DKIM key records.
struct Dns {
    child: tokio::process::Child,
    port: u16,
}

impl Drop for Dns {
    fn drop(&mut self) {
        let _ = self.child.start_kill();
    }
}

/// A DKIM key: its private PEM file and the TXT record publishing it.
struct DkimKey {
    pem: PathBuf,
    record: String,
}

async fn dkim_key(dir: &Path, name: &str) -> DkimKey {
    let pem = dir.join(format!("{name}.pem"));
    let ok = Command::new("openssl")
        .args(["genrsa", "-out"])
        .arg(&pem)
        .arg("1024")
        .output()
        .await
        .unwrap();
    assert!(ok.status.success(), "{ok:?}");
    let public = Command::new("openssl")
        .args(["rsa", "-pubout", "-outform", "DER", "-in"])
        .arg(&pem)
        .output()
        .await
        .unwrap();
    assert!(public.status.success(), "{public:?}");
    use base64::Engine;
    let p = base64::engine::general_purpose::STANDARD.encode(&public.stdout);
    DkimKey {
        pem,
        record: format!("v=DKIM1; k=rsa; p={p}"),
    }
}

async fn dns(records: &[(&str, &str)]) -> Dns {
    let port = free_port();
    let mut cmd = Command::new("dnsmasq");
    cmd.args([
        "--keep-in-foreground",
        "--no-resolv",
        "--no-hosts",
        "--bind-interfaces",
    ])
    .args([
        "--listen-address=127.0.0.1",
        "--conf-file=/dev/null",
        "--pid-file=",
        "--user=root",
    ])
    .arg(format!("--port={port}"))
    .kill_on_drop(true);
    for (name, text) in records {
        cmd.arg(format!("--txt-record={name},{text}"));
    }
    let child = cmd
        .spawn()
        .expect("dnsmasq (scripts/services.sh mail installs it)");
    // It answers on UDP and TCP; TCP tells when it is up.
    wait_port(port).await;
    Dns { child, port }
}

/// Sends with swaks; returns whether the server took the message, and swaks's transcript.
async fn swaks(
    port: u16,
    from: &str,
    to: &str,
    subject: &str,
    message_id: &str,
    body: &str,
) -> (bool, String) {
    let out = Command::new("swaks")
        .args(["--server", "127.0.0.1", "--port", &port.to_string()])
        .args(["--from", from, "--to", to])
        .args(["--header", &format!("Subject: {subject}")])
        .args(["--header", &format!("Message-Id: <{message_id}>")])
        // swaks prompts for an empty argument: never give it one.
        .args(["--body", if body.is_empty() { "(no text)" } else { body }])
        .stdin(std::process::Stdio::null())
        .output()
        .await
        .expect("swaks (scripts/services.sh mail installs it)");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).to_string(),
    )
}

/// Sends `raw` with smtplib, DKIM-signed with `key` for `domain` when given.
async fn smtplib(
    port: u16,
    from: &str,
    to: &str,
    raw: &str,
    key: Option<(&str, &DkimKey)>,
) -> String {
    let mut cmd = Command::new(PYTHON);
    cmd.arg(helper("dkim_send.py"))
        .arg(port.to_string())
        .arg(from)
        .arg(to);
    if let Some((domain, key)) = key {
        cmd.arg(domain).arg("sel").arg(&key.pem);
    }
    let mut child = cmd
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    use tokio::io::AsyncWriteExt;
    let mut stdin = child.stdin.take().unwrap();
    stdin.write_all(raw.as_bytes()).await.unwrap();
    drop(stdin);
    let out = child.wait_with_output().await.unwrap();
    String::from_utf8_lossy(&out.stdout).to_string()
}

fn message(from: &str, to: &str, subject: &str, id: &str, body: &str) -> String {
    format!(
        "From: {from}\r\nTo: {to}\r\nSubject: {subject}\r\nMessage-ID: <{id}>\r\n\r\n{body}\r\n"
    )
}

/// A site taking mail: SMTP on a port of its own, the webhook, replies to the relay on
/// `relay_port`.
fn mail_site(site: Site, smtp: u16, relay_port: u16, dns_port: Option<u16>) -> Site {
    let mut site = site
        .with_env("HEARTH_MAIL_ADDRESS", AGENT)
        .with_env(
            "HEARTH_MAIL_RELAY",
            &format!("smtp://127.0.0.1:{relay_port}"),
        )
        .with_env("HEARTH_SMTP_LISTEN", &format!("127.0.0.1:{smtp}"))
        .with_env("HEARTH_MAIL_WEBHOOK_SECRET", SECRET)
        .with_env("HEARTH_MAIL_BACKOFF_MS", "300");
    if let Some(p) = dns_port {
        site = site.with_env("HEARTH_MAIL_DNS", &format!("127.0.0.1:{p}"));
    }
    site
}

async fn secret_address(server: &Server, token: &str) -> String {
    let r = server
        .call("POST", "/v1/me/mail-address", Some(token), None)
        .await;
    assert_eq!(r.status, StatusCode::CREATED, "{:?}", r.body);
    let address = r.body["address"].as_str().unwrap().to_string();
    assert!(
        address.starts_with("agent+") && address.ends_with("@hearth.test"),
        "{address}"
    );
    address
}

async fn environments(server: &Server, token: &str) -> Vec<Value> {
    let r = server
        .call("GET", "/v1/environments", Some(token), None)
        .await;
    r.body["items"].as_array().cloned().unwrap_or_default()
}

async fn all_mail(server: &Server) -> Vec<Value> {
    let r = server
        .call("GET", "/v1/admin/mail", Some(&server.admin_token), None)
        .await;
    assert_eq!(r.status, StatusCode::OK, "{:?}", r.body);
    r.body["items"].as_array().cloned().unwrap()
}

fn slug_in(text: &str) -> String {
    let start = text
        .find("env_")
        .unwrap_or_else(|| panic!("no slug in the reply: {text}"));
    text[start..].chars().take(12).collect()
}

/// Create, execute and destroy by mail on the real Docker engine, each answered in the same
/// thread; a second delivery of a message does nothing; a reply's first line is its
/// command; "restart" is not "create".
#[tokio::test]
async fn create_execute_destroy_by_mail() {
    let sink = Sink::start().await;
    let smtp = free_port();
    let site = mail_site(Site::new(Db::Sqlite).await, smtp, sink.port, None)
        .with_env("HEARTH_MAIL_PER_HOUR", "5");
    let server = site.start().await;
    wait_port(smtp).await;
    let token = server.user("Alice@Example.com", "pro").await;
    let secret = secret_address(&server, &token).await;

    let (taken, transcript) = swaks(
        smtp,
        "alice@example.com",
        &secret,
        "create",
        "c1@example.com",
        "1 vcpu, 512 mb memory, for 2 hours",
    )
    .await;
    assert!(taken, "{transcript}");
    // The same message again while the first is still being worked on (a sender's retry):
    // taken, and nothing done twice.
    let (taken, _) = swaks(
        smtp,
        "alice@example.com",
        &secret,
        "create",
        "c1@example.com",
        "1 vcpu, 512 mb memory, for 2 hours",
    )
    .await;
    assert!(taken);
    let created = sink.reply(1, &site).await;
    assert_eq!(created.rcpt_to, "alice@example.com");
    assert_eq!(created.in_reply_to, "<c1@example.com>");
    assert_eq!(created.auto_submitted, "auto-replied");
    assert!(created.text.contains("is running"), "{}", created.text);
    assert!(
        created.html.contains("is running"),
        "the HTML part says the same: {}",
        created.html
    );
    let slug = slug_in(&created.text);
    assert_eq!(created.subject, format!("Re: create [{slug}]"));
    assert!(created.text.contains("ssh -p "), "{}", created.text);
    let envs = environments(&server, &token).await;
    assert_eq!(envs.len(), 1, "{envs:?}");
    assert_eq!(
        (
            envs[0]["slug"].as_str(),
            envs[0]["vcpus"].as_i64(),
            envs[0]["memoryMb"].as_i64()
        ),
        (Some(slug.as_str()), Some(1), Some(512))
    );

    let body = "Please run:\n\n```\necho hello-from-mail\nuname -s\n```\n";
    let (taken, _) = swaks(
        smtp,
        "alice@example.com",
        &secret,
        &format!("execute {slug}"),
        "x1@example.com",
        body,
    )
    .await;
    assert!(taken);
    let executed = sink.reply(2, &site).await;
    assert_eq!(executed.in_reply_to, "<x1@example.com>");
    assert!(executed.text.contains("exit code 0"), "{}", executed.text);
    assert!(
        executed.text.contains("hello-from-mail\nLinux"),
        "{}",
        executed.text
    );
    let (taken, _) = swaks(
        smtp,
        "alice@example.com",
        &secret,
        &format!("execute {slug}"),
        "x1@example.com",
        body,
    )
    .await;
    assert!(taken);

    // "restart" is no command: the help, and no new environment.
    swaks(
        smtp,
        "alice@example.com",
        &secret,
        &format!("restart {slug}"),
        "h1@example.com",
        "",
    )
    .await;
    let help = sink.reply(3, &site).await;
    assert!(
        help.text.contains("did not act on your message"),
        "{}",
        help.text
    );
    assert!(help.text.contains("create [2 vcpus]"), "{}", help.text);

    // A reply to the first answer whose first line is "destroy": the subject's "create" is
    // not repeated; the slug comes from the subject.
    swaks(
        smtp,
        "alice@example.com",
        &secret,
        &created.subject.replace("Re: ", "Re: Re: "),
        "d1@example.com",
        "destroy\n\nOn Tuesday, Hearth wrote:\n> create\n",
    )
    .await;
    let destroyed = sink.reply(4, &site).await;
    assert!(
        destroyed.text.contains(&format!("{slug} is destroyed")),
        "{}",
        destroyed.text
    );
    let env = server
        .call(
            "GET",
            &format!("/v1/environments/{slug}"),
            Some(&token),
            None,
        )
        .await
        .body;
    assert_eq!(env["state"], "destroyed");

    swaks(
        smtp,
        "alice@example.com",
        &secret,
        "list",
        "l1@example.com",
        "",
    )
    .await;
    let listed = sink.reply(5, &site).await;
    assert!(
        listed.text.contains("You have no environments"),
        "{}",
        listed.text
    );

    // Nothing was done twice: one environment, one execution, one row per message.
    let executions = server
        .call(
            "GET",
            &format!("/v1/environments/{slug}/executions"),
            Some(&token),
            None,
        )
        .await
        .body;
    assert_eq!(
        executions["items"].as_array().unwrap().len(),
        1,
        "{executions:?}"
    );
    assert_eq!(environments_all(&server, &token).await, 1);
    let mine = server
        .call("GET", "/v1/me/mail", Some(&token), None)
        .await
        .body;
    let mine = mine["items"].as_array().unwrap();
    assert_eq!(mine.len(), 5, "{mine:?}");
    assert!(
        mine.iter()
            .all(|m| m["proof"] == "sub-address" && !m["repliedAt"].is_null()),
        "{mine:?}"
    );
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(sink.messages().len(), 5, "no reply twice");
    // A sixth command within the hour is over HEARTH_MAIL_PER_HOUR: refused, unanswered.
    let (taken, _) = swaks(
        smtp,
        "alice@example.com",
        &secret,
        "list",
        "l2@example.com",
        "",
    )
    .await;
    assert!(taken);
    let started = Instant::now();
    while all_mail(&server).await.len() < 6 {
        assert!(started.elapsed() < Duration::from_secs(20));
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let newest = &all_mail(&server).await[0];
    assert_eq!(newest["status"], "rejected");
    assert!(
        newest["outcome"]
            .as_str()
            .unwrap()
            .contains("the limit is 5"),
        "{newest:?}"
    );
    assert!(newest["sender"] == "alice@example.com");
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(sink.messages().len(), 5);
    // The audit names the sender.
    let audit = server
        .call(
            "GET",
            "/v1/admin/audit?limit=200",
            Some(&server.admin_token),
            None,
        )
        .await
        .body;
    assert!(
        audit["items"].as_array().unwrap().iter().any(|a| a["actor"]
            == format!("mail:alice@example.com #{}", mine[4]["id"])
            && a["action"] == "create"),
        "{audit:?}"
    );
}

async fn environments_all(server: &Server, token: &str) -> usize {
    let r = server
        .call(
            "GET",
            "/v1/environments?includeDestroyed=true",
            Some(token),
            None,
        )
        .await;
    r.body["items"].as_array().map_or(0, Vec::len)
}

/// Mail that does not prove its sender is stored as rejected, audited, and never answered:
/// the plain agent address without a signature, a wrong secret, an unknown sender, a
/// signature of another domain, a tampered signed message, an automatic reply. A DKIM
/// signature of the sender's own domain (our own verification over SMTP; SendGrid's verdict
/// on the webhook) is proof. The webhook needs its secret.
#[tokio::test]
async fn unproven_mail_is_refused_unanswered() {
    let sink = Sink::start().await;
    let keys = tempfile::tempdir().unwrap();
    let good = dkim_key(keys.path(), "good").await;
    let evil = dkim_key(keys.path(), "evil").await;
    let resolver = dns(&[
        ("sel._domainkey.example.com", &good.record),
        ("sel._domainkey.evil.test", &evil.record),
    ])
    .await;
    let smtp = free_port();
    let site = mail_site(
        Site::new(Db::Postgres).await,
        smtp,
        sink.port,
        Some(resolver.port),
    )
    .with_env("VM_PROVIDER", "sim");
    let server = site.start().await;
    wait_port(smtp).await;
    let token = server.user("alice@example.com", "pro").await;
    let secret = secret_address(&server, &token).await;
    let wrong = secret.replacen("agent+", "agent+x", 1);

    let create = |id: &str| message("Alice <alice@example.com>", AGENT, "create", id, "1 vcpu");
    // Not addressed to us at all: refused at RCPT, never stored.
    let (taken, _) = swaks(
        smtp,
        "alice@example.com",
        "someone@elsewhere.test",
        "create",
        "r0@example.com",
        "",
    )
    .await;
    assert!(!taken, "the listener is not a relay");
    let (taken, _) = swaks(
        smtp,
        "alice@example.com",
        AGENT,
        "create",
        "r1@example.com",
        "",
    )
    .await;
    assert!(taken, "accepted at SMTP, so a forger learns nothing");
    swaks(
        smtp,
        "alice@example.com",
        &wrong,
        "create",
        "r2@example.com",
        "",
    )
    .await;
    swaks(
        smtp,
        "bob@example.com",
        &secret,
        "create",
        "r3@example.com",
        "",
    )
    .await;
    smtplib(
        smtp,
        "alice@example.com",
        AGENT,
        &create("r4@example.com"),
        Some(("evil.test", &evil)),
    )
    .await;
    // Signed by example.com's key, then changed on the way.
    let signed_then_changed = {
        let out = Command::new(PYTHON)
            .arg("-c")
            .arg("import sys,dkim; m=sys.stdin.buffer.read(); sys.stdout.buffer.write(dkim.sign(m,b'sel',b'example.com',open(sys.argv[1],'rb').read(),include_headers=[b'from',b'subject',b'message-id'])+m)")
            .arg(&good.pem)
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let mut child = out;
        use tokio::io::AsyncWriteExt;
        let mut stdin = child.stdin.take().unwrap();
        stdin
            .write_all(create("r5@example.com").as_bytes())
            .await
            .unwrap();
        drop(stdin);
        let out = child.wait_with_output().await.unwrap();
        String::from_utf8(out.stdout)
            .unwrap()
            .replace("1 vcpu", "8 vcpus")
    };
    smtplib(smtp, "alice@example.com", AGENT, &signed_then_changed, None).await;
    let auto = format!(
        "From: alice@example.com\r\nTo: {secret}\r\nSubject: Out of office: create\r\nMessage-ID: <r6@example.com>\r\nAuto-Submitted: auto-replied\r\n\r\nI am away.\r\n"
    );
    smtplib(smtp, "alice@example.com", &secret, &auto, None).await;
    // A bounce (null envelope sender) to the secret address, as a forged return path makes.
    let bounce = message(
        "alice@example.com",
        &secret,
        "create",
        "r7@example.com",
        "1 vcpu",
    );
    smtplib(smtp, "", &secret, &bounce, None).await;

    let started = Instant::now();
    let rejected = loop {
        let mail = all_mail(&server).await;
        if mail.len() >= 7 {
            break mail;
        }
        assert!(started.elapsed() < Duration::from_secs(30), "{mail:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(rejected.len(), 7, "{rejected:?}");
    let why: Vec<&str> = rejected
        .iter()
        .map(|m| m["outcome"].as_str().unwrap())
        .collect();
    assert!(
        rejected
            .iter()
            .all(|m| m["status"] == "rejected" && m["proof"].is_null()),
        "{rejected:?}"
    );
    for (i, expected) in [
        (6, "unproven"),             // r1: the plain address, no signature
        (5, "unproven"),             // r2: a wrong secret
        (4, "is no user's address"), // r3: bob
        (3, "unproven"),             // r4: signed by evil.test
        (2, "unproven"),             // r5: tampered
        (1, "sent by a machine"),    // r6: automatic
        (0, "a bounce"),             // r7: null sender
    ] {
        assert!(why[i].contains(expected), "{i}: {:?}", why[i]);
    }
    let audit = server
        .call(
            "GET",
            "/v1/admin/audit?limit=200",
            Some(&server.admin_token),
            None,
        )
        .await
        .body;
    let rejections = audit["items"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|a| a["action"] == "mail.reject")
        .count();
    assert_eq!(rejections, 7, "{audit:?}");
    // The secret is never written down, not even in the record of who wrote to it.
    let all = serde_json::to_string(&rejected).unwrap();
    assert!(
        !all.contains(secret.split('+').nth(1).unwrap().split('@').next().unwrap()),
        "{all}"
    );

    // A signature of the sender's own domain is proof.
    let listed = message("alice@example.com", AGENT, "list", "ok1@example.com", "");
    assert!(
        smtplib(
            smtp,
            "alice@example.com",
            AGENT,
            &listed,
            Some(("example.com", &good))
        )
        .await
        .contains("sent")
    );
    let reply = sink.reply(1, &site).await;
    assert!(
        reply.text.contains("You have no environments"),
        "{}",
        reply.text
    );
    assert_eq!(all_mail(&server).await[0]["proof"], "dkim");

    // The webhook: no secret, nothing stored; SendGrid's verdict for another domain is no
    // proof; for the sender's own domain it is.
    let post_to = |to: &str, secret: Option<&str>, dkim: &str, id: &str| {
        let mut args = vec![
            "-s".to_string(),
            "-o".into(),
            "/dev/stdout".into(),
            "-w".into(),
            "\n%{http_code}".into(),
            "-F".into(),
            format!("headers=From: alice@example.com\nSubject: list\nMessage-ID: <{id}>"),
            "-F".into(),
            "from=Alice <alice@example.com>".into(),
            "-F".into(),
            "subject=list".into(),
            "-F".into(),
            "text=".into(),
            "-F".into(),
            format!("to={to}"),
            "-F".into(),
            format!("envelope={{\"to\":[\"{to}\"],\"from\":\"alice@example.com\"}}"),
            "-F".into(),
            format!("dkim={dkim}"),
            "-F".into(),
            "SPF=pass".into(),
        ];
        if let Some(s) = secret {
            args.push("-u".into());
            args.push(format!("sendgrid:{s}"));
        }
        args.push(format!("{}/v1/mail/inbound", server.base));
        async move {
            let out = Command::new("curl").args(&args).output().await.unwrap();
            let text = String::from_utf8_lossy(&out.stdout).to_string();
            let (body, code) = text.rsplit_once('\n').unwrap();
            (code.to_string(), body.to_string())
        }
    };
    let post = |secret: Option<&str>, dkim: &str, id: &str| post_to(AGENT, secret, dkim, id);
    let before = all_mail(&server).await.len();
    let (code, body) = post(None, "{@example.com : pass}", "w0@example.com").await;
    assert_eq!(code, "401", "{body}");
    let challenge = server
        .http
        .post(format!("{}/v1/mail/inbound", server.base))
        .send()
        .await
        .unwrap();
    assert_eq!(challenge.status(), StatusCode::UNAUTHORIZED);
    assert!(
        challenge
            .headers()
            .get("www-authenticate")
            .is_some_and(|v| v.to_str().unwrap().starts_with("Basic")),
        "{:?}",
        challenge.headers()
    );
    let (code, _) = post(
        Some("not-the-secret-at-all"),
        "{@example.com : pass}",
        "w0@example.com",
    )
    .await;
    assert_eq!(code, "401");
    assert_eq!(
        all_mail(&server).await.len(),
        before,
        "nothing stored without the secret"
    );
    let (code, body) = post(Some(SECRET), "{@evil.test : pass}", "w1@example.com").await;
    assert_eq!(
        (code.as_str(), body.contains("rejected")),
        ("200", true),
        "{body}"
    );
    let (code, body) = post(Some(SECRET), "{@example.com : pass}", "w2@example.com").await;
    assert_eq!(
        (code.as_str(), body.contains("queued")),
        ("200", true),
        "{body}"
    );
    let (code, body) = post(Some(SECRET), "{@example.com : pass}", "w2@example.com").await;
    assert_eq!(
        (code.as_str(), body.contains("duplicate")),
        ("200", true),
        "{body}"
    );
    let reply = sink.reply(2, &site).await;
    assert_eq!(reply.in_reply_to, "<w2@example.com>");
    // The secret address proves it on the webhook too, with no DKIM verdict at all.
    let (code, body) = post_to(&secret, Some(SECRET), "none", "w3@example.com").await;
    assert_eq!(
        (code.as_str(), body.contains("queued")),
        ("200", true),
        "{body}"
    );
    let reply = sink.reply(3, &site).await;
    assert_eq!(reply.in_reply_to, "<w3@example.com>");
    assert_eq!(all_mail(&server).await[0]["proof"], "sub-address");

    // Through all of it: no environment, and exactly the three proven messages answered.
    assert!(environments(&server, &token).await.is_empty());
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(sink.messages().len(), 3);
}

/// A node killed after it accepted a message loses nothing: another node answers it. A
/// node killed while `create` waits for its environment leaves it to the next, which finds
/// the environment the mail made instead of making a second, and answers once. A relay
/// that is down delays the answer; it is sent when the relay is back.
#[tokio::test]
async fn nothing_is_lost_when_a_node_dies() {
    let sink_port = free_port();
    let smtp = free_port();
    // The relay is not there yet. The nodes share one master key, as nodes do.
    let site = mail_site(Site::new(Db::Sqlite).await, smtp, sink_port, None)
        .with_env(
            "HEARTH_MASTER_KEY",
            "000102030405060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1f",
        )
        .with_env("HEARTH_WORKERS", "0");

    // A node that takes mail but runs no jobs, killed once it took one.
    let server = site.start().await;
    wait_port(smtp).await;
    let token = server.user("carol@example.com", "pro").await;
    let secret = secret_address(&server, &token).await;
    let json_create =
        r#"{"action": "create", "memoryMb": 256, "initScript": "sleep 6", "duration": "2h"}"#;
    let (taken, transcript) = swaks(
        smtp,
        "carol@example.com",
        &secret,
        "anything",
        "k1@example.com",
        json_create,
    )
    .await;
    assert!(taken, "{transcript}");
    server.kill();
    let mail = site.store().await.mail_page(None, None, 10).await.unwrap();
    assert_eq!(
        (mail.len(), mail[0].status.as_str()),
        (1, "queued"),
        "{mail:?}"
    );

    // A working node picks it up and creates; it is killed as soon as the environment
    // exists (its 6 s init script still ahead), while the mail job waits for it.
    let site = site.node().with_env("HEARTH_WORKERS", "1");
    let server = site.start().await;
    let started = Instant::now();
    while environments(&server, &token).await.is_empty() {
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "never created; log:\n{}",
            tail(&site.log())
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    server.kill();

    // The next node, with the relay down: the answer waits; then the relay comes back.
    let server = site.start().await;
    let envs = environments(&server, &token).await;
    let slug = envs[0]["slug"].as_str().unwrap().to_string();
    server
        .wait_env(&token, &slug, "running", Duration::from_secs(120))
        .await;
    let started = Instant::now();
    loop {
        let mine = server
            .call("GET", "/v1/me/mail", Some(&token), None)
            .await
            .body;
        if mine["items"][0]["status"] == "done" {
            assert!(
                mine["items"][0]["repliedAt"].is_null(),
                "no relay, no reply: {mine:?}"
            );
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(120),
            "{mine:?}\n{}",
            tail(&site.log())
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let sink = Sink::start_on(sink_port).await;
    let reply = sink.reply(1, &site).await;
    assert_eq!(reply.in_reply_to, "<k1@example.com>");
    assert!(
        reply.text.contains(&format!("{slug} is running")),
        "{}",
        reply.text
    );
    assert_eq!(
        environments_all(&server, &token).await,
        1,
        "one environment, not two"
    );
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(sink.messages().len(), 1, "one answer");
    server.destroy(&token, &slug, Duration::from_secs(60)).await;
}

/// One SMTP session over a raw socket, to push the listener's limits.
struct Smtp {
    reader: tokio::io::BufReader<tokio::net::tcp::OwnedReadHalf>,
    writer: tokio::net::tcp::OwnedWriteHalf,
}

impl Smtp {
    async fn open(port: u16) -> (Smtp, String) {
        let tcp = tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .unwrap();
        let (r, w) = tcp.into_split();
        let mut s = Smtp {
            reader: tokio::io::BufReader::new(r),
            writer: w,
        };
        let greeting = s.answer().await;
        (s, greeting)
    }

    /// The server's answer (all lines of a multi-line one).
    async fn answer(&mut self) -> String {
        use tokio::io::AsyncBufReadExt;
        let mut all = String::new();
        loop {
            let mut line = String::new();
            let n = tokio::time::timeout(Duration::from_secs(30), self.reader.read_line(&mut line))
                .await
                .unwrap()
                .unwrap();
            all.push_str(&line);
            if n == 0 || line.as_bytes().get(3) != Some(&b'-') {
                return all;
            }
        }
    }

    async fn say(&mut self, line: &str) -> String {
        use tokio::io::AsyncWriteExt;
        self.writer
            .write_all(format!("{line}\r\n").as_bytes())
            .await
            .unwrap();
        self.answer().await
    }
}

/// The listener's bounds hold: sessions, line lengths, recipients, message size, order.
#[tokio::test]
async fn the_smtp_listener_is_bounded() {
    let sink = Sink::start().await;
    let smtp = free_port();
    let site = mail_site(Site::new(Db::Sqlite).await, smtp, sink.port, None)
        .with_env("VM_PROVIDER", "sim")
        .with_env("HEARTH_SMTP_MAX_CONNECTIONS", "3");
    let server = site.start().await;
    wait_port(smtp).await;

    let (mut a, greeting) = Smtp::open(smtp).await;
    assert!(greeting.starts_with("220"), "{greeting}");
    let (b, _) = Smtp::open(smtp).await;
    let (c, _) = Smtp::open(smtp).await;
    let (_, refused) = Smtp::open(smtp).await;
    assert!(refused.starts_with("421"), "a fourth session: {refused}");

    assert!(a.say("DATA").await.starts_with("503"), "DATA before MAIL");
    assert!(
        a.say("MAIL FROM:<alice@example.com>")
            .await
            .starts_with("503"),
        "MAIL before EHLO"
    );
    let ehlo = a.say("EHLO tests.example").await;
    assert!(ehlo.contains("SIZE 1048576"), "{ehlo}");
    assert!(
        a.say("MAIL FROM:<alice@example.com> SIZE=2000000")
            .await
            .starts_with("552")
    );
    assert!(
        a.say("MAIL FROM:<alice@example.com>")
            .await
            .starts_with("250")
    );
    assert!(
        a.say("RCPT TO:<root@elsewhere.test>")
            .await
            .starts_with("550"),
        "not a relay"
    );
    for _ in 0..16 {
        assert!(
            a.say(&format!("RCPT TO:<{AGENT}>"))
                .await
                .starts_with("250")
        );
    }
    assert!(
        a.say(&format!("RCPT TO:<{AGENT}>"))
            .await
            .starts_with("452"),
        "a 17th recipient"
    );
    assert!(a.say("DATA").await.starts_with("354"));
    // Over 1 MiB of lines: refused, and nothing kept.
    use tokio::io::AsyncWriteExt;
    let line = format!("{}\r\n", "x".repeat(998));
    a.writer
        .write_all(b"From: alice@example.com\r\nSubject: list\r\n\r\n")
        .await
        .unwrap();
    for _ in 0..1100 {
        a.writer.write_all(line.as_bytes()).await.unwrap();
    }
    assert!(a.say(".").await.starts_with("552"));
    // A command line over 512 bytes ends the session.
    let long = a.say(&format!("NOOP {}", "y".repeat(600))).await;
    assert!(long.starts_with("500"), "{long}");
    assert!(all_mail(&server).await.is_empty(), "nothing was stored");
    drop((b, c));

    // A bare LF "." is text, not the end: what follows it is not a second message.
    let (mut d, _) = Smtp::open(smtp).await;
    d.say("EHLO tests.example").await;
    d.say("MAIL FROM:<alice@example.com>").await;
    d.say(&format!("RCPT TO:<{AGENT}>")).await;
    d.say("DATA").await;
    let smuggled = format!(
        "From: alice@example.com\r\nSubject: one\r\nMessage-ID: <s1@example.com>\r\n\r\n..dot\r\nbody\n.\nMAIL FROM:<alice@example.com>\r\nRCPT TO:<{AGENT}>\r\nDATA\r\nFrom: alice@example.com\r\nSubject: two\r\n\r\nx"
    );
    let end = d.say(&format!("{smuggled}\r\n.")).await;
    assert!(end.starts_with("250"), "{end}");
    assert!(
        d.say("QUIT").await.starts_with("221"),
        "one answer per message, so none is left over"
    );
    let stored = all_mail(&server).await;
    assert_eq!(stored.len(), 1, "{stored:?}");
    assert_eq!(stored[0]["subject"], "one");

    // A text line over 998 bytes ends the session: the rest is never read as commands.
    let (mut e, _) = Smtp::open(smtp).await;
    e.say("EHLO tests.example").await;
    e.say("MAIL FROM:<alice@example.com>").await;
    e.say(&format!("RCPT TO:<{AGENT}>")).await;
    e.say("DATA").await;
    let refused = e
        .say(&format!("Subject: x\r\n\r\n{}\r\nQUIT", "z".repeat(1200)))
        .await;
    assert!(refused.starts_with("500"), "{refused}");
    assert_eq!(e.answer().await, "", "the session is closed");
    assert_eq!(all_mail(&server).await.len(), 1);
    assert!(sink.messages().is_empty());
}
