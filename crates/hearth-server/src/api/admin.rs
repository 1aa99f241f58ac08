//! Admin endpoints (role `admin`): users, every VM and environment, jobs, the audit log.

use super::environments::{page_limit, parse_state};
use super::{Admin, Body, Params};
use crate::App;
use crate::error::ApiResult;
use crate::views::{AuditView, EnvironmentView, HostView, JobView, UserView, UserVm};
use axum::Json;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use hearth_store::{AuditFilter, QuotaOverrides};
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
    let (user, token) = app.create_user(&body.email, body.role.as_deref(), body.tier.as_deref()).await?;
    Ok((StatusCode::CREATED, Json(json!({ "user": UserView::from(&user), "token": token }))))
}

pub async fn list_users(State(app): State<App>, Admin(_): Admin) -> ApiResult<Json<Value>> {
    let items: Vec<UserView> = app.store.list_users().await?.iter().map(UserView::from).collect();
    Ok(Json(json!({ "items": items })))
}

/// The seed's `getAllVms`: every personal VM, the hosts, and counts.
pub async fn vms(State(app): State<App>, Admin(_): Admin) -> ApiResult<Json<Value>> {
    let overview = app.vms_overview().await?;
    let vms: Vec<UserVm> = overview.vms.iter().map(UserVm::from).collect();
    let hosts: Vec<HostView> = overview.hosts.iter().map(HostView::from).collect();
    Ok(Json(json!({ "vms": vms, "hosts": hosts, "stats": overview.stats })))
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
    let env = app.admin_destroy(&admin, &id).await?;
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
    let (user, quota, overrides) = app.update_user(&admin, &id, b.tier.as_deref(), b.role.as_deref(), b.quota).await?;
    Ok(Json(json!({ "user": UserView::from(&user), "quota": quota, "quotaOverrides": overrides })))
}

#[derive(Deserialize, Default)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct JobQuery {
    state: Option<String>,
}

pub async fn jobs(State(app): State<App>, Admin(_): Admin, Params(q): Params<JobQuery>) -> ApiResult<Json<Value>> {
    let items: Vec<JobView> = app.jobs(q.state.as_deref()).await?.iter().map(JobView::from).collect();
    Ok(Json(json!({ "items": items })))
}

pub async fn retry_job(State(app): State<App>, Admin(admin): Admin, Path(id): Path<String>) -> ApiResult<(StatusCode, Json<JobView>)> {
    let job = app.retry_job(&admin, &id).await?;
    Ok((StatusCode::ACCEPTED, Json(JobView::from(&job))))
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
