//! Connections into environments through the API's tunnel WebSocket
//! (`/v1/environments/{id}/tunnel/{port}`): `hearth ssh --stdio` (an SSH client's
//! `ProxyCommand`), `hearth port-forward`, and `hearth ssh-config`, which writes the
//! OpenSSH configuration that uses the first. No guest port needs to be reachable from
//! here: only the API.

use crate::client::{Client, Failure};
use futures::{SinkExt, StreamExt};
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio_tungstenite::tungstenite::Message;

type Socket =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// Opens the tunnel to `port` in environment `id`; the server's refusal (nothing listens,
/// not running, not yours) becomes the failure's message.
async fn open(client: &Client, id: &str, port: u16) -> Result<Socket, Failure> {
    client
        .websocket(&format!("/v1/environments/{id}/tunnel/{port}"))
        .await
}

/// Carries bytes between a local stream and the tunnel until both sides are done: the
/// end of local input is passed on as `{"type":"eof"}`, the guest's as a shutdown of
/// local output.
async fn pipe(
    socket: Socket,
    mut input: impl AsyncRead + Unpin,
    mut output: impl AsyncWrite + Unpin,
) -> std::io::Result<()> {
    let (mut sink, mut stream) = socket.split();
    let up = async move {
        let mut buf = vec![0u8; 32 * 1024];
        loop {
            let n = input.read(&mut buf).await?;
            if n == 0 {
                let _ = sink.send(Message::Text(r#"{"type":"eof"}"#.into())).await;
                // Kept open: the guest may still be answering.
                std::future::pending::<()>().await;
            }
            if sink
                .send(Message::Binary(buf[..n].to_vec().into()))
                .await
                .is_err()
            {
                return Ok::<(), std::io::Error>(());
            }
        }
    };
    let down = async move {
        while let Some(msg) = stream.next().await {
            match msg {
                Ok(Message::Binary(bytes)) => {
                    output.write_all(&bytes).await?;
                    output.flush().await?;
                }
                Ok(Message::Text(text)) => {
                    if serde_json::from_str::<Value>(&text).is_ok_and(|v| v["type"] == "eof") {
                        output.shutdown().await?;
                    }
                }
                Ok(Message::Close(_)) | Err(_) => break,
                Ok(_) => {}
            }
        }
        let _ = output.shutdown().await;
        Ok::<(), std::io::Error>(())
    };
    // The connection is over when the server closes it (the guest's side closed); what
    // it sent until then is all written out, even when sending to it failed first.
    tokio::pin!(down);
    tokio::select! {
        r = up => { r?; down.await }
        r = &mut down => r,
    }
}

/// `hearth ssh --stdio ID`: the guest's sshd on standard input and output, for an SSH
/// client's `ProxyCommand`.
pub async fn stdio(client: &Client, id: &str) -> Result<ExitCode, Failure> {
    let socket = open(client, id, 22).await?;
    let piped = pipe(socket, tokio::io::stdin(), tokio::io::stdout()).await;
    // Exits at once: tokio's stdin read runs on a thread that cannot be interrupted, and
    // the SSH client waits for this end of the pipe to close before it finishes.
    match piped {
        Ok(()) => std::process::exit(0),
        Err(e) => {
            eprintln!("error: the connection broke: {e}");
            std::process::exit(1)
        }
    }
}

/// `LOCAL:REMOTE` or `PORT` (the same on both sides).
pub fn parse_ports(spec: &str) -> Result<(u16, u16), Failure> {
    let port = |s: &str| {
        s.parse::<u16>().map_err(|_| {
            Failure::usage(format!(
                "{s:?} is not a port; give LOCAL:REMOTE, e.g. 8080:3000, or one port"
            ))
        })
    };
    let (local, remote) = match spec.split_once(':') {
        Some((l, r)) => (port(l)?, port(r)?),
        None => (port(spec)?, port(spec)?),
    };
    if remote == 0 {
        return Err(Failure::usage("the environment's port must be 1 to 65535"));
    }
    Ok((local, remote))
}

/// `hearth port-forward ID LOCAL:REMOTE`: listens on 127.0.0.1:LOCAL (0 picks a free
/// port) and carries each connection to REMOTE in the environment, until interrupted.
pub async fn port_forward(client: Client, id: &str, spec: &str) -> Result<ExitCode, Failure> {
    let (local, remote) = parse_ports(spec)?;
    // Checked once up front, so a wrong id or a port nothing listens on is said at once.
    drop(open(&client, id, remote).await?);
    let listener = tokio::net::TcpListener::bind(("127.0.0.1", local))
        .await
        .map_err(|e| Failure::failed(format!("cannot listen on 127.0.0.1:{local}: {e}")))?;
    let bound = listener
        .local_addr()
        .map_err(|e| Failure::failed(e.to_string()))?;
    eprintln!("forwarding {bound} -> {id} port {remote} (Ctrl-C stops)");
    let client = std::sync::Arc::new(client);
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                let (conn, peer) = accepted.map_err(|e| Failure::failed(format!("accept: {e}")))?;
                let (client, id) = (client.clone(), id.to_string());
                tokio::spawn(async move {
                    match open(&client, &id, remote).await {
                        Ok(socket) => {
                            let _ = conn.set_nodelay(true);
                            let (r, w) = conn.into_split();
                            if let Err(e) = pipe(socket, r, w).await {
                                eprintln!("{peer}: {e}");
                            }
                        }
                        Err(f) => eprintln!("{peer}: {}", f.message),
                    }
                });
            }
            _ = tokio::signal::ctrl_c() => return Ok(ExitCode::SUCCESS),
        }
    }
}

