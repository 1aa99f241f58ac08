//! Repositories cloned into environments at provisioning, from a git server this test runs
//! itself (`git http-backend`, and OpenSSH's sshd for `ssh://`), public and private (with a
//! stored HTTPS token or SSH deploy key), against a real Docker guest. The server runs in a network namespace of its own, so the guest
//! reaches it as it would a remote git host: routed out through the host, not to the host
//! (which `HEARTH-GUESTS` closes to guests).

mod common;

use common::*;
use reqwest::StatusCode;
use serde_json::{Value, json};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const UP: Duration = Duration::from_secs(180);
const TOKEN: &str = "tok-81c2e6f4-from-the-test";
const WRONG_TOKEN: &str = "tok-0000dead-wrong";

fn run(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap();
    assert!(out.status.success(), "{cmd:?}: {out:?}");
    String::from_utf8_lossy(&out.stdout).to_string()
}

fn git(dir: &Path, args: &[&str]) -> String {
    run(Command::new("git")
        .arg("-C")
        .arg(dir)
        .args(args)
        .env("GIT_AUTHOR_NAME", "test")
        .env("GIT_AUTHOR_EMAIL", "test@example.com")
        .env("GIT_COMMITTER_NAME", "test")
        .env("GIT_COMMITTER_EMAIL", "test@example.com"))
}

/// A bare repository at `bare` holding `files` on `main`, and `extra` on branch `feature`.
fn repository(work: &Path, bare: &Path, files: &[(&str, &str)], extra: &[(&str, &str)]) {
    std::fs::create_dir_all(work).unwrap();
    git(work, &["init", "-q", "-b", "main"]);
    for (name, text) in files {
        std::fs::write(work.join(name), text).unwrap();
    }
    git(work, &["add", "."]);
    git(work, &["commit", "-q", "-m", "first"]);
    if !extra.is_empty() {
        git(work, &["checkout", "-q", "-b", "feature"]);
        for (name, text) in extra {
            std::fs::write(work.join(name), text).unwrap();
        }
        git(work, &["add", "."]);
        git(work, &["commit", "-q", "-m", "feature"]);
        git(work, &["checkout", "-q", "main"]);
    }
    run(Command::new("git")
        .args(["clone", "-q", "--bare"])
        .arg(work)
        .arg(bare));
}

/// The git server in its own network namespace; all of it goes when dropped.
struct GitHost {
    namespace: String,
    link: String,
    server: Option<Child>,
    sshd: Option<Child>,
    address: String,
}

impl GitHost {
    fn start(root: &Path, port: u16) -> GitHost {
        let tag = format!("{:05x}", std::process::id() % 0xfffff);
        let (namespace, link, peer) = (
            format!("hgit{tag}"),
            format!("hgv{tag}h"),
            format!("hgv{tag}n"),
        );
        let block = std::process::id() % 250 + 1;
        let (here, there) = (format!("10.254.{block}.1"), format!("10.254.{block}.2"));
        let _ = Command::new("ip")
            .args(["netns", "del", &namespace])
            .output();
        let _ = Command::new("ip").args(["link", "del", &link]).output();
        run(Command::new("ip").args(["netns", "add", &namespace]));
        let mut host = GitHost {
            namespace: namespace.clone(),
            link: link.clone(),
            server: None,
            sshd: None,
            address: format!("{there}:{port}"),
        };
        run(Command::new("ip").args(["link", "add", &link, "type", "veth", "peer", "name", &peer]));
        run(Command::new("ip").args(["link", "set", &peer, "netns", &namespace]));
        run(Command::new("ip").args(["addr", "add", &format!("{here}/30"), "dev", &link]));
        run(Command::new("ip").args(["link", "set", &link, "up"]));
        let inside = |args: &[&str]| {
            run(Command::new("ip")
                .args(["netns", "exec", &namespace])
                .args(args));
        };
        inside(&["ip", "addr", "add", &format!("{there}/30"), "dev", &peer]);
        inside(&["ip", "link", "set", &peer, "up"]);
        inside(&["ip", "link", "set", "lo", "up"]);
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/repositories/git_server.py");
        let server = Command::new("ip")
            .args(["netns", "exec", &namespace, "python3"])
            .arg(script)
            .arg(root)
            .arg(port.to_string())
            .args(["tester", TOKEN])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        host.server = Some(server);
        host
    }
}

