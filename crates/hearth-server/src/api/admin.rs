//! Admin endpoints (role `admin`): users, every VM and environment, jobs, the audit log.

use super::docs::{AdminOnly, Authed, Invalid, Missing, Refused};
use super::environments::page_limit;
use super::{Admin, Body, Params};
use crate::App;
use crate::error::ApiResult;
use crate::views::{
    AuditView, CapacitySampleView, CapacityView, EnvironmentView, HostView, Items, JobView,
    NewUserView, Page, UserQuotaView, UserView, UserVm, VmStatsView, VmsView,
};
use axum::Json;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use hearth_core::{EnvState, Role, Tier};
use hearth_store::{AuditFilter, QuotaOverrides};
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};

#[derive(Deserialize, Default, ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct NewUserBody {
    /// `name@domain`: one `@`, at most 254 characters, no spaces or control characters.
    #[schema(
        min_length = 3,
        max_length = 254,
        pattern = "^[^@\\s\\u0000-\\u001F\\u007F-\\u009F]+@[^@\\s\\u0000-\\u001F\\u007F-\\u009F]+$"
    )]
    email: String,
    role: Option<Role>,
    tier: Option<Tier>,
}

/// Creates a user (free tier and `user` role unless given) with a first API token.
#[utoipa::path(post, path = "/v1/admin/users", tag = "admin", request_body = NewUserBody,
    responses((status = 201, description = "the user and their token, shown this once", body = NewUserView),
        Invalid, Refused, AdminOnly, Authed))]
pub async fn create_user(
    State(app): State<App>,
    Admin(_admin): Admin,
    Body(body): Body<NewUserBody>,
) -> ApiResult<(StatusCode, Json<NewUserView>)> {
    let role = body.role.map(|r| r.as_str());
    let tier = body.tier.map(|t| t.as_str());
    let (user, token) = app.create_user(&body.email, role, tier).await?;
    Ok((
        StatusCode::CREATED,
        Json(NewUserView {
            user: UserView::from(&user),
            token,
        }),
    ))
}

/// Every user.
#[utoipa::path(get, path = "/v1/admin/users", tag = "admin", responses((status = 200, description = "the users", body = Items<UserView>), AdminOnly, Authed))]
pub async fn list_users(
    State(app): State<App>,
    Admin(_admin): Admin,
) -> ApiResult<Json<Items<UserView>>> {
    Ok(Json(Items {
        items: app
            .store
            .list_users()
            .await?
            .iter()
            .map(UserView::from)
            .collect(),
    }))
}

/// Removes a user and what their destroyed environments left; refused (409) while any of
/// their environments is not destroyed, and for the caller themselves.
#[utoipa::path(delete, path = "/v1/admin/users/{id}", tag = "admin", params(("id" = String, Path, description = "user id")),
    responses((status = 204, description = "removed"), Missing, Refused, AdminOnly, Authed))]
pub async fn delete_user(
    State(app): State<App>,
    Admin(admin): Admin,
    Path(id): Path<String>,
) -> ApiResult<StatusCode> {
    app.delete_user(&admin, &id).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// The seed's `getAllVms`: every personal VM, the hosts, and counts.
#[utoipa::path(get, path = "/v1/admin/vms", tag = "admin", responses((status = 200, description = "VMs, hosts, counts", body = VmsView), AdminOnly, Authed))]
pub async fn vms(State(app): State<App>, Admin(_admin): Admin) -> ApiResult<Json<VmsView>> {
    let overview = app.vms_overview().await?;
    Ok(Json(VmsView {
        vms: overview.vms.iter().map(UserVm::from).collect(),
        hosts: overview.hosts.iter().map(HostView::from).collect(),
        stats: VmStatsView::from(&overview.stats),
    }))
}

#[derive(Deserialize, Default, IntoParams)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
#[into_params(parameter_in = Query, rename_all = "camelCase")]
pub struct EnvQuery {
    state: Option<EnvState>,
    user_id: Option<String>,
    cursor: Option<String>,
    #[param(minimum = 1, maximum = 1000)]
    limit: Option<i64>,
    #[serde(default)]
    include_destroyed: bool,
}

#[derive(Deserialize, Default, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct CapacityQuery {
    /// How far back, in hours (default 24).
    #[param(minimum = 1, maximum = 168)]
    hours: Option<i64>,
}

