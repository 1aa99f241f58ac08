//! The Docker provider: one container per environment, through the Engine API (bollard).
//!
//! Containers are named `hearth-<environment id>` and labelled `hearth.managed=true` and
//! `hearth.environment=<id>`. SSH is published on 127.0.0.1 with a port Docker picks, so
//! there is no port scanning and no race between two creates. Disk size is recorded but
//! not enforced: overlay2 has no per-container quota without an XFS backing store.

use crate::{Provider, ProviderError, VmInfo, VmSpec, VmState};
use async_trait::async_trait;
use bollard::Docker;
use bollard::errors::Error as DockerError;
use bollard::models::{ContainerCreateBody, ContainerStateStatusEnum, HostConfig, PortBinding};
use bollard::query_parameters::{
    CreateContainerOptions, InspectContainerOptions, ListContainersOptions, RemoveContainerOptions,
    StartContainerOptions, StopContainerOptions,
};
use std::collections::HashMap;

pub const LABEL_MANAGED: &str = "hearth.managed";
pub const LABEL_ENVIRONMENT: &str = "hearth.environment";
/// Which Hearth installation owns the container (`HEARTH_INSTANCE`, default `default`), so
/// two installations, or the tests, can share one Docker engine without touching each other.
pub const LABEL_INSTANCE: &str = "hearth.instance";
/// The guest's start-up script reads the authorized key from here.
pub const AUTHORIZED_KEYS_ENV: &str = "HEARTH_AUTHORIZED_KEYS";

pub struct DockerProvider {
    /// Connected on first use and kept, so Hearth can start before Docker does.
    docker: tokio::sync::Mutex<Option<Docker>>,
    instance: String,
    /// Seconds `docker stop` waits for sshd before killing it.
    stop_timeout: i32,
}

pub fn container_name(environment_id: &str) -> String {
    format!("hearth-{environment_id}")
}

fn instance_name() -> String {
    std::env::var("HEARTH_INSTANCE").ok().filter(|s| !s.is_empty()).unwrap_or_else(|| "default".into())
}

fn unavailable(e: DockerError) -> ProviderError {
    ProviderError::Unavailable(format!(
        "cannot reach the Docker engine ({e}); start it (for example `dockerd &` or `systemctl start docker`) \
         or point DOCKER_HOST at it"
    ))
}

/// Connection failures mean the engine is down; anything else is a refusal worth showing.
fn classify(e: DockerError) -> ProviderError {
    match e {
        DockerError::DockerResponseServerError { status_code, message } => {
            ProviderError::Failed(format!("Docker refused ({status_code}): {message}"))
        }
        DockerError::HyperResponseError { .. } | DockerError::IOError { .. } | DockerError::RequestTimeoutError => {
            unavailable(e)
        }
        other => ProviderError::Failed(other.to_string()),
    }
}

fn is_status(e: &DockerError, code: u16) -> bool {
    matches!(e, DockerError::DockerResponseServerError { status_code, .. } if *status_code == code)
}

impl Default for DockerProvider {
    fn default() -> Self {
        Self::new()
    }
}

impl DockerProvider {
    /// No I/O: the engine (`DOCKER_HOST` or the local socket) is reached on first use,
    /// with the API version negotiated so Debian's Docker 20.10 works.
    pub fn new() -> DockerProvider {
        DockerProvider { docker: tokio::sync::Mutex::new(None), instance: instance_name(), stop_timeout: 5 }
    }

    /// The engine client, connecting if this is the first use or the last attempt failed.
    pub async fn client(&self) -> Result<Docker, ProviderError> {
        let mut slot = self.docker.lock().await;
        if let Some(d) = slot.as_ref() {
            return Ok(d.clone());
        }
        let docker = Docker::connect_with_local_defaults().map_err(unavailable)?;
        let docker = docker.negotiate_version().await.map_err(unavailable)?;
        *slot = Some(docker.clone());
        Ok(docker)
    }

    async fn info_of(&self, environment_id: &str) -> Result<Option<VmInfo>, ProviderError> {
        self.inspect_named(&container_name(environment_id), environment_id).await
    }

    /// Inspects a container by name or id; `environment_id` is what it belongs to.
    async fn inspect_named(&self, name_or_id: &str, environment_id: &str) -> Result<Option<VmInfo>, ProviderError> {
        match self.client().await?.inspect_container(name_or_id, None::<InspectContainerOptions>).await {
            Ok(c) => {
                let state = match c.state.as_ref().and_then(|s| s.status) {
                    Some(ContainerStateStatusEnum::RUNNING) => VmState::Running,
                    Some(ContainerStateStatusEnum::EXITED) | Some(ContainerStateStatusEnum::CREATED) => VmState::Stopped,
                    _ => VmState::Other,
                };
                let ports = c.network_settings.as_ref().and_then(|n| n.ports.as_ref());
                let binding = ports
                    .and_then(|p| p.get("22/tcp"))
                    .and_then(|b| b.as_ref())
                    .and_then(|b| b.first());
                let ssh_port = binding.and_then(|b| b.host_port.as_deref()).and_then(|p| p.parse::<i64>().ok());
                let ip = c
                    .network_settings
                    .as_ref()
                    .and_then(|n| n.networks.as_ref())
                    .and_then(|n| n.values().find_map(|net| net.ip_address.clone()))
                    .filter(|ip| !ip.is_empty());
                Ok(Some(VmInfo {
                    environment_id: environment_id.to_string(),
                    vm_id: c.id.unwrap_or_default(),
                    state,
                    ssh_host: ssh_port.map(|_| "127.0.0.1".to_string()),
                    ssh_port,
                    ip_address: ip,
                    memory_bytes: c.host_config.and_then(|h| h.memory),
                }))
            }
            Err(e) if is_status(&e, 404) => Ok(None),
            Err(e) => Err(classify(e)),
        }
    }