impl GitHost {
    /// OpenSSH's sshd beside the HTTP server, on port 2222, letting in `public_key` as
    /// root (git runs `git-upload-pack` through it); its files in `dir`.
    fn start_sshd(&mut self, dir: &Path, public_key: &str) -> String {
        let there = self.address.split(':').next().unwrap().to_string();
        std::fs::create_dir_all(dir).unwrap();
        std::fs::create_dir_all("/run/sshd").unwrap(); // its privilege separation directory
        let host_key = dir.join("host_key");
        run(Command::new("ssh-keygen")
            .args(["-q", "-t", "ed25519", "-N", "", "-f"])
            .arg(&host_key));
        std::fs::write(dir.join("authorized_keys"), public_key).unwrap();
        let config = dir.join("sshd_config");
        std::fs::write(
            &config,
            format!(
                "ListenAddress {there}:2222\nHostKey {}\nAuthorizedKeysFile {}\nPidFile {}\n\
                 StrictModes no\nUsePAM no\nPasswordAuthentication no\n\
                 KbdInteractiveAuthentication no\nPermitRootLogin prohibit-password\n",
                host_key.display(),
                dir.join("authorized_keys").display(),
                dir.join("sshd.pid").display()
            ),
        )
        .unwrap();
        let sshd = Command::new("ip")
            .args([
                "netns",
                "exec",
                &self.namespace,
                "/usr/sbin/sshd",
                "-D",
                "-e",
                "-f",
            ])
            .arg(&config)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        self.sshd = Some(sshd);
        format!("{there}:2222")
    }
}

impl Drop for GitHost {
    fn drop(&mut self) {
        for child in [&mut self.server, &mut self.sshd].into_iter().flatten() {
            let _ = child.kill();
            let _ = child.wait();
        }
        let _ = Command::new("ip")
            .args(["link", "del", &self.link])
            .output();
        let _ = Command::new("ip")
            .args(["netns", "del", &self.namespace])
            .output();
    }
}

async fn create(server: &Server, token: &str, name: &str, extra: Value) -> String {
    let mut body = json!({"name": name, "vcpus": 1, "memoryMb": 256, "diskGb": 2});
    for (k, v) in extra.as_object().unwrap() {
        body[k] = v.clone();
    }
    let r = server
        .call("POST", "/v1/environments", Some(token), Some(body))
        .await;
    assert_eq!(r.status, StatusCode::ACCEPTED, "{:?}", r.body);
    r.body["id"].as_str().unwrap().to_string()
}

