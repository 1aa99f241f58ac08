//! Tunnels: TCP connections to a port inside an environment, opened by the guest's own
//! sshd on Hearth's kept SSH connection (`direct-tcpip`). The terminal-less ways in (SSH
//! through `hearth ssh --stdio`, `hearth port-forward`, the HTTP port proxy) all stand on
//! them, so no guest port is ever published to users.
//!
//! A user's connections into environments are bounded per node (`MAX_TUNNELS_PER_USER`):
//! each tunnel, file session and proxied request in flight holds a `Permit`. The port
//! proxy keeps idle HTTP connections to guests between requests; those are the proxy's
//! (bounded per port, closed when idle), and only a request in flight counts as the user's.

use crate::{App, AppError, AppResult};
use hearth_core::{EnvState, HostKind};
use hearth_guest::{TunnelChannel, TunnelError};
use hearth_store::{Environment, User};
use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::net::TcpStream;

/// Tunnels one user may hold open at once on one node (each is a channel on the
/// environment's SSH connection and a socket here).
pub const MAX_TUNNELS_PER_USER: usize = 64;

/// How often an open tunnel with traffic marks its environment active.
const ACTIVITY_EVERY_MS: i64 = 30_000;

/// Open connections per user on this node, and when each environment's use was last
/// written down.
#[derive(Default)]
pub struct Tunnels {
    open: Mutex<HashMap<String, usize>>,
    /// Each environment's last recorded activity here (when, and what): a request through
    /// the proxy costs no database write when the same use was written within 30 s.
    recorded: Mutex<HashMap<String, (i64, &'static str)>>,
    /// Whose each environment is, by id and by slug, as the proxy found it: an
    /// environment's owner never changes, so a request through the proxy need not read
    /// its row again. An entry lasts `OWNER_KNOWN_MS` (a slug could in principle come back
    /// once its destroyed environment's row is pruned, after 30 days).
    owners: Mutex<HashMap<String, Owner>>,
    /// Environments whose address did not answer a direct connection in time (a firewall
    /// in the guest drops it), and since when: the proxy goes through their sshd instead,
    /// for `NO_DIRECT_MS`.
    no_direct: Mutex<HashMap<String, i64>>,
}

struct Owner {
    environment_id: String,
    user_id: String,
    at: i64,
}

/// How long the proxy trusts what it learnt of an environment's owner.
const OWNER_KNOWN_MS: i64 = 600_000;
/// Environments whose owner is remembered at most.
const MAX_OWNERS_KNOWN: usize = 10_000;

/// Entries `recorded` holds before the stale ones are swept out.
const RECORDED_SWEEP_AT: usize = 4096;

/// How long a direct connection to a guest's address may take before the proxy goes
/// through the guest's sshd instead. On a bridge of this machine a connection is accepted
/// or refused within microseconds; only a packet dropped in the guest waits this long.
const DIRECT_CONNECT_TIMEOUT: Duration = Duration::from_millis(250);
/// How long the proxy goes through sshd to an environment whose direct connection timed out.
const NO_DIRECT_MS: i64 = 600_000;
/// Environments `no_direct` holds at most (emptied when full: the cost is one more timeout).
const MAX_NO_DIRECT: usize = 10_000;

/// Connections the port proxy holds to one environment on one node, in use and kept idle,
/// over all its ports (each is a channel on the environment's SSH connection).
pub const MAX_PROXY_CONNECTIONS_PER_ENVIRONMENT: usize = 256;

/// Connections a shared port may have open at once on one node, from all its visitors
/// together (they do not spend its owner's own).
pub const MAX_SHARED_CONNECTIONS: usize = 32;

impl Tunnels {
    fn take(self: &Arc<Self>, user_id: &str, max: usize) -> Option<Permit> {
        let mut open = self.open.lock().unwrap();
        let count = open.entry(user_id.to_string()).or_default();
        if *count >= max {
            return None;
        }
        *count += 1;
        Some(Permit {
            tunnels: self.clone(),
            user_id: user_id.to_string(),
        })
    }

    /// The environment `id_or_slug` names and its owner, if known (and not stale).
    fn owner(&self, id_or_slug: &str, now: i64) -> Option<(String, String)> {
        let owners = self.owners.lock().unwrap();
        owners
            .get(id_or_slug)
            .filter(|o| now - o.at < OWNER_KNOWN_MS)
            .map(|o| (o.environment_id.clone(), o.user_id.clone()))
    }

