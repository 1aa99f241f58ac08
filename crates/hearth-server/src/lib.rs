//! The control plane process (`hearth serve`): the HTTP API, the job handlers that turn
//! requests into VMs, and start-up (database, master key, first admin).
//!
//! Handlers in `api` are thin; the rules live in `service` (what a request may do) and
//! `jobs` (the provisioning and control steps, each with its undo).

pub mod api;
pub mod bus;
pub mod config;
pub mod error;
pub mod events;
pub mod jobs;
pub mod reaper;
pub mod service;
pub mod views;

use hearth_guest::{MasterKey, SshPool};
use hearth_provider::Provider;
use hearth_queue::Queue;
use hearth_store::Store;
use std::sync::Arc;

pub use config::Config;

/// Everything a request or a job needs, cheap to clone.
#[derive(Clone)]
pub struct App {
    pub store: Store,
    pub queue: Queue,
    pub provider: Arc<dyn Provider>,
    pub ssh: SshPool,
    pub master_key: MasterKey,
    pub config: Arc<Config>,
    /// Woken when a state change or log line is written (event streams wait on it).
    pub changed: Arc<tokio::sync::Notify>,
    pub bus: bus::Bus,
    pub hub: Arc<events::Hub>,
}

impl App {
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
}

pub mod serve;
