//! `hearth serve`: open the database, load the master key, make the first admin, start
//! the workers and the HTTP server, and stop cleanly on SIGTERM or Ctrl-C.

use crate::jobs::JobHandler;
use crate::{App, Config};
use anyhow::{Context, Result};
use hearth_core::{Role, Tier};
use hearth_guest::{MasterKey, SshPool};
use hearth_provider::Provider;
use hearth_provider::docker::DockerProvider;
use hearth_queue::Queue;
use hearth_store::Store;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;
use std::future::IntoFuture;
use std::sync::Arc;
use tokio::sync::watch;

/// Writes `contents` to a new file readable by the owner only.
fn write_private(path: &Path, contents: &str) -> Result<()> {
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

fn load_master_key(config: &Config) -> Result<MasterKey> {
    if let Some(text) = &config.master_key {
        return MasterKey::parse(text).context("HEARTH_MASTER_KEY is invalid");
    }
    let path = config.data_dir.join("master.key");
    if path.exists() {
        let text = std::fs::read_to_string(&path).with_context(|| format!("cannot read {}", path.display()))?;
        return MasterKey::parse(&text).with_context(|| format!("{} is invalid", path.display()));
    }
    let key = MasterKey::generate();
    write_private(&path, &key.to_base64())?;
    tracing::info!(path = %path.display(), "generated a master key; back it up: without it stored SSH keys cannot be read");
    Ok(key)
}

/// On an empty database: an admin user whose token goes to `<data dir>/admin.token`.
async fn ensure_admin(store: &Store, data_dir: &Path) -> Result<()> {
    if store.count_users().await? > 0 {
        return Ok(());
    }
    let (user, token) = store.create_user("admin@localhost", Role::Admin, Tier::Unlimited).await?;
    let path = data_dir.join("admin.token");
    write_private(&path, &token)?;
    tracing::info!(user = %user.id, path = %path.display(), "created the first admin; its API token is in this file");
    Ok(())
}

pub async fn open_app(config: Config) -> Result<App> {
    std::fs::create_dir_all(&config.data_dir)
        .with_context(|| format!("cannot create the data directory {}", config.data_dir.display()))?;
    let store = Store::connect(&config.database_url)
        .await
        .with_context(|| format!("cannot open the database {}", redact(&config.database_url)))?;
    let master_key = load_master_key(&config)?;
    ensure_admin(&store, &config.data_dir).await?;
    let provider: Arc<dyn Provider> = Arc::new(DockerProvider::new());
    if let Err(e) = provider.check().await {
        tracing::warn!("{e}. Hearth starts anyway; provisioning fails until Docker is reachable");
    }
    register_local_host(&store, &config).await?;
    let queue = Queue::new(store.clone(), config.queues.clone(), config.timing.clone());
    let bus = crate::bus::Bus::new(crate::bus::url_from_env().as_deref()).map_err(|e| anyhow::anyhow!(e))?;
    if bus.enabled() {
        let status = bus.status().await;
        tracing::info!(redis = %status, "Redis configured as the bus");
    }
    Ok(App {
        bus,
        hub: Default::default(),
        store,
        queue,
        provider,
        ssh: SshPool::new(),
        master_key,
        config: Arc::new(config),
        changed: Arc::new(tokio::sync::Notify::new()),
    })
}

/// The Docker engine this process drives is a host: capacity from the machine, with dev-VM
/// overcommit (16 vCPUs per core, twice the memory: most dev VMs sit idle), unless
/// `HEARTH_HOST_MAX_*` say otherwise.
async fn register_local_host(store: &Store, config: &Config) -> Result<()> {
    let cores = std::thread::available_parallelism().map(|n| n.get() as i64).unwrap_or(1);
    let mem_mb = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| m.lines().find(|l| l.starts_with("MemTotal:")).and_then(|l| l.split_whitespace().nth(1)?.parse::<i64>().ok()))
        .map(|kb| kb / 1024)
        .unwrap_or(4096);
    let cap = hearth_store::HostCapacity {
        max_vcpus: config.host_max_vcpus.unwrap_or(cores * 16),
        max_memory_mb: config.host_max_memory_mb.unwrap_or(mem_mb * 2),
        max_environments: config.host_max_environments,
    };
    let name = format!("docker@{}/{}", hostname(), instance());
    let host = store.upsert_host(&name, "docker", &cap).await?;
    tracing::info!(host = %host.name, vcpus = cap.max_vcpus, memory_mb = cap.max_memory_mb, environments = cap.max_environments, "registered the local Docker host");
    Ok(())
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname").map(|s| s.trim().to_string()).unwrap_or_else(|_| "localhost".into())
}

fn instance() -> String {
    std::env::var("HEARTH_INSTANCE").ok().filter(|s| !s.is_empty()).unwrap_or_else(|| "default".into())
}

fn redact(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(s), Some(at)) if at > s => format!("{}://***{}", &url[..s], &url[at..]),
        _ => url.to_string(),
    }
}

async fn shutdown_signal() {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).expect("SIGTERM handler");
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}

pub async fn run(config: Config) -> Result<()> {
    let listen = config.listen.clone();
    let app = open_app(config).await?;
    let listener = tokio::net::TcpListener::bind(&listen)
        .await
        .with_context(|| format!("cannot listen on {listen}; set HEARTH_LISTEN to a free address"))?;
    tracing::info!(address = %listener.local_addr()?, data_dir = %app.config.data_dir.display(), "Hearth is serving");

    let (stop, stopped) = watch::channel(false);
    let workers = if app.config.workers {
        let queue = app.queue.clone();
        let handler = Arc::new(JobHandler { app: app.clone() });
        let stopped = stopped.clone();
        Some(tokio::spawn(async move { queue.run(handler, stopped).await }))
    } else {
        tracing::info!("HEARTH_WORKERS=0: this node serves the API only");
        None
    };
    let upkeep = tokio::spawn(crate::reaper::run(app.clone(), stopped.clone()));
    let listener_task = tokio::spawn(app.bus.clone().listen(app.clone(), stopped));
    let router = crate::api::router(app.clone());
    let (closing, closed) = watch::channel(false);
    // No Nagle delay: terminal keystrokes and event lines are small writes.
    let listener = axum::serve::ListenerExt::tap_io(listener, |tcp| {
        let _ = tcp.set_nodelay(true);
    });
    let server = tokio::spawn(
        axum::serve(listener, router)
            .with_graceful_shutdown(async move {
                let mut closed = closed;
                let _ = closed.wait_for(|c| *c).await;
            })
            .into_future(),
    );
    shutdown_signal().await;
    tracing::info!("shutting down: no new jobs are claimed; running ones finish");
    let _ = closing.send(true);
    let _ = stop.send(true);
    // Event streams and terminals never end by themselves: give them a moment, then go.
    if tokio::time::timeout(std::time::Duration::from_secs(5), server).await.is_err() {
        tracing::info!("closing the remaining long-lived connections");
    }
    if let Some(w) = workers {
        let _ = w.await;
    }
    let _ = upkeep.await;
    let _ = listener_task.await;
    tracing::info!("stopped");
    Ok(())
}
