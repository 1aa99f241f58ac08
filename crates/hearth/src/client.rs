//! A small HTTP client for the CLI: finds the server and token, maps errors to exit codes.

use serde::{Deserialize, Serialize};
use serde_json::Value;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;

/// What `hearth login` keeps (0600 in the user's config directory), so that programs
/// started without the user's environment (an editor's SSH `ProxyCommand`) find the
/// server and token.
#[derive(Serialize, Deserialize)]
pub struct SavedLogin {
    pub url: String,
    pub token: String,
}

fn login_path() -> Option<std::path::PathBuf> {
    crate::tunnel::config_dir().map(|d| d.join("login.json"))
}

fn saved_login() -> Option<SavedLogin> {
    serde_json::from_slice(&std::fs::read(login_path()?).ok()?).ok()
}

pub fn saved_login_exists() -> bool {
    saved_login().is_some()
}

/// Writes the login, readable by its owner only.
pub fn save_login(login: &SavedLogin) -> Result<std::path::PathBuf, Failure> {
    use std::io::Write;
    use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
    let path = login_path().ok_or_else(|| Failure::usage("no HOME to keep the login in"))?;
    let failed =
        |e: std::io::Error| Failure::failed(format!("cannot write {}: {e}", path.display()));
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(failed)?;
    }
    let temporary = path.with_extension("tmp");
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&temporary)
        .map_err(failed)?;
    // A file left by an earlier attempt keeps its mode through `open`.
    std::fs::set_permissions(&temporary, std::fs::Permissions::from_mode(0o600)).map_err(failed)?;
    file.write_all(&serde_json::to_vec(login).expect("serializes"))
        .map_err(failed)?;
    std::fs::rename(&temporary, &path).map_err(failed)?;
    Ok(path)
}

pub struct Failure {
    pub message: String,
    pub exit_code: u8,
    /// The HTTP status, when the server answered.
    pub status: Option<u16>,
}

impl Failure {
    pub fn failed(message: impl Into<String>) -> Failure {
        Failure {
            message: message.into(),
            exit_code: 1,
            status: None,
        }
    }
    pub fn usage(message: impl Into<String>) -> Failure {
        Failure {
            message: message.into(),
            exit_code: 2,
            status: None,
        }
    }
    pub fn unreachable(message: impl Into<String>) -> Failure {
        Failure {
            message: message.into(),
            exit_code: 3,
            status: None,
        }
    }
}

pub struct Client {
    http: reqwest::Client,
    base: String,
    token: String,
}

impl Client {
    /// `HEARTH_URL` and `HEARTH_TOKEN`; else what `hearth login` saved; else this
    /// machine's server (`HEARTH_LISTEN`, default 127.0.0.1:8080) and the admin token
    /// `serve` wrote in its data directory.
    pub fn from_env() -> Result<Client, Failure> {
        let env = |name: &str| std::env::var(name).ok().filter(|s| !s.is_empty());
        // The saved token goes only to the server it was saved for.
        let saved = saved_login()
            .filter(|s| env("HEARTH_URL").is_none_or(|u| u.trim_end_matches('/') == s.url));
        let base = env("HEARTH_URL")
            .or_else(|| saved.as_ref().map(|s| s.url.clone()))
            .unwrap_or_else(|| {
                let listen =
                    std::env::var("HEARTH_LISTEN").unwrap_or_else(|_| "127.0.0.1:8080".into());
                format!("http://{listen}")
            });
        let token = match env("HEARTH_TOKEN").or_else(|| saved.map(|s| s.token)) {
            Some(t) => t,
            None => {
                let dir = std::env::var("HEARTH_DATA_DIR")
                    .unwrap_or_else(|_| hearth_app::config::default_data_dir());
                let path = std::path::Path::new(&dir).join("admin.token");
                std::fs::read_to_string(&path)
                    .map(|t| t.trim().to_string())
                    .map_err(|_| {
                        Failure::unreachable(format!(
                            "no token: run `hearth login`, set HEARTH_TOKEN, or run this where `hearth serve` wrote {}",
                            path.display()
                        ))
                    })?
            }
        };
        Client::new(base, token)
    }

