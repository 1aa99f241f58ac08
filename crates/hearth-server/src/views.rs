//! The JSON shapes of the API (camelCase, RFC 3339 times), built from store types. Their
//! schemas go into the OpenAPI document (`api::docs`), so document and answers cannot drift.

use hearth_app::service::ExecResult;
use hearth_core::{EnvState, HostHealth, HostKind, HostStatus, Quota, Role, Tier, Usage};
use hearth_store::{
    AuditEntry, Environment, EnvironmentSummary, Execution, ExecutionSummary, Host, Job, LogEntry,
    QuotaOverrides, User,
};
use serde::Serialize;
use utoipa::ToSchema;

pub use hearth_app::events::time;

fn opt_time(ms: Option<i64>) -> Option<String> {
    ms.map(time)
}

/// The personal VM: a view of the user's personal environment, never a second status.
#[derive(Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct UserVm {
    pub id: String,
    pub user_id: String,
    pub environment_id: String,
    pub status: EnvState,
    pub state_message: Option<String>,
    pub generation: i64,
    pub vcpus: i64,
    pub memory_mb: i64,
    pub disk_gb: i64,
    pub host_name: Option<String>,
    pub ssh_host: Option<String>,
    pub ssh_port: Option<i64>,
    pub ssh_user: String,
    /// Whether the owner gave their own SSH key (so `ssh` works from their machine).
    pub has_user_ssh_key: bool,
    pub internal_ip: Option<String>,
    pub auto_stop: bool,
    pub auto_stop_minutes: i64,
    pub total_runtime_minutes: i64,
    pub last_started_at: Option<String>,
    pub last_stopped_at: Option<String>,
    pub last_activity_at: Option<String>,
    pub created_at: String,
    pub updated_at: String,
}

impl From<&Environment> for UserVm {
    fn from(e: &Environment) -> UserVm {
        let running_now = match (e.state, e.started_at) {
            (hearth_core::EnvState::Running, Some(s)) => {
                ((hearth_core::Clock::now_ms(&hearth_core::clock::SystemClock) - s) / 1000).max(0)
            }
            _ => 0,
        };
        UserVm {
            id: e.id.clone(),
            user_id: e.user_id.clone(),
            environment_id: e.id.clone(),
            status: e.state,
            state_message: e.state_message.clone(),
            generation: e.generation,
            vcpus: e.vcpus,
            memory_mb: e.memory_mb,
            disk_gb: e.disk_gb,
            host_name: e.host_name.clone(),
            ssh_host: e.ssh_host.clone(),
            ssh_port: e.ssh_port,
            ssh_user: e.ssh_user.clone(),
            has_user_ssh_key: e.has_user_ssh_key(),
            internal_ip: e.ip_address.clone(),
            auto_stop: e.auto_stop_minutes.is_some(),
            auto_stop_minutes: e.auto_stop_minutes.unwrap_or(0),
            total_runtime_minutes: (e.total_runtime_seconds + running_now) / 60,
            last_started_at: opt_time(e.started_at),
            last_stopped_at: opt_time(e.stopped_at),
            last_activity_at: opt_time(e.last_activity_at),
            created_at: time(e.created_at),
            updated_at: time(e.updated_at),
        }
    }
}

#[derive(Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct UserView {
    pub id: String,
    pub email: String,
    pub role: Role,
    pub tier: Tier,
    pub created_at: String,
}

impl From<&User> for UserView {
    fn from(u: &User) -> UserView {
        UserView {
            id: u.id.clone(),
            email: u.email.clone(),
            role: u.role,
            tier: u.tier,
            created_at: time(u.created_at),
        }
    }
}

#[derive(Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct LogView {
    pub timestamp: String,
    pub level: String,
    pub message: String,
}

impl From<&LogEntry> for LogView {
    fn from(l: &LogEntry) -> LogView {
        LogView {
            timestamp: time(l.at),
            level: l.level.clone(),
            message: l.message.clone(),
        }
    }
}