    async fn start_existing(&self, environment_id: &str) -> Result<VmInfo, ProviderError> {
        match self.client().await?.start_container(&container_name(environment_id), None::<StartContainerOptions>).await {
            Ok(()) => {}
            Err(e) if is_status(&e, 304) => {} // already running
            Err(e) if is_status(&e, 404) => return Err(ProviderError::NotFound(environment_id.to_string())),
            Err(e) => return Err(classify(e)),
        }
        let info = self.info_of(environment_id).await?.ok_or_else(|| ProviderError::NotFound(environment_id.to_string()))?;
        if info.state != VmState::Running || info.ssh_port.is_none() {
            return Err(ProviderError::Failed(format!(
                "container {} did not stay running (state {:?}); see `docker logs {}`",
                container_name(environment_id),
                info.state,
                container_name(environment_id)
            )));
        }
        Ok(info)
    }
}

#[async_trait]
impl Provider for DockerProvider {
    fn name(&self) -> &'static str {
        "docker"
    }

    async fn check(&self) -> Result<(), ProviderError> {
        self.client().await?.ping().await.map(|_| ()).map_err(unavailable)
    }

    async fn create(&self, spec: &VmSpec) -> Result<VmInfo, ProviderError> {
        if self.info_of(&spec.environment_id).await?.is_none() {
            let mut env: Vec<String> = spec.env.iter().map(|(k, v)| format!("{k}={v}")).collect();
            env.push(format!("{AUTHORIZED_KEYS_ENV}={}", spec.authorized_key));
            let labels = HashMap::from([
                (LABEL_MANAGED.to_string(), "true".to_string()),
                (LABEL_ENVIRONMENT.to_string(), spec.environment_id.clone()),
                (LABEL_INSTANCE.to_string(), self.instance.clone()),
            ]);
            let port_bindings = HashMap::from([(
                "22/tcp".to_string(),
                Some(vec![PortBinding { host_ip: Some("127.0.0.1".into()), host_port: Some(String::new()) }]),
            )]);
            let body = ContainerCreateBody {
                image: Some(spec.image.clone()),
                hostname: Some("hearth".into()),
                env: Some(env),
                labels: Some(labels),
                exposed_ports: Some(vec!["22/tcp".to_string()]),
                stop_timeout: Some(self.stop_timeout as i64),
                host_config: Some(HostConfig {
                    memory: Some(spec.memory_mb * 1024 * 1024),
                    // A quota rather than NanoCpus: the engine refuses NanoCpus above the
                    // host's core count, and placement, not Docker, decides what fits.
                    cpu_period: Some(100_000),
                    cpu_quota: Some(spec.vcpus * 100_000),
                    port_bindings: Some(port_bindings),
                    init: Some(true),
                    ..Default::default()
                }),
                ..Default::default()
            };
            let options = CreateContainerOptions { name: Some(container_name(&spec.environment_id)), ..Default::default() };
            match self.client().await?.create_container(Some(options), body).await {
                Ok(_) => {}
                // A concurrent or earlier attempt made it first: use that one.
                Err(e) if is_status(&e, 409) => {}
                Err(e) if is_status(&e, 404) => {
                    return Err(ProviderError::Failed(format!(
                        "image {} is not in the Docker engine; build it with `hearth image build`",
                        spec.image
                    )));
                }
                Err(e) => return Err(classify(e)),
            }
        }
        self.start_existing(&spec.environment_id).await
    }

    async fn start(&self, environment_id: &str) -> Result<VmInfo, ProviderError> {
        self.start_existing(environment_id).await
    }

    async fn stop(&self, environment_id: &str) -> Result<(), ProviderError> {
        let options = StopContainerOptions { t: Some(self.stop_timeout), ..Default::default() };
        match self.client().await?.stop_container(&container_name(environment_id), Some(options)).await {
            Ok(()) => Ok(()),
            Err(e) if is_status(&e, 304) => Ok(()), // already stopped
            Err(e) if is_status(&e, 404) => Err(ProviderError::NotFound(environment_id.to_string())),
            Err(e) => Err(classify(e)),
        }
    }

    async fn destroy(&self, environment_id: &str) -> Result<(), ProviderError> {
        let options = RemoveContainerOptions { force: true, v: true, ..Default::default() };
        match self.client().await?.remove_container(&container_name(environment_id), Some(options)).await {
            Ok(()) => Ok(()),
            Err(e) if is_status(&e, 404) => Ok(()),
            // 409: removal already in progress; the container is going away.
            Err(e) if is_status(&e, 409) => Ok(()),
            Err(e) => Err(classify(e)),
        }
    }

    async fn inspect(&self, environment_id: &str) -> Result<Option<VmInfo>, ProviderError> {
        self.info_of(environment_id).await
    }

    async fn list(&self) -> Result<Vec<VmInfo>, ProviderError> {
        let filters = HashMap::from([(
            "label".to_string(),
            vec![format!("{LABEL_MANAGED}=true"), format!("{LABEL_INSTANCE}={}", self.instance)],
        )]);
        let options = ListContainersOptions { all: true, filters: Some(filters), ..Default::default() };
        let containers = self.client().await?.list_containers(Some(options)).await.map_err(classify)?;
        let mut out = Vec::new();
        for c in containers {
            let (Some(env), Some(id)) = (c.labels.as_ref().and_then(|l| l.get(LABEL_ENVIRONMENT)), c.id.as_deref()) else {
                continue;
            };
            if let Some(info) = self.inspect_named(id, env).await? {
                out.push(info);
            }
        }
        Ok(out)
    }
}
