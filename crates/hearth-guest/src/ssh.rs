//! Commands over SSH, on kept connections.
//!
//! One authenticated connection per environment is cached; each command opens a new
//! channel on it, so only the first command pays for TCP, key exchange and auth. A
//! connection that broke (VM restarted, port changed) is dropped and made again once.
//!
//! Host keys are pinned on first use: the first contact after a VM is made (the
//! provisioning probe) accepts and returns the guest's host key, which the control plane
//! records; every later connection must be offered that same key, or it is refused as a
//! possible interception (a VM on OVH is reached across the internet).

use russh::client::{self, Handle};
use russh::keys::{PrivateKeyWithHashAlg, decode_secret_key};
use russh::{ChannelMsg, Disconnect, Sig};
use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::Mutex;

/// Where and as whom to log in.
#[derive(Clone)]
pub struct Target {
    /// The cache key: one connection per environment.
    pub environment_id: String,
    pub host: String,
    pub port: u16,
    pub user: String,
    pub private_key_openssh: String,
    /// The host key recorded at the first contact (`type base64`); `None` accepts any key
    /// (the first contact, which reports it).
    pub host_key: Option<String>,
}

#[derive(Clone)]
pub struct ExecRequest {
    /// Run by the login shell of the guest user, as `ssh host CODE` would. A user's
    /// command travels on standard input to a fixed wrapper (`code_on_stdin`), so its size
    /// is never bound by the guest's argument limit (128 KiB per argument on Linux).
    pub code: String,
    /// Send `code` on standard input to the fixed wrapper (a user's command, which then
    /// reads an empty standard input); otherwise run `code` itself, with `stdin`.
    pub code_on_stdin: bool,
    pub working_dir: Option<String>,
    pub env: BTreeMap<String, String>,
    /// Written to the command's standard input, which is then closed (so a command that
    /// reads it never waits for input that cannot come).
    pub stdin: Vec<u8>,
    pub timeout: Duration,
    /// Output past this many bytes per stream is dropped and `truncated` set.
    pub max_output: usize,
}

/// Without `stdin`, which may carry a secret (a clone's credential).
impl std::fmt::Debug for ExecRequest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ExecRequest")
            .field("code", &self.code)
            .field("code_on_stdin", &self.code_on_stdin)
            .field("working_dir", &self.working_dir)
            .field("stdin_bytes", &self.stdin.len())
            .field("timeout", &self.timeout)
            .finish_non_exhaustive()
    }
}

#[derive(Debug, Clone)]
pub struct ExecOutput {
    pub stdout: Vec<u8>,
    pub stderr: Vec<u8>,
    /// `None` when the command was killed by a signal or timed out.
    pub exit_code: Option<i64>,
    pub timed_out: bool,
    pub truncated: bool,
    pub duration: Duration,
}

#[derive(Debug, thiserror::Error)]
pub enum GuestError {
    #[error("cannot connect to the VM's SSH server at {0}: {1}")]
    Connect(String, String),
    #[error("the VM refused Hearth's SSH key for user {0}")]
    Auth(String),
    #[error("the environment's SSH key cannot be read: {0}")]
    Key(String),
    #[error("SSH session failed: {0}")]
    Session(String),
    /// The guest offered another host key than the one recorded when it was made.
    #[error(
        "the VM at {0} offered SSH host key {1}, not {2} recorded when it was made: refused (someone may be in between; if the VM was rebuilt by hand, destroy and recreate it)"
    )]
    HostKey(String, String, String),
    /// The VM's SSH server took the connection but did not start the command in time:
    /// usually a VM out of processes or memory.
    #[error(
        "the VM did not start the command within {0} s; it may be out of processes or memory (stop and start it)"
    )]
    Unresponsive(u64),
}

/// How long opening a terminal's shell may take.
const SHELL_OPEN_TIMEOUT: Duration = Duration::from_secs(10);

/// Starts `req` within its own timeout: a VM that cannot fork never holds a request.
async fn start_within(
    handle: &Handle<HostKeyCheck>,
    req: &ExecRequest,
) -> Result<russh::Channel<client::Msg>, GuestError> {
    tokio::time::timeout(req.timeout, start(handle, req))
        .await
        .map_err(|_| GuestError::Unresponsive(req.timeout.as_secs()))?
}

