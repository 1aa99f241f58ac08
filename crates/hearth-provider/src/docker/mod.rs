//! The Docker provider: one container per environment on any number of Docker engines,
//! each reached through its host's endpoint (bollard):
//! - `unix:///path/docker.sock`: an engine on the node's own machine (only nodes on that
//!   machine can use it);
//! - `tcp://host:port` with TLS material (CA, client certificate and key): a remote engine;
//!   plain TCP is refused, since it hands out root on the host;
//! - `ssh://user@host[:port]`: a remote engine through `ssh ... docker system dial-stdio`,
//!   with the node user's own SSH configuration and keys.
//!
//! Containers are named `hearth-<environment id>` and labelled with the installation and
//! environment. SSH is published on the host's guest address with a port Docker picks, so
//! there is no port scanning and no race between two creates.
//!
//! Confinement (the host's `options`, see `options.rs`): each VM on a network of its own
//! (`network.rs`), a pids limit, the capabilities a dev VM needs and no more (no NET_RAW,
//! so no ARP or packet spoofing; no MKNOD, no SETFCAP), optionally `no-new-privileges` and
//! another runtime (gVisor's `runsc`). Disk size is enforced where the engine's storage
//! driver can (`--storage-opt size`: overlay2 on XFS with pquota, btrfs, zfs); elsewhere
//! it is recorded but not enforced, and the first create on such a host says so in the log.

pub mod guard;
pub mod network;
pub mod options;
pub mod tarball;

use crate::{
    HostFacts, HostRef, LABEL_ENVIRONMENT, LABEL_INSTALLATION, LABEL_MANAGED, Provider,
    ProviderError, SnapshotMade, VmInfo, VmRef, VmSpec, VmState,
};
use async_trait::async_trait;
use bollard::errors::Error as DockerError;
use bollard::models::{ContainerCreateBody, ContainerStateStatusEnum, HostConfig, PortBinding};
use bollard::query_parameters::{
    CreateContainerOptions, InspectContainerOptions, ListContainersOptions, RemoveContainerOptions,
    StartContainerOptions, StopContainerOptions,
};
use bollard::{API_DEFAULT_VERSION, Docker};
use hearth_core::HostKind;
use options::DockerOptions;
use std::collections::{HashMap, HashSet};
use std::path::PathBuf;
use std::sync::Mutex;

/// What a dev VM needs: sshd (CHOWN, SETUID, SETGID, SYS_CHROOT, AUDIT_WRITE, KILL,
/// NET_BIND_SERVICE), sudo, and package managers (DAC_OVERRIDE, FOWNER, FSETID, SETPCAP).
/// Docker's default set less NET_RAW, MKNOD and SETFCAP.
pub const CAPABILITIES: [&str; 11] = [
    "CHOWN",
    "DAC_OVERRIDE",
    "FOWNER",
    "FSETID",
    "KILL",
    "SETGID",
    "SETUID",
    "SETPCAP",
    "NET_BIND_SERVICE",
    "SYS_CHROOT",
    "AUDIT_WRITE",
];

/// The guest's start-up script reads the authorized keys from here.
pub const AUTHORIZED_KEYS_ENV: &str = "HEARTH_AUTHORIZED_KEYS";
/// Snapshots are images of this repository, tagged with the snapshot's id.
pub const SNAPSHOT_REPOSITORY: &str = "hearth-snapshot";
/// The label that says which snapshot an image is.
pub const LABEL_SNAPSHOT: &str = "hearth.snapshot";
/// The memory of a build step's container.
pub const BUILD_MEMORY_BYTES: i32 = 2_000_000_000;
/// The label that says which custom image (its record's id) an image is.
pub const LABEL_IMAGE: &str = "hearth.image";
/// Custom images are images of this repository, tagged with their record's id (the store
/// names them so on every kind of host).
pub const IMAGE_REPOSITORY: &str = "hearth-image";
/// An uploaded tarball is loaded under this repository, tagged as the custom image it
/// becomes, then built on (`import_image`); the tag is removed with the image.
pub const IMPORT_REPOSITORY: &str = "hearth-import";

/// The container `export_image` makes of `reference`: never started, removed after.
fn export_container(reference: &str) -> String {
    let tag: String = reference
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '-' })
        .collect();
    format!("hearth-export-{tag}")
}

/// The tag an image tarball loads under, for custom image `reference`
/// (`hearth-image:<id>` loads as `hearth-import:<id>`).
fn import_tag(reference: &str) -> String {
    let id = reference
        .rsplit_once(':')
        .map(|(_, id)| id)
        .unwrap_or(reference);
    format!("{IMPORT_REPOSITORY}:{id}")
}
/// The path a committed image is given. The engine adds the container's other variables
/// to whatever a commit sets, so each of them is set empty instead: nothing of the source's
/// values (which may be secrets) is kept; a VM made from it gets its own.
const SNAPSHOT_PATH: &str = "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// Seconds a request to an engine may take before it counts as unanswered.
const REQUEST_TIMEOUT_SECONDS: u64 = 60;