    pub fn new(base: String, token: String) -> Result<Client, Failure> {
        let http = reqwest::Client::builder()
            .timeout(std::time::Duration::from_secs(3700))
            .build()
            .map_err(|e| Failure::failed(e.to_string()))?;
        Ok(Client {
            http,
            base: base.trim_end_matches('/').to_string(),
            token,
        })
    }

    pub fn base(&self) -> &str {
        &self.base
    }

    async fn send(&self, req: reqwest::RequestBuilder) -> Result<Value, Failure> {
        let resp = req.bearer_auth(&self.token).send().await.map_err(|e| {
            Failure::unreachable(format!(
                "cannot reach Hearth at {} ({e}); is `hearth serve` running?",
                self.base
            ))
        })?;
        let status = resp.status().as_u16();
        let body: Value = resp.json().await.unwrap_or(Value::Null);
        if (200..300).contains(&status) {
            return Ok(body);
        }
        let message = body["error"]["message"]
            .as_str()
            .unwrap_or("no message")
            .to_string();
        let code = body["error"]["code"].as_str().unwrap_or("error");
        let exit_code = if status == 401 { 3 } else { 1 };
        Err(Failure {
            message: format!("{code}: {message}"),
            exit_code,
            status: Some(status),
        })
    }

    pub async fn get(&self, path: &str) -> Result<Value, Failure> {
        self.send(self.http.get(format!("{}{path}", self.base)))
            .await
    }

    pub async fn post(&self, path: &str, body: Value) -> Result<Value, Failure> {
        self.send(self.http.post(format!("{}{path}", self.base)).json(&body))
            .await
    }

    pub async fn patch(&self, path: &str, body: Value) -> Result<Value, Failure> {
        self.send(self.http.patch(format!("{}{path}", self.base)).json(&body))
            .await
    }

    /// Sends `file` as the body of a request (`POST` or `PUT`) to `path`, `bar` counting
    /// its bytes as they go; once all is sent it says `done` while the server finishes.
    pub async fn upload(
        &self,
        method: reqwest::Method,
        path: &str,
        query: &[(&str, &str)],
        file: &std::path::Path,
        bar: &indicatif::ProgressBar,
        done: &'static str,
    ) -> Result<Value, Failure> {
        use tokio::io::AsyncReadExt;
        let opened = tokio::fs::File::open(file)
            .await
            .map_err(|e| Failure::usage(format!("cannot read {}: {e}", file.display())))?;
        let (counting, size) = (bar.clone(), bar.length().unwrap_or(0));
        let chunks = futures::stream::try_unfold(opened, move |mut file| {
            let bar = counting.clone();
            async move {
                let mut buffer = vec![0u8; 1 << 20];
                let n = file.read(&mut buffer).await?;
                if n == 0 {
                    return Ok::<_, std::io::Error>(None);
                }
                buffer.truncate(n);
                bar.inc(n as u64);
                if bar.position() >= size {
                    bar.set_message(done);
                }
                Ok(Some((buffer, file)))
            }
        });
        let sent = self
            .send(
                self.http
                    .request(method, format!("{}{path}", self.base))
                    .query(query)
                    .header("content-type", "application/octet-stream")
                    .header(reqwest::header::CONTENT_LENGTH, size)
                    .body(reqwest::Body::wrap_stream(chunks)),
            )
            .await;
        match sent {
            // The server answered before taking it all: it refuses at once what announces
            // a size over its limit, and then stops reading.
            Err(f) if f.status.is_none() && bar.position() > 0 => Err(Failure::failed(format!(
                "the server stopped the upload: one that announces a size over its limit is refused at once, \
                 or the server went away ({})",
                f.message
            ))),
            other => other,
        }
    }