#[derive(Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct ExecView {
    pub id: String,
    pub stdout: String,
    pub stderr: String,
    pub exit_code: Option<i64>,
    pub duration_ms: i64,
    pub timed_out: bool,
    pub truncated: bool,
}

impl From<&ExecResult> for ExecView {
    fn from(r: &ExecResult) -> ExecView {
        ExecView {
            id: r.execution.id.clone(),
            stdout: r.stdout.clone(),
            stderr: r.stderr.clone(),
            exit_code: r.execution.exit_code,
            duration_ms: r.execution.duration_ms.unwrap_or(0),
            timed_out: r.execution.status == "timeout",
            truncated: r.truncated,
        }
    }
}

#[derive(Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct EnvironmentView {
    pub id: String,
    pub slug: String,
    pub name: String,
    pub user_id: String,
    pub personal: bool,
    pub state: EnvState,
    pub state_message: Option<String>,
    pub provider: HostKind,
    pub host_id: Option<String>,
    /// The host's name, as the admin's host list shows it.
    pub host_name: Option<String>,
    pub vm_id: Option<String>,
    pub region: Option<String>,
    pub ip_address: Option<String>,
    pub ssh_host: Option<String>,
    pub ssh_port: Option<i64>,
    pub ssh_user: String,
    /// The guest's SSH host key (`type base64`), pinned when the VM was made: what
    /// `hearth ssh-config` writes to its `known_hosts`.
    pub ssh_host_key: Option<String>,
    /// Whether the owner gave their own SSH key (so `ssh` works from their machine).
    pub has_user_ssh_key: bool,
    pub vcpus: i64,
    pub memory_mb: i64,
    pub disk_gb: i64,
    pub gpus: i64,
    pub gpu_model: Option<String>,
    pub base_image: String,
    pub repository_url: Option<String>,
    /// The branch or tag cloned; the remote's default branch when null.
    pub repository_ref: Option<String>,
    pub environment_vars: std::collections::BTreeMap<String, String>,
    pub auto_stop_minutes: Option<i64>,
    pub generation: i64,
    pub created_at: String,
    pub started_at: Option<String>,
    pub stopped_at: Option<String>,
    pub expires_at: Option<String>,
    pub last_activity_at: Option<String>,
}

impl From<&Environment> for EnvironmentView {
    fn from(e: &Environment) -> EnvironmentView {
        EnvironmentView::from(EnvironmentSummary::from(e))
    }
}

/// A page's items are moved into their views, not copied.
impl From<EnvironmentSummary> for EnvironmentView {
    fn from(e: EnvironmentSummary) -> EnvironmentView {
        EnvironmentView {
            id: e.id,
            slug: e.slug,
            name: e.name,
            user_id: e.user_id,
            personal: e.personal,
            state: e.state,
            state_message: e.state_message,
            provider: e.provider,
            host_id: e.host_id,
            host_name: e.host_name,
            vm_id: e.vm_id,
            region: e.region,
            ip_address: e.ip_address,
            ssh_host: e.ssh_host,
            ssh_port: e.ssh_port,
            ssh_user: e.ssh_user,
            ssh_host_key: e.ssh_host_key,
            has_user_ssh_key: e.has_user_ssh_key,
            vcpus: e.vcpus,
            memory_mb: e.memory_mb,
            disk_gb: e.disk_gb,
            gpus: e.gpus,
            gpu_model: e.gpu_model,
            base_image: e.base_image,
            repository_url: e.repository_url,
            repository_ref: e.repository_ref,
            environment_vars: e.environment_vars,
            auto_stop_minutes: e.auto_stop_minutes,
            generation: e.generation,
            created_at: time(e.created_at),
            started_at: opt_time(e.started_at),
            stopped_at: opt_time(e.stopped_at),
            expires_at: opt_time(e.expires_at),
            last_activity_at: opt_time(e.last_activity_at),
        }
    }
}

#[derive(Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct AuditView {
    pub id: i64,
    pub at: String,
    pub actor: String,
    pub action: String,
    pub environment_id: Option<String>,
    pub previous_state: Option<String>,
    pub new_state: Option<String>,
    pub outcome: String,
    pub error: Option<String>,
    pub duration_ms: Option<i64>,
}