pub struct DockerProvider {
    /// One client per host, made on first use and remade when the endpoint changes.
    clients: Mutex<HashMap<String, (String, Docker)>>,
    /// Where TLS material is written for bollard, which reads it from files (mode 0600).
    scratch: PathBuf,
    /// Seconds `docker stop` waits for sshd before killing it.
    stop_timeout: i32,
    /// Hosts whose storage driver cannot limit a container's disk (learnt on first create).
    no_disk_limit: Mutex<HashSet<String>>,
}

impl DockerProvider {
    /// No I/O: engines are reached on first use. `scratch` is a private directory.
    pub fn new(scratch: PathBuf) -> DockerProvider {
        DockerProvider {
            clients: Mutex::new(HashMap::new()),
            scratch,
            stop_timeout: 5,
            no_disk_limit: Mutex::new(HashSet::new()),
        }
    }

    /// The engine client for `host`, connecting (and negotiating the API version, so
    /// Debian's Docker 20.10 works) if this is the first use.
    async fn client(&self, host: &HostRef) -> Result<Docker, ProviderError> {
        let fingerprint = format!(
            "{}|{}",
            host.endpoint,
            host.tls.as_ref().map(|t| t.cert_pem.len()).unwrap_or(0)
        );
        if let Some((f, d)) = self.clients.lock().unwrap().get(&host.id)
            && *f == fingerprint
        {
            return Ok(d.clone());
        }
        let docker = self.connect(host)?;
        let docker = docker
            .negotiate_version()
            .await
            .map_err(|e| unavailable(host, e))?;
        self.clients
            .lock()
            .unwrap()
            .insert(host.id.clone(), (fingerprint, docker.clone()));
        Ok(docker)
    }

    fn connect(&self, host: &HostRef) -> Result<Docker, ProviderError> {
        let endpoint = host.endpoint.as_str();
        let refused = |e: DockerError| match e {
            DockerError::SocketNotFoundError(_) => unavailable(host, e),
            e => ProviderError::Failed(format!(
                "host {}: endpoint {endpoint} is unusable: {e}",
                host.name
            )),
        };
        if let Some(path) = endpoint.strip_prefix("unix://") {
            return Docker::connect_with_unix(path, REQUEST_TIMEOUT_SECONDS, API_DEFAULT_VERSION)
                .map_err(refused);
        }
        if endpoint.starts_with("tcp://") {
            let Some(tls) = &host.tls else {
                return Err(ProviderError::Failed(format!(
                    "host {}: {endpoint} needs TLS material (CA, client certificate and key); plain TCP hands out root on the host",
                    host.name
                )));
            };
            let dir = self.scratch.join(&host.id);
            write_private(&dir, "ca.pem", &tls.ca_pem)?;
            write_private(&dir, "cert.pem", &tls.cert_pem)?;
            write_private(&dir, "key.pem", &tls.key_pem)?;
            return Docker::connect_with_ssl(
                endpoint,
                &dir.join("key.pem"),
                &dir.join("cert.pem"),
                &dir.join("ca.pem"),
                REQUEST_TIMEOUT_SECONDS,
                API_DEFAULT_VERSION,
            )
            .map_err(refused);
        }
        if endpoint.starts_with("ssh://") {
            return Docker::connect_with_ssh(
                endpoint,
                REQUEST_TIMEOUT_SECONDS,
                API_DEFAULT_VERSION,
                None,
            )
            .map_err(refused);
        }
        Err(ProviderError::Failed(format!(
            "host {}: endpoint {endpoint:?} must start with unix://, tcp:// or ssh://",
            host.name
        )))
    }

