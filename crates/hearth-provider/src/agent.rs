//! Hosts of kind `agent`: machines running `hearth agent`, which runs VMs (QEMU today).
//! The control plane calls the agent's HTTPS API with the host's credential as a bearer
//! token, trusting only the certificate authority the agent presented when it joined
//! (pinned in the host's row): no other certificate is accepted, whatever the system trusts.
//!
//! `wire` holds the JSON both sides speak; the agent's server (`hearth-agent`) uses it too.

use crate::{
    HostFacts, HostRef, Provider, ProviderError, SnapshotMade, VmInfo, VmRef, VmSpec, VmState,
};
use async_trait::async_trait;
use hearth_core::HostKind;
use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

pub mod wire {
    use serde::{Deserialize, Serialize};
    use std::collections::BTreeMap;

    /// What an agent offers. The seed's defaults: 50 VMs, 16 vCPUs, 60,000 MB.
    #[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
    #[serde(rename_all = "camelCase")]
    pub struct Capacity {
        pub max_vms: i64,
        pub max_vcpus: i64,
        pub max_memory_mb: i64,
        pub max_disk_gb: i64,
    }

    #[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
    #[serde(rename_all = "camelCase")]
    pub struct Status {
        pub version: String,
        /// The VMM: `qemu` or `firecracker`.
        #[serde(default)]
        pub backend: String,
        /// `kvm` or `tcg`, as the agent found by booting a probe.
        pub accel: String,
        pub capacity: Capacity,
        pub vms: i64,
        pub running: i64,
    }

    #[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
    #[serde(rename_all = "camelCase", deny_unknown_fields)]
    pub struct CreateVm {
        pub name: String,
        pub environment_id: String,
        pub hostname: String,
        pub vcpus: i64,
        pub memory_mb: i64,
        pub disk_gb: i64,
        pub authorized_keys: String,
        #[serde(default)]
        pub labels: BTreeMap<String, String>,
        /// The snapshot (taken on this host) the VM's disk is made from; the image's if none.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        pub snapshot: Option<String>,
        /// The custom image (imported on this host) the VM's disk is made from, when no
        /// snapshot is; the host's image if none.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        pub image: Option<String>,
    }

    /// `POST /v1/snapshots`: save VM `vm`'s disk as snapshot `id`.
    #[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
    #[serde(rename_all = "camelCase", deny_unknown_fields)]
    pub struct TakeSnapshot {
        pub vm: String,
        pub id: String,
    }

    /// A snapshot an agent keeps.
    #[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
    #[serde(rename_all = "camelCase")]
    pub struct Snapshot {
        pub id: String,
        /// The bytes its files take on the host's disk (its disk's and its memory's).
        pub size_bytes: i64,
        /// The size of the disk it was taken of: a VM made from it needs at least this.
        pub disk_gb: i64,
        /// The bytes of its saved memory, part of `size_bytes` (0: it keeps the disk only).
        #[serde(default)]
        pub memory_bytes: i64,
    }

    #[derive(Debug, Clone, Serialize, Deserialize)]
    #[serde(rename_all = "camelCase")]
    pub struct Snapshots {
        pub items: Vec<Snapshot>,
    }

    /// `DELETE /v1/snapshots/{id}`: whether its file is gone now (it stays while VMs made
    /// from it do, and the agent no longer lists it).
    #[derive(Debug, Clone, Serialize, Deserialize)]
    #[serde(rename_all = "camelCase")]
    pub struct SnapshotRemoved {
        pub removed: bool,
    }

    #[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
    #[serde(rename_all = "camelCase")]
    pub struct Vm {
        pub name: String,
        pub environment_id: String,
        /// `running`, `paused` or `stopped`.
        pub state: String,
        pub ssh_host: String,
        pub ssh_port: u16,
    }

    #[derive(Debug, Clone, Serialize, Deserialize)]
    #[serde(rename_all = "camelCase")]
    pub struct Vms {
        pub items: Vec<Vm>,
    }

    /// Sent by an agent to the control plane, once, with a join token.
    #[derive(Debug, Clone, Serialize, Deserialize)]
    #[serde(rename_all = "camelCase", deny_unknown_fields)]
    pub struct JoinRequest {
        pub token: String,
        /// `https://host:port` where the control plane reaches the agent.
        pub endpoint: String,
        /// The agent's certificate authority (PEM): the only one trusted for it.
        pub certificate: String,
        /// Where guests' SSH ports answer.
        pub guest_address: String,
        pub capacity: Capacity,
        pub version: String,
    }

