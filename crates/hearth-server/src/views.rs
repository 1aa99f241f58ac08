//! The JSON shapes of the API (camelCase, RFC 3339 times), built from store types.

use chrono::{DateTime, SecondsFormat, Utc};
use hearth_store::{Environment, Execution, LogEntry, User};
use serde::Serialize;

pub fn time(ms: i64) -> String {
    DateTime::<Utc>::from_timestamp_millis(ms)
        .unwrap_or_default()
        .to_rfc3339_opts(SecondsFormat::Millis, true)
}

fn opt_time(ms: Option<i64>) -> Option<String> {
    ms.map(time)
}

/// The personal VM: a view of the user's personal environment, never a second status.
#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
pub struct UserVm {
    pub id: String,
    pub user_id: String,
    pub environment_id: String,
    pub status: String,
    pub state_message: Option<String>,
    pub generation: i64,
    pub vcpus: i64,
    pub memory_mb: i64,
    pub disk_gb: i64,
    pub ssh_host: Option<String>,
    pub ssh_port: Option<i64>,
    pub ssh_user: String,
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
            (hearth_core::EnvState::Running, Some(s)) => ((hearth_store::now_ms() - s) / 1000).max(0),
            _ => 0,
        };
        UserVm {
            id: e.id.clone(),
            user_id: e.user_id.clone(),
            environment_id: e.id.clone(),
            status: e.state.to_string(),
            state_message: e.state_message.clone(),
            generation: e.generation,
            vcpus: e.vcpus,
            memory_mb: e.memory_mb,
            disk_gb: e.disk_gb,
            ssh_host: e.ssh_host.clone(),
            ssh_port: e.ssh_port,
            ssh_user: e.ssh_user.clone(),
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

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
pub struct UserView {
    pub id: String,
    pub email: String,
    pub role: &'static str,
    pub tier: &'static str,
    pub created_at: String,
}

impl From<&User> for UserView {
    fn from(u: &User) -> UserView {
        UserView {
            id: u.id.clone(),
            email: u.email.clone(),
            role: u.role.as_str(),
            tier: u.tier.as_str(),
            created_at: time(u.created_at),
        }
    }
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
pub struct LogView {
    pub timestamp: String,
    pub level: String,
    pub message: String,
}

impl From<&LogEntry> for LogView {
    fn from(l: &LogEntry) -> LogView {
        LogView { timestamp: time(l.at), level: l.level.clone(), message: l.message.clone() }
    }
}

#[derive(Serialize)]
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

impl ExecView {
    pub fn from_execution(e: &Execution, stdout: String, stderr: String, truncated: bool) -> ExecView {
        ExecView {
            id: e.id.clone(),
            stdout,
            stderr,
            exit_code: e.exit_code,
            duration_ms: e.duration_ms.unwrap_or(0),
            timed_out: e.status == "timeout",
            truncated,
        }
    }
}