/// Every environment of the caller that is not destroyed, all pages.
async fn environments(client: &Client) -> Result<Vec<Value>, Failure> {
    let mut all = Vec::new();
    let mut cursor = String::new();
    loop {
        let page = client
            .get(&format!("/v1/environments?limit=1000&cursor={cursor}"))
            .await?;
        all.extend(page["items"].as_array().cloned().unwrap_or_default());
        match page["nextCursor"].as_str() {
            Some(next) => cursor = next.to_string(),
            None => return Ok(all),
        }
    }
}

/// The `Host` entry of one environment. `%` is ssh_config's escape character.
fn host_entry(env: &Value, exe: &Path, known_hosts: &Path) -> String {
    let (id, slug) = (
        env["id"].as_str().unwrap_or_default(),
        env["slug"].as_str().unwrap_or_default(),
    );
    // ssh runs the ProxyCommand with the user's shell: single quotes keep `$` and
    // backquotes literal (paths with a quote are refused before).
    let quoted = |p: &Path| format!("'{}'", p.display().to_string().replace('%', "%%"));
    let mut entry = format!(
        "Host hearth-{slug}\n    HostName {slug}\n    User {}\n    ProxyCommand {} ssh --stdio {id}\n",
        env["sshUser"].as_str().unwrap_or("dev"),
        quoted(exe),
    );
    if env["sshHostKey"].is_string() {
        entry.push_str(&format!(
            "    HostKeyAlias hearth-{id}\n    UserKnownHostsFile {}\n    StrictHostKeyChecking yes\n",
            quoted(known_hosts)
        ));
    }
    entry
}

/// The first line of the `known_hosts` that `ssh-config` writes (and may overwrite).
const KNOWN_HOSTS_HEADER: &str = "# written by `hearth ssh-config`; rewritten each time\n";

/// Where `hearth login` and `hearth ssh-config` keep their files.
pub fn config_dir() -> Option<PathBuf> {
    std::env::var_os("XDG_CONFIG_HOME")
        .filter(|d| !d.is_empty())
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".config")))
        .map(|d| d.join("hearth"))
}