    #[derive(Debug, Clone, Serialize, Deserialize)]
    #[serde(rename_all = "camelCase")]
    pub struct JoinResponse {
        pub host_id: String,
        pub host_name: String,
        /// The bearer credential the control plane will present; the agent keeps it 0600.
        pub credential: String,
    }
}

/// How long a call to an agent may take (a create returns once QEMU runs, not once it booted).
const REQUEST_TIMEOUT: Duration = Duration::from_secs(60);
/// How long taking a snapshot may take on the agent: its copy of the VM's disk (the control
/// plane gives a take 10 minutes in all).
const SNAPSHOT_TIMEOUT: Duration = Duration::from_secs(590);
/// How long an agent may take to receive an image's file system and make a disk of it.
const IMPORT_TIMEOUT: Duration = Duration::from_secs(900);

pub struct AgentProvider {
    /// One client per host, remade when its pinned certificate changes.
    clients: Mutex<HashMap<String, (String, reqwest::Client)>>,
}

impl Default for AgentProvider {
    fn default() -> Self {
        Self::new()
    }
}

impl AgentProvider {
    pub fn new() -> AgentProvider {
        AgentProvider {
            clients: Mutex::new(HashMap::new()),
        }
    }

    fn client(&self, host: &HostRef) -> Result<(reqwest::Client, String), ProviderError> {
        let Some(access) = &host.agent else {
            return Err(ProviderError::Failed(format!(
                "host {} has no agent credential; join the agent again",
                host.name
            )));
        };
        if let Some((pem, client)) = self.clients.lock().unwrap().get(&host.id)
            && *pem == access.ca_pem
        {
            return Ok((client.clone(), access.credential.clone()));
        }
        let ca = reqwest::Certificate::from_pem(access.ca_pem.as_bytes()).map_err(|e| {
            ProviderError::Failed(format!(
                "host {}: its pinned certificate is unreadable: {e}",
                host.name
            ))
        })?;
        let client = reqwest::Client::builder()
            .tls_built_in_root_certs(false)
            .add_root_certificate(ca)
            .https_only(true)
            .timeout(REQUEST_TIMEOUT)
            .connect_timeout(Duration::from_secs(5))
            .build()
            .map_err(|e| ProviderError::Failed(format!("host {}: {e}", host.name)))?;
        self.clients
            .lock()
            .unwrap()
            .insert(host.id.clone(), (access.ca_pem.clone(), client.clone()));
        Ok((client, access.credential.clone()))
    }

    /// One call; `None` for a 404. Connection failures mean the agent is down.
    async fn call<T: serde::de::DeserializeOwned>(
        &self,
        host: &HostRef,
        method: reqwest::Method,
        path: &str,
        body: Option<serde_json::Value>,
    ) -> Result<Option<T>, ProviderError> {
        self.call_within(host, method, path, body, REQUEST_TIMEOUT)
            .await
    }

    /// `call` that may take up to `timeout` (a snapshot's copy takes longer than a call).
    async fn call_within<T: serde::de::DeserializeOwned>(
        &self,
        host: &HostRef,
        method: reqwest::Method,
        path: &str,
        body: Option<serde_json::Value>,
        timeout: Duration,
    ) -> Result<Option<T>, ProviderError> {
        let mut request = self.request(host, method, path, timeout)?;
        if let Some(body) = body {
            request = request.json(&body);
        }
        self.send(host, request).await
    }

    fn request(
        &self,
        host: &HostRef,
        method: reqwest::Method,
        path: &str,
        timeout: Duration,
    ) -> Result<reqwest::RequestBuilder, ProviderError> {
        let (client, credential) = self.client(host)?;
        Ok(client
            .request(
                method,
                format!("{}{path}", host.endpoint.trim_end_matches('/')),
            )
            .timeout(timeout)
            .bearer_auth(credential))
    }