    /// Opens a WebSocket to `path` with the bearer token; a refusal before the upgrade
    /// becomes a failure carrying the server's message.
    pub async fn websocket(
        &self,
        path: &str,
    ) -> Result<
        tokio_tungstenite::WebSocketStream<
            tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>,
        >,
        Failure,
    > {
        let url = format!("{}{path}", self.base.replacen("http", "ws", 1));
        let mut request = url
            .into_client_request()
            .map_err(|e| Failure::usage(format!("bad HEARTH_URL: {e}")))?;
        let auth = format!("Bearer {}", self.token)
            .parse()
            .map_err(|_| Failure::usage("the token has characters a header cannot carry"))?;
        request.headers_mut().insert("authorization", auth);
        let (ws, _) = tokio_tungstenite::connect_async(request)
            .await
            .map_err(|e| match e {
                tokio_tungstenite::tungstenite::Error::Http(resp) => {
                    let body = resp
                        .body()
                        .as_ref()
                        .map(|b| String::from_utf8_lossy(b).to_string())
                        .unwrap_or_default();
                    let message = serde_json::from_str::<Value>(&body)
                        .ok()
                        .and_then(|v| v["error"]["message"].as_str().map(str::to_string))
                        .unwrap_or(body);
                    let code = if resp.status().as_u16() == 401 { 3 } else { 1 };
                    Failure {
                        message: format!("{}: {message}", resp.status()),
                        exit_code: code,
                        status: Some(resp.status().as_u16()),
                    }
                }
                other => {
                    Failure::unreachable(format!("cannot reach Hearth at {}: {other}", self.base))
                }
            })?;
        Ok(ws)
    }

    /// Writes the body of a GET of `path` to `to`, `bar` counting its bytes.
    pub async fn download(
        &self,
        path: &str,
        query: &[(&str, &str)],
        to: &std::path::Path,
        bar: &indicatif::ProgressBar,
    ) -> Result<u64, Failure> {
        use futures::StreamExt;
        use tokio::io::AsyncWriteExt;
        let resp = self
            .http
            .get(format!("{}{path}", self.base))
            .query(query)
            .bearer_auth(&self.token)
            .send()
            .await
            .map_err(|e| {
                Failure::unreachable(format!("cannot reach Hearth at {} ({e})", self.base))
            })?;
        if !resp.status().is_success() {
            // The error's shape, through the one place that maps it.
            let status = resp.status().as_u16();
            let body: Value = resp.json().await.unwrap_or(Value::Null);
            return Err(Failure {
                message: format!(
                    "{}: {}",
                    body["error"]["code"].as_str().unwrap_or("error"),
                    body["error"]["message"].as_str().unwrap_or("no message")
                ),
                exit_code: if status == 401 { 3 } else { 1 },
                status: Some(status),
            });
        }
        if let Some(n) = resp.content_length() {
            bar.set_length(n);
        }
        let failed =
            |e: std::io::Error| Failure::failed(format!("cannot write {}: {e}", to.display()));
        // Beside the destination, removed unless the download completes.
        let mut temporary = to.as_os_str().to_owned();
        temporary.push(".hearth-download");
        let temporary = std::path::PathBuf::from(temporary);
        let copied = async {
            let mut file = tokio::fs::File::create(&temporary).await.map_err(failed)?;
            let mut body = resp.bytes_stream();
            let mut written = 0u64;
            while let Some(chunk) = body.next().await {
                let chunk =
                    chunk.map_err(|e| Failure::failed(format!("the download broke off: {e}")))?;
                file.write_all(&chunk).await.map_err(failed)?;
                written += chunk.len() as u64;
                bar.inc(chunk.len() as u64);
            }
            file.flush().await.map_err(failed)?;
            drop(file);
            tokio::fs::rename(&temporary, to).await.map_err(failed)?;
            Ok(written)
        }
        .await;
        if copied.is_err() {
            let _ = std::fs::remove_file(&temporary);
        }
        copied
    }

    pub async fn delete(&self, path: &str) -> Result<Value, Failure> {
        self.send(self.http.delete(format!("{}{path}", self.base)))
            .await
    }
}
