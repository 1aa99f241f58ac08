//! The application: what requests may do (`service`, `hosts`), the sagas that turn them
//! into VMs (`jobs`, `saga`), the background upkeep (`reaper`, `reconcile`, `health`), live
//! events (`events`, `bus`) and start-up (`start`).
//!
//! Architecture invariant: this crate knows no HTTP. It returns its own errors
//! (`AppError`), which only the HTTP crate turns into status codes; background workers
//! never see an HTTP error. Providers are looked up by a host's kind and every provider
//! call names the host, so any node can act on any host.

pub mod admin;
pub mod bus;
pub mod config;
pub mod demand;
pub mod error;
pub mod events;
pub mod files;
mod guest;
pub mod health;
pub mod hosts;
pub mod images;
pub mod jobs;
pub mod mail;
pub mod oidc;
pub mod pools;
pub mod previews;
pub mod reaper;
pub mod reconcile;
pub mod repositories;
mod saga;
pub mod service;
pub mod shares;
pub mod sign_in;
mod sim_ledger;
pub mod snapshots;
pub mod start;
pub mod tunnels;

#[cfg(test)]
mod tests;

pub use config::Config;
pub use error::{AppError, AppResult};

use hearth_guest::{MasterKey, SshPool};
use hearth_provider::sim::SimProvider;
use hearth_provider::{HostRef, Providers, TlsMaterial};
use hearth_queue::Queue;
use hearth_store::{Host, Store};
use std::sync::Arc;

/// Everything a request or a job needs, cheap to clone.
#[derive(Clone)]
pub struct App {
    pub store: Store,
    pub queue: Queue,
    pub providers: Providers,
    /// Also in `providers`; kept apart because its guests are reached through it, not SSH.
    pub sim: Arc<SimProvider>,
    /// Also in `providers`; kept apart because agent hosts are bought through it.
    pub ovh: Arc<hearth_provider::ovh::OvhProvider>,
    pub ssh: SshPool,
    pub master_key: MasterKey,
    /// This installation's id: every VM carries it, and nothing else is ever touched.
    pub installation_id: String,
    pub config: Arc<Config>,
    /// Woken when a state change or log line is written (event streams wait on it).
    pub changed: Arc<tokio::sync::Notify>,
    pub bus: bus::Bus,
    pub hub: Arc<events::Hub>,
    /// What the reconciler found on its last pass, to act on when found again.
    pub suspects: Arc<reconcile::Suspects>,
    /// Commands by mail, when `HEARTH_MAIL_ADDRESS` is set.
    pub mail: Option<Arc<mail::MailService>>,
    /// Woken when a pool changed or a warm VM was claimed, so it refills at once.
    pub pools_wake: Arc<tokio::sync::Notify>,
    /// Connections into guests open on this node, per user (bounded).
    pub tunnels: Arc<tunnels::Tunnels>,
}

impl App {
    /// Now, by the store's clock.
    pub fn now(&self) -> i64 {
        self.store.now()
    }

    /// Tells event streams, here and (through Redis) on other nodes, to look again now.
    pub fn notify_changed(&self, environment_id: &str) {
        self.notify_changed_locally();
        self.bus.publish(bus::CHANGED, environment_id.to_string());
    }

    pub fn notify_changed_locally(&self) {
        self.hub.bump();
        self.changed.notify_waiters();
    }

    /// Wakes the workers of `queue` here and, through Redis, on every other node.
    pub fn wake(&self, queue: &str) {
        self.queue.wake(queue);
        self.bus.publish(bus::WAKE, queue.to_string());
    }

    /// What a provider needs to know of a host, its TLS key unsealed.
    pub fn host_ref(&self, host: &Host) -> AppResult<HostRef> {
        let tls = match (&host.tls_ca, &host.tls_cert, &host.tls_key_sealed) {
            (Some(ca), Some(cert), Some(key)) => Some(TlsMaterial {
                ca_pem: ca.clone(),
                cert_pem: cert.clone(),
                key_pem: self.master_key.open(key).map_err(|e| {
                    AppError::Internal(format!(
                        "the TLS key of host {} cannot be opened: {e}",
                        host.name
                    ))
                })?,
            }),
            _ => None,
        };
        let agent = match (host.kind, &host.tls_ca, &host.credential_sealed) {
            (hearth_core::HostKind::Agent, Some(ca), Some(sealed)) => {
                Some(hearth_provider::AgentAccess {
                    ca_pem: ca.clone(),
                    credential: self.master_key.open(sealed).map_err(|e| {
                        AppError::Internal(format!(
                            "the credential of host {} cannot be opened: {e}",
                            host.name
                        ))
                    })?,
                })
            }
            _ => None,
        };
        let ovh = match (host.kind, &host.credential_sealed) {
            (hearth_core::HostKind::Ovh, Some(sealed)) => {
                let json = self.master_key.open(sealed).map_err(|e| {
                    AppError::Internal(format!(
                        "the OVH credentials of host {} cannot be opened: {e}",
                        host.name
                    ))
                })?;
                Some(serde_json::from_str(&json).map_err(|e| {
                    AppError::Internal(format!(
                        "the OVH credentials of host {} are unreadable: {e}",
                        host.name
                    ))
                })?)
            }
            _ => None,
        };
        Ok(HostRef {
            ovh,
            region: host.region.clone(),
            id: host.id.clone(),
            name: host.name.clone(),
            kind: host.kind,
            endpoint: host.endpoint.clone(),
            guest_address: host.guest_address.clone(),
            tls,
            agent,
            options: host.options.clone(),
            installation_id: self.installation_id.clone(),
        })
    }
}
pub use hearth_provider::agent::wire as agent_wire;
pub use hearth_provider::ovh::client::Credentials as OvhCredentials;