/// What the fleet ran and held over the last hours: a sample per 5 minutes (kept 7 days),
/// then the fleet now. For the admin's chart.
#[utoipa::path(get, path = "/v1/admin/capacity", tag = "admin", params(CapacityQuery),
    responses((status = 200, description = "oldest first", body = CapacityView), Invalid, AdminOnly, Authed))]
pub async fn capacity(
    State(app): State<App>,
    Admin(_admin): Admin,
    Params(q): Params<CapacityQuery>,
) -> ApiResult<Json<CapacityView>> {
    let samples = app.capacity(q.hours.unwrap_or(24)).await?;
    Ok(Json(CapacityView {
        interval_seconds: hearth_store::SAMPLE_MS / 1000,
        samples: samples.iter().map(CapacitySampleView::from).collect(),
    }))
}

/// Live changes to everyone's environments (server-sent events): `changed` at once, then
/// whenever an environment is created, changes state or goes.
#[utoipa::path(get, path = "/v1/admin/events", tag = "admin",
    responses((status = 200, description = "a stream of `changed` events", content_type = "text/event-stream", body = String), AdminOnly, Authed))]
pub async fn events(State(app): State<App>, Admin(_admin): Admin) -> axum::response::Response {
    super::environments::live_response(hearth_app::events::list_stream(app, None))
}

/// Every user's environments, newest first.
#[utoipa::path(get, path = "/v1/admin/environments", tag = "admin", params(EnvQuery),
    responses((status = 200, description = "a page", body = Page<EnvironmentView>), Invalid, AdminOnly, Authed))]
pub async fn environments(
    State(app): State<App>,
    Admin(_admin): Admin,
    Params(q): Params<EnvQuery>,
) -> ApiResult<Json<Page<EnvironmentView>>> {
    let cursor = q.cursor.as_deref().filter(|c| !c.is_empty());
    let (items, next_cursor) = app
        .store
        .list_environments(
            q.user_id.as_deref(),
            q.state,
            q.include_destroyed,
            cursor,
            page_limit(q.limit)?,
        )
        .await?;
    Ok(Json(Page {
        items: items.into_iter().map(EnvironmentView::from).collect(),
        next_cursor,
    }))
}

/// Destroys anyone's environment.
#[utoipa::path(delete, path = "/v1/admin/environments/{id}", tag = "admin", params(("id" = String, Path, description = "environment id")),
    responses((status = 202, description = "a destroy is queued", body = EnvironmentView), Missing, Refused, AdminOnly, Authed))]
pub async fn destroy_environment(
    State(app): State<App>,
    Admin(admin): Admin,
    Path(id): Path<String>,
) -> ApiResult<(StatusCode, Json<EnvironmentView>)> {
    let env = app.admin_destroy(&admin, &id).await?;
    Ok((StatusCode::ACCEPTED, Json(EnvironmentView::from(&env))))
}

#[derive(Deserialize, Default, ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PatchUserBody {
    tier: Option<Tier>,
    role: Option<Role>,
    /// Replaces the overrides; a field left out (or null) means the tier's default.
    quota: Option<QuotaOverrides>,
}

/// One user, the quota in force and the overrides an admin set.
#[utoipa::path(get, path = "/v1/admin/users/{id}", tag = "admin", params(("id" = String, Path, description = "user id")),
    responses((status = 200, description = "the user, the quota in force, the overrides", body = UserQuotaView), Missing, AdminOnly, Authed))]
pub async fn get_user(
    State(app): State<App>,
    Admin(_admin): Admin,
    Path(id): Path<String>,
) -> ApiResult<Json<UserQuotaView>> {
    let (user, quota, quota_overrides) = app.user_quota(&id).await?;
    Ok(Json(UserQuotaView {
        user: UserView::from(&user),
        quota,
        quota_overrides,
    }))
}

