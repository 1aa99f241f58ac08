//! Tunnels: TCP connections to a port inside an environment, opened by the guest's own
//! sshd on Hearth's kept SSH connection (`direct-tcpip`). The terminal-less ways in (SSH
//! through `hearth ssh --stdio`, `hearth port-forward`, the HTTP port proxy) all stand on
//! them, so no guest port is ever published to users.

use crate::{App, AppError, AppResult};
use hearth_core::EnvState;
use hearth_guest::{TunnelChannel, TunnelError};
use hearth_store::{Environment, User};
use std::collections::HashMap;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, Mutex};

/// Tunnels one user may hold open at once on one node (each is a channel on the
/// environment's SSH connection and a socket here).
pub const MAX_TUNNELS_PER_USER: usize = 64;

/// How often an open tunnel with traffic marks its environment active.
const ACTIVITY_EVERY_MS: i64 = 30_000;

/// Open tunnels per user on this node.
#[derive(Default)]
pub struct Tunnels {
    open: Mutex<HashMap<String, usize>>,
}

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
}

/// One of a user's open connections into environments (a tunnel, a file session); given
/// back when dropped.
pub(crate) struct Permit {
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
    last: AtomicI64,
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
        let now = app.now();
        let _ = app.store.touch_activity(environment_id, now, source).await;
        Activity(Arc::new(ActivityInner {
            app: app.clone(),
            environment_id: environment_id.to_string(),
            source,
            last: AtomicI64::new(now),
            _permit: permit,
        }))
    }

    /// Records activity now, unless it did within the last 30 s.
    pub async fn mark(&self) {
        let inner = &self.0;
        let now = inner.app.now();
        let last = inner.last.load(Ordering::Relaxed);
        if now - last >= ACTIVITY_EVERY_MS
            && inner
                .last
                .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
        {
            let _ = inner
                .app
                .store
                .touch_activity(&inner.environment_id, now, inner.source)
                .await;
        }
    }
}

impl App {
    /// Opens a connection to `127.0.0.1:port` in the caller's running environment.
    /// `source` names what uses it in the activity record (`tunnel`, `port`).
    pub async fn open_tunnel(
        &self,
        user: &User,
        id_or_slug: &str,
        port: u16,
        source: &'static str,
    ) -> AppResult<Tunnel> {
        if port == 0 {
            return Err(AppError::Invalid("port must be 1 to 65535".into()));
        }
        let env = self.owned_environment(user, id_or_slug).await?;
        let permit = take_permit(self, &user.id)?;
        self.tunnel_into(env, port, permit, source).await
    }

    /// Opens a connection for a visitor of a shared port (see `shares`), within the
    /// environment's own bound for visitors.
    pub(crate) async fn open_shared_tunnel(
        &self,
        env: Environment,
        port: u16,
    ) -> AppResult<Tunnel> {
        let permit = self
            .tunnels
            .take(&format!("shared:{}", env.id), MAX_SHARED_CONNECTIONS)
            .ok_or_else(|| {
                AppError::TooMany(format!(
                    "this shared port has {MAX_SHARED_CONNECTIONS} connections open; try again soon"
                ))
            })?;
        self.tunnel_into(env, port, permit, "shared port").await
    }

    async fn tunnel_into(
        &self,
        env: Environment,
        port: u16,
        permit: Permit,
        source: &'static str,
    ) -> AppResult<Tunnel> {
        if port == 0 {
            return Err(AppError::Invalid("port must be 1 to 65535".into()));
        }
        if env.state != EnvState::Running {
            return Err(AppError::InvalidState(format!(
                "the environment is {}; a connection to it needs it running",
                env.state
            )));
        }
        let target = self.target(&env)?;
        let channel = self
            .ssh
            .open_tunnel(&target, port)
            .await
            .map_err(|e| match e {
                TunnelError::Refused(..) => AppError::Unavailable(e.to_string()),
                TunnelError::Guest(e) => {
                    AppError::Unavailable(format!("cannot reach the environment: {e}"))
                }
            })?;
        Ok(Tunnel {
            activity: Activity::new(self, &env.id, source, permit).await,
            environment: env,
            port,
            channel,
        })
    }
}