    async fn inspect_key(
        &self,
        host: &HostRef,
        key: &str,
    ) -> Result<Option<VmInfo>, ProviderError> {
        match self
            .client(host)
            .await?
            .inspect_container(key, None::<InspectContainerOptions>)
            .await
        {
            Ok(c) => {
                let labels = c
                    .config
                    .as_ref()
                    .and_then(|c| c.labels.clone())
                    .unwrap_or_default();
                if labels.get(LABEL_INSTALLATION) != Some(&host.installation_id) {
                    // Not ours: another installation's container of that name is no VM of ours.
                    return Ok(None);
                }
                let state = match c.state.as_ref().and_then(|s| s.status) {
                    Some(ContainerStateStatusEnum::RUNNING) => VmState::Running,
                    Some(ContainerStateStatusEnum::EXITED)
                    | Some(ContainerStateStatusEnum::CREATED) => VmState::Stopped,
                    _ => VmState::Other,
                };
                let ports = c.network_settings.as_ref().and_then(|n| n.ports.as_ref());
                let ssh_port = ports
                    .and_then(|p| p.get("22/tcp"))
                    .and_then(|b| b.as_ref())
                    .and_then(|b| b.first())
                    .and_then(|b| b.host_port.as_deref())
                    .and_then(|p| p.parse::<i64>().ok());
                let ip = c
                    .network_settings
                    .as_ref()
                    .and_then(|n| n.networks.as_ref())
                    .and_then(|n| n.values().find_map(|net| net.ip_address.clone()))
                    .filter(|ip| !ip.is_empty());
                let name = c
                    .name
                    .as_deref()
                    .unwrap_or(key)
                    .trim_start_matches('/')
                    .to_string();
                Ok(Some(VmInfo {
                    vm: VmRef { name, id: c.id },
                    environment_id: labels.get(LABEL_ENVIRONMENT).cloned().unwrap_or_default(),
                    state,
                    ssh_host: ssh_port.map(|_| host.guest_address.clone()),
                    ssh_port,
                    ip_address: ip,
                }))
            }
            Err(e) if is_status(&e, 404) => Ok(None),
            Err(e) => Err(classify(host, e)),
        }
    }

    /// The container if it exists and belongs to this installation: every action checks
    /// first, so no installation ever touches another's container.
    async fn ours(&self, host: &HostRef, vm: &VmRef) -> Result<Option<VmInfo>, ProviderError> {
        self.inspect_key(host, vm.key()).await
    }
}

fn write_private(dir: &std::path::Path, name: &str, contents: &str) -> Result<(), ProviderError> {
    use std::io::Write;
    use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
    let fail = |e: std::io::Error| {
        ProviderError::Failed(format!(
            "cannot write TLS material into {}: {e}",
            dir.display()
        ))
    };
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(fail)?;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(dir.join(name))
        .map_err(fail)?;
    f.write_all(contents.as_bytes()).map_err(fail)
}

pub(crate) fn unavailable(host: &HostRef, e: DockerError) -> ProviderError {
    ProviderError::Unavailable(format!(
        "cannot reach the Docker engine of host {} at {} ({e}); start it (`dockerd`, `systemctl start docker`) or fix \
         the host's endpoint",
        host.name, host.endpoint
    ))
}

/// Connection failures mean the engine is down; anything else is a refusal worth showing.
pub(crate) fn classify(host: &HostRef, e: DockerError) -> ProviderError {
    match e {
        DockerError::DockerResponseServerError {
            status_code,
            message,
        } => ProviderError::Failed(format!(
            "the Docker engine of host {} refused ({status_code}): {message}",
            host.name
        )),
        DockerError::HyperResponseError { .. }
        | DockerError::IOError { .. }
        | DockerError::RequestTimeoutError
        | DockerError::HyperLegacyError { .. }
        | DockerError::SocketNotFoundError(_) => unavailable(host, e),
        other => ProviderError::Failed(format!("host {}: {other}", host.name)),
    }
}

pub(crate) fn is_status(e: &DockerError, code: u16) -> bool {
    matches!(e, DockerError::DockerResponseServerError { status_code, .. } if *status_code == code)
}

#[async_trait]
impl Provider for DockerProvider {
    fn kind(&self) -> HostKind {
        HostKind::Docker
    }

    async fn check(&self, host: &HostRef) -> Result<HostFacts, ProviderError> {
        let options = DockerOptions::parse(&host.options).map_err(ProviderError::Failed)?;
        let docker = self.client(host).await?;
        let info = docker.info().await.map_err(|e| unavailable(host, e))?;
        if let Some(runtime) = &options.runtime
            && !info
                .runtimes
                .as_ref()
                .is_some_and(|r| r.contains_key(runtime))
        {
            return Err(ProviderError::Failed(format!(
                "host {}: its engine has no runtime {runtime:?}; register it (for gVisor: install runsc and add \
                     {{\"runtimes\": {{\"runsc\": {{\"path\": \"/usr/bin/runsc\"}}}}}} to /etc/docker/daemon.json, then \
                     reload dockerd) or remove options.runtime",
                host.name
            )));
        }
        // The engine ID alone is not enough: daemons of one machine share it (it comes
        // from /etc/docker), and cloned machines may too. With the machine's name and the
        // daemon's data root, two rows name one engine only when they really do.
        let report = serde_json::json!({
            "version": info.server_version,
            "containers": info.containers,
            "running": info.containers_running,
        });
        let identity = match (info.id.filter(|id| !id.is_empty()), info.docker_root_dir) {
            (Some(id), Some(root)) => Some(format!(
                "docker:{id}:{}:{root}",
                info.name.unwrap_or_default()
            )),
            _ => None,
        };
        Ok(HostFacts {
            identity,
            report: Some(report),
            capacity: None,
        })
    }

