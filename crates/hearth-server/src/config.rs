//! Settings from the environment (DESIGN.md section 6), with defaults that run on one machine.

use hearth_queue::{QueueConfig, Timing};
use std::path::PathBuf;
use std::time::Duration;

#[derive(Debug, Clone)]
pub struct Config {
    pub listen: String,
    pub data_dir: PathBuf,
    pub database_url: String,
    /// `HEARTH_MASTER_KEY`; when unset, `<data dir>/master.key` (made on first start).
    pub master_key: Option<String>,
    pub provider: String,
    pub image: String,
    pub queues: Vec<QueueConfig>,
    pub timing: Timing,
    /// How long provisioning waits for the guest's SSH before the attempt fails.
    pub ssh_wait: Duration,
    /// How often the reaper and reconciler run.
    pub reaper_interval: Duration,
    /// A transition older than this with no job behind it is rolled back.
    pub transition_deadline: Duration,
    /// Capacity the local Docker host announces (defaults from the machine).
    pub host_max_vcpus: Option<i64>,
    pub host_max_memory_mb: Option<i64>,
    pub host_max_environments: i64,
    /// Run job workers in this process (an API-only node sets false).
    pub workers: bool,
}

fn var(name: &str) -> Option<String> {
    std::env::var(name).ok().filter(|v| !v.trim().is_empty())
}

fn number<T: std::str::FromStr>(name: &str, default: T) -> Result<T, String> {
    match var(name) {
        None => Ok(default),
        Some(v) => v.trim().parse().map_err(|_| format!("{name} must be a number, got {v:?}")),
    }
}

impl Config {
    pub fn from_env() -> Result<Config, String> {
        let data_dir = PathBuf::from(var("HEARTH_DATA_DIR").unwrap_or_else(|| default_data_dir()));
        let database_url = var("DATABASE_URL")
            .unwrap_or_else(|| format!("sqlite://{}?mode=rwc", data_dir.join("hearth.db").display()));
        let provider = var("VM_PROVIDER").unwrap_or_else(|| "docker".into());
        if provider != "docker" {
            return Err(format!(
                "VM_PROVIDER={provider} is not implemented yet; only `docker` works in this version"
            ));
        }
        let mut queues = QueueConfig::defaults();
        for q in &mut queues {
            let up = q.name.to_uppercase();
            q.concurrency = number(&format!("HEARTH_{up}_CONCURRENCY"), q.concurrency)?;
            q.max_attempts = number(&format!("HEARTH_{up}_ATTEMPTS"), q.max_attempts)?;
            let backoff_ms = number(&format!("HEARTH_{up}_BACKOFF_MS"), q.backoff.as_millis() as u64)?;
            q.backoff = Duration::from_millis(backoff_ms);
            if q.concurrency == 0 || q.max_attempts < 1 {
                return Err(format!("queue {} needs concurrency and attempts of at least 1", q.name));
            }
        }
        let timing = Timing {
            lease: Duration::from_millis(number("HEARTH_JOB_LEASE_MS", 30_000u64)?),
            poll: Duration::from_millis(number("HEARTH_JOB_POLL_MS", 1_000u64)?),
        };
        Ok(Config {
            listen: var("HEARTH_LISTEN").unwrap_or_else(|| "127.0.0.1:8080".into()),
            data_dir,
            database_url,
            master_key: var("HEARTH_MASTER_KEY"),
            provider,
            image: var("HEARTH_IMAGE").unwrap_or_else(|| hearth_provider::image::DEFAULT_IMAGE.into()),
            queues,
            timing,
            ssh_wait: Duration::from_secs(number("HEARTH_SSH_WAIT_SECONDS", 120u64)?),
            reaper_interval: Duration::from_millis(number("HEARTH_REAPER_INTERVAL_MS", 30_000u64)?),
            transition_deadline: Duration::from_secs(number("HEARTH_TRANSITION_DEADLINE_SECONDS", 900u64)?),
            host_max_vcpus: var("HEARTH_HOST_MAX_VCPUS").map(|_| number("HEARTH_HOST_MAX_VCPUS", 0i64)).transpose()?,
            host_max_memory_mb: var("HEARTH_HOST_MAX_MEMORY_MB").map(|_| number("HEARTH_HOST_MAX_MEMORY_MB", 0i64)).transpose()?,
            host_max_environments: number("HEARTH_HOST_MAX_ENVIRONMENTS", 200i64)?,
            workers: number("HEARTH_WORKERS", 1u8)? != 0,
        })
    }
}

pub fn default_data_dir() -> String {
    match std::env::var("HOME") {
        Ok(home) if !home.is_empty() => format!("{home}/.local/share/hearth"),
        _ => "/var/lib/hearth".into(),
    }
}