impl From<&AuditEntry> for AuditView {
    fn from(a: &AuditEntry) -> AuditView {
        AuditView {
            id: a.id,
            at: time(a.at),
            actor: a.actor.clone(),
            action: a.action.clone(),
            environment_id: a.environment_id.clone(),
            previous_state: a.previous_state.clone(),
            new_state: a.new_state.clone(),
            outcome: a.outcome.clone(),
            error: a.error.clone(),
            duration_ms: a.duration_ms,
        }
    }
}

#[derive(Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct ExecutionView {
    pub id: String,
    pub environment_id: String,
    pub command: String,
    pub working_dir: Option<String>,
    pub status: String,
    pub exit_code: Option<i64>,
    pub stdout: String,
    pub stderr: String,
    pub truncated: bool,
    pub started_at: String,
    pub finished_at: Option<String>,
    pub duration_ms: Option<i64>,
}

impl From<&Execution> for ExecutionView {
    fn from(e: &Execution) -> ExecutionView {
        ExecutionView {
            id: e.id.clone(),
            environment_id: e.environment_id.clone(),
            command: e.command.clone(),
            working_dir: e.working_dir.clone(),
            status: e.status.clone(),
            exit_code: e.exit_code,
            stdout: e.stdout.clone(),
            stderr: e.stderr.clone(),
            truncated: e.truncated,
            started_at: time(e.started_at),
            finished_at: opt_time(e.finished_at),
            duration_ms: e.duration_ms,
        }
    }
}

/// An execution in a list: no output, and the command's first 1,024 characters (at
/// most 4 KiB), so a page of 1,000 stays within 5 MiB. `GET .../executions/{id}` has the rest.
#[derive(Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct ExecutionSummaryView {
    pub id: String,
    pub environment_id: String,
    pub command: String,
    pub command_truncated: bool,
    pub working_dir: Option<String>,
    pub status: String,
    pub exit_code: Option<i64>,
    /// The stored output was cut (64 KiB per stream is kept).
    pub truncated: bool,
    pub stdout_chars: i64,
    pub stderr_chars: i64,
    pub started_at: String,
    pub finished_at: Option<String>,
    pub duration_ms: Option<i64>,
}

impl From<&ExecutionSummary> for ExecutionSummaryView {
    fn from(e: &ExecutionSummary) -> ExecutionSummaryView {
        ExecutionSummaryView {
            id: e.id.clone(),
            environment_id: e.environment_id.clone(),
            command: e.command.clone(),
            command_truncated: e.command_truncated,
            working_dir: e.working_dir.clone(),
            status: e.status.clone(),
            exit_code: e.exit_code,
            truncated: e.truncated,
            stdout_chars: e.stdout_chars,
            stderr_chars: e.stderr_chars,
            started_at: time(e.started_at),
            finished_at: opt_time(e.finished_at),
            duration_ms: e.duration_ms,
        }
    }
}

/// A custom image: what creates name in `baseImage`.
#[derive(Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct ImageView {
    pub id: String,
    pub name: String,
    pub owner_id: String,
    /// `private` (its owner's) or `everyone`.
    pub visibility: String,
    /// The host that built it; environments of it go there.
    pub host_id: String,
    pub size_bytes: Option<i64>,
    /// The smallest `diskGb` an environment of it may ask for (an image for agent hosts is a
    /// file system of a size); absent: any.
    pub min_disk_gb: Option<i64>,
    /// `building` or `ready`.
    pub state: String,
    pub created_at: String,
}

impl From<&hearth_store::Image> for ImageView {
    fn from(i: &hearth_store::Image) -> ImageView {
        ImageView {
            id: i.id.clone(),
            name: i.name.clone(),
            owner_id: i.owner_id.clone(),
            visibility: i.visibility.clone(),
            host_id: i.host_id.clone(),
            size_bytes: i.size_bytes,
            min_disk_gb: i.min_disk_gb,
            state: i.state.clone(),
            created_at: time(i.created_at),
        }
    }
}