    async fn ensure_created(&self, host: &HostRef, spec: &VmSpec) -> Result<VmRef, ProviderError> {
        let options = DockerOptions::parse(&host.options).map_err(ProviderError::Failed)?;
        let docker = self.client(host).await?;
        if self.inspect_key(host, &spec.name).await?.is_none() {
            let pool = options.pool().map_err(ProviderError::Failed)?;
            network::ensure(
                &docker,
                host,
                &spec.name,
                &spec.environment_id,
                &spec.labels,
                pool,
            )
            .await?;
            let mut env: Vec<String> = spec.env.iter().map(|(k, v)| format!("{k}={v}")).collect();
            env.push(format!("{AUTHORIZED_KEYS_ENV}={}", spec.authorized_key));
            let mut labels: HashMap<String, String> = spec.labels.clone().into_iter().collect();
            labels.insert(LABEL_MANAGED.into(), "true".into());
            labels.insert(LABEL_INSTALLATION.into(), host.installation_id.clone());
            labels.insert(LABEL_ENVIRONMENT.into(), spec.environment_id.clone());
            let port_bindings = HashMap::from([(
                "22/tcp".to_string(),
                Some(vec![PortBinding {
                    host_ip: Some(host.guest_address.clone()),
                    host_port: Some(String::new()),
                }]),
            )]);
            let limit_disk = !self.no_disk_limit.lock().unwrap().contains(&host.id);
            let body = |limit_disk: bool| ContainerCreateBody {
                image: Some(spec.image.clone()),
                hostname: Some(spec.hostname.clone()),
                env: Some(env.clone()),
                labels: Some(labels.clone()),
                exposed_ports: Some(vec!["22/tcp".to_string()]),
                stop_timeout: Some(self.stop_timeout as i64),
                host_config: Some(HostConfig {
                    memory: Some(spec.memory_mb * 1024 * 1024),
                    // A quota rather than NanoCpus: the engine refuses NanoCpus above the
                    // host's core count, and placement, not Docker, decides what fits.
                    cpu_period: Some(100_000),
                    cpu_quota: Some(spec.vcpus * 100_000),
                    pids_limit: Some(options.pids_limit),
                    cap_drop: Some(vec!["ALL".into()]),
                    cap_add: Some(CAPABILITIES.iter().map(|c| c.to_string()).collect()),
                    security_opt: options
                        .no_new_privileges
                        .then(|| vec!["no-new-privileges".to_string()]),
                    runtime: options.runtime.clone(),
                    storage_opt: limit_disk.then(|| {
                        HashMap::from([("size".to_string(), format!("{}G", spec.disk_gb))])
                    }),
                    network_mode: Some(spec.name.clone()),
                    port_bindings: Some(port_bindings.clone()),
                    init: Some(true),
                    ..Default::default()
                }),
                ..Default::default()
            };
            let create = |limit_disk: bool| {
                let options = CreateContainerOptions {
                    name: Some(spec.name.clone()),
                    ..Default::default()
                };
                docker.create_container(Some(options), body(limit_disk))
            };
            let mut created = create(limit_disk).await;
            if let Err(e) = &created
                && limit_disk
                && is_status(e, 500)
                && e.to_string().to_ascii_lowercase().contains("storage-opt")
            {
                tracing::warn!(
                    host = %host.name,
                    error = %e,
                    "this host's storage driver cannot limit a VM's disk; disk sizes are recorded but not enforced there \
                     (overlay2 needs an XFS backing store mounted with pquota)"
                );
                self.no_disk_limit.lock().unwrap().insert(host.id.clone());
                created = create(false).await;
            }
            match created {
                Ok(_) => {}
                // A concurrent or earlier attempt made it first: use that one (checked below).
                Err(e) if is_status(&e, 409) => {}
                Err(e) if is_status(&e, 404) => {
                    return Err(ProviderError::Failed(format!(
                        "image {} is not in the Docker engine of host {}; build it there with `hearth image build`",
                        spec.image, host.name
                    )));
                }
                Err(e) => return Err(classify(host, e)),
            }
        }
        let Some(info) = self.inspect_key(host, &spec.name).await? else {
            return Err(ProviderError::Failed(format!(
                "a container named {} exists on host {} but belongs to another installation; remove it or rename it",
                spec.name, host.name
            )));
        };
        self.start(host, &info.vm).await?;
        Ok(info.vm)
    }

