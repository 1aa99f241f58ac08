//! Environments: several per user, under quota. Every lookup is scoped by the caller, so
//! someone else's id is a 404 like an id that does not exist.

use super::{Body, Caller, Params};
use crate::App;
use crate::error::{ApiError, ApiResult};
use crate::views::{AuditView, EnvironmentView, ExecView, ExecutionView, LogView, time};
use axum::Json;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use hearth_app::service::{CreateInput, ExecInput, SizeRequest, StreamEvent};
use hearth_core::{EnvState, JobKind};
use hearth_store::{AuditFilter, Environment};
use serde::Deserialize;
use serde_json::{Value, json};
use std::collections::BTreeMap;
use std::time::Duration;

#[derive(Deserialize, Default)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct CreateBody {
    #[serde(default)]
    name: String,
    vcpus: Option<i64>,
    memory_mb: Option<i64>,
    disk_gb: Option<i64>,
    duration_hours: Option<i64>,
    base_image: Option<String>,
    init_script: Option<String>,
    #[serde(default)]
    environment_vars: BTreeMap<String, String>,
    repository_url: Option<String>,
    ssh_public_key: Option<String>,
    provider: Option<String>,
    region: Option<String>,
    gpus: Option<i64>,
    gpu_model: Option<String>,
}

pub async fn create(
    State(app): State<App>,
    Caller(user): Caller,
    Body(b): Body<CreateBody>,
) -> ApiResult<(StatusCode, Json<Value>)> {
    let input = CreateInput {
        name: b.name,
        size: SizeRequest { vcpus: b.vcpus, memory_mb: b.memory_mb, disk_gb: b.disk_gb },
        duration_hours: b.duration_hours,
        base_image: b.base_image,
        init_script: b.init_script,
        environment_vars: b.environment_vars,
        repository_url: b.repository_url,
        ssh_public_key: b.ssh_public_key,
        provider: b.provider,
        region: b.region,
        gpus: b.gpus,
        gpu_model: b.gpu_model,
    };
    let (env, access_token) = app.create_environment(&user, input).await?;
    let mut body = serde_json::to_value(EnvironmentView::from(&env)).unwrap_or_default();
    body["accessToken"] = json!(access_token);
    Ok((StatusCode::ACCEPTED, Json(body)))
}

#[derive(Deserialize, Default)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ListQuery {
    cursor: Option<String>,
    limit: Option<i64>,
    state: Option<String>,
    #[serde(default)]
    include_destroyed: bool,
}

pub fn page_limit(limit: Option<i64>) -> ApiResult<i64> {
    match limit {
        None => Ok(100),
        Some(n) if (1..=1000).contains(&n) => Ok(n),
        Some(n) => Err(ApiError::invalid(format!("limit must be between 1 and 1000, got {n}"))),
    }
}

pub fn parse_state(state: Option<&str>) -> ApiResult<Option<EnvState>> {
    // One state name parser for every query.
    state.map(|s| EnvState::parse(s).ok_or_else(|| ApiError::invalid(format!("unknown state {s:?}")))).transpose()
}

pub async fn list(State(app): State<App>, Caller(user): Caller, Params(q): Params<ListQuery>) -> ApiResult<Json<Value>> {
    let state = parse_state(q.state.as_deref())?;
    let (items, next) = app
        .store
        .list_environments(Some(&user.id), state, q.include_destroyed, q.cursor.as_deref(), page_limit(q.limit)?)
        .await?;
    let items: Vec<EnvironmentView> = items.iter().map(EnvironmentView::from).collect();
    Ok(Json(json!({ "items": items, "nextCursor": next })))
}

