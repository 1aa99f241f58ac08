//! Settings from the environment (DESIGN.md section 6), with defaults that run on one machine.

use hearth_core::HostKind;
use hearth_queue::{QueueConfig, Timing};
use std::path::PathBuf;
use std::time::Duration;

#[derive(Debug, Clone)]
pub struct Config {
    pub listen: String,
    /// Connections the listener holds at most (`HEARTH_MAX_CONNECTIONS`).
    pub max_connections: usize,
    /// A request's headers must arrive within this; a keep-alive connection idle this long
    /// is closed (`HEARTH_HEADER_TIMEOUT_SECONDS`).
    pub header_timeout: Duration,
    /// `/metrics` answers without a token (`HEARTH_METRICS_PUBLIC=1`); otherwise it needs
    /// an admin's, since it tells how many environments and jobs there are.
    pub metrics_public: bool,
    /// Session cookies carry `Secure` (`HEARTH_SECURE_COOKIES=1`): set it when browsers
    /// reach Hearth over TLS (through a proxy that terminates it), never on plain HTTP,
    /// where browsers would then drop the cookie.
    pub secure_cookies: bool,
    /// OpenID Connect sign-in, when `HEARTH_OIDC_ISSUER` is set (see `oidc.rs`).
    pub oidc: Option<crate::oidc::OidcConfig>,
    /// Preview URLs, when `HEARTH_PREVIEW_DOMAIN` is set (see `previews.rs`).
    pub previews: Option<crate::previews::PreviewConfig>,
    /// Close the host to its VMs (`HEARTH_GUEST_FIREWALL`, on by default): on a machine
    /// whose Docker engine is a host of this installation, VMs may not open connections
    /// to the host or to link-local addresses (see `hearth_provider::docker::guard`).
    pub guest_firewall: bool,
    /// Send stored HTTPS tokens to `http://` repositories too
    /// (`HEARTH_GIT_TOKENS_OVER_PLAIN_HTTP=1`; off: anyone on the way could read them).
    pub git_tokens_over_plain_http: bool,
    pub data_dir: PathBuf,
    pub database_url: String,
    /// `HEARTH_MASTER_KEY`; when unset, `<data dir>/master.key` (made on first start).
    pub master_key: Option<String>,
    /// `VM_PROVIDER`: the kind of host environments go to unless they ask for another.
    pub default_kind: HostKind,
    /// `HEARTH_INSTANCE`: a display name, put on VMs as a label for people. Identity is
    /// the installation id in the database, never this.
    pub instance_name: Option<String>,
    pub image: String,
    pub queues: Vec<QueueConfig>,
    pub timing: Timing,
    /// How long provisioning waits for the guest's SSH before the attempt fails.
    pub ssh_wait: Duration,
    /// How often the reaper and reconciler run.
    pub reaper_interval: Duration,
    /// A transition older than this with no job behind it is rolled back.
    pub transition_deadline: Duration,
    /// A snapshot still being taken after this long lost its taker (a node that died): the
    /// reaper keeps what the host finished or drops the row.
    pub snapshot_taker_lost: Duration,
    /// An image still being made after this long lost its builder (a node that died): the
    /// reaper removes it with what was made of it, and this node's uploads that old.
    pub image_builder_lost: Duration,
    /// The largest image tarball an upload may bring (`HEARTH_IMAGE_UPLOAD_MAX_BYTES`); it is
    /// kept on this node's disk under `<data dir>/imports` while it is loaded.
    pub image_upload_max_bytes: u64,
    /// How often every host is asked whether it answers.
    pub host_check_interval: Duration,
    /// A host not seen for this long is unhealthy: placement skips it, and the reconciler
    /// leaves its VMs alone.
    pub host_unhealthy_after: Duration,
    /// How long a job waits for a host that does not answer (a daemon restart, a network
    /// blip) before that counts as a failed attempt.
    pub host_outage_budget: Duration,
    /// Register the local Docker engine as a host on the installation's first start.
    pub local_docker_host: bool,
    /// With `VM_PROVIDER=ovh`, the seed's `OVH_*` variables: the OVH project and region
    /// that become the installation's first host.
    pub ovh: Option<OvhSeed>,
    /// Capacity the local Docker host announces (defaults from the machine).
    pub host_max_vcpus: Option<i64>,
    pub host_max_memory_mb: Option<i64>,
    pub host_max_environments: i64,
    /// Run job workers in this process (an API-only node sets false).
    pub workers: bool,
    /// How long history is kept.
    pub retention: hearth_store::Retention,
    /// Commands by mail (`HEARTH_MAIL_ADDRESS` and the rest, see `mail.rs`).
    pub mail: Option<crate::mail::MailConfig>,
}

const DAY_MS: i64 = 86_400_000;

fn var(name: &str) -> Option<String> {
    std::env::var(name).ok().filter(|v| !v.trim().is_empty())
}