    async fn send<T: serde::de::DeserializeOwned>(
        &self,
        host: &HostRef,
        request: reqwest::RequestBuilder,
    ) -> Result<Option<T>, ProviderError> {
        let response = request.send().await.map_err(|e| {
            ProviderError::Unavailable(format!(
                "cannot reach the agent of host {} at {}: {e}",
                host.name, host.endpoint
            ))
        })?;
        let status = response.status();
        if status == reqwest::StatusCode::NOT_FOUND {
            return Ok(None);
        }
        if !status.is_success() {
            let text = response.text().await.unwrap_or_default();
            let message = serde_json::from_str::<serde_json::Value>(&text)
                .ok()
                .and_then(|v| v["error"]["message"].as_str().map(str::to_string))
                .unwrap_or(text);
            // Busy now, or no room now: another time may do.
            if matches!(
                status,
                reqwest::StatusCode::TOO_MANY_REQUESTS | reqwest::StatusCode::INSUFFICIENT_STORAGE
            ) {
                return Err(ProviderError::Unavailable(format!(
                    "the agent of host {}: {message}",
                    host.name
                )));
            }
            return Err(ProviderError::Failed(format!(
                "the agent of host {} refused ({status}): {message}",
                host.name
            )));
        }
        if status == reqwest::StatusCode::NO_CONTENT {
            return Ok(serde_json::from_value(serde_json::Value::Null).ok());
        }
        let value = response.json::<T>().await.map_err(|e| {
            ProviderError::Failed(format!(
                "the agent of host {} answered something unreadable: {e}",
                host.name
            ))
        })?;
        Ok(Some(value))
    }

    pub async fn status(&self, host: &HostRef) -> Result<wire::Status, ProviderError> {
        self.call(host, reqwest::Method::GET, "/v1/status", None)
            .await?
            .ok_or_else(|| {
                ProviderError::Failed(format!("host {}: the agent has no status", host.name))
            })
    }
}

/// Whether an agent answers `GET /healthz` at `endpoint` over TLS with a certificate from
/// `ca_pem` (and nothing else): what an agent that asks to join must show.
pub async fn healthz(endpoint: &str, ca_pem: &str) -> Result<(), String> {
    let ca = reqwest::Certificate::from_pem(ca_pem.as_bytes())
        .map_err(|e| format!("the certificate is unreadable: {e}"))?;
    let client = reqwest::Client::builder()
        .tls_built_in_root_certs(false)
        .add_root_certificate(ca)
        .https_only(true)
        .timeout(Duration::from_secs(10))
        .build()
        .map_err(|e| e.to_string())?;
    let response = client
        .get(format!("{}/healthz", endpoint.trim_end_matches('/')))
        .send()
        .await
        .map_err(|e| {
            let mut text = e.to_string();
            let mut source = std::error::Error::source(&e);
            while let Some(s) = source {
                text.push_str(&format!(": {s}"));
                source = s.source();
            }
            text
        })?;
    if response.status().is_success() {
        Ok(())
    } else {
        Err(format!("it answered {}", response.status()))
    }
}

/// The id on the agent of custom image `reference` (`hearth-image:<id>`, the control
/// plane's name for it on every kind of host); `None` for any other image.
fn custom_image_id(reference: &str) -> Option<&str> {
    reference
        .strip_prefix(crate::docker::IMAGE_REPOSITORY)
        .and_then(|rest| rest.strip_prefix(':'))
}

/// What a VM made from snapshot `id` is created from: the name the control plane records
/// as the snapshot's image, the form a Docker snapshot's image has.
fn snapshot_image(id: &str) -> String {
    format!("{}:{id}", crate::docker::SNAPSHOT_REPOSITORY)
}

/// The snapshot an image name (`snapshot_image`) stands for; `None` for the host's image.
fn snapshot_id(image: &str) -> Option<&str> {
    image
        .strip_prefix(crate::docker::SNAPSHOT_REPOSITORY)
        .and_then(|rest| rest.strip_prefix(':'))
}

fn made(snapshot: wire::Snapshot) -> SnapshotMade {
    SnapshotMade {
        image: snapshot_image(&snapshot.id),
        size_bytes: snapshot.size_bytes,
        memory_bytes: snapshot.memory_bytes,
    }
}

fn info(vm: wire::Vm) -> VmInfo {
    let state = match vm.state.as_str() {
        "running" => VmState::Running,
        "stopped" => VmState::Stopped,
        _ => VmState::Other,
    };
    VmInfo {
        vm: VmRef {
            name: vm.name,
            id: None,
        },
        environment_id: vm.environment_id,
        state,
        ssh_host: Some(vm.ssh_host),
        ssh_port: Some(vm.ssh_port as i64),
        ip_address: None,
    }
}