    async fn start(&self, host: &HostRef, vm: &VmRef) -> Result<(), ProviderError> {
        if self.ours(host, vm).await?.is_none() {
            return Err(ProviderError::NotFound(vm.name.clone()));
        }
        match self
            .client(host)
            .await?
            .start_container(vm.key(), None::<StartContainerOptions>)
            .await
        {
            Ok(()) => Ok(()),
            Err(e) if is_status(&e, 304) => Ok(()), // already running
            Err(e) if is_status(&e, 404) => Err(ProviderError::NotFound(vm.name.clone())),
            Err(e) => Err(classify(host, e)),
        }
    }

    async fn stop(&self, host: &HostRef, vm: &VmRef) -> Result<(), ProviderError> {
        if self.ours(host, vm).await?.is_none() {
            return Err(ProviderError::NotFound(vm.name.clone()));
        }
        let options = StopContainerOptions {
            t: Some(self.stop_timeout),
            ..Default::default()
        };
        match self
            .client(host)
            .await?
            .stop_container(vm.key(), Some(options))
            .await
        {
            Ok(()) => Ok(()),
            Err(e) if is_status(&e, 304) => Ok(()), // already stopped
            Err(e) if is_status(&e, 404) => Err(ProviderError::NotFound(vm.name.clone())),
            Err(e) => Err(classify(host, e)),
        }
    }

    async fn destroy(&self, host: &HostRef, vm: &VmRef) -> Result<(), ProviderError> {
        let docker = self.client(host).await?;
        if self.ours(host, vm).await?.is_some() {
            let options = RemoveContainerOptions {
                force: true,
                v: true,
                ..Default::default()
            };
            match docker.remove_container(vm.key(), Some(options)).await {
                Ok(()) => {}
                Err(e) if is_status(&e, 404) => {}
                // 409: removal already in progress; the container is going away.
                Err(e) if is_status(&e, 409) => {}
                Err(e) => return Err(classify(host, e)),
            }
        }
        // The network goes too, also when a crash left it without its container.
        network::remove(&docker, host, &vm.name).await
    }

    async fn inspect(&self, host: &HostRef, vm: &VmRef) -> Result<Option<VmInfo>, ProviderError> {
        self.ours(host, vm).await
    }

    /// `docker commit` (the container paused meanwhile) into `hearth-snapshot:<id>`,
    /// labelled with the installation and snapshot, without the source's variables.
    async fn snapshot(
        &self,
        host: &HostRef,
        vm: &VmRef,
        snapshot_id: &str,
    ) -> Result<SnapshotMade, ProviderError> {
        if let Some(made) = self.find_snapshot(host, snapshot_id).await? {
            return Ok(made);
        }
        if self.ours(host, vm).await?.is_none() {
            return Err(ProviderError::NotFound(vm.name.clone()));
        }
        let docker = self.client(host).await?;
        let source_env = docker
            .inspect_container(vm.key(), None::<InspectContainerOptions>)
            .await
            .map_err(|e| classify(host, e))?
            .config
            .and_then(|c| c.env)
            .unwrap_or_default();
        let mut env = vec![SNAPSHOT_PATH.to_string()];
        env.extend(
            source_env
                .iter()
                .filter_map(|kv| kv.split_once('=').map(|(k, _)| k))
                .filter(|k| *k != "PATH")
                .map(|k| format!("{k}=")),
        );
        let options = bollard::query_parameters::CommitContainerOptions {
            container: Some(vm.key().to_string()),
            repo: Some(SNAPSHOT_REPOSITORY.into()),
            tag: Some(snapshot_id.into()),
            pause: true,
            ..Default::default()
        };
        let labels = HashMap::from([
            (LABEL_MANAGED.to_string(), "true".to_string()),
            (LABEL_INSTALLATION.to_string(), host.installation_id.clone()),
            (LABEL_SNAPSHOT.to_string(), snapshot_id.to_string()),
        ]);
        let config = bollard::models::ContainerConfig {
            env: Some(env),
            labels: Some(labels),
            ..Default::default()
        };
        docker
            .commit_container(options, config)
            .await
            .map_err(|e| classify(host, e))?;
        self.find_snapshot(host, snapshot_id).await?.ok_or_else(|| {
            ProviderError::Failed(format!(
                "the Docker engine of host {} committed snapshot {snapshot_id} but does not show it",
                host.name
            ))
        })
    }

