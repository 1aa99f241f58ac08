//! Where VMs come from. A provider drives one kind of host (a Docker engine, an agent, a
//! cloud project, a simulated host); every call names the host (`HostRef`, built from its
//! row) and the VM (`VmRef`), so any node can act on any host.
//!
//! Architecture invariant: providers know nothing of the database, users or quotas. They
//! take a spec and return facts. Every VM carries a deterministic name derived from its
//! environment id and is labelled with the installation's id, so a retried create finds
//! the first attempt's VM and an installation only ever sees its own VMs.

pub mod agent;
pub mod docker;
pub mod image;
pub mod ovh;
pub mod sim;

use async_trait::async_trait;
use hearth_core::HostKind;
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

/// The host a call is about, as a provider needs it.
#[derive(Debug, Clone)]
pub struct HostRef {
    pub id: String,
    pub name: String,
    pub kind: HostKind,
    /// `unix:///path`, `tcp://host:port`, `ssh://user@host[:port]`, `sim://name`.
    pub endpoint: String,
    /// Where guests answer, from the nodes.
    pub guest_address: String,
    /// For `tcp://` Docker endpoints: PEM text, the key already unsealed.
    pub tls: Option<TlsMaterial>,
    /// For `agent` hosts: the certificate authority pinned at join and the credential.
    pub agent: Option<AgentAccess>,
    /// For `ovh` hosts: the API credentials, unsealed.
    pub ovh: Option<ovh::client::Credentials>,
    /// The host's region (an OVH host's region is where its instances go).
    pub region: Option<String>,
    /// Kind-specific settings (a simulated host's latency and faults).
    pub options: serde_json::Value,
    /// The installation whose VMs a call may see and touch; no other's.
    pub installation_id: String,
}

#[derive(Clone)]
pub struct AgentAccess {
    pub ca_pem: String,
    /// The bearer credential, unsealed.
    pub credential: String,
}

impl std::fmt::Debug for AgentAccess {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("AgentAccess { .. }")
    }
}

#[derive(Clone)]
pub struct TlsMaterial {
    pub ca_pem: String,
    pub cert_pem: String,
    pub key_pem: String,
}

impl std::fmt::Debug for TlsMaterial {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("TlsMaterial { .. }")
    }
}

/// A VM on a host: the deterministic name the control plane gave it and, once it exists,
/// the provider's own id. Either finds it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmRef {
    pub name: String,
    pub id: Option<String>,
}

impl VmRef {
    /// The reference of an environment's VM before it exists: its name only.
    pub fn named(environment_id: &str) -> VmRef {
        VmRef {
            name: vm_name(environment_id),
            id: None,
        }
    }

    /// What to ask the provider for: its id when known, else the name.
    pub fn key(&self) -> &str {
        self.id.as_deref().unwrap_or(&self.name)
    }
}

/// `hearth-<environment id>`: the same on every attempt, so a retry finds the VM.
pub fn vm_name(environment_id: &str) -> String {
    format!("hearth-{environment_id}")
}

/// Labels every VM carries.
pub const LABEL_MANAGED: &str = "hearth.managed";
pub const LABEL_INSTALLATION: &str = "hearth.installation";
pub const LABEL_ENVIRONMENT: &str = "hearth.environment";

/// What to create.
#[derive(Debug, Clone)]
pub struct VmSpec {
    pub environment_id: String,
    pub name: String,
    /// The guest's hostname (the environment's slug, so a prompt says where it is).
    pub hostname: String,
    pub image: String,
    pub vcpus: i64,
    pub memory_mb: i64,
    pub disk_gb: i64,
    pub gpus: i64,
    /// Handed to the VM as data, never through a shell.
    pub env: BTreeMap<String, String>,
    /// The OpenSSH public keys the guest's `dev` user accepts.
    pub authorized_key: String,
    /// Extra labels for people (the installation's display name).
    pub labels: BTreeMap<String, String>,
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
    pub vm: VmRef,
    pub environment_id: String,
    pub state: VmState,
    /// Where SSH answers, from the control plane's point of view.
    pub ssh_host: Option<String>,
    pub ssh_port: Option<i64>,
    pub ip_address: Option<String>,
}