    fn remember_owner(&self, id_or_slug: &str, environment_id: &str, user_id: &str, now: i64) {
        let mut owners = self.owners.lock().unwrap();
        if owners.len() >= MAX_OWNERS_KNOWN {
            owners.retain(|_, o| now - o.at < OWNER_KNOWN_MS);
            if owners.len() >= MAX_OWNERS_KNOWN {
                owners.clear();
            }
        }
        for key in [id_or_slug, environment_id] {
            owners.insert(
                key.to_string(),
                Owner {
                    environment_id: environment_id.to_string(),
                    user_id: user_id.to_string(),
                    at: now,
                },
            );
        }
    }

    fn direct_allowed(&self, environment_id: &str, now: i64) -> bool {
        let no_direct = self.no_direct.lock().unwrap();
        no_direct
            .get(environment_id)
            .is_none_or(|since| now - since >= NO_DIRECT_MS)
    }

    fn forbid_direct(&self, environment_id: &str, now: i64) {
        let mut no_direct = self.no_direct.lock().unwrap();
        if no_direct.len() >= MAX_NO_DIRECT {
            no_direct.clear();
        }
        no_direct.insert(environment_id.to_string(), now);
    }

    /// Whether `environment_id`'s use by `source` should be written down now: it was
    /// not within the last 30 s on this node, or the last use written was another kind
    /// (so the recorded source stays the latest). Notes that it is.
    fn record_due(&self, environment_id: &str, source: &'static str, now: i64) -> bool {
        let mut recorded = self.recorded.lock().unwrap();
        if recorded.len() >= RECORDED_SWEEP_AT {
            recorded.retain(|_, (at, _)| now - *at < ACTIVITY_EVERY_MS);
        }
        if recorded
            .get(environment_id)
            .is_some_and(|(at, last)| *last == source && now - *at < ACTIVITY_EVERY_MS)
        {
            return false;
        }
        recorded.insert(environment_id.to_string(), (now, source));
        true
    }
}

/// One of a user's open connections into environments (a tunnel, a file session), or one
/// of the proxy's connections to an environment; given back when dropped.
pub struct Permit {
    tunnels: Arc<Tunnels>,
    user_id: String,
}

impl Drop for Permit {
    fn drop(&mut self) {
        let mut open = self.tunnels.open.lock().unwrap();
        if let Some(count) = open.get_mut(&self.user_id) {
            *count -= 1;
            if *count == 0 {
                open.remove(&self.user_id);
            }
        }
    }
}

/// An open connection to a port in a guest.
pub struct Tunnel {
    pub environment: Environment,
    /// The port it reaches in the guest.
    pub port: u16,
    pub channel: TunnelChannel,
    /// Marks the environment active while the tunnel is used; holds the user's permit
    /// until its last clone is dropped.
    pub activity: Activity,
}

/// Marks a tunnel's environment active (so it does not idle-stop under a used tunnel).
#[derive(Clone)]
pub struct Activity(Arc<ActivityInner>);

struct ActivityInner {
    app: App,
    environment_id: String,
    source: &'static str,
    _permit: Permit,
}

/// Takes one of `user_id`'s places for a connection into an environment.
pub(crate) fn take_permit(app: &App, user_id: &str) -> AppResult<Permit> {
    app.tunnels.take(user_id, MAX_TUNNELS_PER_USER).ok_or_else(|| {
        AppError::TooMany(format!(
            "you have {MAX_TUNNELS_PER_USER} connections into environments open on this node; close one first"
        ))
    })
}

impl Activity {
    /// Marks `environment_id` active now (as `source`), holding `permit` while it lives.
    pub(crate) async fn new(
        app: &App,
        environment_id: &str,
        source: &'static str,
        permit: Permit,
    ) -> Activity {
        let activity = Activity(Arc::new(ActivityInner {
            app: app.clone(),
            environment_id: environment_id.to_string(),
            source,
            _permit: permit,
        }));
        activity.mark().await;
        activity
    }