/// Accepts the recorded host key only (any key when none is recorded) and keeps the one
/// offered.
struct HostKeyCheck {
    expected: Option<String>,
    offered: Arc<std::sync::Mutex<Option<String>>>,
}

/// `type base64` of a key, as `authorized_keys` and `known_hosts` write it, without comment.
fn openssh_line(key: &russh::keys::PublicKeyOrCertificate) -> String {
    let text = match key {
        russh::keys::PublicKeyOrCertificate::PublicKey { key, .. } => key.to_openssh().ok(),
        russh::keys::PublicKeyOrCertificate::Certificate(c) => c.to_openssh().ok(),
    }
    .unwrap_or_default();
    text.split_whitespace()
        .take(2)
        .collect::<Vec<_>>()
        .join(" ")
}

impl client::Handler for HostKeyCheck {
    type Error = russh::Error;

    async fn check_server_key(
        &mut self,
        key: &russh::keys::PublicKeyOrCertificate,
    ) -> Result<bool, Self::Error> {
        let offered = openssh_line(key);
        // A key that cannot be written down cannot be pinned: refused.
        let ok = !offered.is_empty() && self.expected.as_ref().is_none_or(|e| *e == offered);
        *self.offered.lock().unwrap() = Some(offered);
        Ok(ok)
    }
}

struct Cached {
    addr: (String, u16),
    handle: Arc<Handle<HostKeyCheck>>,
}

/// Kept SSH connections, one per environment.
#[derive(Clone, Default)]
pub struct SshPool {
    conns: Arc<Mutex<HashMap<String, Cached>>>,
}

/// The working directory travels as an SSH `env` request (data, not shell text); the
/// fixed wrapper `cd`s into it before the user's code runs.
const WORKDIR_ENV: &str = "HEARTH_WORKDIR";
/// Reads the user's code from standard input into a file that is unlinked once open, then
/// replaces itself with the user's login shell reading the code from that descriptor, so
/// signals (a timeout's SIGKILL) reach the user's shell and the command's own standard
/// input is empty.
const WRAPPER: &str = r#"t=$(mktemp) || exit 125
cat > "$t"
exec 3< "$t"
rm -f -- "$t"
if [ -n "${HEARTH_WORKDIR:-}" ]; then cd -- "$HEARTH_WORKDIR" || exit 126; fi
exec "${SHELL:-/bin/sh}" /dev/fd/3 < /dev/null
"#;

impl SshPool {
    pub fn new() -> SshPool {
        SshPool::default()
    }

    /// Connects and authenticates within `timeout`; gives up sooner when the server's
    /// banner has not come within `banner_wait` (a connection accepted by QEMU's user
    /// network before the guest's network is up hangs: its SYN to the guest was lost).
    async fn connect_waiting(
        target: &Target,
        timeout: Duration,
        banner_wait: Duration,
    ) -> Result<(Handle<HostKeyCheck>, String), GuestError> {
        let addr = format!("{}:{}", target.host, target.port);
        let stream = tokio::time::timeout(
            timeout,
            tokio::net::TcpStream::connect((target.host.as_str(), target.port)),
        )
        .await
        .map_err(|_| GuestError::Connect(addr.clone(), "timed out".into()))?
        .map_err(|e| GuestError::Connect(addr.clone(), e.to_string()))?;
        let _ = stream.set_nodelay(true);
        let mut first = [0u8; 4];
        match tokio::time::timeout(banner_wait.min(timeout), stream.peek(&mut first)).await {
            Err(_) => {
                return Err(GuestError::Connect(
                    addr,
                    format!("no SSH banner within {} ms", banner_wait.as_millis()),
                ));
            }
            Ok(Ok(0)) => return Err(GuestError::Connect(addr, "closed before its banner".into())),
            Ok(Err(e)) => return Err(GuestError::Connect(addr, e.to_string())),
            Ok(Ok(_)) => {}
        }
        Self::handshake(target, timeout, stream).await
    }

    async fn connect(
        target: &Target,
        timeout: Duration,
    ) -> Result<Handle<HostKeyCheck>, GuestError> {
        Ok(Self::connect_waiting(target, timeout, timeout).await?.0)
    }