/// Changes a user's tier, role or quota overrides.
#[utoipa::path(patch, path = "/v1/admin/users/{id}", tag = "admin", params(("id" = String, Path, description = "user id")),
    request_body(content = Option<PatchUserBody>, description = "what to change; an empty body changes nothing"),
    responses((status = 200, description = "the user, the quota in force, the overrides", body = UserQuotaView), Invalid, Missing, Refused, AdminOnly, Authed))]
pub async fn patch_user(
    State(app): State<App>,
    Admin(admin): Admin,
    Path(id): Path<String>,
    Body(b): Body<PatchUserBody>,
) -> ApiResult<Json<UserQuotaView>> {
    let tier = b.tier.map(|t| t.as_str());
    let role = b.role.map(|r| r.as_str());
    let (user, quota, quota_overrides) = app.update_user(&admin, &id, tier, role, b.quota).await?;
    Ok(Json(UserQuotaView {
        user: UserView::from(&user),
        quota,
        quota_overrides,
    }))
}

#[derive(Deserialize, Default, IntoParams)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct JobQuery {
    #[param(pattern = "^(queued|running|succeeded|dead)$")]
    state: Option<String>,
    /// `nextCursor` of the page before (a number; empty means the first page).
    #[param(pattern = "^[0-9]{0,18}$")]
    cursor: Option<String>,
    #[param(minimum = 1, maximum = 1000)]
    limit: Option<i64>,
}

/// Jobs, newest first, optionally by state: a page (100 unless `limit` says otherwise).
#[utoipa::path(get, path = "/v1/admin/jobs", tag = "admin", params(JobQuery),
    responses((status = 200, description = "a page, newest first", body = Page<JobView>), Invalid, AdminOnly, Authed))]
pub async fn jobs(
    State(app): State<App>,
    Admin(_admin): Admin,
    Params(q): Params<JobQuery>,
) -> ApiResult<Json<Page<JobView>>> {
    let cursor = super::number_cursor(q.cursor.as_deref())?;
    let (items, next) = app
        .jobs(q.state.as_deref(), cursor, page_limit(q.limit)?)
        .await?;
    Ok(Json(Page {
        items: items.iter().map(JobView::from).collect(),
        next_cursor: next.map(|n| n.to_string()),
    }))
}

/// Puts a dead job back in its queue.
#[utoipa::path(post, path = "/v1/admin/jobs/{id}/retry", tag = "admin", params(("id" = String, Path, description = "job id")),
    responses((status = 202, description = "queued again", body = JobView), Missing, Refused, AdminOnly, Authed))]
pub async fn retry_job(
    State(app): State<App>,
    Admin(admin): Admin,
    Path(id): Path<String>,
) -> ApiResult<(StatusCode, Json<JobView>)> {
    let job = app.retry_job(&admin, &id).await?;
    Ok((StatusCode::ACCEPTED, Json(JobView::from(&job))))
}

#[derive(Deserialize, Default, IntoParams)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
#[into_params(parameter_in = Query, rename_all = "camelCase")]
pub struct AuditQuery {
    actor: Option<String>,
    action: Option<String>,
    environment_id: Option<String>,
    outcome: Option<String>,
    /// `nextCursor` of the page before (a number; empty means the first page).
    #[param(pattern = "^[0-9]{0,18}$")]
    cursor: Option<String>,
    #[param(minimum = 1, maximum = 1000)]
    limit: Option<i64>,
}

/// All of the audit log, newest first, filtered by actor, action, environment or outcome.
#[utoipa::path(get, path = "/v1/admin/audit", tag = "admin", params(AuditQuery),
    responses((status = 200, description = "a page", body = Page<AuditView>), Invalid, AdminOnly, Authed))]