    /// Records activity now, unless this node recorded the same kind of use of the
    /// environment within the last 30 s (`Tunnels::record_due`).
    pub async fn mark(&self) {
        let inner = &self.0;
        let now = inner.app.now();
        if inner
            .app
            .tunnels
            .record_due(&inner.environment_id, inner.source, now)
        {
            let _ = inner
                .app
                .store
                .touch_activity(&inner.environment_id, now, inner.source)
                .await;
        }
    }
}

/// A connection to a port in a guest, for the port proxy.
pub enum PortConnection {
    /// Straight to the guest's own address, where this machine routes to it.
    Direct(TcpStream),
    /// A `direct-tcpip` channel: the guest's sshd connects to the port on its loopback.
    Tunnel(TunnelChannel),
}

/// The guest address a proxied connection may go to directly: a Docker container whose
/// engine runs on this machine (its SSH port is published on this machine's loopback), so
/// its own address is on one of this machine's bridges. Anything else (a VM on an agent
/// host, an OVH instance, an engine elsewhere) goes through the guest's sshd.
///
/// The address cannot be another environment's: each container has a bridge network of its
/// own (hearth-provider's `docker::network`), which lives until its environment is
/// destroyed, and Docker gives no two networks overlapping subnets.
fn direct_address(env: &Environment) -> Option<IpAddr> {
    if env.provider != HostKind::Docker {
        return None;
    }
    let published: IpAddr = env.ssh_host.as_deref()?.parse().ok()?;
    if !published.is_loopback() {
        return None;
    }
    env.ip_address.as_deref()?.parse().ok()
}

/// One use of a port of a running environment through the proxy (a request, or the
/// connection it upgraded to): who may use it was checked, and its permit and activity
/// last as long as it does.
pub struct PortUse {
    pub environment_id: String,
    pub port: u16,
    pub activity: Activity,
}

impl App {
    /// The caller's use of `port` of their environment, through the proxy. The first
    /// request reads the environment's row (it must be the caller's and running); later
    /// ones know whose it is, and the connection to the guest says whether it runs (a
    /// kept one ends with the VM; a new one is opened only to a running environment).
    pub async fn use_port(&self, user: &User, id_or_slug: &str, port: u16) -> AppResult<PortUse> {
        if port == 0 {
            return Err(AppError::Invalid("port must be 1 to 65535".into()));
        }
        let now = self.now();
        let environment_id = match self.tunnels.owner(id_or_slug, now) {
            Some((id, owner)) if owner == user.id => id,
            Some(_) => return Err(AppError::NotFound("environment")),
            None => {
                let env = self.owned_environment(user, id_or_slug).await?;
                running(&env)?;
                self.tunnels
                    .remember_owner(id_or_slug, &env.id, &env.user_id, now);
                env.id
            }
        };
        let permit = take_permit(self, &user.id)?;
        Ok(PortUse {
            activity: Activity::new(self, &environment_id, "port", permit).await,
            environment_id,
            port,
        })
    }

    /// A visitor's use of a shared port (see `shares`), within the environment's own bound
    /// for visitors.
    pub(crate) async fn use_shared_port(&self, env: Environment, port: u16) -> AppResult<PortUse> {
        let permit = self
            .tunnels
            .take(&format!("shared:{}", env.id), MAX_SHARED_CONNECTIONS)
            .ok_or_else(|| {
                AppError::TooMany(format!(
                    "this shared port has {MAX_SHARED_CONNECTIONS} connections open; try again soon"
                ))
            })?;
        running(&env)?;
        Ok(PortUse {
            activity: Activity::new(self, &env.id, "shared port", permit).await,
            environment_id: env.id,
            port,
        })
    }