    async fn find_snapshot(
        &self,
        host: &HostRef,
        snapshot_id: &str,
    ) -> Result<Option<SnapshotMade>, ProviderError> {
        let image = format!("{SNAPSHOT_REPOSITORY}:{snapshot_id}");
        match self.client(host).await?.inspect_image(&image).await {
            Ok(i) => {
                let labels = i.config.and_then(|c| c.labels).unwrap_or_default();
                if labels.get(LABEL_INSTALLATION) != Some(&host.installation_id) {
                    return Ok(None);
                }
                Ok(Some(SnapshotMade {
                    image,
                    size_bytes: i.size.unwrap_or(0),
                    // A committed image: a container's memory is not kept (Docker's
                    // checkpoints need CRIU, experimental).
                    memory_bytes: 0,
                }))
            }
            Err(e) if is_status(&e, 404) => Ok(None),
            Err(e) => Err(classify(host, e)),
        }
    }

    async fn labelled_images(
        &self,
        host: &HostRef,
        label: &str,
    ) -> Result<Vec<(String, String)>, ProviderError> {
        let filters = HashMap::from([(
            "label".to_string(),
            vec![
                format!("{LABEL_INSTALLATION}={}", host.installation_id),
                label.to_string(),
            ],
        )]);
        // Untagged images are top-level ones: no need for every intermediate layer.
        let options = bollard::query_parameters::ListImagesOptions {
            all: false,
            filters: Some(filters),
            ..Default::default()
        };
        let images = self
            .client(host)
            .await?
            .list_images(Some(options))
            .await
            .map_err(|e| classify(host, e))?;
        Ok(images
            .into_iter()
            .filter_map(|i| i.labels.get(label).cloned().map(|v| (v, i.id)))
            .collect())
    }

    async fn remove_unused_image(
        &self,
        host: &HostRef,
        image_id: &str,
    ) -> Result<bool, ProviderError> {
        match self
            .client(host)
            .await?
            .remove_image(
                image_id,
                None::<bollard::query_parameters::RemoveImageOptions>,
                None,
            )
            .await
        {
            Ok(_) => Ok(true),
            Err(e) if is_status(&e, 404) => Ok(true),
            // A VM made from it still runs.
            Err(e) if is_status(&e, 409) => Ok(false),
            Err(e) => Err(classify(host, e)),
        }
    }

    /// Untags the image (forced: VMs made from it keep its layers until they go).
    async fn remove_snapshot(
        &self,
        host: &HostRef,
        snapshot_id: &str,
    ) -> Result<(), ProviderError> {
        if self.find_snapshot(host, snapshot_id).await?.is_none() {
            return Ok(());
        }
        let options = bollard::query_parameters::RemoveImageOptions {
            force: true,
            ..Default::default()
        };
        match self
            .client(host)
            .await?
            .remove_image(
                &format!("{SNAPSHOT_REPOSITORY}:{snapshot_id}"),
                Some(options),
                None,
            )
            .await
        {
            Ok(_) => Ok(()),
            Err(e) if is_status(&e, 404) => Ok(()),
            Err(e) => Err(classify(host, e)),
        }
    }

    /// `docker build` of a context holding only the Dockerfile (so nothing of the node's
    /// files can be copied in), with the classic builder; the last 20 lines of its output
    /// are the error when it fails.
    async fn build_image(
        &self,
        host: &HostRef,
        reference: &str,
        dockerfile: &str,
    ) -> Result<i64, ProviderError> {
        use futures::StreamExt;
        let mut context = tar::Builder::new(Vec::new());
        let mut header = tar::Header::new_gnu();
        header.set_size(dockerfile.len() as u64);
        header.set_mode(0o644);
        header.set_cksum();
        context
            .append_data(&mut header, "Dockerfile", dockerfile.as_bytes())
            .and_then(|()| context.finish())
            .map_err(|e| ProviderError::Failed(format!("could not pack the Dockerfile: {e}")))?;
        let context = context
            .into_inner()
            .map_err(|e| ProviderError::Failed(format!("could not pack the Dockerfile: {e}")))?;
        let options = bollard::query_parameters::BuildImageOptions {
            dockerfile: "Dockerfile".into(),
            t: Some(reference.into()),
            rm: true,
            forcerm: true,
            // Each step's container: 2 GB of memory and no swap beyond it, one CPU, 64 MiB
            // of /dev/shm (the image's size is checked once it is built).
            memory: Some(BUILD_MEMORY_BYTES),
            memswap: Some(BUILD_MEMORY_BYTES),
            cpuperiod: Some(100_000),
            cpuquota: Some(100_000),
            shmsize: Some(64 * 1024 * 1024),
            labels: Some(HashMap::from([
                (LABEL_MANAGED.to_string(), "true".to_string()),
                (LABEL_INSTALLATION.to_string(), host.installation_id.clone()),
                (
                    LABEL_IMAGE.to_string(),
                    reference
                        .rsplit_once(':')
                        .map(|(_, id)| id)
                        .unwrap_or(reference)
                        .to_string(),
                ),
            ])),
            ..Default::default()
        };
        let docker = self.client(host).await?;
        let mut stream = docker.build_image(
            options,
            None,
            Some(bollard::body_full(bytes::Bytes::from(context))),
        );
        let mut tail: std::collections::VecDeque<String> = std::collections::VecDeque::new();
        while let Some(item) = stream.next().await {
            let said = match item {
                Ok(info) => {
                    if let Some(detail) = info.error_detail.and_then(|d| d.message) {
                        tail.push_back(detail);
                        return Err(ProviderError::Failed(
                            tail.into_iter().collect::<Vec<_>>().join("\n"),
                        ));
                    }
                    info.stream.or(info.status).unwrap_or_default()
                }
                Err(DockerError::DockerStreamError { error }) => {
                    tail.push_back(error);
                    return Err(ProviderError::Failed(
                        tail.into_iter().collect::<Vec<_>>().join("\n"),
                    ));
                }
                Err(e) => return Err(classify(host, e)),
            };
            for line in said.lines().filter(|l| !l.trim().is_empty()) {
                tail.push_back(line.trim_end().to_string());
                if tail.len() > 20 {
                    tail.pop_front();
                }
            }
        }
        let image = docker
            .inspect_image(reference)
            .await
            .map_err(|e| classify(host, e))?;
        Ok(image.size.unwrap_or(0))
    }