    async fn handshake(
        target: &Target,
        timeout: Duration,
        stream: tokio::net::TcpStream,
    ) -> Result<(Handle<HostKeyCheck>, String), GuestError> {
        let key = decode_secret_key(&target.private_key_openssh, None)
            .map_err(|e| GuestError::Key(e.to_string()))?;
        let config = Arc::new(client::Config {
            inactivity_timeout: None,
            keepalive_interval: Some(Duration::from_secs(15)),
            keepalive_max: 3,
            nodelay: true,
            ..Default::default()
        });
        let addr = format!("{}:{}", target.host, target.port);
        let offered = Arc::new(std::sync::Mutex::new(None));
        let check = HostKeyCheck {
            expected: target.host_key.clone(),
            offered: offered.clone(),
        };
        let connecting = client::connect_stream(config, stream, check);
        let connected = tokio::time::timeout(timeout, connecting)
            .await
            .map_err(|_| GuestError::Connect(addr.clone(), "timed out".into()))?;
        let offered = offered.lock().unwrap().clone();
        let host_key = offered.clone().unwrap_or_default();
        let mut handle = match (connected, &target.host_key, offered) {
            (Ok(h), _, _) => h,
            (Err(_), Some(expected), Some(offered)) if *expected != offered => {
                return Err(GuestError::HostKey(addr, offered, expected.clone()));
            }
            (Err(e), _, _) => return Err(GuestError::Connect(addr.clone(), e.to_string())),
        };
        let auth = tokio::time::timeout(
            timeout,
            handle.authenticate_publickey(
                &target.user,
                PrivateKeyWithHashAlg::new(Arc::new(key), None),
            ),
        )
        .await
        .map_err(|_| GuestError::Connect(addr.clone(), "authentication timed out".into()))?
        .map_err(|e| GuestError::Connect(addr, e.to_string()))?;
        if !auth.success() {
            return Err(GuestError::Auth(target.user.clone()));
        }
        Ok((handle, host_key))
    }

    /// The cached connection for this target, or a new one.
    async fn handle(&self, target: &Target) -> Result<Arc<Handle<HostKeyCheck>>, GuestError> {
        let addr = (target.host.clone(), target.port);
        {
            let conns = self.conns.lock().await;
            if let Some(c) = conns.get(&target.environment_id)
                && c.addr == addr
                && !c.handle.is_closed()
            {
                return Ok(c.handle.clone());
            }
        }
        let handle = Arc::new(Self::connect(target, Duration::from_secs(10)).await?);
        if target.environment_id.ends_with(STREAMS_SUFFIX) {
            let _ = tokio::time::timeout(Duration::from_secs(5), without_nagle(&handle)).await;
        }
        let mut conns = self.conns.lock().await;
        conns.insert(
            target.environment_id.clone(),
            Cached {
                addr,
                handle: handle.clone(),
            },
        );
        Ok(handle)
    }

    /// Files the connection kept under `from` under `to` (a warm VM's connection, made with
    /// its pool key, becomes its environment's once the keys are swapped: sshd does not ask
    /// a live connection to authenticate again). True when there was one.
    pub async fn rename(&self, from: &str, to: &str) -> bool {
        let mut conns = self.conns.lock().await;
        match conns.remove(from) {
            Some(c) if !c.handle.is_closed() => {
                conns.insert(to.to_string(), c);
                true
            }
            _ => false,
        }
    }

    /// Drops the kept connections whose peer has gone, and those `stale` says of their
    /// key (a warm VM's connection after another node claimed or drained it): they would
    /// otherwise stay open for the life of the process.
    pub async fn forget_where(&self, stale: impl Fn(&str) -> bool) {
        let dropped: Vec<Cached> = {
            let mut conns = self.conns.lock().await;
            let keys: Vec<String> = conns
                .iter()
                .filter(|(k, c)| c.handle.is_closed() || stale(k))
                .map(|(k, _)| k.clone())
                .collect();
            keys.iter().filter_map(|k| conns.remove(k)).collect()
        };
        for c in dropped {
            let _ = c
                .handle
                .disconnect(Disconnect::ByApplication, "", "en")
                .await;
        }
    }