/// The fingerprint of a PEM certificate: the host's identity (one agent, one certificate
/// authority, made when its state directory was).
pub fn fingerprint(pem: &str) -> String {
    use sha2::Digest;
    let body: String = pem.lines().filter(|l| !l.starts_with("-----")).collect();
    hex::encode(&sha2::Sha256::digest(body.as_bytes())[..16])
}

#[async_trait]
impl Provider for AgentProvider {
    fn kind(&self) -> HostKind {
        HostKind::Agent
    }

    async fn check(&self, host: &HostRef) -> Result<HostFacts, ProviderError> {
        let status = self.status(host).await?;
        let identity = host
            .agent
            .as_ref()
            .map(|a| format!("agent:{}", fingerprint(&a.ca_pem)));
        Ok(HostFacts {
            identity,
            report: Some(serde_json::to_value(status).expect("serializable")),
            capacity: None,
        })
    }

    async fn ensure_created(&self, host: &HostRef, spec: &VmSpec) -> Result<VmRef, ProviderError> {
        let body = wire::CreateVm {
            name: spec.name.clone(),
            environment_id: spec.environment_id.clone(),
            hostname: spec.hostname.clone(),
            vcpus: spec.vcpus,
            memory_mb: spec.memory_mb,
            disk_gb: spec.disk_gb,
            authorized_keys: spec.authorized_key.clone(),
            labels: spec.labels.clone(),
            snapshot: snapshot_id(&spec.image).map(str::to_string),
            image: custom_image_id(&spec.image).map(str::to_string),
        };
        let vm: wire::Vm = self
            .call(
                host,
                reqwest::Method::POST,
                "/v1/vms",
                Some(serde_json::to_value(body).expect("serializable")),
            )
            .await?
            .ok_or_else(|| {
                ProviderError::Failed(format!("host {}: the agent made no VM", host.name))
            })?;
        Ok(VmRef {
            name: vm.name,
            id: None,
        })
    }

    async fn start(&self, host: &HostRef, vm: &VmRef) -> Result<(), ProviderError> {
        let done: Option<wire::Vm> = self
            .call(
                host,
                reqwest::Method::POST,
                &format!("/v1/vms/{}/start", vm.name),
                None,
            )
            .await?;
        done.map(|_| ())
            .ok_or_else(|| ProviderError::NotFound(vm.name.clone()))
    }

    async fn stop(&self, host: &HostRef, vm: &VmRef) -> Result<(), ProviderError> {
        let done: Option<wire::Vm> = self
            .call(
                host,
                reqwest::Method::POST,
                &format!("/v1/vms/{}/stop", vm.name),
                None,
            )
            .await?;
        done.map(|_| ())
            .ok_or_else(|| ProviderError::NotFound(vm.name.clone()))
    }

    async fn destroy(&self, host: &HostRef, vm: &VmRef) -> Result<(), ProviderError> {
        let _: Option<serde_json::Value> = self
            .call(
                host,
                reqwest::Method::DELETE,
                &format!("/v1/vms/{}", vm.name),
                None,
            )
            .await?;
        Ok(())
    }

    async fn inspect(&self, host: &HostRef, vm: &VmRef) -> Result<Option<VmInfo>, ProviderError> {
        let found: Option<wire::Vm> = self
            .call(
                host,
                reqwest::Method::GET,
                &format!("/v1/vms/{}", vm.name),
                None,
            )
            .await?;
        Ok(found.map(info))
    }

    async fn list(&self, host: &HostRef) -> Result<Vec<VmInfo>, ProviderError> {
        let vms: wire::Vms = self
            .call(host, reqwest::Method::GET, "/v1/vms", None)
            .await?
            .ok_or_else(|| {
                ProviderError::Failed(format!("host {}: the agent lists no VMs", host.name))
            })?;
        Ok(vms.items.into_iter().map(info).collect())
    }

    /// The agent copies the VM's disk whole (a running VM paused meanwhile); memory is
    /// not kept.
    async fn snapshot(
        &self,
        host: &HostRef,
        vm: &VmRef,
        snapshot_id: &str,
    ) -> Result<SnapshotMade, ProviderError> {
        let body = wire::TakeSnapshot {
            vm: vm.name.clone(),
            id: snapshot_id.to_string(),
        };
        let taken: wire::Snapshot = self
            .call_within(
                host,
                reqwest::Method::POST,
                "/v1/snapshots",
                Some(serde_json::to_value(body).expect("serializable")),
                SNAPSHOT_TIMEOUT,
            )
            .await?
            .ok_or_else(|| ProviderError::NotFound(vm.name.clone()))?;
        Ok(made(taken))
    }