    /// Also removes the tag an import loaded it under, if an import made it.
    async fn remove_image(&self, host: &HostRef, reference: &str) -> Result<(), ProviderError> {
        let docker = self.client(host).await?;
        // An export cut short by a node that died left its container, which holds the image.
        let options = RemoveContainerOptions {
            force: true,
            v: true,
            ..Default::default()
        };
        match docker
            .remove_container(&export_container(reference), Some(options))
            .await
        {
            Ok(()) => {}
            Err(e) if is_status(&e, 404) || is_status(&e, 409) => {}
            Err(e) => return Err(classify(host, e)),
        }
        for name in [reference.to_string(), import_tag(reference)] {
            let options = bollard::query_parameters::RemoveImageOptions {
                force: true,
                ..Default::default()
            };
            match docker.remove_image(&name, Some(options), None).await {
                Ok(_) => {}
                Err(e) if is_status(&e, 404) => {}
                Err(e) => return Err(classify(host, e)),
            }
        }
        Ok(())
    }

    /// `docker export` of a container made (not started) of the image: one layer, the file
    /// system a container of it starts with. The container is removed after, and by
    /// `remove_image` if a node died before that.
    async fn export_image(
        &self,
        host: &HostRef,
        reference: &str,
        to: &std::path::Path,
        max_bytes: u64,
    ) -> Result<u64, ProviderError> {
        use futures::StreamExt;
        use tokio::io::AsyncWriteExt;
        let docker = self.client(host).await?;
        let name = export_container(reference);
        let options = RemoveContainerOptions {
            force: true,
            v: true,
            ..Default::default()
        };
        let remove = async || match docker.remove_container(&name, Some(options.clone())).await {
            Ok(()) => Ok(()),
            Err(e) if is_status(&e, 404) => Ok(()),
            Err(e) => Err(classify(host, e)),
        };
        remove().await?;
        docker
            .create_container(
                Some(CreateContainerOptions {
                    name: Some(name.clone()),
                    ..Default::default()
                }),
                ContainerCreateBody {
                    image: Some(reference.to_string()),
                    ..Default::default()
                },
            )
            .await
            .map_err(|e| classify(host, e))?;
        let written = async {
            let mut file = tokio::fs::File::create(to).await.map_err(|e| {
                ProviderError::Failed(format!("writing the image's file system: {e}"))
            })?;
            let mut stream = docker.export_container(&name);
            let mut bytes = 0u64;
            while let Some(chunk) = stream.next().await {
                let chunk = chunk.map_err(|e| classify(host, e))?;
                bytes += chunk.len() as u64;
                if bytes > max_bytes {
                    return Err(ProviderError::Failed(format!(
                        "the image's file system is larger than {} GB",
                        max_bytes / 1_000_000_000
                    )));
                }
                file.write_all(&chunk).await.map_err(|e| {
                    ProviderError::Failed(format!("writing the image's file system: {e}"))
                })?;
            }
            file.sync_all().await.map_err(|e| {
                ProviderError::Failed(format!("writing the image's file system: {e}"))
            })?;
            Ok::<u64, ProviderError>(bytes)
        }
        .await;
        let removed = remove().await;
        let bytes = written?;
        removed?;
        Ok(bytes)
    }