    /// Drops the environment's connections (after stop or destroy): commands' and tunnels'.
    pub async fn forget(&self, environment_id: &str) {
        let dropped: Vec<Cached> = {
            let mut conns = self.conns.lock().await;
            [environment_id.to_string(), streams_key(environment_id)]
                .iter()
                .filter_map(|k| conns.remove(k))
                .collect()
        };
        for c in dropped {
            let _ = c
                .handle
                .disconnect(Disconnect::ByApplication, "", "en")
                .await;
        }
    }

    /// Succeeds once the guest accepts Hearth's key and runs `true`: the VM is usable.
    /// A try whose banner has not come within `banner_wait` fails then, so the next try
    /// can start (see `connect_waiting`).
    /// Returns the host key the guest offered (`type base64`), to be recorded.
    pub async fn probe(
        &self,
        target: &Target,
        banner_wait: Duration,
    ) -> Result<String, GuestError> {
        let (handle, host_key) =
            Self::connect_waiting(target, Duration::from_secs(5), banner_wait).await?;
        let handle = Arc::new(handle);
        let out = run_on(
            &handle,
            &ExecRequest {
                code: "true".into(),
                code_on_stdin: false,
                working_dir: None,
                env: BTreeMap::new(),
                stdin: Vec::new(),
                timeout: Duration::from_secs(5),
                max_output: 1024,
            },
        )
        .await?;
        if out.exit_code != Some(0) {
            return Err(GuestError::Session(format!(
                "probe exited with {:?}",
                out.exit_code
            )));
        }
        self.conns.lock().await.insert(
            target.environment_id.clone(),
            Cached {
                addr: (target.host.clone(), target.port),
                handle,
            },
        );
        Ok(host_key)
    }

    /// Polls `probe` until it succeeds or `deadline` passes; returns the last error.
    pub async fn wait_ready(&self, target: &Target, deadline: Duration) -> Result<(), GuestError> {
        let until = Instant::now() + deadline;
        loop {
            match self.probe(target, Duration::from_secs(5)).await {
                Ok(_) => return Ok(()),
                Err(e) if Instant::now() >= until => return Err(e),
                Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
            }
        }
    }

    /// Runs a command on a kept connection, reconnecting once if the kept one broke.
    pub async fn exec(&self, target: &Target, req: &ExecRequest) -> Result<ExecOutput, GuestError> {
        let handle = self.handle(target).await?;
        match run_on(&handle, req).await {
            Err(GuestError::Session(_)) => {
                // The kept connection may be stale; one fresh try.
                self.conns.lock().await.remove(&target.environment_id);
                let handle = self.handle(target).await?;
                run_on(&handle, req).await
            }
            other => other,
        }
    }
}

/// A piece of a streaming command's life.
#[derive(Debug, Clone)]
pub enum StreamChunk {
    Stdout(Vec<u8>),
    Stderr(Vec<u8>),
    Exit {
        code: Option<i64>,
        timed_out: bool,
        duration: Duration,
    },
}

/// How long a command's output may stay silent after its exit status before the exec ends.
/// sshd sends the status when the command exits and ends the channel once nothing holds its
/// output open, so a background process the command started (`server &`) would otherwise
/// hold the exec open until its time limit. What the command itself wrote is already in
/// the pipe then; each piece of it that arrives restarts the wait.
const OUTPUT_GRACE_AFTER_EXIT: Duration = Duration::from_secs(2);