pub async fn get(State(app): State<App>, Caller(user): Caller, Path(id): Path<String>) -> ApiResult<Json<EnvironmentView>> {
    Ok(Json(EnvironmentView::from(&app.owned_environment(&user, &id).await?)))
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct WaitQuery {
    state: String,
    timeout_seconds: Option<u64>,
}

/// Returns once the environment reaches `state`; 408 on timeout; 409 if it ended in
/// `error` or `destroyed` instead.
pub async fn wait(
    State(app): State<App>,
    Caller(user): Caller,
    Path(id): Path<String>,
    Params(q): Params<WaitQuery>,
) -> ApiResult<Json<EnvironmentView>> {
    let want = parse_state(Some(&q.state))?.expect("given");
    let timeout = q.timeout_seconds.unwrap_or(60);
    if !(1..=600).contains(&timeout) {
        return Err(ApiError::invalid("timeoutSeconds must be between 1 and 600"));
    }
    let env = app.owned_environment(&user, &id).await?;
    let env = app.wait_for_state(env, want, Duration::from_secs(timeout)).await?;
    Ok(Json(EnvironmentView::from(&env)))
}

async fn control(app: App, user: &hearth_store::User, id: &str, kind: JobKind) -> ApiResult<(StatusCode, Json<EnvironmentView>)> {
    let env = app.owned_environment(user, id).await?;
    app.request(&user.id, &env, kind).await?;
    Ok((StatusCode::ACCEPTED, Json(EnvironmentView::from(&env))))
}

pub async fn start(State(app): State<App>, Caller(user): Caller, Path(id): Path<String>) -> ApiResult<(StatusCode, Json<EnvironmentView>)> {
    control(app, &user, &id, JobKind::Start).await
}

pub async fn stop(State(app): State<App>, Caller(user): Caller, Path(id): Path<String>) -> ApiResult<(StatusCode, Json<EnvironmentView>)> {
    control(app, &user, &id, JobKind::Stop).await
}

pub async fn destroy(State(app): State<App>, Caller(user): Caller, Path(id): Path<String>) -> ApiResult<(StatusCode, Json<EnvironmentView>)> {
    control(app, &user, &id, JobKind::Destroy).await
}

pub async fn exec(
    State(app): State<App>,
    Caller(user): Caller,
    Path(id): Path<String>,
    Body(body): Body<super::me::ExecBody>,
) -> ApiResult<Json<ExecView>> {
    let input: ExecInput = body.into();
    input.validate()?;
    let env = app.owned_environment(&user, &id).await?;
    Ok(Json(ExecView::from(&app.exec(&user, &env, input).await?)))
}

#[derive(Deserialize, Default)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PageQuery {
    cursor: Option<String>,
    limit: Option<i64>,
}

pub async fn executions(
    State(app): State<App>,
    Caller(user): Caller,
    Path(id): Path<String>,
    Params(q): Params<PageQuery>,
) -> ApiResult<Json<Value>> {
    let env = app.owned_environment(&user, &id).await?;
    let (items, next) = app.store.executions_page(&env.id, q.cursor.as_deref(), page_limit(q.limit)?).await?;
    let items: Vec<ExecutionView> = items.iter().map(ExecutionView::from).collect();
    Ok(Json(json!({ "items": items, "nextCursor": next })))
}

pub async fn audit(
    State(app): State<App>,
    Caller(user): Caller,
    Path(id): Path<String>,
    Params(q): Params<PageQuery>,
) -> ApiResult<Json<Value>> {
    let env = app.owned_environment(&user, &id).await?;
    let cursor = super::number_cursor(q.cursor.as_deref())?;
    let filter = AuditFilter { environment_id: Some(env.id.clone()), ..Default::default() };
    let (items, next) = app.store.audit_page(&filter, cursor, page_limit(q.limit)?, true).await?;
    let items: Vec<AuditView> = items.iter().map(AuditView::from).collect();
    Ok(Json(json!({ "items": items, "nextCursor": next.map(|n| n.to_string()) })))
}

pub async fn logs(State(app): State<App>, Caller(user): Caller, Path(id): Path<String>) -> ApiResult<Json<Value>> {
    let env = app.owned_environment(&user, &id).await?;
    let items: Vec<LogView> = app.store.logs(&env.id).await?.iter().map(LogView::from).collect();
    Ok(Json(json!({ "items": items })))
}