#[tokio::test]
async fn public_and_private_repositories_are_cloned_and_the_token_is_kept_nowhere() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("srv");
    repository(
        &dir.path().join("w1"),
        &root.join("public.git"),
        &[("README", "hello-public\n")],
        &[("FEATURE", "on a branch\n")],
    );
    repository(
        &dir.path().join("w2"),
        &root.join("private/secret.git"),
        &[("README", "hello-private\n")],
        &[],
    );
    let mut git_host = GitHost::start(&root, 8080);
    let base = format!("http://{}", git_host.address);
    let deploy_key = dir.path().join("deploy");
    run(Command::new("ssh-keygen")
        .args(["-q", "-t", "ed25519", "-N", "", "-C", "deploy", "-f"])
        .arg(&deploy_key));
    let ssh_address = git_host.start_sshd(
        &dir.path().join("sshd"),
        &std::fs::read_to_string(deploy_key.with_extension("pub")).unwrap(),
    );
    let ssh_url = format!(
        "ssh://root@{ssh_address}{}/private/secret.git",
        root.display()
    );
    let deploy_secret = std::fs::read_to_string(&deploy_key).unwrap();
    // A line of the key's body: what would show if any of it leaked.
    let deploy_line = deploy_secret.lines().nth(2).unwrap().to_string();
    let http = reqwest::Client::new();
    let started = Instant::now();
    while http
        .get(format!(
            "{base}/public.git/info/refs?service=git-upload-pack"
        ))
        .send()
        .await
        .map(|r| r.status() != StatusCode::OK)
        .unwrap_or(true)
    {
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "the git server never answered"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // The test's git server speaks plain HTTP: tokens may go over it here.
    let site = Site::new(Db::Sqlite)
        .await
        .with_env("HEARTH_GIT_TOKENS_OVER_PLAIN_HTTP", "1");
    let server = site.start().await;
    let token = server.user("repos@example.com", "unlimited").await;

    // Credentials: kept, listed without their secrets.
    for (name, secret) in [("ci", TOKEN), ("wrong", WRONG_TOKEN)] {
        let r = server
            .call(
                "POST",
                "/v1/me/git-credentials",
                Some(&token),
                Some(json!({"name": name, "kind": "https-token", "username": "tester", "secret": secret})),
            )
            .await;
        assert_eq!(r.status, StatusCode::CREATED, "{:?}", r.body);
        assert!(!r.body.to_string().contains(secret), "{}", r.body);
    }
    let again = server
        .call(
            "POST",
            "/v1/me/git-credentials",
            Some(&token),
            Some(json!({"name": "ci", "kind": "https-token", "secret": "x"})),
        )
        .await;
    assert_eq!(again.status, StatusCode::CONFLICT, "{:?}", again.body);
    let listed = server
        .call("GET", "/v1/me/git-credentials", Some(&token), None)
        .await
        .body;
    assert_eq!(listed["items"].as_array().unwrap().len(), 2, "{listed}");
    assert!(!listed.to_string().contains(TOKEN));
    // An SSH key does not go with an HTTPS URL.
    let key = server
        .call(
            "POST",
            "/v1/me/git-credentials",
            Some(&token),
            Some(json!({"name": "deploy", "kind": "ssh-key", "secret": "-----BEGIN OPENSSH PRIVATE KEY-----\nAAAA\n-----END OPENSSH PRIVATE KEY-----\n"})),
        )
        .await;
    assert_eq!(key.status, StatusCode::CREATED, "{:?}", key.body);
    let r = server
        .call(
            "POST",
            "/v1/environments",
            Some(&token),
            Some(json!({"name": "x", "repositoryUrl": format!("{base}/private/secret.git"), "gitCredential": "deploy"})),
        )
        .await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST, "{:?}", r.body);

    let public = create(
        &server,
        &token,
        "public",
        json!({"repositoryUrl": format!("{base}/public.git"), "repositoryRef": "feature"}),
    )
    .await;
    let private = create(
        &server,
        &token,
        "private",
        json!({"repositoryUrl": format!("{base}/private/secret.git"), "gitCredential": "ci",
               "initScript": "test -f ~/secret/README"}),
    )
    .await;
    let refused = create(
        &server,
        &token,
        "refused",
        json!({"repositoryUrl": format!("{base}/private/secret.git"), "gitCredential": "wrong"}),
    )
    .await;
    let anonymous = create(
        &server,
        &token,
        "anonymous",
        json!({"repositoryUrl": format!("{base}/private/secret.git")}),
    )
    .await;
    let missing = create(
        &server,
        &token,
        "missing",
        json!({"repositoryUrl": format!("{base}/none-such.git")}),
    )
    .await;
    let r = server
        .call(
            "POST",
            "/v1/me/git-credentials",
            Some(&token),
            Some(json!({"name": "deploy-key", "kind": "ssh-key", "secret": deploy_secret})),
        )
        .await;
    assert_eq!(r.status, StatusCode::CREATED, "{:?}", r.body);
    let over_ssh = create(
        &server,
        &token,
        "over-ssh",
        json!({"repositoryUrl": ssh_url, "gitCredential": "deploy-key"}),
    )
    .await;

    server.wait_env(&token, &public, "running", UP).await;
    assert_eq!(
        exec_ok(&server, &token, &public, "cat public/README public/FEATURE; git -C public rev-parse --abbrev-ref HEAD; git -C public remote get-url origin").await,
        format!("hello-public\non a branch\nfeature\n{base}/public.git\n")
    );
    server.wait_env(&token, &private, "running", UP).await;
    assert_eq!(
        exec_ok(&server, &token, &private, "cat secret/README").await,
        "hello-private\n"
    );
    // The token is nowhere in the guest: not in the clone's config, the home directory,
    // temporary files, or a clone directory left behind.
    let found = exec_ok(
        &server,
        &token,
        &private,
        &format!("grep -rIl -- {TOKEN} ~ /tmp /etc 2>/dev/null; ls -a ~ | grep hearth-clone; true"),
    )
    .await;
    assert_eq!(found, "", "the token was left in the guest");
    server.wait_env(&token, &over_ssh, "running", UP).await;
    assert_eq!(
        exec_ok(
            &server,
            &token,
            &over_ssh,
            "cat secret/README; git -C secret remote get-url origin"
        )
        .await,
        format!("hello-private\n{ssh_url}\n")
    );
    let found = exec_ok(
        &server,
        &token,
        &over_ssh,
        &format!("grep -rIl -- '{deploy_line}' ~ /tmp /etc 2>/dev/null; ls -a ~ | grep hearth-clone; true"),
    )
    .await;
    assert_eq!(found, "", "the deploy key was left in the guest");

    for (id, says) in [
        (&refused, "refused the credential"),
        (&anonymous, "needs a credential"),
        (&missing, "was not found"),
    ] {
        let env = server.wait_env(&token, id, "error", UP).await;
        let message = env["stateMessage"].as_str().unwrap_or_default();
        assert!(
            message.contains(says),
            "{id}: {message}\n{}",
            server.env_log(&token, id).await
        );
    }

    // Neither token in any answer, log line, the audit, or the server's own log.
    let mut seen = String::new();
    for id in [&public, &private, &refused, &anonymous, &missing, &over_ssh] {
        seen.push_str(
            &server
                .call("GET", &format!("/v1/environments/{id}"), Some(&token), None)
                .await
                .body
                .to_string(),
        );
        seen.push_str(&server.env_log(&token, id).await);
    }
    seen.push_str(&server.env_log(&token, &private).await);
    seen.push_str(
        &server
            .call(
                "GET",
                "/v1/admin/audit?limit=1000",
                Some(&server.admin_token),
                None,
            )
            .await
            .body
            .to_string(),
    );
    seen.push_str(&site.log());
    assert!(seen.contains("cloning"), "the clone was not logged");
    for secret in [TOKEN, WRONG_TOKEN, deploy_line.as_str()] {
        assert!(!seen.contains(secret), "a token or key was shown or logged");
    }

    // A deleted credential is gone, and naming it is refused.
    let r = server
        .call("DELETE", "/v1/me/git-credentials/ci", Some(&token), None)
        .await;
    assert_eq!(r.status, StatusCode::NO_CONTENT);
    let r = server
        .call(
            "POST",
            "/v1/environments",
            Some(&token),
            Some(json!({"name": "x", "repositoryUrl": format!("{base}/private/secret.git"), "gitCredential": "ci"})),
        )
        .await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST, "{:?}", r.body);

    for id in [&public, &private, &refused, &anonymous, &missing, &over_ssh] {
        server.destroy(&token, id, UP).await;
    }
}