impl SshPool {
    /// Starts a command and streams its output as it comes. Dropping the receiver kills
    /// the remote process (SIGKILL, then the channel is closed).
    pub async fn exec_stream(
        &self,
        target: &Target,
        req: &ExecRequest,
    ) -> Result<tokio::sync::mpsc::Receiver<StreamChunk>, GuestError> {
        let handle = self.handle(target).await?;
        let channel = match start_within(&handle, req).await {
            Ok(c) => c,
            Err(GuestError::Session(_)) => {
                self.conns.lock().await.remove(&target.environment_id);
                let handle = self.handle(target).await?;
                start_within(&handle, req).await?
            }
            Err(e) => return Err(e),
        };
        let (tx, rx) = tokio::sync::mpsc::channel(64);
        let timeout = req.timeout;
        tokio::spawn(async move {
            let mut channel = channel;
            let started = Instant::now();
            let deadline = tokio::time::sleep(timeout);
            tokio::pin!(deadline);
            let mut code = None;
            let mut timed_out = false;
            let grace = tokio::time::sleep(timeout);
            tokio::pin!(grace);
            loop {
                tokio::select! {
                    msg = channel.wait() => match msg {
                        Some(ChannelMsg::Data { data }) => {
                            if tx.send(StreamChunk::Stdout(data.to_vec())).await.is_err() { break; }
                            grace.as_mut().reset(tokio::time::Instant::now() + OUTPUT_GRACE_AFTER_EXIT);
                        }
                        Some(ChannelMsg::ExtendedData { data, ext: 1 }) => {
                            if tx.send(StreamChunk::Stderr(data.to_vec())).await.is_err() { break; }
                            grace.as_mut().reset(tokio::time::Instant::now() + OUTPUT_GRACE_AFTER_EXIT);
                        }
                        Some(ChannelMsg::ExitStatus { exit_status }) => {
                            code = Some(exit_status as i64);
                            grace.as_mut().reset(tokio::time::Instant::now() + OUTPUT_GRACE_AFTER_EXIT);
                        }
                        Some(ChannelMsg::Close) | None => {
                            let _ = tx.send(StreamChunk::Exit { code, timed_out, duration: started.elapsed() }).await;
                            return;
                        }
                        Some(_) => {}
                    },
                    _ = &mut grace, if code.is_some() => {
                        let _ = channel.close().await;
                        let _ = tx.send(StreamChunk::Exit { code, timed_out, duration: started.elapsed() }).await;
                        return;
                    }
                    _ = &mut deadline => {
                        timed_out = true;
                        let _ = channel.signal(Sig::KILL).await;
                        let _ = channel.close().await;
                        let _ = tx.send(StreamChunk::Exit { code: None, timed_out, duration: started.elapsed() }).await;
                        return;
                    }
                    _ = tx.closed() => break,
                }
            }
            // The listener went away: stop the command.
            let _ = channel.signal(Sig::KILL).await;
            let _ = channel.close().await;
        });
        Ok(rx)
    }
}

impl SshPool {
    /// A session channel on the target's kept connection, or on a new one when the kept
    /// one broke.
    async fn session_channel(
        &self,
        target: &Target,
    ) -> Result<russh::Channel<client::Msg>, GuestError> {
        let handle = self.handle(target).await?;
        match handle.channel_open_session().await {
            Ok(c) => Ok(c),
            Err(_) => {
                self.conns.lock().await.remove(&target.environment_id);
                self.handle(target)
                    .await?
                    .channel_open_session()
                    .await
                    .map_err(|e| GuestError::Session(e.to_string()))
            }
        }
    }

    /// An interactive shell on a PTY of `cols` x `rows`, on the kept connection, with
    /// the environment's variables set (as SSH `env` requests).
    pub async fn open_shell(
        &self,
        target: &Target,
        env: &BTreeMap<String, String>,
        cols: u32,
        rows: u32,
    ) -> Result<russh::Channel<client::Msg>, GuestError> {
        let session = |e: russh::Error| GuestError::Session(e.to_string());
        // Connected (or reconnected) outside the time limit, which is for the shell.
        self.handle(target).await?;
        let open = async {
            let channel = self.session_channel(target).await?;
            for (k, v) in env {
                channel
                    .set_env(false, k.as_str(), v.as_str())
                    .await
                    .map_err(session)?;
            }
            channel
                .request_pty(false, "xterm-256color", cols, rows, 0, 0, &[])
                .await
                .map_err(session)?;
            channel.request_shell(false).await.map_err(session)?;
            Ok(channel)
        };
        tokio::time::timeout(SHELL_OPEN_TIMEOUT, open)
            .await
            .map_err(|_| GuestError::Unresponsive(SHELL_OPEN_TIMEOUT.as_secs()))?
    }
}