    /// A new connection to `port` of running environment `environment_id`, for the
    /// proxy's kept connections, with its place among the environment's
    /// (`MAX_PROXY_CONNECTIONS_PER_ENVIRONMENT`) to hold while it is open. It checks no
    /// caller: a `PortUse` did.
    ///
    /// Where this machine routes to the guest (`direct_address`) the connection goes
    /// straight to the guest's address: a channel through the guest's sshd costs a round
    /// trip to open and a decryption and encryption each way, which is most of the proxy's
    /// added latency when the guest's server closes every connection. A service that
    /// listens on the guest's loopback only refuses that connection, and is then reached
    /// through sshd like any other; so is one behind a firewall in the guest (after
    /// `DIRECT_CONNECT_TIMEOUT`, and for `NO_DIRECT_MS` after that).
    pub async fn port_connection(
        &self,
        environment_id: &str,
        port: u16,
    ) -> AppResult<(PortConnection, Permit)> {
        let permit = self
            .tunnels
            .take(
                &format!("proxy:{environment_id}"),
                MAX_PROXY_CONNECTIONS_PER_ENVIRONMENT,
            )
            .ok_or_else(|| {
                AppError::TooMany(format!(
                    "the proxy has {MAX_PROXY_CONNECTIONS_PER_ENVIRONMENT} connections open to this environment on this node; try again when some close (idle ones close after 30 s)"
                ))
            })?;
        let env = self
            .store
            .environment(environment_id)
            .await
            .map_err(AppError::not_found("environment"))?;
        running(&env)?;
        if let Some(address) = direct_address(&env) {
            let now = self.now();
            if self.tunnels.direct_allowed(&env.id, now) {
                let connect = TcpStream::connect((address, port));
                match tokio::time::timeout(DIRECT_CONNECT_TIMEOUT, connect).await {
                    Ok(Ok(stream)) => {
                        // Small answers go out at once (see `without_nagle` in hearth-guest).
                        let _ = stream.set_nodelay(true);
                        return Ok((PortConnection::Direct(stream), permit));
                    }
                    // Listening on the guest's loopback only, or not at all: sshd says which.
                    Ok(Err(e)) if e.kind() == std::io::ErrorKind::ConnectionRefused => {}
                    Ok(Err(e)) => {
                        tracing::debug!(environment = %env.id, %address, error = %e, "no direct connection to the guest; through its sshd");
                    }
                    Err(_) => {
                        tracing::info!(environment = %env.id, %address, "a direct connection to the guest timed out; the proxy goes through its sshd for 10 minutes");
                        self.tunnels.forbid_direct(&env.id, now);
                    }
                }
            }
        }
        let channel = self.channel_to(&env, port).await?;
        Ok((PortConnection::Tunnel(channel), permit))
    }

    async fn channel_to(&self, env: &Environment, port: u16) -> AppResult<TunnelChannel> {
        let target = self.target(env)?;
        self.ssh
            .open_tunnel(&target, port)
            .await
            .map_err(|e| match e {
                TunnelError::Refused(..) => AppError::Unavailable(e.to_string()),
                TunnelError::Guest(e) => {
                    AppError::Unavailable(format!("cannot reach the environment: {e}"))
                }
            })
    }

    /// Opens a connection to `127.0.0.1:port` in the caller's running environment.
    pub async fn open_tunnel(&self, user: &User, id_or_slug: &str, port: u16) -> AppResult<Tunnel> {
        if port == 0 {
            return Err(AppError::Invalid("port must be 1 to 65535".into()));
        }
        let env = self.owned_environment(user, id_or_slug).await?;
        let permit = take_permit(self, &user.id)?;
        running(&env)?;
        let channel = self.channel_to(&env, port).await?;
        Ok(Tunnel {
            activity: Activity::new(self, &env.id, "tunnel", permit).await,
            environment: env,
            port,
            channel,
        })
    }
}

/// Connections go only to a running environment.
fn running(env: &Environment) -> AppResult<()> {
    if env.state != EnvState::Running {
        return Err(AppError::InvalidState(format!(
            "the environment is {}; a connection to it needs it running",
            env.state
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_use_is_written_once_in_30_s_unless_its_kind_changes() {
        let t = Tunnels::default();
        assert!(t.record_due("e", "port", 0));
        assert!(!t.record_due("e", "port", 29_999));
        assert!(t.record_due("e", "tunnel", 29_999), "another kind of use");
        assert!(t.record_due("e", "port", 30_000));
        assert!(!t.record_due("e", "port", 59_999));
        assert!(t.record_due("e", "port", 60_000));
        assert!(t.record_due("f", "port", 60_000), "another environment");
    }

    #[test]
    fn a_direct_connection_is_tried_again_ten_minutes_after_it_timed_out() {
        let t = Tunnels::default();
        assert!(t.direct_allowed("e", 0));
        t.forbid_direct("e", 5);
        assert!(!t.direct_allowed("e", 5 + NO_DIRECT_MS - 1));
        assert!(t.direct_allowed("e", 5 + NO_DIRECT_MS));
        assert!(t.direct_allowed("f", 6), "another environment");
    }

    #[test]
    fn an_owner_is_remembered_by_id_and_slug_for_ten_minutes() {
        let t = Tunnels::default();
        t.remember_owner("env_abc", "env-1", "user-1", 0);
        let known = Some(("env-1".to_string(), "user-1".to_string()));
        assert_eq!(t.owner("env_abc", 1), known);
        assert_eq!(t.owner("env-1", OWNER_KNOWN_MS - 1), known);
        assert_eq!(t.owner("env-1", OWNER_KNOWN_MS), None);
        assert_eq!(t.owner("env_other", 1), None);
    }
}