/// Why the environment is (or is not) kept alive: last activity, its source, and when
/// the reaper will stop or destroy it.
pub async fn activity(State(app): State<App>, Caller(user): Caller, Path(id): Path<String>) -> ApiResult<Json<Value>> {
    let env = app.owned_environment(&user, &id).await?;
    Ok(Json(activity_view(&env)))
}

pub fn activity_view(env: &Environment) -> Value {
    let last = env.last_activity_at.or(env.started_at).unwrap_or(env.created_at);
    let next_stop = match (env.state, env.auto_stop_minutes) {
        (EnvState::Running, Some(m)) if m > 0 => Some(time(last + m * 60_000)),
        _ => None,
    };
    let reason = match (&next_stop, env.expires_at) {
        (Some(_), _) => format!("kept running by {} activity; stops after {} idle minutes", env.last_activity_source.as_deref().unwrap_or("start"), env.auto_stop_minutes.unwrap_or(0)),
        (None, _) if env.state == EnvState::Running => "auto-stop is off for this environment".to_string(),
        _ => format!("the environment is {}", env.state),
    };
    json!({
        "state": env.state.as_str(),
        "lastActivityAt": env.last_activity_at.map(time),
        "lastActivitySource": env.last_activity_source,
        "autoStopMinutes": env.auto_stop_minutes,
        "nextAutoStopAt": next_stop,
        "expiresAt": env.expires_at.map(time),
        "reason": reason,
    })
}

/// An explicit keep-alive: counts as activity for auto-stop.
pub async fn keepalive(State(app): State<App>, Caller(user): Caller, Path(id): Path<String>) -> ApiResult<Json<Value>> {
    Ok(Json(activity_view(&app.keep_alive(&user, &id).await?)))
}

/// Server-sent events: the current state and recent log, then changes as they happen.
pub async fn events(
    State(app): State<App>,
    Caller(user): Caller,
    Path(id): Path<String>,
    headers: axum::http::HeaderMap,
) -> ApiResult<axum::response::Response> {
    use axum::response::IntoResponse;
    let env = app.owned_environment(&user, &id).await?;
    Ok(event_stream(app, env.id, &headers).into_response())
}

/// Streaming exec: `stdout` and `stderr` events as output is produced, then `exit`.
/// Closing the connection kills the remote process.
pub async fn exec_stream(
    State(app): State<App>,
    Caller(user): Caller,
    Path(id): Path<String>,
    Body(body): Body<super::me::ExecBody>,
) -> ApiResult<axum::response::Response> {
    let input: ExecInput = body.into();
    input.validate()?;
    let env = app.owned_environment(&user, &id).await?;
    let rx = app.exec_stream(&user, &env, input).await?;
    Ok(stream_response(rx))
}

/// The environment's live events as server-sent events, resuming after `Last-Event-ID`.
pub fn event_stream(app: App, environment_id: String, headers: &axum::http::HeaderMap) -> axum::response::Response {
    use axum::response::IntoResponse;
    use axum::response::sse::{Event, KeepAlive, Sse};
    use futures::StreamExt;
    let resume = hearth_app::events::parse_cursor(headers.get("last-event-id").and_then(|v| v.to_str().ok()));
    let events = hearth_app::events::stream(app, environment_id, resume)
        .map(|e| Ok::<_, std::convert::Infallible>(Event::default().event(e.kind).id(e.id).data(e.data.to_string())));
    Sse::new(events).keep_alive(KeepAlive::new().interval(Duration::from_secs(15)).text("ping")).into_response()
}

pub fn stream_response(rx: tokio::sync::mpsc::Receiver<StreamEvent>) -> axum::response::Response {
    use axum::response::IntoResponse;
    use axum::response::sse::{Event, KeepAlive, Sse};
    let events = futures::stream::unfold(rx, |mut rx| async move {
        let e = rx.recv().await?;
        Some((Ok::<_, std::convert::Infallible>(Event::default().event(e.kind).data(e.data.to_string())), rx))
    });
    Sse::new(events).keep_alive(KeepAlive::default()).into_response()
}
