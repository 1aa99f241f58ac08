//! Runs the real `hearth serve` binary against a real database and Docker engine.
#![allow(dead_code)]

pub mod engine;

use reqwest::StatusCode;
use serde_json::{Value, json};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Db {
    Sqlite,
    Postgres,
}

/// One database (SQLite file or fresh PostgreSQL database) and data directory, which
/// outlive any one server process: kill a server and start another on the same state.
pub struct Site {
    /// `HEARTH_INSTANCE`, a display name put on this site's containers so `make` can clean
    /// up after tests. `None`: default settings, as a new user would run it.
    pub instance: Option<String>,
    pub dir: tempfile::TempDir,
    pub database_url: String,
    pub extra_env: Vec<(String, String)>,
}

impl Site {
    pub async fn new(db: Db) -> Site {
        let dir = tempfile::tempdir().unwrap();
        let database_url = match db {
            Db::Sqlite => format!(
                "sqlite://{}?mode=rwc",
                dir.path().join("hearth.db").display()
            ),
            Db::Postgres => hearth_store::testdb::fresh_postgres_url().await,
        };
        let instance = Some(format!("test-{}", &uuid_like()[..12]));
        Site {
            instance,
            dir,
            database_url,
            extra_env: Vec::new(),
        }
    }

    /// No `HEARTH_INSTANCE`: the settings a new user would run with.
    pub fn default_settings(mut self) -> Site {
        self.instance = None;
        self
    }

    /// Another node of the same installation: the same database and settings, its own
    /// data directory (with the admin token copied, so tests can call it as the admin).
    pub fn node(&self) -> Site {
        let node = Site {
            instance: self.instance.clone(),
            dir: tempfile::tempdir().unwrap(),
            database_url: self.database_url.clone(),
            extra_env: self.extra_env.clone(),
        };
        std::fs::create_dir_all(node.data_dir()).unwrap();
        if let Ok(token) = std::fs::read_to_string(self.data_dir().join("admin.token")) {
            std::fs::write(node.data_dir().join("admin.token"), token).unwrap();
        }
        node
    }

    pub fn with_env(mut self, k: &str, v: &str) -> Site {
        self.extra_env.push((k.into(), v.into()));
        self
    }