    async fn find_snapshot(
        &self,
        host: &HostRef,
        snapshot_id: &str,
    ) -> Result<Option<SnapshotMade>, ProviderError> {
        let found: Option<wire::Snapshot> = self
            .call(
                host,
                reqwest::Method::GET,
                &format!("/v1/snapshots/{snapshot_id}"),
                None,
            )
            .await?;
        Ok(found.map(made))
    }

    /// An agent's labelled images are its snapshots (`hearth.snapshot`), named by id, and
    /// its custom images (`hearth.image`), named by reference.
    async fn labelled_images(
        &self,
        host: &HostRef,
        label: &str,
    ) -> Result<Vec<(String, String)>, ProviderError> {
        let (path, name): (&str, fn(&str) -> String) = match label {
            crate::docker::LABEL_SNAPSHOT => ("/v1/snapshots", str::to_string),
            crate::docker::LABEL_IMAGE => ("/v1/images", |id| {
                format!("{}:{id}", crate::docker::IMAGE_REPOSITORY)
            }),
            _ => return Ok(Vec::new()),
        };
        let kept: wire::Snapshots = self
            .call(host, reqwest::Method::GET, path, None)
            .await?
            .ok_or_else(|| {
                ProviderError::Failed(format!("host {}: the agent lists no {path}", host.name))
            })?;
        Ok(kept
            .items
            .into_iter()
            .map(|s| (s.id.clone(), name(&s.id)))
            .collect())
    }

    /// Deletes the snapshot (an id) or custom image (a reference): the agent no longer
    /// offers it, and removes its file once no VM is made from it (true when that happened
    /// now).
    async fn remove_unused_image(
        &self,
        host: &HostRef,
        image_id: &str,
    ) -> Result<bool, ProviderError> {
        let path = match custom_image_id(image_id) {
            Some(id) => format!("/v1/images/{id}"),
            None => format!("/v1/snapshots/{image_id}"),
        };
        let removed: Option<wire::SnapshotRemoved> = self
            .call(host, reqwest::Method::DELETE, &path, None)
            .await?;
        Ok(removed.is_none_or(|r| r.removed))
    }

    /// Sends the file system in `tarball` (`Provider::export_image`'s, of an image built
    /// `FROM hearth/base`) to the agent, which makes a VM's root file system of it.
    async fn import_image(
        &self,
        host: &HostRef,
        reference: &str,
        tarball: &std::path::Path,
    ) -> Result<crate::ImageMade, ProviderError> {
        let id = custom_image_id(reference)
            .ok_or_else(|| ProviderError::Failed(format!("{reference} names no custom image")))?;
        let file = tokio::fs::File::open(tarball)
            .await
            .map_err(|e| ProviderError::Failed(format!("reading the image's file system: {e}")))?;
        let length = file
            .metadata()
            .await
            .map_err(|e| ProviderError::Failed(format!("reading the image's file system: {e}")))?
            .len();
        let request = self
            .request(
                host,
                reqwest::Method::PUT,
                &format!("/v1/images/{id}"),
                IMPORT_TIMEOUT,
            )?
            .header(reqwest::header::CONTENT_LENGTH, length)
            .body(reqwest::Body::wrap_stream(
                tokio_util::io::ReaderStream::with_capacity(file, 1 << 20),
            ));
        let made: wire::Snapshot = self.send(host, request).await?.ok_or_else(|| {
            ProviderError::Failed(format!("host {}: the agent made no image", host.name))
        })?;
        Ok(crate::ImageMade {
            size_bytes: made.size_bytes,
            min_disk_gb: Some(made.disk_gb),
        })
    }

    async fn remove_image(&self, host: &HostRef, reference: &str) -> Result<(), ProviderError> {
        self.remove_unused_image(host, reference).await.map(|_| ())
    }

    async fn remove_snapshot(
        &self,
        host: &HostRef,
        snapshot_id: &str,
    ) -> Result<(), ProviderError> {
        self.remove_unused_image(host, snapshot_id)
            .await
            .map(|_| ())
    }
}