/// A snapshot of an environment's disk, as its owner sees it.
#[derive(Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct SnapshotView {
    pub id: String,
    pub name: String,
    /// `taking`, `ready` or `deleting`.
    pub state: String,
    /// The environment it was taken of (which may be gone since).
    pub environment_id: String,
    pub host_id: String,
    /// What the host keeps for it, once taken.
    pub size_bytes: Option<i64>,
    /// The part of `sizeBytes` that is its VM's saved memory, once taken. An environment
    /// made from it (or a fork) with the same sizes, on a host that can load it, resumes
    /// where its source was, processes and all; others boot from its disk. 0: the disk
    /// only (Docker, Firecracker, or a VM that was not running).
    pub memory_bytes: Option<i64>,
    /// The size of the environment it was taken of.
    pub vcpus: i64,
    pub memory_mb: i64,
    pub disk_gb: i64,
    pub created_at: String,
}

impl From<&hearth_store::Snapshot> for SnapshotView {
    fn from(s: &hearth_store::Snapshot) -> SnapshotView {
        SnapshotView {
            id: s.id.clone(),
            name: s.name.clone(),
            state: s.state.clone(),
            environment_id: s.environment_id.clone(),
            host_id: s.host_id.clone(),
            size_bytes: s.size_bytes,
            memory_bytes: s.memory_bytes,
            vcpus: s.vcpus,
            memory_mb: s.memory_mb,
            disk_gb: s.disk_gb,
            created_at: time(s.created_at),
        }
    }
}

/// A warm pool as admins see it: what it keeps on which host, and what it has now.
#[derive(Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct PoolView {
    pub id: String,
    pub host_id: String,
    pub host_name: String,
    pub base_image: String,
    pub vcpus: i64,
    pub memory_mb: i64,
    pub disk_gb: i64,
    /// How many VMs it keeps ready.
    pub size: i64,
    /// Booting now.
    pub filling: i64,
    /// Ready to be claimed now.
    pub ready: i64,
    /// Being removed (surplus, or failed).
    pub draining: i64,
    /// Why the last fill failed, if it did.
    pub last_error: Option<String>,
    /// The pool fills again from then on (after a failed fill).
    pub paused_until: Option<String>,
    pub updated_at: String,
}

impl From<&hearth_store::WarmPool> for PoolView {
    fn from(p: &hearth_store::WarmPool) -> PoolView {
        PoolView {
            id: p.id.clone(),
            host_id: p.host_id.clone(),
            host_name: p.host_name.clone(),
            base_image: p.base_image.clone(),
            vcpus: p.vcpus,
            memory_mb: p.memory_mb,
            disk_gb: p.disk_gb,
            size: p.size,
            filling: p.filling,
            ready: p.ready,
            draining: p.draining,
            last_error: p.last_error.clone(),
            paused_until: opt_time(p.paused_until),
            updated_at: time(p.updated_at),
        }
    }
}

/// A host as admins see it. TLS material never leaves the server.
#[derive(Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct HostView {
    pub id: String,
    pub name: String,
    pub kind: HostKind,
    pub endpoint: String,
    pub guest_address: String,
    pub region: Option<String>,
    pub gpu_model: Option<String>,
    pub gpu_count: i64,
    pub status: HostStatus,
    pub health: HostHealth,
    pub health_message: Option<String>,
    pub last_seen_at: Option<String>,
    pub max_vcpus: i64,
    pub max_memory_mb: i64,
    pub max_environments: i64,
    pub used_vcpus: i64,
    pub used_memory_mb: i64,
    pub used_environments: i64,
    pub used_gpus: i64,
    pub tls: bool,
    #[schema(value_type = Object)]
    pub options: serde_json::Value,
    /// What the host said of itself at its last check: for an agent `version`,
    /// `backend` (`qemu` or `firecracker`), `accel` (`kvm` or `tcg`), `capacity`, `vms` and `running`; for a Docker engine its
    /// `version`, `containers` and `running` (all of the engine's, not only Hearth's); null
    /// for kinds that say nothing.
    #[schema(value_type = Option<Object>)]
    pub report: Option<serde_json::Value>,
    pub created_at: String,
    pub updated_at: String,
}