/// A snapshot of a VM's disk as its host keeps it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SnapshotMade {
    /// What a new VM is created from (on Docker, the committed image's name).
    pub image: String,
    pub size_bytes: i64,
    /// The part of `size_bytes` that is the VM's saved memory (0: the disk only).
    pub memory_bytes: i64,
}

/// A custom image as its host keeps it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ImageMade {
    pub size_bytes: i64,
    /// The smallest disk a VM of it may have (an agent's image is a file system of a
    /// size); `None`: any.
    pub min_disk_gb: Option<i64>,
}

/// What a host says of itself when checked.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct HostFacts {
    /// A stable id of the machine (a Docker engine's ID), so one machine is never
    /// registered as two hosts; `None` for kinds that cannot say.
    pub identity: Option<String>,
    /// What the host says of itself, to be shown to admins (an agent: its version,
    /// accelerator, capacity and VMs); `None` for kinds that say nothing more.
    pub report: Option<serde_json::Value>,
    /// What the host may hold, for kinds that say (an OVH project's quota in its region);
    /// `None` keeps what the admin set.
    pub capacity: Option<HostCapacityFacts>,
}

/// A host's capacity as the host states it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct HostCapacityFacts {
    pub vcpus: i64,
    pub memory_mb: i64,
    pub environments: i64,
}

/// A size a host offers (an OVH flavor), for `/v1/flavors`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OfferedFlavor {
    pub id: String,
    pub name: String,
    /// What kind of size it is ("General Purpose", "GPU", ...).
    pub type_label: String,
    pub region: String,
    pub vcpus: i64,
    pub memory_mb: i64,
    pub disk_gb: i64,
    pub gpus: i64,
    pub gpu_model: Option<String>,
}

#[derive(Debug, Clone, thiserror::Error)]
pub enum ProviderError {
    /// The host (Docker engine, agent, cloud API) cannot be reached at all.
    #[error("{0}")]
    Unavailable(String),
    #[error("no VM {0} on the host")]
    NotFound(String),
    /// The host answered but refused or failed the request.
    #[error("{0}")]
    Failed(String),
    /// This build or this host cannot do it (a kind with no provider yet, say).
    #[error("{0}")]
    Unsupported(String),
}

