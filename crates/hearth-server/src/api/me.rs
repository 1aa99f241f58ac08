//! The personal VM (the seed's `vm.*` procedures).

use super::{Body, Caller};
use crate::App;
use crate::error::ApiResult;
use crate::views::{ExecView, LogView, UserView, UserVm};
use axum::Json;
use axum::extract::State;
use axum::http::StatusCode;
use hearth_app::service::{ExecInput, SizeRequest};
use hearth_core::JobKind;
use hearth_store::User;
use serde::Deserialize;
use serde_json::{Value, json};

pub async fn me(State(app): State<App>, Caller(user): Caller) -> ApiResult<Json<Value>> {
    let quota = app.store.quota(&user).await?;
    let usage = app.store.usage(&user.id).await?;
    Ok(Json(json!({ "user": UserView::from(&user), "quota": quota, "usage": usage })))
}

pub async fn get_vm(State(app): State<App>, Caller(user): Caller) -> ApiResult<Json<UserVm>> {
    Ok(Json(UserVm::from(&app.personal_vm(&user).await?)))
}

#[derive(Deserialize, Default)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ProvisionBody {
    vcpus: Option<i64>,
    memory_mb: Option<i64>,
    disk_gb: Option<i64>,
}

pub async fn provision(
    State(app): State<App>,
    Caller(user): Caller,
    Body(body): Body<ProvisionBody>,
) -> ApiResult<(StatusCode, Json<UserVm>)> {
    let size = SizeRequest { vcpus: body.vcpus, memory_mb: body.memory_mb, disk_gb: body.disk_gb };
    let (created, env) = app.provision_personal(&user, size).await?;
    let status = if created { StatusCode::ACCEPTED } else { StatusCode::OK };
    Ok((status, Json(UserVm::from(&env))))
}

async fn control(app: App, user: &User, kind: JobKind) -> ApiResult<(StatusCode, Json<UserVm>)> {
    let env = app.personal_vm(user).await?;
    app.request(&user.id, &env, kind).await?;
    Ok((StatusCode::ACCEPTED, Json(UserVm::from(&env))))
}

pub async fn start(State(app): State<App>, Caller(user): Caller) -> ApiResult<(StatusCode, Json<UserVm>)> {
    control(app, &user, JobKind::Start).await
}

pub async fn stop(State(app): State<App>, Caller(user): Caller) -> ApiResult<(StatusCode, Json<UserVm>)> {
    control(app, &user, JobKind::Stop).await
}

pub async fn destroy(State(app): State<App>, Caller(user): Caller) -> ApiResult<(StatusCode, Json<UserVm>)> {
    control(app, &user, JobKind::Destroy).await
}

#[derive(Deserialize, Default)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ExecBody {
    #[serde(default)]
    code: String,
    timeout_seconds: Option<i64>,
    working_dir: Option<String>,
}

impl From<ExecBody> for ExecInput {
    fn from(b: ExecBody) -> ExecInput {
        ExecInput { code: b.code, timeout_seconds: b.timeout_seconds, working_dir: b.working_dir }
    }
}

pub async fn exec(State(app): State<App>, Caller(user): Caller, Body(body): Body<ExecBody>) -> ApiResult<Json<ExecView>> {
    let input: ExecInput = body.into();
    input.validate()?;
    let env = app.personal_vm(&user).await?;
    Ok(Json(ExecView::from(&app.exec(&user, &env, input).await?)))
}

pub async fn logs(State(app): State<App>, Caller(user): Caller) -> ApiResult<Json<Value>> {
    let env = app.personal_vm(&user).await?;
    let items: Vec<LogView> = app.store.logs(&env.id).await?.iter().map(LogView::from).collect();
    Ok(Json(json!({ "items": items })))
}

pub async fn events(State(app): State<App>, Caller(user): Caller, headers: axum::http::HeaderMap) -> ApiResult<axum::response::Response> {
    let env = app.personal_vm(&user).await?;
    Ok(super::environments::event_stream(app, env.id, &headers))
}

pub async fn exec_stream(State(app): State<App>, Caller(user): Caller, Body(body): Body<ExecBody>) -> ApiResult<axum::response::Response> {
    let input: ExecInput = body.into();
    input.validate()?;
    let env = app.personal_vm(&user).await?;
    let rx = app.exec_stream(&user, &env, input).await?;
    Ok(super::environments::stream_response(rx))
}