impl From<&Host> for HostView {
    fn from(h: &Host) -> HostView {
        HostView {
            id: h.id.clone(),
            name: h.name.clone(),
            kind: h.kind,
            endpoint: h.endpoint.clone(),
            guest_address: h.guest_address.clone(),
            region: h.region.clone(),
            gpu_model: h.gpu_model.clone(),
            gpu_count: h.gpu_count,
            status: h.status,
            health: h.health,
            health_message: h.health_message.clone(),
            last_seen_at: opt_time(h.last_seen_at),
            max_vcpus: h.capacity.max_vcpus,
            max_memory_mb: h.capacity.max_memory_mb,
            max_environments: h.capacity.max_environments,
            used_vcpus: h.used_vcpus,
            used_memory_mb: h.used_memory_mb,
            used_environments: h.used_environments,
            used_gpus: h.used_gpus,
            tls: h.tls_key_sealed.is_some(),
            options: h.options.clone(),
            report: h.report.clone(),
            created_at: time(h.created_at),
            updated_at: time(h.updated_at),
        }
    }
}

#[derive(Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct JobView {
    pub id: i64,
    pub queue: String,
    pub kind: String,
    pub environment_id: String,
    /// `queued`, `running`, `succeeded` or `dead`.
    #[schema(pattern = "^(queued|running|succeeded|dead)$")]
    pub state: &'static str,
    pub attempts: i64,
    pub max_attempts: i64,
    pub run_after: String,
    pub lease_owner: Option<String>,
    pub last_error: Option<String>,
    pub actor: String,
    pub created_at: String,
    pub updated_at: String,
}

impl From<&Job> for JobView {
    fn from(j: &Job) -> JobView {
        JobView {
            id: j.id,
            queue: j.queue.clone(),
            kind: j.kind.clone(),
            environment_id: j.environment_id.clone(),
            state: j.state.as_str(),
            attempts: j.attempts,
            max_attempts: j.max_attempts,
            run_after: time(j.run_after),
            lease_owner: j.lease_owner.clone(),
            last_error: j.last_error.clone(),
            actor: j.actor.clone(),
            created_at: time(j.created_at),
            updated_at: time(j.updated_at),
        }
    }
}

/// A page of a list: `nextCursor` is where the next page starts, `null` on the last.
#[derive(Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct Page<T: ToSchema> {
    pub items: Vec<T>,
    pub next_cursor: Option<String>,
}

/// A whole list.
#[derive(Serialize, ToSchema)]
pub struct Items<T: ToSchema> {
    pub items: Vec<T>,
}

/// `GET /v1/me`: the caller, their quota and what of it they use.
#[derive(Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct MeView {
    pub user: UserView,
    pub quota: Quota,
    pub usage: Usage,
    /// Where commands by mail go (`HEARTH_MAIL_ADDRESS`); none when they are off.
    pub mail_agent: Option<String>,
}

/// A port of an environment shared beyond its owner.
#[derive(Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct PortShareView {
    pub id: String,
    pub environment_id: String,
    pub port: i64,
    pub public: bool,
    pub expires_at: String,
    pub created_at: String,
    /// Where visitors go: the proxy's URL for a public share; `/v1/shared/{token}/` for a
    /// token share, in the answer that made it only (null in lists).
    pub url: Option<String>,
    /// The token, in the answer that made the share only.
    pub token: Option<String>,
}

impl PortShareView {
    pub fn new(s: &hearth_store::PortShare, token: Option<String>) -> PortShareView {
        let url = match (&token, s.public) {
            (_, true) => Some(format!(
                "/v1/environments/{}/ports/{}/",
                s.environment_id, s.port
            )),
            (Some(t), false) => Some(format!("/v1/shared/{t}/")),
            (None, false) => None,
        };
        PortShareView {
            id: s.id.clone(),
            environment_id: s.environment_id.clone(),
            port: s.port,
            public: s.public,
            expires_at: time(s.expires_at),
            created_at: time(s.created_at),
            url,
            token,
        }
    }
}

