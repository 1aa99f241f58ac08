//! Where VMs come from. A provider takes a spec and returns facts; it knows nothing of
//! users or the database. Every VM carries a name and labels derived from its
//! environment id, so a retried create finds the first attempt's VM.

pub mod docker;
pub mod image;

use async_trait::async_trait;
use std::collections::BTreeMap;

/// What to create. `environment_id` is the key for every later call.
#[derive(Debug, Clone)]
pub struct VmSpec {
    pub environment_id: String,
    pub image: String,
    pub vcpus: i64,
    pub memory_mb: i64,
    pub disk_gb: i64,
    /// Handed to the VM as data, never through a shell.
    pub env: BTreeMap<String, String>,
    /// The OpenSSH public key the guest's `dev` user accepts.
    pub authorized_key: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VmState {
    Running,
    Stopped,
    /// Exists but neither running nor cleanly stopped (dead, restarting, paused...).
    Other,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VmInfo {
    pub environment_id: String,
    pub vm_id: String,
    pub state: VmState,
    /// Where SSH answers, from the control plane's point of view.
    pub ssh_host: Option<String>,
    pub ssh_port: Option<i64>,
    pub ip_address: Option<String>,
    pub memory_bytes: Option<i64>,
}

#[derive(Debug, thiserror::Error)]
pub enum ProviderError {
    /// The backend (Docker engine, agent, cloud API) cannot be reached at all.
    #[error("{0}")]
    Unavailable(String),
    #[error("no VM for environment {0}")]
    NotFound(String),
    /// The backend answered but refused or failed the request.
    #[error("{0}")]
    Failed(String),
}

#[async_trait]
pub trait Provider: Send + Sync + 'static {
    fn name(&self) -> &'static str;

    /// Is the backend reachable? The error says how to fix it.
    async fn check(&self) -> Result<(), ProviderError>;

    /// Creates (or finds, after a retry) the VM and starts it.
    async fn create(&self, spec: &VmSpec) -> Result<VmInfo, ProviderError>;

    /// Starts a stopped VM; returns its (possibly new) SSH address.
    async fn start(&self, environment_id: &str) -> Result<VmInfo, ProviderError>;

    async fn stop(&self, environment_id: &str) -> Result<(), ProviderError>;

    /// Removes the VM; a VM that is already gone counts as removed.
    async fn destroy(&self, environment_id: &str) -> Result<(), ProviderError>;

    async fn inspect(&self, environment_id: &str) -> Result<Option<VmInfo>, ProviderError>;

    /// Every VM this provider manages, for the reconciler.
    async fn list(&self) -> Result<Vec<VmInfo>, ProviderError>;
}
