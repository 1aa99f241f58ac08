//! Opening an installation on this node: the data directory (private), the database, the
//! installation's identity and master key, the first admin, the providers, and on the
//! installation's first start its first host, the local Docker engine.

use crate::{App, Config};
use anyhow::{Context, Result, bail};
use hearth_core::{Clock, HostKind, Role, Tier};
use hearth_guest::{MasterKey, SshPool};
use hearth_provider::Providers;
use hearth_provider::docker::DockerProvider;
use hearth_provider::sim::SimProvider;
use hearth_queue::Queue;
use hearth_store::{HostCapacity, KeyCheck, NewHost, Store, StoreError};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::Path;
use std::sync::Arc;

/// Writes `contents` to a new file readable by the owner only.
pub fn write_private(path: &Path, contents: &str) -> Result<()> {
    use std::io::Write;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("cannot write {}", path.display()))?;
    f.write_all(contents.as_bytes())?;
    Ok(())
}

/// The data directory, made (or narrowed) to mode 0700: it holds the database, the master
/// key and the admin token.
fn private_data_dir(dir: &Path) -> Result<()> {
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .with_context(|| format!("cannot create the data directory {}", dir.display()))?;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
        .with_context(|| format!("cannot make {} private", dir.display()))
}

/// The master key of this node: `HEARTH_MASTER_KEY`, `<data dir>/master.key`, or (on the
/// installation's very first start) a new one. A node whose key is not the installation's
/// refuses to start: every secret it wrote would be unreadable to the others.
async fn master_key(config: &Config, store: &Store) -> Result<MasterKey> {
    let installation = store.installation().await?;
    let path = config.data_dir.join("master.key");
    let how_to_fix = format!(
        "copy master.key from the data directory of a node of this installation to {} (mode 0600), or set \
         HEARTH_MASTER_KEY to its contents",
        path.display()
    );
    let (key, source, generated) = if let Some(text) = &config.master_key {
        (
            MasterKey::parse(text).context("HEARTH_MASTER_KEY is invalid")?,
            "HEARTH_MASTER_KEY".to_string(),
            false,
        )
    } else if path.exists() {
        let text = std::fs::read_to_string(&path)
            .with_context(|| format!("cannot read {}", path.display()))?;
        (
            MasterKey::parse(&text).with_context(|| format!("{} is invalid", path.display()))?,
            path.display().to_string(),
            false,
        )
    } else if installation.key_check.is_none() {
        let key = MasterKey::generate();
        write_private(&path, &key.to_base64())?;
        tracing::info!(path = %path.display(), "generated the installation's master key; back it up: without it stored secrets cannot be read");
        (key, path.display().to_string(), true)
    } else {
        bail!(
            "this node has no master key, and installation {} already has one; {how_to_fix}. (A new key would make every \
             secret the installation stored unreadable.)",
            installation.id
        );
    };
    match store.adopt_key_check(&key.check_value()).await? {
        KeyCheck::Matches => Ok(key),
        KeyCheck::Differs => {
            if generated {
                let _ = std::fs::remove_file(&path);
            }
            bail!(
                "the master key of this node (from {source}) is not the key of installation {}; {how_to_fix}",
                installation.id
            )
        }
    }
}

/// The master key, as the store's seal for secrets at rest.
struct Sealed(MasterKey);

/// `store`, sealing and opening secrets at rest with `key` (what `hearth serve` does with
/// the installation's master key; tools and tests that read sealed columns need it too).
pub fn sealed_with(store: Store, key: MasterKey) -> Store {
    store.with_secrets(Arc::new(Sealed(key)))
}

impl hearth_store::Secrets for Sealed {
    fn seal(&self, plain: &str) -> String {
        self.0.seal(plain)
    }

    fn open(&self, sealed: &str) -> Result<String, String> {
        self.0.open(sealed).map_err(|e| e.to_string())
    }
}

/// On an empty database: an admin user whose token goes to `<data dir>/admin.token`.
async fn ensure_admin(store: &Store, data_dir: &Path) -> Result<()> {
    if store.count_users().await? > 0 {
        return Ok(());
    }
    let (user, token) = store
        .create_user("admin@localhost", Role::Admin, Tier::Unlimited)
        .await?;
    let path = data_dir.join("admin.token");
    write_private(&path, &token)?;
    tracing::info!(user = %user.id, path = %path.display(), "created the first admin; its API token is in this file");
    Ok(())
}