/// A file, directory or link in an environment.
#[derive(Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct FileView {
    pub name: String,
    /// `file`, `directory`, `symlink` or `other`.
    pub kind: String,
    pub size: u64,
    pub modified_at: Option<String>,
    /// The permission bits, as `ls -l` counts them in octal (`0o644` is 420).
    pub mode: u32,
}

impl From<&hearth_app::files::Entry> for FileView {
    fn from(e: &hearth_app::files::Entry) -> FileView {
        FileView {
            name: e.name.clone(),
            kind: e.kind.to_string(),
            size: e.size,
            modified_at: e.modified_at.map(|s| time(s * 1000)),
            mode: e.mode,
        }
    }
}

/// What is at a path: a directory's entries, or a file's own.
#[derive(Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct ListingView {
    pub path: String,
    pub directory: bool,
    pub entries: Vec<FileView>,
    /// A directory's entries past the first 10,000, not listed.
    pub left_out: u64,
}

/// One of the caller's git credentials: never its secret.
#[derive(Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct GitCredentialView {
    pub id: String,
    /// What a create's `gitCredential` names.
    pub name: String,
    /// `https-token` or `ssh-key`.
    pub kind: String,
    pub username: Option<String>,
    pub created_at: String,
}

impl From<&hearth_store::GitCredential> for GitCredentialView {
    fn from(c: &hearth_store::GitCredential) -> GitCredentialView {
        GitCredentialView {
            id: c.id.clone(),
            name: c.name.clone(),
            kind: c.kind.clone(),
            username: c.username.clone(),
            created_at: time(c.created_at),
        }
    }
}

/// One of the caller's API tokens: its id and name, never the token.
#[derive(Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct TokenView {
    /// Names the token for `DELETE /v1/me/tokens/{id}`.
    pub id: String,
    pub name: String,
    pub created_at: String,
    /// To the minute; null when never used.
    pub last_used_at: Option<String>,
}

impl From<&hearth_store::ApiToken> for TokenView {
    fn from(t: &hearth_store::ApiToken) -> TokenView {
        TokenView {
            id: t.id.clone(),
            name: t.name.clone(),
            created_at: time(t.created_at),
            last_used_at: t.last_used_at.map(time),
        }
    }
}

/// A token just made: the token itself is shown this once.
#[derive(Serialize, ToSchema)]
pub struct NewTokenView {
    #[serde(flatten)]
    pub about: TokenView,
    pub token: String,
}

/// A user just made, with their first API token (shown this once).
#[derive(Serialize, ToSchema)]
pub struct NewUserView {
    pub user: UserView,
    pub token: String,
}

/// A user after a change, with the quota now in force and the overrides.
#[derive(Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct UserQuotaView {
    pub user: UserView,
    pub quota: Quota,
    pub quota_overrides: QuotaOverrides,
}

/// The seed's `getAllVms` counts.
#[derive(Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct VmStatsView {
    pub total: usize,
    pub running: usize,
    pub stopped: usize,
    pub provisioning: usize,
    pub error: usize,
    pub vcpus_running: i64,
    pub vcpus_total: i64,
    pub memory_mb_running: i64,
    pub memory_mb_total: i64,
}

impl From<&hearth_app::admin::VmStats> for VmStatsView {
    fn from(s: &hearth_app::admin::VmStats) -> VmStatsView {
        VmStatsView {
            total: s.total,
            running: s.running,
            stopped: s.stopped,
            provisioning: s.provisioning,
            error: s.error,
            vcpus_running: s.vcpus_running,
            vcpus_total: s.vcpus_total,
            memory_mb_running: s.memory_mb_running,
            memory_mb_total: s.memory_mb_total,
        }
    }
}

/// The fleet at one moment: running VMs (personal VMs and environments) and their size,
/// and what hosts hold of what they have.
#[derive(Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct CapacitySampleView {
    pub at: String,
    pub running_vms: i64,
    pub running_vcpus: i64,
    pub running_memory_mb: i64,
    pub used_vcpus: i64,
    pub max_vcpus: i64,
    pub used_memory_mb: i64,
    pub max_memory_mb: i64,
}

