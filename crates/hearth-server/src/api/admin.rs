//! Admin endpoints (role `admin`).

use super::{Admin, Body, Params};
use crate::App;
use crate::error::{ApiError, ApiResult};
use super::environments::{page_limit, parse_state};
use crate::service::JobKind;
use crate::views::{AuditView, EnvironmentView, HostView, JobView, UserView, UserVm};
use axum::Json;
use axum::extract::{Path, State};
use hearth_store::{AuditFilter, JobState, QuotaOverrides, StoreError};
use axum::http::StatusCode;
use hearth_core::{EnvState, Role, Tier};
use serde::Deserialize;
use serde_json::{Value, json};

#[derive(Deserialize, Default)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct NewUserBody {
    email: String,
    role: Option<String>,
    tier: Option<String>,
}

pub async fn create_user(
    State(app): State<App>,
    Admin(_): Admin,
    Body(body): Body<NewUserBody>,
) -> ApiResult<(StatusCode, Json<Value>)> {
    let email = body.email.as_str();
    if email.len() > 254 || !email.contains('@') || email.starts_with('@') || email.ends_with('@') || email.chars().any(|c| c.is_control() || c.is_whitespace()) {
        return Err(ApiError::invalid("email must look like name@domain, without spaces or control characters (at most 254 characters)"));
    }
    let role = match body.role.as_deref() {
        None => Role::User,
        Some(r) => Role::parse(r).ok_or_else(|| ApiError::invalid(format!("role must be user or admin, got {r:?}")))?,
    };
    let tier = match body.tier.as_deref() {
        None => Tier::Free,
        Some(t) => Tier::parse(t).ok_or_else(|| ApiError::invalid(format!("tier must be free, pro or unlimited, got {t:?}")))?,
    };
    let (user, token) = app.store.create_user(email, role, tier).await?;
    Ok((StatusCode::CREATED, Json(json!({ "user": UserView::from(&user), "token": token }))))
}

pub async fn list_users(State(app): State<App>, Admin(_): Admin) -> ApiResult<Json<Value>> {
    let items: Vec<UserView> = app.store.list_users().await?.iter().map(UserView::from).collect();
    Ok(Json(json!({ "items": items })))
}

/// The seed's `getAllVms`: every personal VM, the hosts, and counts.
pub async fn vms(State(app): State<App>, Admin(_): Admin) -> ApiResult<Json<Value>> {
    let envs = app.store.live_environments().await?;
    let personal: Vec<_> = envs.iter().filter(|e| e.personal).collect();
    let count = |s: EnvState| personal.iter().filter(|e| e.state == s).count();
    let running: Vec<_> = personal.iter().filter(|e| e.state == EnvState::Running).collect();
    let stats = json!({
        "total": personal.len(),
        "running": running.len(),
        "stopped": count(EnvState::Stopped),
        "provisioning": personal.iter().filter(|e| matches!(e.state, EnvState::Requested | EnvState::Provisioning)).count(),
        "error": count(EnvState::Error),
        "vcpusRunning": running.iter().map(|e| e.vcpus).sum::<i64>(),
        "vcpusTotal": personal.iter().map(|e| e.vcpus).sum::<i64>(),
        "memoryMbRunning": running.iter().map(|e| e.memory_mb).sum::<i64>(),
        "memoryMbTotal": personal.iter().map(|e| e.memory_mb).sum::<i64>(),
    });
    let vms: Vec<UserVm> = personal.iter().map(|e| UserVm::from(*e)).collect();
    let hosts: Vec<HostView> = app.store.hosts().await?.iter().map(HostView::from).collect();
    Ok(Json(json!({ "vms": vms, "hosts": hosts, "stats": stats })))
}

fn not_found(what: &'static str) -> impl Fn(StoreError) -> ApiError {
    move |e| match e {
        StoreError::NotFound => ApiError::not_found(what),
        other => other.into(),
    }
}

#[derive(Deserialize, Default)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct EnvQuery {
    state: Option<String>,
    user_id: Option<String>,
    cursor: Option<String>,
    limit: Option<i64>,
    #[serde(default)]
    include_destroyed: bool,
}

pub async fn environments(State(app): State<App>, Admin(_): Admin, Params(q): Params<EnvQuery>) -> ApiResult<Json<Value>> {
    let state = parse_state(q.state.as_deref())?;
    let (items, next) = app
        .store
        .list_environments(q.user_id.as_deref(), state, q.include_destroyed, q.cursor.as_deref(), page_limit(q.limit)?)
        .await?;
    let items: Vec<EnvironmentView> = items.iter().map(EnvironmentView::from).collect();
    Ok(Json(json!({ "items": items, "nextCursor": next })))
}

pub async fn destroy_environment(
    State(app): State<App>,
    Admin(admin): Admin,
    Path(id): Path<String>,
) -> ApiResult<(StatusCode, Json<EnvironmentView>)> {
    let env = app.store.environment(&id).await.map_err(not_found("environment"))?;
    app.request(&admin.id, &env, JobKind::Destroy).await?;
    Ok((StatusCode::ACCEPTED, Json(EnvironmentView::from(&env))))
}