fn number<T: std::str::FromStr>(name: &str, default: T) -> Result<T, String> {
    match var(name) {
        None => Ok(default),
        Some(v) => v
            .trim()
            .parse()
            .map_err(|_| format!("{name} must be a number, got {v:?}")),
    }
}

impl Config {
    /// The defaults, for a data directory and database, with nothing read from the
    /// environment (tests build on this).
    pub fn new(data_dir: PathBuf, database_url: String) -> Config {
        Config {
            listen: "127.0.0.1:8080".into(),
            max_connections: 16_384,
            header_timeout: Duration::from_secs(10),
            metrics_public: false,
            secure_cookies: false,
            oidc: None,
            previews: None,
            guest_firewall: true,
            git_tokens_over_plain_http: false,
            data_dir,
            database_url,
            master_key: None,
            default_kind: HostKind::Docker,
            instance_name: None,
            image: hearth_provider::image::DEFAULT_IMAGE.into(),
            queues: QueueConfig::defaults(),
            timing: Timing::default(),
            ssh_wait: Duration::from_secs(120),
            reaper_interval: Duration::from_secs(30),
            transition_deadline: Duration::from_secs(900),
            snapshot_taker_lost: Duration::from_secs(900),
            image_builder_lost: Duration::from_secs(3600),
            image_upload_max_bytes: 10_000_000_000,
            host_check_interval: Duration::from_secs(5),
            host_unhealthy_after: Duration::from_secs(15),
            host_outage_budget: Duration::from_secs(300),
            local_docker_host: true,
            ovh: None,
            host_max_vcpus: None,
            host_max_memory_mb: None,
            host_max_environments: 200,
            workers: true,
            retention: hearth_store::Retention {
                executions_ms: 30 * DAY_MS,
                audit_ms: 365 * DAY_MS,
                jobs_ms: 30 * DAY_MS,
                destroyed_ms: 30 * DAY_MS,
            },
            mail: None,
        }
    }

    /// The defaults, overridden by the environment variables README.md lists.
    pub fn from_env() -> Result<Config, String> {
        let data_dir = PathBuf::from(var("HEARTH_DATA_DIR").unwrap_or_else(default_data_dir));
        let database_url = var("DATABASE_URL").unwrap_or_else(|| {
            format!("sqlite://{}?mode=rwc", data_dir.join("hearth.db").display())
        });
        let mut c = Config::new(data_dir, database_url);
        let provider = var("VM_PROVIDER").unwrap_or_else(|| "docker".into());
        c.default_kind = match HostKind::parse(&provider) {
            Some(k) => k,
            None => {
                return Err(format!(
                    "VM_PROVIDER must be docker, agent, ovh or sim, got {provider:?}"
                ));
            }
        };
        if c.default_kind == HostKind::Ovh {
            c.ovh = Some(OvhSeed::from_env()?);
        }
        for q in &mut c.queues {
            let up = q.name.to_uppercase();
            q.concurrency = number(&format!("HEARTH_{up}_CONCURRENCY"), q.concurrency)?;
            q.max_attempts = number(&format!("HEARTH_{up}_ATTEMPTS"), q.max_attempts)?;
            let backoff_ms = number(
                &format!("HEARTH_{up}_BACKOFF_MS"),
                q.backoff.as_millis() as u64,
            )?;
            q.backoff = Duration::from_millis(backoff_ms);
            if q.concurrency == 0 || q.max_attempts < 1 {
                return Err(format!(
                    "queue {} needs concurrency and attempts of at least 1",
                    q.name
                ));
            }
        }
        let ms =
            |name: &str, d: Duration| number(name, d.as_millis() as u64).map(Duration::from_millis);
        let secs = |name: &str, d: Duration| number(name, d.as_secs()).map(Duration::from_secs);
        c.timing = Timing {
            lease: ms("HEARTH_JOB_LEASE_MS", c.timing.lease)?,
            poll: ms("HEARTH_JOB_POLL_MS", c.timing.poll)?,
        };
        c.listen = var("HEARTH_LISTEN").unwrap_or(c.listen);
        c.max_connections = number("HEARTH_MAX_CONNECTIONS", c.max_connections)?;
        c.header_timeout = secs("HEARTH_HEADER_TIMEOUT_SECONDS", c.header_timeout)?;
        c.master_key = var("HEARTH_MASTER_KEY");
        c.instance_name = var("HEARTH_INSTANCE");
        c.image = var("HEARTH_IMAGE").unwrap_or(c.image);
        c.ssh_wait = secs("HEARTH_SSH_WAIT_SECONDS", c.ssh_wait)?;
        c.reaper_interval = ms("HEARTH_REAPER_INTERVAL_MS", c.reaper_interval)?;
        c.transition_deadline = secs("HEARTH_TRANSITION_DEADLINE_SECONDS", c.transition_deadline)?;
        c.snapshot_taker_lost = ms("HEARTH_SNAPSHOT_TAKER_LOST_MS", c.snapshot_taker_lost)?;
        c.image_builder_lost = ms("HEARTH_IMAGE_BUILDER_LOST_MS", c.image_builder_lost)?;
        c.image_upload_max_bytes =
            number("HEARTH_IMAGE_UPLOAD_MAX_BYTES", c.image_upload_max_bytes)?;
        c.host_check_interval = ms("HEARTH_HOST_CHECK_INTERVAL_MS", c.host_check_interval)?;
        c.host_unhealthy_after = ms("HEARTH_HOST_UNHEALTHY_AFTER_MS", c.host_unhealthy_after)?;
        c.host_outage_budget = secs("HEARTH_HOST_OUTAGE_BUDGET_SECONDS", c.host_outage_budget)?;
        c.local_docker_host = number("HEARTH_LOCAL_DOCKER_HOST", 1u8)? != 0;
        c.host_max_vcpus = var("HEARTH_HOST_MAX_VCPUS")
            .map(|_| number("HEARTH_HOST_MAX_VCPUS", 0i64))
            .transpose()?;
        c.host_max_memory_mb = var("HEARTH_HOST_MAX_MEMORY_MB")
            .map(|_| number("HEARTH_HOST_MAX_MEMORY_MB", 0i64))
            .transpose()?;
        c.host_max_environments = number("HEARTH_HOST_MAX_ENVIRONMENTS", c.host_max_environments)?;
        c.workers = number("HEARTH_WORKERS", 1u8)? != 0;
        c.metrics_public = number("HEARTH_METRICS_PUBLIC", 0u8)? != 0;
        c.secure_cookies = number("HEARTH_SECURE_COOKIES", 0u8)? != 0;
        c.oidc = crate::oidc::OidcConfig::from_env()?;
        c.previews = crate::previews::PreviewConfig::from_env()?;
        c.mail = crate::mail::MailConfig::from_env()?;
        c.guest_firewall = number("HEARTH_GUEST_FIREWALL", 1u8)? != 0;
        c.git_tokens_over_plain_http = number("HEARTH_GIT_TOKENS_OVER_PLAIN_HTTP", 0u8)? != 0;
        let days = |name: &str, ms: i64| number(name, ms / DAY_MS).map(|d: i64| d.max(1) * DAY_MS);
        c.retention = hearth_store::Retention {
            executions_ms: days("HEARTH_RETAIN_EXECUTIONS_DAYS", c.retention.executions_ms)?,
            audit_ms: days("HEARTH_RETAIN_AUDIT_DAYS", c.retention.audit_ms)?,
            jobs_ms: days("HEARTH_RETAIN_JOBS_DAYS", c.retention.jobs_ms)?,
            destroyed_ms: days("HEARTH_RETAIN_DESTROYED_DAYS", c.retention.destroyed_ms)?,
        };
        Ok(c)
    }
}