/// `hearth ssh-config`: prints an OpenSSH `Host hearth-<slug>` entry per environment and
/// writes the guests' pinned host keys to `known_hosts`.
pub async fn ssh_config(
    client: &Client,
    known_hosts: Option<PathBuf>,
) -> Result<ExitCode, Failure> {
    let known_hosts = known_hosts
        .or_else(|| config_dir().map(|d| d.join("known_hosts")))
        .ok_or_else(|| Failure::usage("no HOME: give --known-hosts PATH"))?;
    let exe = std::env::current_exe()
        .map_err(|e| Failure::failed(format!("cannot find this program's path: {e}")))?;
    let quote = ['\'', '"'];
    if exe.to_string_lossy().contains(quote) || known_hosts.to_string_lossy().contains(quote) {
        return Err(Failure::usage(
            "paths with a quote cannot be written into an SSH config",
        ));
    }
    // The file is ours alone: one that `ssh-config` did not write (~/.ssh/known_hosts)
    // is never overwritten.
    if let Ok(existing) = std::fs::read_to_string(&known_hosts)
        && !existing.is_empty()
        && !existing.starts_with(KNOWN_HOSTS_HEADER)
    {
        return Err(Failure::usage(format!(
            "{} was not written by `hearth ssh-config`; give --known-hosts a file of its own",
            known_hosts.display()
        )));
    }
    let envs = environments(client).await?;
    let lines: String = std::iter::once(KNOWN_HOSTS_HEADER.to_string())
        .chain(envs.iter().filter_map(|e| {
            Some(format!(
                "hearth-{} {}\n",
                e["id"].as_str()?,
                e["sshHostKey"].as_str()?
            ))
        }))
        .collect();
    if let Some(dir) = known_hosts.parent() {
        std::fs::create_dir_all(dir)
            .map_err(|e| Failure::failed(format!("cannot create {}: {e}", dir.display())))?;
    }
    std::fs::write(&known_hosts, lines)
        .map_err(|e| Failure::failed(format!("cannot write {}: {e}", known_hosts.display())))?;
    println!(
        "# Written by `hearth ssh-config`; the host keys are in {}",
        known_hosts.display()
    );
    for env in &envs {
        println!("{}", host_entry(env, &exe, &known_hosts));
    }
    if std::env::var_os("HEARTH_TOKEN").is_some() && !crate::client::saved_login_exists() {
        eprintln!(
            "note: the ProxyCommand finds your token in HEARTH_TOKEN; run `hearth login` so it works without it (editors started from a desktop do not have it)"
        );
    }
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ports_are_local_then_remote() {
        assert_eq!(parse_ports("8080:3000").ok(), Some((8080, 3000)));
        assert_eq!(parse_ports("5432").ok(), Some((5432, 5432)));
        assert_eq!(parse_ports("0:22").ok(), Some((0, 22)));
        for bad in ["", "x", "1:0", "70000:1", "1:2:3"] {
            assert!(parse_ports(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn an_entry_pins_the_host_key_it_knows() {
        let env = serde_json::json!({"id": "0190-ab", "slug": "env-x", "sshUser": "dev", "sshHostKey": "ssh-ed25519 AAAA"});
        let entry = host_entry(
            &env,
            Path::new("/opt/my%bin/hearth"),
            Path::new("/k/known_hosts"),
        );
        assert!(entry.starts_with("Host hearth-env-x\n"), "{entry}");
        assert!(
            entry.contains("ProxyCommand '/opt/my%%bin/hearth' ssh --stdio 0190-ab\n"),
            "{entry}"
        );
        assert!(entry.contains("HostKeyAlias hearth-0190-ab\n"), "{entry}");
        assert!(entry.contains("StrictHostKeyChecking yes\n"), "{entry}");
        let unprovisioned =
            serde_json::json!({"id": "a", "slug": "b", "sshUser": "dev", "sshHostKey": null});
        assert!(
            !host_entry(&unprovisioned, Path::new("/h"), Path::new("/k"))
                .contains("StrictHostKeyChecking")
        );
    }
}