#[derive(Deserialize, Default)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PatchUserBody {
    tier: Option<String>,
    role: Option<String>,
    /// Replaces the overrides; a field left out (or null) means the tier's default.
    quota: Option<QuotaOverrides>,
}

pub async fn patch_user(
    State(app): State<App>,
    Admin(admin): Admin,
    Path(id): Path<String>,
    Body(b): Body<PatchUserBody>,
) -> ApiResult<Json<Value>> {
    let user = app.store.user(&id).await.map_err(not_found("user"))?;
    let tier = b.tier.as_deref().map(|t| Tier::parse(t).ok_or_else(|| ApiError::invalid(format!("tier must be free, pro or unlimited, got {t:?}")))).transpose()?;
    let role = b.role.as_deref().map(|r| Role::parse(r).ok_or_else(|| ApiError::invalid(format!("role must be user or admin, got {r:?}")))).transpose()?;
    if let Some(q) = &b.quota {
        for (name, v) in [
            ("maxEnvironments", q.max_environments),
            ("maxConcurrentEnvironments", q.max_concurrent_environments),
            ("maxVcpus", q.max_vcpus),
            ("maxMemoryMb", q.max_memory_mb),
            ("maxDiskGb", q.max_disk_gb),
            ("maxDurationHours", q.max_duration_hours),
        ] {
            if let Some(v) = v {
                if !(0..=10_000_000).contains(&v) {
                    return Err(ApiError::invalid(format!("quota.{name} must be between 0 and 10000000, got {v}")));
                }
            }
        }
    }
    if admin.id == user.id && role == Some(Role::User) {
        return Err(ApiError::invalid_state("an admin cannot take away their own admin role"));
    }
    let user = app.store.set_user_tier_role(&user.id, tier, role).await?;
    if let Some(q) = &b.quota {
        app.store.set_quota_overrides(&user.id, q).await?;
    }
    let _ = app.store.audit(&admin.id, "user_update", None, "success", None, None).await;
    let quota = app.store.quota(&user).await?;
    let overrides = app.store.quota_overrides(&user.id).await?;
    Ok(Json(json!({ "user": UserView::from(&user), "quota": quota, "quotaOverrides": overrides })))
}

#[derive(Deserialize, Default)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct JobQuery {
    state: Option<String>,
}

pub async fn jobs(State(app): State<App>, Admin(_): Admin, Params(q): Params<JobQuery>) -> ApiResult<Json<Value>> {
    let state = q
        .state
        .as_deref()
        .map(|s| JobState::parse(s).ok_or_else(|| ApiError::invalid(format!("state must be queued, running, succeeded or dead, got {s:?}"))))
        .transpose()?;
    let items: Vec<JobView> = app.store.list_jobs(state).await?.iter().map(JobView::from).collect();
    Ok(Json(json!({ "items": items })))
}

pub async fn retry_job(State(app): State<App>, Admin(admin): Admin, Path(id): Path<String>) -> ApiResult<(StatusCode, Json<JobView>)> {
    let id: i64 = id.parse().map_err(|_| ApiError::not_found("job"))?;
    let job = app.store.retry_dead(id, &admin.id).await.map_err(not_found("job"))?;
    app.wake(&job.queue);
    Ok((StatusCode::ACCEPTED, Json(JobView::from(&job))))
}

pub async fn hosts(State(app): State<App>, Admin(_): Admin) -> ApiResult<Json<Value>> {
    let items: Vec<HostView> = app.store.hosts().await?.iter().map(HostView::from).collect();
    Ok(Json(json!({ "items": items })))
}

pub async fn drain_host(State(app): State<App>, Admin(admin): Admin, Path(id): Path<String>) -> ApiResult<Json<HostView>> {
    let host = app.store.set_host_status(&id, "draining").await.map_err(not_found("host"))?;
    let _ = app.store.audit(&admin.id, "host_drain", None, "success", None, None).await;
    Ok(Json(HostView::from(&host)))
}

pub async fn undrain_host(State(app): State<App>, Admin(admin): Admin, Path(id): Path<String>) -> ApiResult<Json<HostView>> {
    let host = app.store.set_host_status(&id, "ready").await.map_err(not_found("host"))?;
    let _ = app.store.audit(&admin.id, "host_ready", None, "success", None, None).await;
    Ok(Json(HostView::from(&host)))
}

#[derive(Deserialize, Default)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct AuditQuery {
    actor: Option<String>,
    action: Option<String>,
    environment_id: Option<String>,
    outcome: Option<String>,
    cursor: Option<String>,
    limit: Option<i64>,
}

/// All of the audit log, newest first, filtered by actor, action, environment or outcome.
pub async fn audit(State(app): State<App>, Admin(_): Admin, Params(q): Params<AuditQuery>) -> ApiResult<Json<Value>> {
    let cursor = super::number_cursor(q.cursor.as_deref())?;
    let filter = AuditFilter { environment_id: q.environment_id, actor: q.actor, action: q.action, outcome: q.outcome };
    let (items, next) = app.store.audit_page(&filter, cursor, page_limit(q.limit)?, false).await?;
    let items: Vec<AuditView> = items.iter().map(AuditView::from).collect();
    Ok(Json(json!({ "items": items, "nextCursor": next.map(|n| n.to_string()) })))
}