impl From<&hearth_store::CapacitySample> for CapacitySampleView {
    fn from(s: &hearth_store::CapacitySample) -> CapacitySampleView {
        CapacitySampleView {
            at: time(s.at),
            running_vms: s.running_vms,
            running_vcpus: s.running_vcpus,
            running_memory_mb: s.running_memory_mb,
            used_vcpus: s.used_vcpus,
            max_vcpus: s.max_vcpus,
            used_memory_mb: s.used_memory_mb,
            max_memory_mb: s.max_memory_mb,
        }
    }
}

/// Samples a bucket apart, oldest first; the last is the fleet now.
#[derive(Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct CapacityView {
    pub interval_seconds: i64,
    pub samples: Vec<CapacitySampleView>,
}

/// The seed's `getAllVms`: every personal VM, the hosts, and counts.
#[derive(Serialize, ToSchema)]
pub struct VmsView {
    pub vms: Vec<UserVm>,
    pub hosts: Vec<HostView>,
    pub stats: VmStatsView,
}

/// Why an environment is kept alive, and until when.
#[derive(Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct ActivityView {
    pub state: EnvState,
    pub last_activity_at: Option<String>,
    pub last_activity_source: Option<String>,
    pub auto_stop_minutes: Option<i64>,
    pub next_auto_stop_at: Option<String>,
    pub expires_at: Option<String>,
    pub reason: String,
}

impl From<&Environment> for ActivityView {
    fn from(env: &Environment) -> ActivityView {
        let last = env
            .last_activity_at
            .or(env.started_at)
            .unwrap_or(env.created_at);
        let next_stop = match (env.state, env.auto_stop_minutes) {
            (EnvState::Running, Some(m)) if m > 0 => Some(time(last + m * 60_000)),
            _ => None,
        };
        let reason = match &next_stop {
            Some(_) => format!(
                "kept running by {} activity; stops after {} idle minutes",
                env.last_activity_source.as_deref().unwrap_or("start"),
                env.auto_stop_minutes.unwrap_or(0)
            ),
            None if env.state == EnvState::Running => {
                "auto-stop is off for this environment".to_string()
            }
            None => format!("the environment is {}", env.state),
        };
        ActivityView {
            state: env.state,
            last_activity_at: opt_time(env.last_activity_at),
            last_activity_source: env.last_activity_source.clone(),
            auto_stop_minutes: env.auto_stop_minutes,
            next_auto_stop_at: next_stop,
            expires_at: opt_time(env.expires_at),
            reason,
        }
    }
}

/// A size a provider offers.
#[derive(Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct FlavorView {
    /// A tier's name for the tiers' sizes; `ovh:<region>:<flavor>` for an OVH flavor.
    pub id: String,
    pub name: String,
    pub provider: HostKind,
    /// "Tier", or OVH's kind of flavor ("General Purpose", "GPU", ...).
    pub type_label: String,
    pub region: Option<String>,
    pub vcpus: i64,
    pub memory_mb: i64,
    pub disk_gb: i64,
    pub gpus: i64,
    pub gpu_model: Option<String>,
}

/// A region of healthy hosts that take new environments.
#[derive(Serialize, ToSchema)]
pub struct RegionView {
    pub id: String,
    pub hosts: i64,
}

/// A terminal ticket for a browser's WebSocket.
#[derive(Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct TicketView {
    pub ticket: String,
    pub expires_in_seconds: i64,
}

/// `{"status": "ok"}`
#[derive(Serialize, ToSchema)]
pub struct HealthView {
    pub status: &'static str,
}

/// Readiness: the database, the hosts as last checked, Redis, and this node.
#[derive(Serialize, ToSchema)]
pub struct ReadyView {
    pub ready: bool,
    pub database: String,
    #[schema(value_type = Object)]
    pub hosts: serde_json::Value,
    pub redis: String,
    pub node: String,
}