/// Opens a channel and starts `req` on it (environment, working directory, command).
async fn start(
    handle: &Handle<HostKeyCheck>,
    req: &ExecRequest,
) -> Result<russh::Channel<client::Msg>, GuestError> {
    let session = |e: russh::Error| GuestError::Session(e.to_string());
    let channel = handle.channel_open_session().await.map_err(session)?;
    for (k, v) in &req.env {
        channel
            .set_env(false, k.as_str(), v.as_str())
            .await
            .map_err(session)?;
    }
    if let Some(dir) = &req.working_dir {
        channel
            .set_env(false, WORKDIR_ENV, dir.as_str())
            .await
            .map_err(session)?;
    }
    let (code, stdin) = if req.code_on_stdin {
        (WRAPPER, req.code.as_bytes())
    } else {
        (req.code.as_str(), &req.stdin[..])
    };
    channel.exec(true, code.as_bytes()).await.map_err(session)?;
    if !stdin.is_empty() {
        channel.data(stdin).await.map_err(session)?;
    }
    channel.eof().await.map_err(session)?;
    Ok(channel)
}

async fn run_on(
    handle: &Handle<HostKeyCheck>,
    req: &ExecRequest,
) -> Result<ExecOutput, GuestError> {
    let started = Instant::now();
    let mut channel = start_within(handle, req).await?;

    let mut out = ExecOutput {
        stdout: Vec::new(),
        stderr: Vec::new(),
        exit_code: None,
        timed_out: false,
        truncated: false,
        duration: Duration::ZERO,
    };
    let deadline = tokio::time::sleep(req.timeout);
    tokio::pin!(deadline);
    let grace = tokio::time::sleep(req.timeout);
    tokio::pin!(grace);
    let append = |buf: &mut Vec<u8>, data: &[u8], truncated: &mut bool| {
        let room = req.max_output.saturating_sub(buf.len());
        if data.len() > room {
            *truncated = true;
        }
        buf.extend_from_slice(&data[..data.len().min(room)]);
    };
    loop {
        tokio::select! {
            msg = channel.wait() => match msg {
                Some(ChannelMsg::Data { data }) => {
                    append(&mut out.stdout, &data, &mut out.truncated);
                    grace.as_mut().reset(tokio::time::Instant::now() + OUTPUT_GRACE_AFTER_EXIT);
                }
                Some(ChannelMsg::ExtendedData { data, ext: 1 }) => {
                    append(&mut out.stderr, &data, &mut out.truncated);
                    grace.as_mut().reset(tokio::time::Instant::now() + OUTPUT_GRACE_AFTER_EXIT);
                }
                Some(ChannelMsg::ExitStatus { exit_status }) => {
                    out.exit_code = Some(exit_status as i64);
                    grace.as_mut().reset(tokio::time::Instant::now() + OUTPUT_GRACE_AFTER_EXIT);
                }
                Some(ChannelMsg::Failure) => {
                    return Err(GuestError::Session("the VM's SSH server refused to run the command".into()))
                }
                Some(ChannelMsg::Close) | None => break,
                Some(_) => {}
            },
            _ = &mut grace, if out.exit_code.is_some() => {
                let _ = channel.close().await;
                break;
            }
            _ = &mut deadline => {
                out.timed_out = true;
                let _ = channel.signal(Sig::KILL).await;
                let _ = channel.close().await;
                break;
            }
        }
    }
    out.duration = started.elapsed();
    Ok(out)
}

const STREAMS_SUFFIX: &str = "#streams";

/// The key of an environment's kept connection for tunnels and file transfers.
fn streams_key(environment_id: &str) -> String {
    format!("{environment_id}{STREAMS_SUFFIX}")
}

/// Has the guest's sshd send small packets at once on this connection. OpenSSH turns
/// Nagle's algorithm off (`TCP_NODELAY`) on a connection only once a session with a PTY
/// runs on it; until then a small packet waits for the ACK of the one before, which
/// this side delays up to 40 ms. A proxied HTTP answer's headers and body are two such
/// packets: 45 ms a request, measured (BENCHMARKS.md, issue 17). One `true` on a PTY
/// switches the connection for its life.
async fn without_nagle(handle: &Handle<HostKeyCheck>) -> Result<(), russh::Error> {
    let mut channel = handle.channel_open_session().await?;
    channel
        .request_pty(false, "dumb", 80, 24, 0, 0, &[])
        .await?;
    channel.exec(true, "true").await?;
    while let Some(msg) = channel.wait().await {
        if matches!(msg, ChannelMsg::Close) {
            break;
        }
    }
    Ok(())
}

/// A connection to a port in the guest (see `SshPool::open_tunnel`).
pub type TunnelChannel = russh::Channel<client::Msg>;