pub fn default_data_dir() -> String {
    match std::env::var("HOME") {
        Ok(home) if !home.is_empty() => format!("{home}/.local/share/hearth"),
        _ => "/var/lib/hearth".into(),
    }
}

/// The OVH project and region an installation started with `VM_PROVIDER=ovh` runs on, from
/// the seed's variables: `OVH_ENDPOINT` (default `ovh-eu`), `OVH_APPLICATION_KEY`,
/// `OVH_APPLICATION_SECRET`, `OVH_CONSUMER_KEY`, `OVH_PROJECT_ID`, `OVH_REGION` (default
/// `GRA9`, as the seed's); `HEARTH_OVH_POLL_MS` how often instances are listed (5000).
#[derive(Debug, Clone)]
pub struct OvhSeed {
    pub endpoint: String,
    pub credentials: hearth_provider::ovh::client::Credentials,
    pub project_id: String,
    pub region: String,
    pub poll_ms: u64,
}

impl OvhSeed {
    fn from_env() -> Result<OvhSeed, String> {
        let need = |name: &str| {
            var(name).ok_or_else(|| {
                format!("VM_PROVIDER=ovh needs {name} (see README.md: OVH Public Cloud)")
            })
        };
        let credentials = hearth_provider::ovh::client::Credentials {
            application_key: need("OVH_APPLICATION_KEY")?,
            application_secret: need("OVH_APPLICATION_SECRET")?,
            consumer_key: need("OVH_CONSUMER_KEY")?,
        };
        credentials.check()?;
        let endpoint = hearth_provider::ovh::client::base_url(
            &var("OVH_ENDPOINT").unwrap_or_else(|| "ovh-eu".into()),
        )?;
        Ok(OvhSeed {
            endpoint,
            credentials,
            project_id: need("OVH_PROJECT_ID")?,
            region: var("OVH_REGION").unwrap_or_else(|| "GRA9".into()),
            poll_ms: number("HEARTH_OVH_POLL_MS", 5_000)?,
        })
    }
}