/// On the installation's first start, the Docker engine of this machine becomes its first
/// host: capacity from the machine with dev-VM overcommit (16 vCPUs per core, twice the
/// memory: most dev VMs sit idle), unless `HEARTH_HOST_MAX_*` say otherwise. Later hosts
/// are added with `hearth admin hosts add`.
async fn first_host(store: &Store, config: &Config) -> Result<()> {
    if !config.local_docker_host
        || config.default_kind != HostKind::Docker
        || store.count_hosts().await? > 0
    {
        return Ok(());
    }
    let cores = std::thread::available_parallelism()
        .map(|n| n.get() as i64)
        .unwrap_or(1);
    let mem_mb = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| {
            m.lines()
                .find(|l| l.starts_with("MemTotal:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse::<i64>().ok())
        })
        .map(|kb| kb / 1024)
        .unwrap_or(4096);
    let endpoint = std::env::var("DOCKER_HOST")
        .ok()
        .filter(|h| h.starts_with("unix://"))
        .unwrap_or_else(|| "unix:///var/run/docker.sock".into());
    let new = NewHost {
        id: uuid::Uuid::now_v7().to_string(),
        name: format!("docker@{}", machine_name()),
        kind: HostKind::Docker,
        endpoint,
        guest_address: "127.0.0.1".into(),
        region: None,
        gpu_model: None,
        gpu_count: 0,
        capacity: HostCapacity {
            max_vcpus: config.host_max_vcpus.unwrap_or(cores * 16),
            max_memory_mb: config.host_max_memory_mb.unwrap_or(mem_mb * 2),
            max_environments: config.host_max_environments,
        },
        tls_ca: None,
        tls_cert: None,
        tls_key_sealed: None,
        credential_sealed: None,
        options: serde_json::json!({}),
        // Learnt at its first health check: Docker may not be up yet.
        identity: None,
    };
    match store.add_host(&new).await {
        Ok(host) => {
            tracing::info!(host = %host.name, endpoint = %host.endpoint, vcpus = host.capacity.max_vcpus, memory_mb = host.capacity.max_memory_mb, "registered the local Docker engine as the first host");
            Ok(())
        }
        // Another node of this installation registered it at the same moment.
        Err(StoreError::Conflict(_)) => Ok(()),
        Err(e) => Err(e.into()),
    }
}

/// With `VM_PROVIDER=ovh` (the seed's configuration), the OVH project and region of the
/// `OVH_*` variables become the installation's first host, and no local Docker host is
/// registered. Its capacity is the project's quota, read at its first health check (within
/// `HEARTH_HOST_CHECK_INTERVAL_MS`); until then it takes nothing.
async fn first_ovh_host(store: &Store, config: &Config, master_key: &MasterKey) -> Result<()> {
    let Some(seed) = &config.ovh else {
        return Ok(());
    };
    if store.count_hosts().await? > 0 {
        return Ok(());
    }
    let new = NewHost {
        id: uuid::Uuid::now_v7().to_string(),
        name: format!("ovh-{}-{}", seed.project_id, seed.region),
        kind: HostKind::Ovh,
        endpoint: seed.endpoint.clone(),
        guest_address: "0.0.0.0".into(),
        region: Some(seed.region.clone()),
        gpu_model: None,
        gpu_count: 0,
        capacity: HostCapacity {
            max_vcpus: 1,
            max_memory_mb: 1,
            max_environments: 1,
        },
        tls_ca: None,
        tls_cert: None,
        tls_key_sealed: None,
        credential_sealed: Some(master_key.seal(&serde_json::to_string(&seed.credentials)?)),
        options: serde_json::json!({ "projectId": seed.project_id, "pollMs": seed.poll_ms }),
        identity: None,
    };
    hearth_provider::ovh::OvhOptions::parse(&new.options)
        .map_err(|e| anyhow::anyhow!("OVH_PROJECT_ID or HEARTH_OVH_POLL_MS: {e}"))?;
    match store.add_host(&new).await {
        Ok(host) => {
            tracing::info!(host = %host.name, endpoint = %host.endpoint, "registered the OVH project and region of OVH_* as the first host");
            Ok(())
        }
        Err(StoreError::Conflict(_)) => Ok(()),
        Err(e) => Err(e.into()),
    }
}

/// When an engine of this machine (a `unix://` endpoint) runs this installation's VMs,
/// closes the host to them (`HEARTH_GUEST_FIREWALL=0` leaves the firewall alone). Without
/// root or iptables it says what to run instead; it never stops the node from starting.
async fn guard_local_engine(store: &Store, config: &Config) -> Result<()> {
    if !config.guest_firewall {
        return Ok(());
    }
    let local = store
        .hosts()
        .await?
        .into_iter()
        .any(|h| h.kind == HostKind::Docker && h.endpoint.starts_with("unix://"));
    if !local {
        return Ok(());
    }
    match hearth_provider::docker::guard::guard_local_host() {
        Ok(()) => tracing::info!(
            "VMs on this machine cannot open connections to it (iptables chain HEARTH-GUESTS)"
        ),
        Err(e) => tracing::warn!(
            error = %e,
            commands = %hearth_provider::docker::guard::guard_commands().join("; "),
            "cannot close this machine to its VMs: they can reach services listening on its addresses; run these as root, \
             or set HEARTH_GUEST_FIREWALL=0 to silence this"
        ),
    }
    Ok(())
}

pub fn machine_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|_| "localhost".into())
}