/// Why a tunnel to a port in the guest could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum TunnelError {
    /// The guest's sshd was reached but would not connect to the port (usually nothing
    /// listens there).
    #[error("nothing in the environment accepted a connection on port {0} ({1})")]
    Refused(u16, String),
    #[error(transparent)]
    Guest(#[from] GuestError),
}

impl SshPool {
    /// A TCP connection to `127.0.0.1:port` inside the guest, made by the guest's sshd
    /// (an SSH `direct-tcpip` channel): no guest port is exposed, and the connection is as
    /// private as Hearth's own SSH session.
    ///
    /// Tunnels and file transfers have a kept connection of their own, apart from commands
    /// and terminals: russh hands a channel's data to a bounded queue from the
    /// connection's one reading task, so a stream whose client stops reading stalls every
    /// channel of its connection. It can stall the environment's other streams, never its
    /// commands.
    pub async fn open_tunnel(
        &self,
        target: &Target,
        port: u16,
    ) -> Result<TunnelChannel, TunnelError> {
        let target = &Target {
            environment_id: streams_key(&target.environment_id),
            ..target.clone()
        };
        let open = |handle: Arc<Handle<HostKeyCheck>>| async move {
            handle
                .channel_open_direct_tcpip("127.0.0.1", u32::from(port), "127.0.0.1", 0)
                .await
        };
        let attempt = async {
            let handle = self.handle(target).await?;
            match open(handle).await {
                Ok(c) => Ok(c),
                Err(russh::Error::ChannelOpenFailure(reason)) => {
                    Err(TunnelError::Refused(port, format!("{reason:?}")))
                }
                Err(_) => {
                    // The kept connection may be stale; one fresh try.
                    self.conns.lock().await.remove(&target.environment_id);
                    let handle = self.handle(target).await?;
                    open(handle).await.map_err(|e| match e {
                        russh::Error::ChannelOpenFailure(reason) => {
                            TunnelError::Refused(port, format!("{reason:?}"))
                        }
                        other => GuestError::Session(other.to_string()).into(),
                    })
                }
            }
        };
        tokio::time::timeout(SHELL_OPEN_TIMEOUT, attempt)
            .await
            .map_err(|_| GuestError::Unresponsive(SHELL_OPEN_TIMEOUT.as_secs()))?
    }
}

/// The longest SFTP packet accepted from a guest. The client library allocates what a
/// packet's length prefix says (up to 4 GiB); a guest's user is root there and could run
/// any `sftp-server`. Data packets are at most 256 KiB (`Config::max_packet_len`).
const MAX_SFTP_PACKET: u32 = 1 << 20;

/// An SFTP byte stream that fails, before the client reads it, any packet whose length
/// prefix is over `MAX_SFTP_PACKET`.
pub struct GuardedSftp<S> {
    inner: S,
    header: [u8; 4],
    have: usize,
    remaining: u64,
}

impl<S> GuardedSftp<S> {
    fn new(inner: S) -> Self {
        GuardedSftp {
            inner,
            header: [0; 4],
            have: 0,
            remaining: 0,
        }
    }

    /// Follows packet boundaries over `bytes`; `Err` at a length over the limit.
    fn check(&mut self, mut bytes: &[u8]) -> std::io::Result<()> {
        while !bytes.is_empty() {
            if self.remaining > 0 {
                let skip = (self.remaining as usize).min(bytes.len());
                self.remaining -= skip as u64;
                bytes = &bytes[skip..];
                continue;
            }
            self.header[self.have] = bytes[0];
            self.have += 1;
            bytes = &bytes[1..];
            if self.have == 4 {
                self.have = 0;
                let length = u32::from_be_bytes(self.header);
                if length > MAX_SFTP_PACKET {
                    return Err(std::io::Error::new(
                        std::io::ErrorKind::InvalidData,
                        format!(
                            "the guest's SFTP server sent a packet of {length} bytes; at most {MAX_SFTP_PACKET} are read"
                        ),
                    ));
                }
                self.remaining = u64::from(length);
            }
        }
        Ok(())
    }
}

impl<S: tokio::io::AsyncRead + Unpin> tokio::io::AsyncRead for GuardedSftp<S> {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let polled = std::pin::Pin::new(&mut self.inner).poll_read(cx, buf);
        if let std::task::Poll::Ready(Ok(())) = polled {
            let fresh = buf.filled()[before..].to_vec();
            if let Err(e) = self.check(&fresh) {
                buf.set_filled(before);
                return std::task::Poll::Ready(Err(e));
            }
        }
        polled
    }
}