pub async fn audit(
    State(app): State<App>,
    Admin(_admin): Admin,
    Params(q): Params<AuditQuery>,
) -> ApiResult<Json<Page<AuditView>>> {
    let cursor = super::number_cursor(q.cursor.as_deref())?;
    let filter = AuditFilter {
        environment_id: q.environment_id,
        actor: q.actor,
        action: q.action,
        outcome: q.outcome,
    };
    let (items, next) = app
        .store
        .audit_page(&filter, cursor, page_limit(q.limit)?, false)
        .await?;
    Ok(Json(Page {
        items: items.iter().map(AuditView::from).collect(),
        next_cursor: next.map(|n| n.to_string()),
    }))
}

/// Hosts by demand: buy agent hosts on OVH when the agent hosts' free vCPUs fall below
/// `freeVcpusBelow` (or fewer than `minHosts` were bought), up to `maxHosts` and within
/// `maxHourlyCost` for all of them (OVH's catalogue price); sell those it bought once empty
/// for `idleSeconds`, never below `minHosts`. Decisions are audited as `system:demand`.
#[derive(Deserialize, Serialize, Default, ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct DemandPolicyBody {
    enabled: bool,
    /// The ovh host (project and region) to buy through, by name or id.
    #[schema(min_length = 1, max_length = 100)]
    via: String,
    #[schema(min_length = 1, max_length = 64, pattern = "^[A-Za-z0-9._-]+$")]
    flavor: String,
    /// The URL bought hosts reach this control plane at.
    #[schema(min_length = 8, max_length = 500)]
    control_plane: String,
    #[schema(minimum = 0, maximum = 100000)]
    free_vcpus_below: i64,
    #[schema(minimum = 0, maximum = 100)]
    min_hosts: i64,
    #[schema(minimum = 0, maximum = 100)]
    max_hosts: i64,
    #[schema(minimum = 0, maximum = 2592000)]
    idle_seconds: i64,
    #[schema(minimum = 0)]
    max_hourly_cost: f64,
}

impl From<DemandPolicyBody> for hearth_app::demand::DemandPolicy {
    fn from(b: DemandPolicyBody) -> Self {
        hearth_app::demand::DemandPolicy {
            enabled: b.enabled,
            via: b.via,
            flavor: b.flavor,
            control_plane: b.control_plane,
            free_vcpus_below: b.free_vcpus_below,
            min_hosts: b.min_hosts,
            max_hosts: b.max_hosts,
            idle_seconds: b.idle_seconds,
            max_hourly_cost: b.max_hourly_cost,
        }
    }
}

impl From<hearth_app::demand::DemandPolicy> for DemandPolicyBody {
    fn from(p: hearth_app::demand::DemandPolicy) -> Self {
        DemandPolicyBody {
            enabled: p.enabled,
            via: p.via,
            flavor: p.flavor,
            control_plane: p.control_plane,
            free_vcpus_below: p.free_vcpus_below,
            min_hosts: p.min_hosts,
            max_hosts: p.max_hosts,
            idle_seconds: p.idle_seconds,
            max_hourly_cost: p.max_hourly_cost,
        }
    }
}

/// The demand policy (404 when none is set).
#[utoipa::path(get, path = "/v1/admin/demand-policy", tag = "hosts",
    responses((status = 200, description = "the policy", body = DemandPolicyBody), Missing, AdminOnly, Authed))]
pub async fn demand_policy(
    State(app): State<App>,
    Admin(_admin): Admin,
) -> ApiResult<Json<DemandPolicyBody>> {
    let p = app
        .demand_policy()
        .await?
        .ok_or(hearth_app::AppError::NotFound("demand policy"))?;
    Ok(Json(p.into()))
}

/// Sets the demand policy; it acts from the next upkeep pass (`HEARTH_REAPER_INTERVAL_MS`).
#[utoipa::path(put, path = "/v1/admin/demand-policy", tag = "hosts", request_body = DemandPolicyBody,
    responses((status = 200, description = "the policy", body = DemandPolicyBody), Invalid, Missing, AdminOnly, Authed))]
pub async fn set_demand_policy(
    State(app): State<App>,
    Admin(admin): Admin,
    Body(b): Body<DemandPolicyBody>,
) -> ApiResult<Json<DemandPolicyBody>> {
    Ok(Json(app.set_demand_policy(&admin, b.into()).await?.into()))
}