    /// `docker load` of a copy of the tarball whose only name is `hearth-import:<id>`
    /// (`tarball.rs`), then a build `FROM` it that adds this installation's labels under
    /// `reference`; the import tag is removed once the build has it.
    async fn import_image(
        &self,
        host: &HostRef,
        reference: &str,
        tarball: &std::path::Path,
    ) -> Result<crate::ImageMade, ProviderError> {
        use futures::StreamExt;
        use tokio::io::AsyncReadExt;
        let loaded_as = import_tag(reference);
        let clean = tarball.with_extension("clean.tar");
        let (from, to, tag) = (tarball.to_path_buf(), clean.clone(), loaded_as.clone());
        let sanitized = tokio::task::spawn_blocking(move || tarball::sanitize(&from, &to, &tag))
            .await
            .map_err(|e| ProviderError::Failed(format!("reading the tarball failed: {e}")))?;
        if let Err(reason) = sanitized {
            let _ = std::fs::remove_file(&clean);
            return Err(ProviderError::Failed(format!("the tarball: {reason}")));
        }
        let docker = self.client(host).await?;
        let file = tokio::fs::File::open(&clean)
            .await
            .map_err(|e| ProviderError::Failed(format!("reading the tarball failed: {e}")))?;
        let chunks = futures::stream::try_unfold(file, |mut file| async move {
            let mut buffer = vec![0u8; 1 << 20];
            let n = file.read(&mut buffer).await?;
            if n == 0 {
                return Ok::<_, std::io::Error>(None);
            }
            buffer.truncate(n);
            Ok(Some((bytes::Bytes::from(buffer), file)))
        });
        let options = bollard::query_parameters::ImportImageOptionsBuilder::default()
            .quiet(true)
            .build();
        let mut loading = docker.import_image_stream(options, chunks, None);
        let mut refused = None;
        while let Some(item) = loading.next().await {
            match item {
                Ok(info) => {
                    if let Some(message) = info.error_detail.and_then(|d| d.message) {
                        refused = Some(ProviderError::Failed(format!("the tarball: {message}")));
                        break;
                    }
                }
                Err(DockerError::DockerStreamError { error }) => {
                    refused = Some(ProviderError::Failed(format!("the tarball: {error}")));
                    break;
                }
                Err(e) => {
                    refused = Some(classify(host, e));
                    break;
                }
            }
        }
        drop(loading);
        let _ = tokio::fs::remove_file(&clean).await;
        if let Some(e) = refused {
            let _ = self.remove_image(host, reference).await;
            return Err(e);
        }
        let built = self
            .build_image(host, reference, &format!("FROM {loaded_as}\n"))
            .await;
        // The built image keeps the loaded one as its parent: untagging frees nothing yet.
        let untag = bollard::query_parameters::RemoveImageOptions {
            noprune: true,
            ..Default::default()
        };
        match built {
            Ok(size) => {
                if let Err(e) = docker.remove_image(&loaded_as, Some(untag), None).await {
                    tracing::warn!(tag = %loaded_as, error = %e, "could not remove an import's tag (removed with its image)");
                }
                Ok(crate::ImageMade {
                    size_bytes: size,
                    min_disk_gb: None,
                })
            }
            Err(e) => {
                let _ = self.remove_image(host, reference).await;
                Err(e)
            }
        }
    }

    async fn list(&self, host: &HostRef) -> Result<Vec<VmInfo>, ProviderError> {
        let filters = HashMap::from([(
            "label".to_string(),
            vec![
                format!("{LABEL_MANAGED}=true"),
                format!("{LABEL_INSTALLATION}={}", host.installation_id),
            ],
        )]);
        let options = ListContainersOptions {
            all: true,
            filters: Some(filters),
            ..Default::default()
        };
        let containers = self
            .client(host)
            .await?
            .list_containers(Some(options))
            .await
            .map_err(|e| classify(host, e))?;
        Ok(containers
            .into_iter()
            .filter_map(|c| {
                let labels = c.labels.unwrap_or_default();
                let environment_id = labels.get(LABEL_ENVIRONMENT)?.clone();
                let state = match c.state.map(|s| s.to_string()).as_deref() {
                    Some("running") => VmState::Running,
                    Some("exited") | Some("created") => VmState::Stopped,
                    _ => VmState::Other,
                };
                let ssh_port = c
                    .ports
                    .unwrap_or_default()
                    .iter()
                    .find(|p| p.private_port == 22)
                    .and_then(|p| p.public_port)
                    .map(i64::from);
                let name = c
                    .names
                    .unwrap_or_default()
                    .first()
                    .map(|n| n.trim_start_matches('/').to_string())?;
                Some(VmInfo {
                    vm: VmRef { name, id: c.id },
                    environment_id,
                    state,
                    ssh_host: ssh_port.map(|_| host.guest_address.clone()),
                    ssh_port,
                    ip_address: None,
                })
            })
            .collect())
    }
}