fn redact(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(s), Some(at)) if at > s => format!("{}://***{}", &url[..s], &url[at..]),
        _ => url.to_string(),
    }
}

/// Opens the installation with the system clock.
pub async fn open_app(config: Config) -> Result<App> {
    open_app_with_clock(config, hearth_core::clock::system()).await
}

pub async fn open_app_with_clock(config: Config, clock: Arc<dyn Clock>) -> Result<App> {
    private_data_dir(&config.data_dir)?;
    let store = Store::connect_with_clock(&config.database_url, clock)
        .await
        .with_context(|| format!("cannot open the database {}", redact(&config.database_url)))?;
    // SQLite keeps its data beside the database file; nobody else may read it.
    for name in ["hearth.db", "hearth.db-wal", "hearth.db-shm"] {
        let path = config.data_dir.join(name);
        if path.exists() {
            let _ = std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600));
        }
    }
    let installation = store.installation().await?;
    let master_key = master_key(&config, &store).await?;
    // Environment variables (often secrets) are sealed at rest like SSH keys.
    let store = sealed_with(store, master_key.clone());
    ensure_admin(&store, &config.data_dir).await?;
    first_host(&store, &config).await?;
    first_ovh_host(&store, &config, &master_key).await?;
    guard_local_engine(&store, &config).await?;
    let sim = Arc::new(SimProvider::new(Arc::new(crate::sim_ledger::StoreLedger(
        store.clone(),
    ))));
    let docker = Arc::new(DockerProvider::new(config.data_dir.join("hosts")));
    let providers = Providers::default()
        .with(docker)
        .with(sim.clone())
        .with(Arc::new(hearth_provider::agent::AgentProvider::new()));
    let ovh = Arc::new(hearth_provider::ovh::OvhProvider::new());
    let providers = providers.with(ovh.clone());
    let queue = Queue::new(store.clone(), config.queues.clone(), config.timing.clone());
    let bus = crate::bus::Bus::new(crate::bus::url_from_env().as_deref())
        .map_err(|e| anyhow::anyhow!(e))?;
    if bus.enabled() {
        let status = bus.status().await;
        tracing::info!(redis = %status, "Redis configured as the bus");
    }
    let mail = match config.mail.clone() {
        Some(c) => Some(Arc::new(
            crate::mail::MailService::new(c).map_err(|e| anyhow::anyhow!(e))?,
        )),
        None => None,
    };
    tracing::info!(installation = %installation.id, "opened the installation");
    Ok(App {
        mail,
        bus,
        hub: Default::default(),
        suspects: Default::default(),
        store,
        queue,
        providers,
        sim,
        ovh,
        ssh: SshPool::new(),
        master_key,
        installation_id: installation.id,
        config: Arc::new(config),
        changed: Arc::new(tokio::sync::Notify::new()),
        pools_wake: Arc::new(tokio::sync::Notify::new()),
        tunnels: Default::default(),
    })
}

/// Starts this node's background work: the job workers (unless `HEARTH_WORKERS=0`), the
/// reaper and reconciler, host health checks, and the Redis listener. Each ends when
/// `shutdown` turns true; running jobs are let finish.
pub fn spawn_background(
    app: &App,
    shutdown: tokio::sync::watch::Receiver<bool>,
) -> Vec<tokio::task::JoinHandle<()>> {
    let mut tasks = Vec::new();
    if app.config.workers {
        let queue = app.queue.clone();
        let handler = Arc::new(crate::jobs::JobHandler { app: app.clone() });
        let stopped = shutdown.clone();
        tasks.push(tokio::spawn(
            async move { queue.run(handler, stopped).await },
        ));
        tasks.push(tokio::spawn(crate::pools::run(
            app.clone(),
            shutdown.clone(),
        )));
    } else {
        tracing::info!("HEARTH_WORKERS=0: this node serves the API only");
    }
    tasks.push(tokio::spawn(crate::reaper::run(
        app.clone(),
        shutdown.clone(),
    )));
    tasks.push(tokio::spawn(crate::health::run(
        app.clone(),
        shutdown.clone(),
    )));
    tasks.push(tokio::spawn(app.bus.clone().listen(app.clone(), shutdown)));
    tasks
}