impl<S: tokio::io::AsyncWrite + Unpin> tokio::io::AsyncWrite for GuardedSftp<S> {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        data: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        std::pin::Pin::new(&mut self.inner).poll_write(cx, data)
    }
    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// How long one SFTP request may wait for the guest's answer.
const SFTP_REQUEST_SECONDS: u64 = 60;

impl SshPool {
    /// A channel to the guest's SFTP server (OpenSSH's `sftp-server`, as the login user)
    /// on the environment's streams connection (see `open_tunnel`), its packets guarded.
    async fn sftp_stream(
        &self,
        target: &Target,
    ) -> Result<GuardedSftp<russh::ChannelStream<client::Msg>>, GuestError> {
        let target = &Target {
            environment_id: streams_key(&target.environment_id),
            ..target.clone()
        };
        let session = |e: russh::Error| GuestError::Session(e.to_string());
        let open = async {
            let channel = self.session_channel(target).await?;
            channel
                .request_subsystem(true, "sftp")
                .await
                .map_err(session)?;
            Ok(GuardedSftp::new(channel.into_stream()))
        };
        tokio::time::timeout(SHELL_OPEN_TIMEOUT, open)
            .await
            .map_err(|_| GuestError::Unresponsive(SHELL_OPEN_TIMEOUT.as_secs()))?
    }
}

impl SshPool {
    /// An SFTP session on the environment's streams connection, for files' contents.
    pub async fn sftp(
        &self,
        target: &Target,
    ) -> Result<russh_sftp::client::SftpSession, GuestError> {
        let stream = self.sftp_stream(target).await?;
        let config = russh_sftp::client::Config {
            request_timeout_secs: SFTP_REQUEST_SECONDS,
            ..Default::default()
        };
        tokio::time::timeout(
            SHELL_OPEN_TIMEOUT,
            russh_sftp::client::SftpSession::new_with_config(stream, config),
        )
        .await
        .map_err(|_| GuestError::Unresponsive(SHELL_OPEN_TIMEOUT.as_secs()))?
        .map_err(|e| GuestError::Session(format!("the VM's SFTP server did not answer: {e}")))
    }

    /// The protocol's own requests (a listing read a batch at a time, OpenSSH's
    /// `posix-rename`), on a session of their own.
    pub async fn sftp_raw(
        &self,
        target: &Target,
    ) -> Result<russh_sftp::client::RawSftpSession, GuestError> {
        let stream = self.sftp_stream(target).await?;
        let config = russh_sftp::client::Config {
            request_timeout_secs: SFTP_REQUEST_SECONDS,
            ..Default::default()
        };
        let raw = russh_sftp::client::RawSftpSession::new_with_config(stream, config);
        tokio::time::timeout(SHELL_OPEN_TIMEOUT, raw.init())
            .await
            .map_err(|_| GuestError::Unresponsive(SHELL_OPEN_TIMEOUT.as_secs()))?
            .map_err(|e| {
                GuestError::Session(format!("the VM's SFTP server did not answer: {e}"))
            })?;
        Ok(raw)
    }
}

#[cfg(test)]
mod sftp_guard_tests {
    use super::*;

    #[test]
    fn a_packet_over_the_limit_is_refused_wherever_its_length_is_cut() {
        let mut guard = GuardedSftp::new(());
        // A 5-byte packet, then a length prefix of 2 MiB cut in two.
        let mut stream = vec![0, 0, 0, 5, 1, 2, 3, 4, 5];
        stream.extend_from_slice(&(2u32 << 20).to_be_bytes());
        assert!(guard.check(&stream[..6]).is_ok());
        assert!(guard.check(&stream[6..11]).is_ok());
        assert!(guard.check(&stream[11..]).is_err());
        let mut fine = GuardedSftp::new(());
        let mut ok = (1u32 << 20).to_be_bytes().to_vec();
        ok.extend(std::iter::repeat_n(7u8, 1 << 20));
        ok.extend_from_slice(&3u32.to_be_bytes());
        assert!(fine.check(&ok).is_ok());
    }
}