    pub fn data_dir(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    fn command(&self, port: u16) -> Command {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.path().join("server.log"))
            .unwrap();
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_hearth"));
        cmd.arg("serve")
            .env("HEARTH_DATA_DIR", self.data_dir())
            .env("HEARTH_LISTEN", format!("127.0.0.1:{port}"))
            .env("DATABASE_URL", &self.database_url)
            .env_remove("HEARTH_INSTANCE")
            .env("HEARTH_JOB_LEASE_MS", "3000")
            .env("HEARTH_JOB_POLL_MS", "200")
            .env("HEARTH_PROVISION_BACKOFF_MS", "300")
            .env("HEARTH_CONTROL_BACKOFF_MS", "300")
            .env("HEARTH_SSH_WAIT_SECONDS", "30")
            .env("HEARTH_REAPER_INTERVAL_MS", "300")
            .env("RUST_LOG", "info,sqlx=warn")
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log);
        if let Some(name) = &self.instance {
            cmd.env("HEARTH_INSTANCE", name);
        }
        for (k, v) in &self.extra_env {
            cmd.env(k, v);
        }
        cmd
    }

    /// Starts `hearth serve` and expects it to refuse: returns its exit code and log.
    pub fn start_refused(&self) -> (i32, String) {
        let mut child = self
            .command(free_port())
            .spawn()
            .expect("spawn hearth serve");
        let started = Instant::now();
        loop {
            if let Some(status) = child.try_wait().unwrap() {
                return (status.code().unwrap_or(-1), self.log());
            }
            if started.elapsed() > Duration::from_secs(30) {
                let _ = child.kill();
                panic!("hearth serve did not refuse to start; log:\n{}", self.log());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub async fn start(&self) -> Server {
        self.start_on(free_port()).await
    }

    /// Starts on a port chosen beforehand (for settings that name the server's own URL).
    pub async fn start_on(&self, port: u16) -> Server {
        let child = self.command(port).spawn().expect("spawn hearth serve");
        let base = format!("http://127.0.0.1:{port}");
        let http = reqwest::Client::new();
        let started = Instant::now();
        loop {
            if http.get(format!("{base}/healthz")).send().await.is_ok() {
                break;
            }
            assert!(
                started.elapsed() < Duration::from_secs(60),
                "server did not start; log:\n{}",
                self.log()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let token = loop {
            match std::fs::read_to_string(self.data_dir().join("admin.token")) {
                Ok(t) if !t.trim().is_empty() => break t.trim().to_string(),
                _ => tokio::time::sleep(Duration::from_millis(20)).await,
            }
        };
        Server {
            child,
            base,
            http,
            admin_token: token,
        }
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("server.log")).unwrap_or_default()
    }

    /// The site's database, opening sealed columns with its master key once it has one.
    pub async fn store(&self) -> hearth_store::Store {
        let store = hearth_store::Store::connect(&self.database_url)
            .await
            .unwrap();
        match std::fs::read_to_string(self.data_dir().join("master.key")) {
            Ok(text) => hearth_app::start::sealed_with(
                store,
                hearth_guest::MasterKey::parse(&text).unwrap(),
            ),
            Err(_) => store,
        }
    }

    /// Rows per table: "the database is unchanged" means these did not move.
    pub async fn counts(&self) -> Vec<(String, i64)> {
        let store = self.store().await;
        let mut out = Vec::new();
        for table in [
            "users",
            "api_tokens",
            "environments",
            "jobs",
            "executions",
            "audit_log",
            "provision_logs",
        ] {
            let sql = format!("SELECT COUNT(*) AS n FROM {table}");
            let row = sqlx_count(&store, &sql).await;
            out.push((table.to_string(), row));
        }
        out
    }
}

async fn sqlx_count(store: &hearth_store::Store, sql: &str) -> i64 {
    store.count(sql).await.unwrap()
}

fn uuid_like() -> String {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos(),
    );
    format!("{:016x}{:016x}", h.finish(), std::process::id())
}

/// Now, by the wall clock the server uses too (epoch milliseconds).
pub fn now_ms() -> i64 {
    hearth_core::Clock::now_ms(&hearth_core::clock::SystemClock)
}

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

pub struct Server {
    pub child: Child,
    pub base: String,
    pub http: reqwest::Client,
    pub admin_token: String,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[derive(Debug)]
pub struct Resp {
    pub status: StatusCode,
    pub body: Value,
}

impl Server {
    /// kill -9.
    pub fn kill(mut self) {
        self.child.kill().unwrap();
        self.child.wait().unwrap();
    }

    pub async fn call(
        &self,
        method: &str,
        path: &str,
        token: Option<&str>,
        body: Option<Value>,
    ) -> Resp {
        let url = format!("{}{path}", self.base);
        let mut req = match method {
            "GET" => self.http.get(url),
            "POST" => self.http.post(url),
            "DELETE" => self.http.delete(url),
            "PATCH" => self.http.patch(url),
            "PUT" | "PUT_IS_NOT_ALLOWED" => self.http.put(url),
            other => panic!("method {other}"),
        };
        if let Some(t) = token {
            req = req.bearer_auth(t);
        }
        if let Some(b) = body {
            req = req.json(&b);
        }
        let resp = req.send().await.unwrap();
        let status = resp.status();
        let body = resp.json().await.unwrap_or(Value::Null);
        Resp { status, body }
    }

    pub async fn raw(&self, path: &str, token: &str, body: Vec<u8>) -> Resp {
        let resp = self
            .http
            .post(format!("{}{path}", self.base))
            .bearer_auth(token)
            .header("content-type", "application/json")
            .body(body)
            .send()
            .await
            .unwrap();
        let status = resp.status();
        Resp {
            status,
            body: resp.json().await.unwrap_or(Value::Null),
        }
    }

    /// A new user of `tier`; returns its token.
    pub async fn user(&self, email: &str, tier: &str) -> String {
        let r = self
            .call(
                "POST",
                "/v1/admin/users",
                Some(&self.admin_token),
                Some(json!({"email": email, "tier": tier})),
            )
            .await;
        assert_eq!(r.status, StatusCode::CREATED, "{:?}", r.body);
        r.body["token"].as_str().unwrap().to_string()
    }

    /// An environment's provisioning log, a line per entry: for a failing test's message.
    pub async fn env_log(&self, token: &str, id: &str) -> String {
        let log = self
            .call(
                "GET",
                &format!("/v1/environments/{id}/logs"),
                Some(token),
                None,
            )
            .await
            .body;
        let lines: Vec<String> = log["items"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|l| format!("{} {} {}", l["timestamp"], l["level"], l["message"]))
            .collect();
        lines.join("\n")
    }

    /// `POST /v1/environments` with `body`, its 202 asserted; the new environment's id.
    pub async fn create(&self, token: &str, body: Value) -> String {
        let r = self
            .call("POST", "/v1/environments", Some(token), Some(body))
            .await;
        assert_eq!(r.status, StatusCode::ACCEPTED, "{:?}", r.body);
        r.body["id"].as_str().unwrap().to_string()
    }

    /// Polls an environment until its state is `want`.
    pub async fn wait_env(&self, token: &str, id: &str, want: &str, timeout: Duration) -> Value {
        let started = Instant::now();
        loop {
            let r = self
                .call("GET", &format!("/v1/environments/{id}"), Some(token), None)
                .await;
            if r.status == StatusCode::OK && r.body["state"] == want {
                return r.body;
            }
            if started.elapsed() > timeout {
                panic!(
                    "environment did not become {want}: last {} {:?}\nits log:\n{}",
                    r.status,
                    r.body,
                    self.env_log(token, id).await
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Destroys an environment (the request must be accepted) and waits until it is gone.
    pub async fn destroy(&self, token: &str, id: &str, timeout: Duration) -> Value {
        let r = self
            .call(
                "DELETE",
                &format!("/v1/environments/{id}"),
                Some(token),
                None,
            )
            .await;
        assert_eq!(
            r.status,
            StatusCode::ACCEPTED,
            "destroying {id}: {:?}",
            r.body
        );
        self.wait_env(token, id, "destroyed", timeout).await
    }

    /// Sets the pool of `shape` (vcpus, memoryMb, diskGb, maybe image) on `host` to `size`.
    pub async fn set_pool(&self, host: &str, shape: Value, size: i64) -> Value {
        let mut body = shape;
        body["size"] = serde_json::json!(size);
        let r = self
            .call(
                "PUT",
                &format!("/v1/admin/hosts/{host}/pools"),
                Some(&self.admin_token),
                Some(body),
            )
            .await;
        assert_eq!(r.status, StatusCode::OK, "{:?}", r.body);
        r.body
    }

    /// The pool list's only pool once it has `ready` VMs and nothing filling or draining.
    pub async fn wait_pool(&self, ready: i64, timeout: Duration) -> Value {
        let started = Instant::now();
        loop {
            let pools = self
                .call("GET", "/v1/admin/pools", Some(&self.admin_token), None)
                .await
                .body;
            let pool = pools["items"][0].clone();
            if pool["ready"] == ready && pool["filling"] == 0 && pool["draining"] == 0 {
                return pool;
            }
            assert!(
                started.elapsed() < timeout,
                "the pool did not settle at {ready} ready: {pool}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    pub async fn patch(&self, path: &str, token: &str, body: Value) -> Resp {
        let resp = self
            .http
            .patch(format!("{}{path}", self.base))
            .bearer_auth(token)
            .json(&body)
            .send()
            .await
            .unwrap();
        let status = resp.status();
        Resp {
            status,
            body: resp.json().await.unwrap_or(Value::Null),
        }
    }

    /// Looks a user up by email through the admin API.
    pub async fn user_id(&self, email: &str) -> String {
        let r = self
            .call("GET", "/v1/admin/users", Some(&self.admin_token), None)
            .await;
        r.body["items"]
            .as_array()
            .unwrap()
            .iter()
            .find(|u| u["email"] == email)
            .unwrap()["id"]
            .as_str()
            .unwrap()
            .to_string()
    }

    pub async fn wait_vm(&self, token: &str, want: &str, timeout: Duration) -> Value {
        let started = Instant::now();
        loop {
            let r = self.call("GET", "/v1/me/vm", Some(token), None).await;
            if want == "gone" && r.status == StatusCode::NOT_FOUND {
                return Value::Null;
            }
            if r.status == StatusCode::OK && r.body["status"] == want {
                return r.body;
            }
            if started.elapsed() > timeout {
                panic!("VM did not become {want}: last {} {:?}", r.status, r.body);
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

/// Containers (running or not) labelled for this environment.
pub fn containers_of(environment_id: &str) -> Vec<String> {
    let out = Command::new("docker")
        .args([
            "ps",
            "-aq",
            "--filter",
            &format!("label=hearth.environment={environment_id}"),
        ])
        .output()
        .expect("docker ps");
    assert!(
        out.status.success(),
        "docker ps failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(str::to_string)
        .collect()
}

pub fn docker_inspect(name: &str, format: &str) -> String {
    let out = Command::new("docker")
        .args(["inspect", "--format", format, name])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "docker inspect {name}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// Runs `code` in an environment through the API (60 s at most); asserts that it exited 0
/// and returns its standard output.
pub async fn exec_ok(server: &Server, token: &str, id: &str, code: &str) -> String {
    let r = server
        .call(
            "POST",
            &format!("/v1/environments/{id}/exec"),
            Some(token),
            Some(json!({"code": code, "timeoutSeconds": 60})),
        )
        .await;
    assert_eq!(
        (r.status, r.body["exitCode"].as_i64()),
        (StatusCode::OK, Some(0)),
        "{code}: {:?}",
        r.body
    );
    r.body["stdout"].as_str().unwrap().to_string()
}

/// `exec_ok`'s standard output without its surrounding whitespace.
pub async fn exec_trimmed(server: &Server, token: &str, id: &str, code: &str) -> String {
    exec_ok(server, token, id, code).await.trim().to_string()
}

/// Real OpenSSH into an environment's guest with `key`; its output, or its error.
pub async fn openssh(key: &std::path::Path, port: i64, command: &str) -> Result<String, String> {
    let out = tokio::process::Command::new("ssh")
        .arg("-i")
        .arg(key)
        .args(["-p", &port.to_string()])
        .args([
            "-o",
            "StrictHostKeyChecking=no",
            "-o",
            "UserKnownHostsFile=/dev/null",
            "-o",
            "BatchMode=yes",
            "-o",
            "IdentitiesOnly=yes",
            "-o",
            "ConnectTimeout=10",
            "-o",
            "LogLevel=ERROR",
        ])
        .arg("dev@127.0.0.1")
        .arg(command)
        .output()
        .await
        .expect("ssh (openssh-client)");
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).to_string())
    }
}

pub fn write_key(dir: &std::path::Path, name: &str, private_openssh: &str) -> std::path::PathBuf {
    use std::os::unix::fs::PermissionsExt;
    let path = dir.join(name);
    std::fs::write(&path, private_openssh).unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
    path
}
