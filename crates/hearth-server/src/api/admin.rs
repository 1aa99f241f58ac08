//! Admin endpoints (role `admin`).

use super::{Admin, Body};
use crate::App;
use crate::error::{ApiError, ApiResult};
use crate::views::{UserView, UserVm};
use axum::Json;
use axum::extract::State;
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
    Ok(Json(json!({ "vms": vms, "hosts": [], "stats": stats })))
}