#[async_trait]
pub trait Provider: Send + Sync + 'static {
    fn kind(&self) -> HostKind;

    /// Is the host reachable, and which machine is it? The error says how to fix it.
    async fn check(&self, host: &HostRef) -> Result<HostFacts, ProviderError>;

    /// Creates the VM and sets it going, or finds the one an earlier attempt made (by
    /// name). Returns as soon as the VM exists, which may be before it is running.
    async fn ensure_created(&self, host: &HostRef, spec: &VmSpec) -> Result<VmRef, ProviderError>;

    /// Starts a stopped VM; `NotFound` when it is gone.
    async fn start(&self, host: &HostRef, vm: &VmRef) -> Result<(), ProviderError>;

    /// Stops a VM; `NotFound` when it is gone.
    async fn stop(&self, host: &HostRef, vm: &VmRef) -> Result<(), ProviderError>;

    /// Removes the VM; a VM that is already gone counts as removed.
    async fn destroy(&self, host: &HostRef, vm: &VmRef) -> Result<(), ProviderError>;

    /// The VM as it is now, or `None` when it does not exist.
    async fn inspect(&self, host: &HostRef, vm: &VmRef) -> Result<Option<VmInfo>, ProviderError>;

    /// Every VM of this installation on the host, for the reconciler.
    async fn list(&self, host: &HostRef) -> Result<Vec<VmInfo>, ProviderError>;

    /// Saves the VM's disk as snapshot `snapshot_id` (or finds the one an earlier try
    /// made). Memory is not kept. Kinds that cannot say so.
    async fn snapshot(
        &self,
        host: &HostRef,
        _vm: &VmRef,
        _snapshot_id: &str,
    ) -> Result<SnapshotMade, ProviderError> {
        Err(ProviderError::Unsupported(format!(
            "hosts of kind {} take no snapshots yet",
            host.kind
        )))
    }

    /// The snapshot if the host has it (a taker that died may have finished it).
    async fn find_snapshot(
        &self,
        _host: &HostRef,
        _snapshot_id: &str,
    ) -> Result<Option<SnapshotMade>, ProviderError> {
        Ok(None)
    }

    /// This installation's images on the host that carry `label` (`hearth.snapshot`,
    /// `hearth.image`), as (the label's value, the engine's image id), untagged ones too: to
    /// find those whose record is gone.
    async fn labelled_images(
        &self,
        _host: &HostRef,
        _label: &str,
    ) -> Result<Vec<(String, String)>, ProviderError> {
        Ok(Vec::new())
    }

    /// Removes an image by the engine's id unless a VM still uses it; true when it is gone.
    async fn remove_unused_image(
        &self,
        _host: &HostRef,
        _image_id: &str,
    ) -> Result<bool, ProviderError> {
        Ok(true)
    }

    /// Removes the snapshot; one already gone counts as removed. VMs made from it keep
    /// running (their host keeps what they use until they go).
    async fn remove_snapshot(
        &self,
        _host: &HostRef,
        _snapshot_id: &str,
    ) -> Result<(), ProviderError> {
        Ok(())
    }

    /// Builds image `reference` from a Dockerfile alone (no other files), labelled as
    /// this installation's; returns its size in bytes. The error carries the build's last
    /// lines. Kinds that cannot say so.
    async fn build_image(
        &self,
        host: &HostRef,
        _reference: &str,
        _dockerfile: &str,
    ) -> Result<i64, ProviderError> {
        Err(ProviderError::Unsupported(format!(
            "hosts of kind {} build no images yet",
            host.kind
        )))
    }

    /// Loads the image in the tarball at `tarball` as image `reference`, labelled as this
    /// installation's as `build_image` does; returns its size in bytes. Docker takes a
    /// `docker save` tarball; an agent host a file system (`export_image`'s).
    /// It never takes the names the tarball gives. The error says what is wrong with the
    /// tarball. Kinds that cannot say so.
    async fn import_image(
        &self,
        host: &HostRef,
        _reference: &str,
        _tarball: &std::path::Path,
    ) -> Result<ImageMade, ProviderError> {
        Err(ProviderError::Unsupported(format!(
            "hosts of kind {} import no images yet",
            host.kind
        )))
    }

    /// Writes the file system a VM of image `reference` starts with as a tarball at `to`
    /// (what an agent host makes a custom image's root file system of), refused past
    /// `max_bytes`; returns its length. Kinds that cannot say so.
    async fn export_image(
        &self,
        host: &HostRef,
        _reference: &str,
        _to: &std::path::Path,
        _max_bytes: u64,
    ) -> Result<u64, ProviderError> {
        Err(ProviderError::Unsupported(format!(
            "hosts of kind {} export no images",
            host.kind
        )))
    }

    /// Removes an image this installation built; one already gone counts as removed.
    async fn remove_image(&self, _host: &HostRef, _reference: &str) -> Result<(), ProviderError> {
        Ok(())
    }

    /// The sizes this host offers beyond the tiers' (an OVH region's flavors); none by
    /// default.
    async fn flavors(&self, _host: &HostRef) -> Result<Vec<OfferedFlavor>, ProviderError> {
        Ok(Vec::new())
    }

    /// A named point in a job (`provision.create_vm`, ...) where a simulated host injects
    /// latency or a failure. Real hosts pass straight through.
    async fn fault_point(&self, _host: &HostRef, _step: &str) -> Result<(), ProviderError> {
        Ok(())
    }
}

/// The provider for each kind of host.
#[derive(Clone, Default)]
pub struct Providers {
    by_kind: HashMap<HostKind, Arc<dyn Provider>>,
}

impl Providers {
    pub fn with(mut self, provider: Arc<dyn Provider>) -> Providers {
        self.by_kind.insert(provider.kind(), provider);
        self
    }

    pub fn get(&self, kind: HostKind) -> Result<Arc<dyn Provider>, ProviderError> {
        self.by_kind.get(&kind).cloned().ok_or_else(|| {
            ProviderError::Unsupported(format!(
                "hosts of kind {kind} are not supported by this version of Hearth yet"
            ))
        })
    }

    pub fn kinds(&self) -> Vec<HostKind> {
        let mut kinds: Vec<HostKind> = self.by_kind.keys().copied().collect();
        kinds.sort_by_key(|k| k.as_str());
        kinds
    }
}
